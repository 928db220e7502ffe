//! Where uploads and predictions are kept: a local directory (plain disk, or a bucket mounted as
//! Cloud Run does for the original service) or Google Cloud Storage through its official client.
//!
//! Both stores take an object as a stream of chunks and make it visible only once the whole
//! stream has arrived and been committed: an upload that is abandoned (a refused image, a client
//! that went away) leaves nothing behind, and an existing object is never overwritten.

pub mod gcs;
mod local;

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use local::{LocalStore, PARTIAL_PREFIX};

/// How many chunks may wait between the request handler and the store's writer.
const PIPE_DEPTH: usize = 8;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or refused the operation.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The store took longer than allowed.
    #[error("storage timed out after {0:?}")]
    Timeout(Duration),
    /// The object exists already (names carry a request id, so this signals a bug or a clash).
    #[error("object {0} exists already")]
    Exists(String),
    /// The object does not exist (or its bucket does not).
    #[error("object {0} not found")]
    NotFound(String),
    /// The writer stopped before the upload was finished.
    #[error("the upload was cancelled")]
    Cancelled,
    /// The object is larger than the reader accepts.
    #[error("object {name} is {size} bytes, above the limit of {limit}")]
    TooLarge {
        /// The object's name.
        name: String,
        /// Its size (or the bytes seen when it outgrew the limit).
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The object is there but is not something to read: not a regular file (a FIFO, a
    /// device, a socket), unreadable by this process, a symbolic link that loops or leads
    /// nowhere, a name that is not UTF-8. It is that object's own failure, not the store's.
    #[error("object {name} cannot be read ({code}): {reason}")]
    Unreadable {
        /// The object's name (lossy where it is not UTF-8).
        name: String,
        /// A machine-readable reason: `not_regular_file`, `permission_denied`, ...
        code: &'static str,
        /// What was found.
        reason: String,
    },
    /// The store specification is malformed.
    #[error("invalid store {0:?}: expected a directory or gs://BUCKET[/PREFIX]")]
    InvalidSpec(String),
}

/// A configured store.
#[derive(Clone, Debug)]
pub enum Store {
    /// A directory.
    Local(LocalStore),
    /// A Cloud Storage bucket.
    Gcs(Box<gcs::GcsStore>),
}

impl Store {
    /// Opens the store `spec` names (a directory, or `gs://BUCKET[/PREFIX]`) and checks that it
    /// can be written, so a misconfigured store stops start-up instead of failing every request.
    pub async fn open(spec: &str, timeout: Duration) -> Result<Self, StoreError> {
        if let Some(rest) = spec.strip_prefix("gs://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(StoreError::InvalidSpec(spec.to_string()));
            }
            let store = gcs::GcsStore::open(bucket, prefix.trim_matches('/'), timeout).await?;
            return Ok(Self::Gcs(Box::new(store)));
        }
        if spec.is_empty() || spec.contains("://") {
            return Err(StoreError::InvalidSpec(spec.to_string()));
        }
        Ok(Self::Local(LocalStore::open(spec.into(), timeout).await?))
    }

    /// Connects to the store `spec` names without writing to it, for stores that are only
    /// read: a directory must exist; a bucket must answer.
    pub async fn connect(spec: &str, timeout: Duration) -> Result<Self, StoreError> {
        if spec.starts_with("gs://") {
            return Self::open(spec, timeout).await;
        }
        if spec.is_empty() || spec.contains("://") {
            return Err(StoreError::InvalidSpec(spec.to_string()));
        }
        Ok(Self::Local(
            LocalStore::existing(spec.into(), timeout).await?,
        ))
    }

    /// Every object in the store, named relative to its root, in name order (objects still
    /// being written are not listed).
    pub async fn list(&self) -> Result<Vec<Listed>, StoreError> {
        match self {
            Self::Local(store) => store.list().await,
            Self::Gcs(store) => Ok(store
                .list()
                .await?
                .into_iter()
                .map(|o| Listed {
                    name: o.name,
                    size: o.size,
                    unreadable: None,
                })
                .collect()),
        }
    }

    /// Opens object `name` for reading in chunks (for streaming it to a client).
    pub async fn open_object(&self, name: &str) -> Result<ObjectStream, StoreError> {
        let timeout = self.timeout();
        let opened = async {
            Ok(match self {
                Self::Local(store) => {
                    let (file, size) = store.open_object(name).await?;
                    ObjectStream {
                        source: Source::Local(file),
                        size: Some(size),
                        timeout,
                    }
                }
                Self::Gcs(store) => {
                    let reader = store.open_object(name).await?;
                    // A read does not always carry the object's size (the emulators leave it
                    // at 0); no object this service stores is empty, so 0 means unknown.
                    ObjectStream {
                        size: reader.size().filter(|&size| size > 0),
                        source: Source::Gcs(Box::new(reader)),
                        timeout,
                    }
                }
            })
        };
        tokio::time::timeout(timeout, opened)
            .await
            .map_err(|_| StoreError::Timeout(timeout))?
    }

    /// Reads object `name` whole; one above `max_bytes` is refused before its body is read.
    pub async fn read(&self, name: &str, max_bytes: u64) -> Result<Bytes, StoreError> {
        let mut object = self.open_object(name).await?;
        let too_large = |size| StoreError::TooLarge {
            name: name.to_string(),
            size,
            limit: max_bytes,
        };
        let size = object.size().unwrap_or_default();
        if size > max_bytes {
            return Err(too_large(size));
        }
        let mut data = bytes::BytesMut::with_capacity(size as usize);
        while let Some(chunk) = object.next_chunk().await? {
            data.extend_from_slice(&chunk);
            if data.len() as u64 > max_bytes {
                return Err(too_large(data.len() as u64));
            }
        }
        Ok(data.freeze())
    }

    /// How long one call on an object may take before it counts as failed.
    pub fn timeout(&self) -> Duration {
        match self {
            Self::Local(store) => store.timeout(),
            Self::Gcs(store) => store.timeout(),
        }
    }

    /// Where `other` lies inside this store, as a name prefix ("" when both are the same
    /// place), or `None` when it lies elsewhere.
    pub fn prefix_of(&self, other: &Store) -> Option<String> {
        match (self, other) {
            (Self::Local(outer), Self::Local(inner)) => outer.prefix_of(inner),
            (Self::Gcs(outer), Self::Gcs(inner)) => outer.prefix_of(inner),
            _ => None,
        }
    }

    /// `gs://bucket/prefix` or the directory, for logs and the welcome page.
    pub fn describe(&self) -> String {
        match self {
            Self::Local(store) => store.root().display().to_string(),
            Self::Gcs(store) => store.describe(),
        }
    }

    /// The full object name of `name` inside the bucket or directory (with the GCS prefix).
    pub fn object_key(&self, name: &str) -> String {
        match self {
            Self::Local(_) => name.to_string(),
            Self::Gcs(store) => store.object_name(name),
        }
    }

    /// Starts writing `name`; the object appears when [`Upload::finish`] succeeds.
    pub fn begin(&self, name: &str) -> Upload {
        let (sender, receiver) = mpsc::channel(PIPE_DEPTH);
        let task = match self {
            Self::Local(store) => tokio::spawn(store.clone().write(name.to_string(), receiver)),
            Self::Gcs(store) => tokio::spawn((**store).clone().write(name.to_string(), receiver)),
        };
        Upload {
            sender: Some(sender),
            task: Some(task),
            name: name.to_string(),
            bytes: 0,
            timeout: self.timeout(),
        }
    }
}

