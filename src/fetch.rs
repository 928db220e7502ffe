//! Weights from where the flags say: a path, an `https://` URL, `gs://bucket/object` or a
//! model's name (upstream's release file), downloaded at most once into a cache and verified
//! against a pinned sha256, then loaded by [`midas_model::weights`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use midas_model::backend::Device;
use midas_model::model::{MIDAS_RELEASES, ModelKind, Network, published_weights};
use midas_model::weights::{self, WeightsError, WeightsReport, hex, sha256_file};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::storage::gcs;

/// Why weights could not be fetched and loaded.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The argument is not a path, `https://`/`http://` URL or `gs://bucket/object`.
    #[error(
        "invalid weights location {0:?}: expected a file path, an https:// URL or gs://bucket/object"
    )]
    InvalidLocation(String),
    /// Downloading from a URL or bucket failed.
    #[error("cannot download weights from {location}: {message}")]
    Download {
        /// The URL or `gs://` location.
        location: String,
        /// What went wrong.
        message: String,
    },
    /// The file's sha256 differs from the pinned one.
    #[error("weights sha256 mismatch for {location}: expected {expected}, got {actual}")]
    Checksum {
        /// The URL, bucket object or path.
        location: String,
        /// The pinned digest.
        expected: String,
        /// The file's digest.
        actual: String,
    },
    /// The file is there but is not usable weights.
    #[error(transparent)]
    Weights(#[from] WeightsError),
}

/// Where weights come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WeightsLocation {
    /// A local file (or a mounted bucket).
    Path(PathBuf),
    /// An `https://` (or plain `http://`, for internal mirrors) URL.
    Url(String),
    /// An object in Google Cloud Storage.
    Gcs {
        /// Bucket name.
        bucket: String,
        /// Object name.
        object: String,
    },
}

impl FromStr for WeightsLocation {
    type Err = FetchError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || FetchError::InvalidLocation(redact_url(text));
        if let Some(rest) = text.strip_prefix("gs://") {
            let (bucket, object) = rest.split_once('/').ok_or_else(invalid)?;
            if bucket.is_empty() || object.is_empty() {
                return Err(invalid());
            }
            return Ok(Self::Gcs {
                bucket: bucket.to_string(),
                object: object.to_string(),
            });
        }
        if text.starts_with("https://") || text.starts_with("http://") {
            let url = reqwest::Url::parse(text).map_err(|_| invalid())?;
            if url.host_str().is_none_or(str::is_empty) {
                return Err(invalid());
            }
            return Ok(Self::Url(text.to_string()));
        }
        if text.is_empty() || text.contains("://") {
            return Err(invalid());
        }
        Ok(Self::Path(PathBuf::from(text)))
    }
}

/// `--weights-mirror`'s default: each publisher's own downloads (MiDaS's release downloads
/// stand for them all).
pub const UPSTREAM_RELEASES: &str = MIDAS_RELEASES;

impl WeightsLocation {
    /// A published file's bare name (`midas_v21_small_256`, `dpt_hybrid_384`,
    /// `depth_anything_v2_vits`, ...) stands for upstream's download of it, under `mirror` when
    /// one replaces [`UPSTREAM_RELEASES`], unless a file of that name exists: a path keeps
    /// meaning the file.
    pub fn resolve_named(self, mirror: &str) -> Self {
        let Self::Path(path) = &self else {
            return self;
        };
        let named = published_weights()
            .into_iter()
            .find(|weights| path.as_os_str() == weights.name.as_str());
        match named {
            Some(weights) if !path.exists() => {
                let root = if mirror == UPSTREAM_RELEASES {
                    weights.root
                } else {
                    mirror
                };
                Self::Url(format!("{}/{}", root.trim_end_matches('/'), weights.path))
            }
            _ => self,
        }
    }
}

/// A URL as it may be shown: without user information, query or fragment, which can carry
/// credentials (a signed URL's signature, a token); what was removed is marked `<redacted>`.
pub fn redact_url(text: &str) -> String {
    let Ok(mut url) = reqwest::Url::parse(text) else {
        // Not a URL: show only its scheme, if any, since the rest cannot be told apart.
        return match text.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://<redacted>"),
            None => "<redacted>".to_string(),
        };
    };
    let had_secret = !url.username().is_empty() || url.password().is_some();
    let had_query = url.query().is_some() || url.fragment().is_some();
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_query(None);
    url.set_fragment(None);
    let mut shown = url.to_string();
    if had_secret {
        shown = shown.replacen("://", "://<redacted>@", 1);
    }
    if had_query {
        shown.push_str("?<redacted>");
    }
    shown
}

