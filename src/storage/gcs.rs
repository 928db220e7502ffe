//! Google Cloud Storage through the official `google-cloud-storage` client.
//!
//! On Cloud Run the client uses Application Default Credentials. For local runs and tests,
//! `STORAGE_EMULATOR_HOST` (as the other Google SDKs read it) points it at an emulator with
//! anonymous credentials; the crate does not read that variable itself.
//!
//! Every upload is a resumable upload fed by a channel, so the request body goes to the bucket
//! while it arrives, a transient error is retried from the client's buffer without replaying the
//! request, and an abandoned upload is never finalised: no object appears. Retries are short
//! and every call is bounded in time (the crate's defaults retry for minutes).

use std::time::Duration;

use bytes::Bytes;
use google_cloud_auth::credentials::{CacheableResource, Credentials};
use google_cloud_gax::exponential_backoff::ExponentialBackoffBuilder;
use google_cloud_gax::retry_policy::{RetryPolicy, RetryPolicyExt};
use google_cloud_gax::retry_result::RetryResult;
use google_cloud_gax::retry_state::RetryState;
use google_cloud_storage::client::Storage;
use google_cloud_storage::read_object::ReadObjectResponse;
use google_cloud_storage::read_resume_policy::{ReadResumePolicyExt, Recommended};
use google_cloud_storage::streaming_source::StreamingSource;
use tokio::sync::{mpsc, oneshot};

use super::{Piece, StoreError};

/// The environment variable naming an emulator endpoint (`host:port` or a URL).
pub const EMULATOR_ENV: &str = "STORAGE_EMULATOR_HOST";

/// Attempts per call before an error is final.
const ATTEMPTS: u32 = 3;

/// Bytes buffered by a resumable upload (also the unit a retry can resend).
const UPLOAD_BUFFER: usize = 8 << 20;

fn unavailable(error: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(error.to_string())
}

/// The JSON API's host when no emulator is named.
const DEFAULT_ENDPOINT: &str = "https://storage.googleapis.com";

/// Objects per page of a listing (the API's maximum).
const LIST_PAGE: &str = "1000";

/// A configured Cloud Storage client.
#[derive(Clone, Debug)]
pub struct Client {
    storage: Storage,
    /// The same credentials the storage client uses, for the listing calls made over the JSON
    /// API: the crate lists objects only over gRPC, which the emulators do not serve.
    credentials: Credentials,
    http: reqwest::Client,
    timeout: Duration,
    endpoint: Option<String>,
}

/// An object found by [`Client::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedObject {
    /// Full object name in the bucket.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
}

