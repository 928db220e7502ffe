//! Where uploads and predictions are kept: a local directory (plain disk, or a bucket mounted as
//! Cloud Run does for the original service) or Google Cloud Storage through its official client.
//!
//! Both stores take an object as a stream of chunks and make it visible only once the whole
//! stream has arrived and been committed: an upload that is abandoned (a refused image, a client
//! that went away) leaves nothing behind, and an existing object is never overwritten.

pub mod gcs;
mod local;

use std::fmt;
use std::time::{Duration, SystemTime};

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
        Ok(Self::Local(LocalStore::open(spec.into()).await?))
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
        Ok(Self::Local(LocalStore::existing(spec.into()).await?))
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
                })
                .collect()),
        }
    }

    /// Reads object `name` whole; one above `max_bytes` is refused before its body is read.
    pub async fn read(&self, name: &str, max_bytes: u64) -> Result<Bytes, StoreError> {
        match self {
            Self::Local(store) => store.read(name, max_bytes).await,
            Self::Gcs(store) => store.read(name, max_bytes).await,
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
            sender,
            task,
            name: name.to_string(),
            bytes: 0,
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
#[derive(Debug)]
pub struct Upload {
    sender: mpsc::Sender<Piece>,
    task: JoinHandle<Result<u64, StoreError>>,
    name: String,
    bytes: u64,
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

    /// Appends a chunk (waits while the store is behind).
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        self.bytes += chunk.len() as u64;
        if self.sender.send(Piece::Chunk(chunk)).await.is_err() {
            // The writer stopped early: its result says why.
            return Err(self.failure().await);
        }
        Ok(())
    }

    async fn failure(&mut self) -> StoreError {
        match (&mut self.task).await {
            Ok(Err(error)) => error,
            Ok(Ok(_)) | Err(_) => StoreError::Cancelled,
        }
    }

    /// Commits the object; returns its size once it is durably stored.
    pub async fn finish(mut self) -> Result<u64, StoreError> {
        if self.sender.send(Piece::Finish).await.is_err() {
            return Err(self.failure().await);
        }
        drop(self.sender);
        self.task.await.map_err(|_| StoreError::Cancelled)?
    }

    /// Abandons the object: nothing is stored. (Dropping an `Upload` does the same.)
    pub async fn abort(self) {
        drop(self.sender);
        let _ = self.task.await;
    }
}

/// The object names of one request: `uploads/YYYY/MM/DD/<id>-<name>` and
/// `predictions/YYYY/MM/DD/<id>.<ext>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectNames {
    /// Where the uploaded image goes.
    pub input: String,
    /// Where the prediction goes.
    pub output: String,
}

/// Longest file-name part of an object name (extension included).
const MAX_NAME_CHARS: usize = 100;

impl ObjectNames {
    /// Names for request `request_id`, uploaded as `file_name`, producing `extension`.
    pub fn new(request_id: &str, file_name: &str, extension: &str, now: SystemTime) -> Self {
        let date = date_path(now);
        Self {
            input: format!("uploads/{date}/{request_id}-{}", sanitise(file_name)),
            output: format!("predictions/{date}/{request_id}.{extension}"),
        }
    }
}

/// `YYYY/MM/DD` in UTC.
fn date_path(now: SystemTime) -> String {
    let datetime = time::OffsetDateTime::from(now);
    format!(
        "{:04}/{:02}/{:02}",
        datetime.year(),
        u8::from(datetime.month()),
        datetime.day()
    )
}

/// A client's file name made safe as the last part of an object name: only ASCII letters,
/// digits, `.`, `-` and `_` (anything else becomes `_`), no leading dots (so no `..`), at most
/// [`MAX_NAME_CHARS`] characters keeping the extension, never empty.
pub fn sanitise(file_name: &str) -> String {
    // Browsers may send a full path; only its last component is a name.
    let base = file_name.rsplit(['/', '\\']).next().unwrap_or_default();
    let cleaned: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let cleaned = cleaned.trim_start_matches('.');
    let cleaned = if cleaned.len() > MAX_NAME_CHARS {
        let extension = cleaned
            .rsplit_once('.')
            .map(|(_, e)| e)
            .filter(|e| e.len() < 10)
            .unwrap_or("");
        let keep = MAX_NAME_CHARS - extension.len() - 1;
        format!("{}.{extension}", &cleaned[..keep])
    } else {
        cleaned.to_string()
    };
    if cleaned.is_empty() {
        "upload".to_string()
    } else {
        cleaned
    }
}

impl fmt::Display for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_sanitised() {
        assert_eq!(sanitise("photo.jpg"), "photo.jpg");
        assert_eq!(sanitise("../../etc/passwd"), "passwd");
        assert_eq!(sanitise("..\\..\\x.png"), "x.png");
        assert_eq!(sanitise("..."), "upload");
        assert_eq!(sanitise("a\nb\u{0}c é.png"), "a_b_c__.png");
        let long = format!("{}.jpeg", "x".repeat(500));
        let short = sanitise(&long);
        assert_eq!(short.len(), MAX_NAME_CHARS);
        assert!(short.ends_with("x.jpeg"));
    }

    #[test]
    fn object_names_carry_date_and_id() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_028_800); // 2025-11-25
        let names = ObjectNames::new("abc", "my photo.png", "png", now);
        assert_eq!(names.input, "uploads/2025/11/25/abc-my_photo.png");
        assert_eq!(names.output, "predictions/2025/11/25/abc.png");
    }
}