impl fmt::Display for WeightsLocation {
    /// Shown in logs, on `/` and `/readyz`: URLs are redacted (see [`redact_url`]).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Path(path) => write!(f, "{}", path.display()),
            Self::Url(url) => f.write_str(&redact_url(url)),
            Self::Gcs { bucket, object } => write!(f, "gs://{bucket}/{object}"),
        }
    }
}

/// Settings for [`fetch`].
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// Directory downloaded weights are kept in.
    pub cache_dir: PathBuf,
    /// Expected sha256 (hex) of the file; a cached copy that differs is downloaded again.
    pub sha256: Option<String>,
}

/// How long a download may stall before it is abandoned.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A download logs its progress every this many bytes.
const PROGRESS_EVERY: u64 = 8 << 20;

impl WeightsLocation {
    /// The cache file for a remote location: a hash of the location plus its file name.
    fn cache_path(&self, cache_dir: &Path) -> PathBuf {
        let text = self.to_string();
        let digest = hex(&Sha256::digest(text.as_bytes()));
        let name = text
            .rsplit('/')
            .next()
            .filter(|n| !n.is_empty())
            .unwrap_or("weights");
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || ".-_".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        cache_dir.join(format!("{}-{safe}", &digest[..16]))
    }
}

/// Returns a local file holding the weights: the path itself, or the cached download (made now
/// if absent, or if a pinned sha256 does not match the cached copy).
pub async fn fetch(
    location: &WeightsLocation,
    options: &FetchOptions,
) -> Result<PathBuf, FetchError> {
    let path = match location {
        WeightsLocation::Path(path) => {
            if !path.is_file() {
                let error = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
                return Err(WeightsError::Io {
                    path: path.clone(),
                    error,
                }
                .into());
            }
            return Ok(path.clone());
        }
        remote => remote.cache_path(&options.cache_dir),
    };
    if path.is_file() {
        match &options.sha256 {
            None => {
                tracing::info!(location = %location, path = %path.display(), "using cached weights");
                return Ok(path);
            }
            Some(expected) => {
                let actual = sha256_file(&path).map_err(|error| WeightsError::Io {
                    path: path.clone(),
                    error,
                })?;
                if actual.eq_ignore_ascii_case(expected) {
                    tracing::info!(location = %location, path = %path.display(), "using cached weights (sha256 verified)");
                    return Ok(path);
                }
                tracing::warn!(location = %location, "cached weights do not match the pinned sha256; downloading again");
            }
        }
    }
    let download_error = |message: String| FetchError::Download {
        location: location.to_string(),
        message,
    };
    tokio::fs::create_dir_all(&options.cache_dir)
        .await
        .map_err(|e| {
            download_error(format!(
                "cannot create cache directory {}: {e}",
                options.cache_dir.display()
            ))
        })?;
    let partial = path.with_extension("partial");
    let result = download(location, &partial).await.map_err(download_error);
    let digest = match result {
        Ok(digest) => digest,
        Err(error) => {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(error);
        }
    };
    if let Some(expected) = &options.sha256
        && !digest.eq_ignore_ascii_case(expected)
    {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(FetchError::Checksum {
            location: location.to_string(),
            expected: expected.clone(),
            actual: digest,
        });
    }
    tokio::fs::rename(&partial, &path)
        .await
        .map_err(|e| download_error(format!("cannot move the download into the cache: {e}")))?;
    Ok(path)
}

/// Builds the model from `location` (downloaded once into the cache if remote), or the
/// untrained synthetic model of `kind` (MiDaS small if `None`) when there is no location.
pub async fn load(
    location: Option<&WeightsLocation>,
    options: &FetchOptions,
    key_prefix: Option<&str>,
    kind: Option<ModelKind>,
    device: &Device,
) -> Result<(Network, WeightsReport), FetchError> {
    let Some(location) = location else {
        return Ok(weights::untrained(
            kind.unwrap_or(ModelKind::MidasV21Small256),
            device,
        ));
    };
    let path = fetch(location, options).await?;
    // Hashing and parsing read the whole file: seconds of blocking work, done where the
    // runtime moves its other tasks off this thread (a multi-threaded runtime is required).
    let loaded = tokio::task::block_in_place(|| match &options.sha256 {
        Some(expected) => weights::load_verified(&path, expected, key_prefix, kind, device),
        None => weights::load_file(&path, key_prefix, kind, device),
    });
    let (model, mut report) = loaded.map_err(|error| match error {
        // Named by where the file came from, not by its place in the cache.
        WeightsError::Checksum {
            expected, actual, ..
        } => FetchError::Checksum {
            location: location.to_string(),
            expected,
            actual,
        },
        other => other.into(),
    })?;
    report.source = location.to_string();
    Ok((model, report))
}