impl Client {
    /// A client for the emulator named by `STORAGE_EMULATOR_HOST`, or for Cloud Storage with
    /// Application Default Credentials; every call gives up after `timeout`.
    pub async fn from_env(timeout: Duration) -> Result<Self, StoreError> {
        crate::tls::install_crypto_provider();
        let backoff = ExponentialBackoffBuilder::new()
            .with_initial_delay(Duration::from_millis(100))
            .with_maximum_delay(Duration::from_secs(2))
            .build()
            .map_err(unavailable)?;
        let mut builder = Storage::builder()
            .with_retry_policy(
                HttpStatusOnly
                    .with_attempt_limit(ATTEMPTS)
                    .with_time_limit(timeout),
            )
            .with_read_resume_policy(Recommended.with_attempt_limit(ATTEMPTS))
            .with_backoff_policy(backoff)
            .with_resumable_upload_threshold(0usize)
            .with_resumable_upload_buffer_size(UPLOAD_BUFFER);
        let endpoint = std::env::var(EMULATOR_ENV)
            .ok()
            .filter(|v| !v.is_empty())
            .map(|host| {
                if host.contains("://") {
                    host
                } else {
                    format!("http://{host}")
                }
            });
        let credentials = match &endpoint {
            Some(_) => google_cloud_auth::credentials::anonymous::Builder::new().build(),
            None => google_cloud_auth::credentials::Builder::default()
                .build()
                .map_err(|e| {
                    StoreError::Unavailable(format!("no Google Cloud credentials: {e}"))
                })?,
        };
        builder = builder.with_credentials(credentials.clone());
        if let Some(endpoint) = &endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let storage = tokio::time::timeout(timeout, builder.build())
            .await
            .map_err(|_| StoreError::Timeout(timeout))?
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot create the Cloud Storage client: {e}"))
            })?;
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(unavailable)?;
        Ok(Self {
            storage,
            credentials,
            http,
            timeout,
            endpoint,
        })
    }

    /// Every object of `bucket` whose name starts with `prefix`, in the API's (lexicographic)
    /// order, a page at a time; each page's request is bounded by the client's timeout.
    pub async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<ListedObject>, StoreError> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Page {
            #[serde(default)]
            items: Vec<Item>,
            next_page_token: Option<String>,
        }
        #[derive(serde::Deserialize)]
        struct Item {
            name: String,
            // The JSON API sends 64-bit integers as strings.
            size: String,
        }
        let endpoint = self.endpoint.as_deref().unwrap_or(DEFAULT_ENDPOINT);
        let url = format!("{endpoint}/storage/v1/b/{bucket}/o");
        let failed = |e: &dyn std::fmt::Display| {
            StoreError::Unavailable(format!("listing gs://{bucket}/{prefix}: {e}"))
        };
        let mut objects = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let headers = match self.credentials.headers(http::Extensions::new()).await {
                Ok(CacheableResource::New { data, .. }) => data,
                Ok(CacheableResource::NotModified) => http::HeaderMap::new(),
                Err(e) => return Err(failed(&e)),
            };
            let mut query = vec![
                ("prefix", prefix),
                ("maxResults", LIST_PAGE),
                ("fields", "items(name,size),nextPageToken"),
            ];
            if let Some(token) = &token {
                query.push(("pageToken", token));
            }
            let request = self.http.get(&url).headers(headers).query(&query).send();
            let response = tokio::time::timeout(self.timeout, request)
                .await
                .map_err(|_| StoreError::Timeout(self.timeout))?
                .map_err(|e| failed(&e))?;
            let status = response.status();
            if status == reqwest::StatusCode::NOT_FOUND {
                return Err(StoreError::NotFound(format!("gs://{bucket}")));
            }
            if !status.is_success() {
                return Err(failed(&format!("HTTP {status}")));
            }
            let page: Page = tokio::time::timeout(self.timeout, response.json())
                .await
                .map_err(|_| StoreError::Timeout(self.timeout))?
                .map_err(|e| failed(&e))?;
            for item in page.items {
                let size = item.size.parse().map_err(|e| failed(&e))?;
                objects.push(ListedObject {
                    name: item.name,
                    size,
                });
            }
            match page.next_page_token {
                Some(next) if !next.is_empty() => token = Some(next),
                _ => return Ok(objects),
            }
        }
    }

    /// Opens an object for reading.
    pub async fn read(&self, bucket: &str, object: &str) -> Result<ObjectReader, StoreError> {
        let request = self.storage.read_object(bucket_path(bucket), object).send();
        let response = tokio::time::timeout(self.timeout, request)
            .await
            .map_err(|_| StoreError::Timeout(self.timeout))?
            .map_err(|e| match e.http_status_code() {
                Some(404) => StoreError::NotFound(format!("gs://{bucket}/{object}")),
                _ => StoreError::Unavailable(format!("gs://{bucket}/{object}: {}", describe(&e))),
            })?;
        Ok(ObjectReader {
            response,
            timeout: self.timeout,
        })
    }
}

/// Retries only failures the service answered with a retryable HTTP status.
///
/// google-cloud-storage 1.21 drops the unacknowledged chunk of a resumable upload when it
/// retries a transport error (no HTTP status), finalising a truncated object; such errors are
/// therefore final here, and the request fails with a 503 instead of storing a corrupt object.
#[derive(Debug)]
struct HttpStatusOnly;

impl RetryPolicy for HttpStatusOnly {
    fn on_error(&self, state: &RetryState, error: google_cloud_storage::Error) -> RetryResult {
        match error.http_status_code() {
            Some(408 | 429 | 500..=599) if state.idempotent => RetryResult::Continue(error),
            _ => RetryResult::Permanent(error),
        }
    }
}

/// The resource name the API expects for a bucket.
fn bucket_path(bucket: &str) -> String {
    format!("projects/_/buckets/{bucket}")
}

/// The client's error with its HTTP status, which is what tells "no such bucket" from "down".
fn describe(error: &google_cloud_storage::Error) -> String {
    match error.http_status_code() {
        Some(status) => format!("HTTP {status}: {error}"),
        None => error.to_string(),
    }
}

/// An object being read.
#[derive(Debug)]
pub struct ObjectReader {
    response: ReadObjectResponse,
    timeout: Duration,
}

impl ObjectReader {
    /// The object's size in bytes.
    pub fn size(&self) -> Option<u64> {
        u64::try_from(self.response.object().size).ok()
    }

    /// The next chunk of the object, `None` at the end.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, StoreError> {
        match tokio::time::timeout(self.timeout, self.response.next()).await {
            Err(_) => Err(StoreError::Timeout(self.timeout)),
            Ok(None) => Ok(None),
            Ok(Some(chunk)) => chunk.map(Some).map_err(|e| unavailable(describe(&e))),
        }
    }
}

/// Objects under `gs://bucket/prefix/`.
#[derive(Clone, Debug)]
pub struct GcsStore {
    client: Client,
    bucket: String,
    prefix: String,
}