/// An object found by [`Store::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// Its name relative to the store's root, `/`-separated.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Set when the entry was found but cannot be read as an object (see
    /// [`StoreError::Unreadable`]): listed so that it is reported, never silently left out.
    pub unreadable: Option<(&'static str, String)>,
}

/// What flows from the writer of an object to the store.
#[derive(Debug)]
pub enum Piece {
    /// More bytes.
    Chunk(Bytes),
    /// The object is complete: commit it. A channel that closes without this aborts the upload.
    Finish,
}

/// An object being written.
///
/// Every call is bounded by the store's timeout, and an upload that is dropped before
/// [`Upload::finish`] succeeds is aborted on the spot: its writer task is cancelled, so an early
/// return anywhere in a caller can neither commit a partial object nor leave a task behind.
#[derive(Debug)]
pub struct Upload {
    /// `None` once [`Upload::finish`] has handed over the end of the object.
    sender: Option<mpsc::Sender<Piece>>,
    /// `None` once awaited.
    task: Option<JoinHandle<Result<u64, StoreError>>>,
    name: String,
    bytes: u64,
    timeout: Duration,
}

impl Upload {
    /// The object's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes handed over so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Appends a chunk, waiting while the store is behind, but no longer than the store's
    /// timeout: a store that stops taking data is a store failure, not a slow client.
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        self.bytes += chunk.len() as u64;
        let Some(sender) = &self.sender else {
            return Err(StoreError::Cancelled);
        };
        match tokio::time::timeout(self.timeout, sender.send(Piece::Chunk(chunk))).await {
            Ok(Ok(())) => Ok(()),
            // The writer stopped early: its result says why.
            Ok(Err(_)) => Err(self.outcome().await.err().unwrap_or(StoreError::Cancelled)),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }

    /// The writer task's result, waited for at most the store's timeout.
    async fn outcome(&mut self) -> Result<u64, StoreError> {
        let Some(task) = self.task.as_mut() else {
            return Err(StoreError::Cancelled);
        };
        let result = match tokio::time::timeout(self.timeout, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(StoreError::Cancelled),
            Err(_) => return Err(StoreError::Timeout(self.timeout)),
        };
        self.task = None;
        result
    }

    /// Commits the object; returns its size once it is durably stored, or fails after the
    /// store's timeout (the object is then not committed by this upload).
    pub async fn finish(mut self) -> Result<u64, StoreError> {
        if let Some(sender) = self.sender.take() {
            match tokio::time::timeout(self.timeout, sender.send(Piece::Finish)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    return Err(self.outcome().await.err().unwrap_or(StoreError::Cancelled));
                }
                Err(_) => return Err(StoreError::Timeout(self.timeout)),
            }
        }
        self.outcome().await
    }

    /// Abandons the object: nothing is stored. Returns at once (dropping does the same).
    pub fn abort(self) {
        drop(self);
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// An object being read, chunk by chunk; each chunk is bounded by the store's timeout.
#[derive(Debug)]
pub struct ObjectStream {
    source: Source,
    size: Option<u64>,
    timeout: Duration,
}

#[derive(Debug)]
enum Source {
    Local(tokio::fs::File),
    Gcs(Box<gcs::ObjectReader>),
}

/// Bytes read from a local file per chunk: small, as a response streamed from it holds a few
/// of them per client (64 KiB, the server's response chunk).
const READ_CHUNK: usize = 64 * 1024;

impl ObjectStream {
    /// The object's size in bytes, when the store said.
    pub fn size(&self) -> Option<u64> {
        self.size
    }

    /// The next chunk, `None` at the end.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, StoreError> {
        match &mut self.source {
            Source::Gcs(reader) => reader.next_chunk().await,
            Source::Local(file) => {
                let mut buffer = bytes::BytesMut::with_capacity(READ_CHUNK);
                let read = tokio::time::timeout(
                    self.timeout,
                    tokio::io::AsyncReadExt::read_buf(file, &mut buffer),
                )
                .await
                .map_err(|_| StoreError::Timeout(self.timeout))?
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                Ok((read > 0).then(|| buffer.freeze()))
            }
        }
    }
}

/// `N` random bytes from the operating system, as lowercase hex. Should the system's source
/// fail, the bytes come from the standard library's per-process random hash keys and a
/// counter instead: still unpredictable to a client, never a panic.
pub fn random_hex<const N: usize>() -> String {
    let mut bytes = [0u8; N];
    if getrandom::fill(&mut bytes).is_err() {
        use std::hash::{BuildHasher, Hasher};
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let keys = std::collections::hash_map::RandomState::new();
        for (i, chunk) in bytes.chunks_mut(8).enumerate() {
            let mut hasher = keys.build_hasher();
            hasher.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
            hasher.write_usize(i);
            let value = hasher.finish().to_le_bytes();
            chunk.copy_from_slice(&value[..chunk.len()]);
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl fmt::Display for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}