/// Streams a remote location into `target`, logging progress; returns the sha256.
async fn download(location: &WeightsLocation, target: &Path) -> Result<String, String> {
    let mut file = tokio::fs::File::create(target)
        .await
        .map_err(|e| format!("cannot create {}: {e}", target.display()))?;
    let mut hasher = Sha256::new();
    let mut progress = Progress::new(location);
    let mut write = async |chunk: &[u8], total: Option<u64>| -> Result<(), String> {
        hasher.update(chunk);
        file.write_all(chunk)
            .await
            .map_err(|e| format!("cannot write {}: {e}", target.display()))?;
        progress.add(chunk.len() as u64, total);
        Ok(())
    };
    match location {
        WeightsLocation::Url(url) => {
            crate::tls::install_crypto_provider();
            let client = reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .read_timeout(STALL_TIMEOUT)
                .build()
                .map_err(|e| e.to_string())?;
            let response = client.get(url).send().await.map_err(describe_reqwest)?;
            let status = response.status();
            if !status.is_success() {
                return Err(format!("the server answered {status}"));
            }
            let total = response.content_length();
            let mut body = response.bytes_stream();
            while let Some(chunk) = body.next().await {
                write(&chunk.map_err(describe_reqwest)?, total).await?;
            }
        }
        WeightsLocation::Gcs { bucket, object } => {
            let client = gcs::Client::from_env(STALL_TIMEOUT)
                .await
                .map_err(|e| e.to_string())?;
            let mut reader = client
                .read(bucket, object)
                .await
                .map_err(|e| e.to_string())?;
            let total = reader.size();
            while let Some(chunk) = reader.next_chunk().await.map_err(|e| e.to_string())? {
                write(&chunk, total).await?;
            }
        }
        WeightsLocation::Path(path) => {
            return Err(format!("{} is local and needs no download", path.display()));
        }
    }
    file.flush().await.map_err(|e| e.to_string())?;
    file.sync_all().await.map_err(|e| e.to_string())?;
    progress.done();
    Ok(hex(&hasher.finalize()))
}

/// reqwest's error with its causes, which carry the useful part ("connection refused"), and
/// without the URL, which may carry credentials (the location is reported redacted beside it).
fn describe_reqwest(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut message = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// Logs a download's progress every few megabytes.
struct Progress {
    location: String,
    received: u64,
    next_report: u64,
    started: Instant,
}

impl Progress {
    fn new(location: &WeightsLocation) -> Self {
        tracing::info!(location = %location, "downloading weights");
        Self {
            location: location.to_string(),
            received: 0,
            next_report: PROGRESS_EVERY,
            started: Instant::now(),
        }
    }

    fn add(&mut self, bytes: u64, total: Option<u64>) {
        self.received += bytes;
        if self.received >= self.next_report {
            self.next_report += PROGRESS_EVERY;
            let percent =
                total.map(|t| format!("{:.0}%", 100.0 * self.received as f64 / t.max(1) as f64));
            tracing::info!(
                location = %self.location,
                received_mib = self.received >> 20,
                total_mib = total.map(|t| t >> 20),
                percent = percent.as_deref().unwrap_or("?"),
                "downloading weights"
            );
        }
    }

    fn done(&self) {
        let seconds = self.started.elapsed().as_secs_f64();
        tracing::info!(
            location = %self.location,
            bytes = self.received,
            seconds = format!("{seconds:.1}"),
            "download complete"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_credentials() {
        let signed =
            "https://user:pw@storage.example.com/w/model.ckpt?X-Goog-Signature=abc123#frag";
        let shown = WeightsLocation::from_str(signed).unwrap().to_string();
        assert_eq!(
            shown,
            "https://<redacted>@storage.example.com/w/model.ckpt?<redacted>"
        );
        for secret in ["user", "pw", "abc123", "Signature", "frag"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert_eq!(
            redact_url("https://example.com/model.pt"),
            "https://example.com/model.pt"
        );
        let invalid = WeightsLocation::from_str("https://?token=secret").unwrap_err();
        assert!(!invalid.to_string().contains("secret"), "{invalid}");
    }
}