impl GcsStore {
    /// Connects and checks that the bucket answers, so a wrong bucket or an unreachable
    /// endpoint stops start-up with a clear message.
    pub async fn open(bucket: &str, prefix: &str, timeout: Duration) -> Result<Self, StoreError> {
        let client = Client::from_env(timeout).await?;
        let store = Self {
            client,
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        };
        let probe = store.object_name(".midas-serve-probe");
        match store.client.read(bucket, &probe).await {
            Ok(_) => {}
            // The probe object does not exist: the service answered, which is what this checks. (A
            // missing bucket answers 404 too; the data-plane API cannot tell them apart, so that
            // shows up as 503s on the first uploads, with the bucket named in the log.)
            Err(StoreError::NotFound(_)) => {}
            Err(StoreError::Unavailable(message)) => {
                let endpoint = store
                    .client
                    .endpoint
                    .as_deref()
                    .unwrap_or("storage.googleapis.com");
                return Err(StoreError::Unavailable(format!(
                    "bucket {bucket} at {endpoint} is not usable: {message}"
                )));
            }
            Err(other) => return Err(other),
        }
        Ok(store)
    }

    /// `gs://bucket/prefix`.
    pub fn describe(&self) -> String {
        match &self.prefix {
            prefix if prefix.is_empty() => format!("gs://{}", self.bucket),
            prefix => format!("gs://{}/{prefix}", self.bucket),
        }
    }

    /// `prefix/name`, the object's name in the bucket.
    pub fn object_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.prefix)
        }
    }

    /// Every object under the prefix, named relative to it, in name order.
    pub async fn list(&self) -> Result<Vec<ListedObject>, StoreError> {
        let prefix = match self.prefix.as_str() {
            "" => String::new(),
            prefix => format!("{prefix}/"),
        };
        let mut objects = self.client.list(&self.bucket, &prefix).await?;
        for object in &mut objects {
            object.name.drain(..prefix.len());
        }
        objects.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(objects)
    }

    /// Opens object `name` (relative to the prefix) for reading in chunks.
    pub async fn open_object(&self, name: &str) -> Result<ObjectReader, StoreError> {
        self.client
            .read(&self.bucket, &self.object_name(name))
            .await
    }

    /// How long one call may take.
    pub fn timeout(&self) -> Duration {
        self.client.timeout
    }

    /// Where `other` lies inside this store, as a name prefix, if it does.
    pub fn prefix_of(&self, other: &GcsStore) -> Option<String> {
        if self.bucket != other.bucket {
            return None;
        }
        if self.prefix.is_empty() {
            return Some(other.prefix.clone());
        }
        match other.prefix.strip_prefix(&self.prefix) {
            Some("") => Some(String::new()),
            Some(rest) => rest.strip_prefix('/').map(str::to_string),
            None => None,
        }
    }

    /// Streams an object's pieces into a resumable upload; commits on [`Piece::Finish`] only.
    pub(super) async fn write(
        self,
        name: String,
        pieces: mpsc::Receiver<Piece>,
    ) -> Result<u64, StoreError> {
        let object = self.object_name(&name);
        let (ended, end_signal) = oneshot::channel();
        let source = ChannelSource {
            pieces,
            bytes: 0,
            ended: Some(ended),
        };
        let upload = self
            .client
            .storage
            .write_object(bucket_path(&self.bucket), object.clone(), source)
            .set_if_generation_match(0)
            .send_buffered();
        tokio::pin!(upload);
        let timeout = self.client.timeout;
        // While the client sends, the upload goes at its pace; once the last byte has been
        // handed over, committing it may take at most the store timeout.
        let result = tokio::select! {
            result = &mut upload => result,
            Ok(()) = end_signal => match tokio::time::timeout(timeout, &mut upload).await {
                Ok(result) => result,
                Err(_) => return Err(StoreError::Timeout(timeout)),
            },
        };
        match result {
            Ok(stored) => Ok(u64::try_from(stored.size).unwrap_or_default()),
            Err(error) if error.http_status_code() == Some(412) => Err(StoreError::Exists(object)),
            Err(error) if caused_by_cancel(&error) => Err(StoreError::Cancelled),
            Err(error) => Err(StoreError::Unavailable(format!(
                "gs://{}/{object}: {}",
                self.bucket,
                describe(&error)
            ))),
        }
    }
}

/// Whether `error`, or an error it wraps, is the source's [`Cancelled`].
fn caused_by_cancel(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if error.is::<Cancelled>() {
            return true;
        }
        current = error.source();
    }
    false
}

/// The error a source returns when its writer went away before finishing.
#[derive(Debug, thiserror::Error)]
#[error("upload cancelled by the writer")]
struct Cancelled;

/// The upload's data: pieces from the request handler, ending at [`Piece::Finish`].
struct ChannelSource {
    pieces: mpsc::Receiver<Piece>,
    bytes: u64,
    ended: Option<oneshot::Sender<()>>,
}

impl StreamingSource for ChannelSource {
    type Error = Cancelled;

    async fn next(&mut self) -> Option<Result<Bytes, Self::Error>> {
        match self.pieces.recv().await {
            Some(Piece::Chunk(chunk)) => {
                self.bytes += chunk.len() as u64;
                Some(Ok(chunk))
            }
            Some(Piece::Finish) => {
                if let Some(ended) = self.ended.take() {
                    let _ = ended.send(());
                }
                None
            }
            // The writer dropped its end without finishing: fail so nothing is committed.
            None => Some(Err(Cancelled)),
        }
    }
}
