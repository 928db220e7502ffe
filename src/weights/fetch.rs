//! Turning a weights location (path, URL, `gs://`) into a local file, downloading at most once.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::WeightsError;

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
    type Err = WeightsError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || WeightsError::InvalidLocation(text.to_string());
        if let Some(rest) = text.strip_prefix("gs://") {
            let (bucket, object) = rest.split_once('/').ok_or_else(invalid)?;
            if bucket.is_empty() || object.is_empty() {
                return Err(invalid());
            }
            return Ok(Self::Gcs { bucket: bucket.to_string(), object: object.to_string() });
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

impl fmt::Display for WeightsLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Path(path) => write!(f, "{}", path.display()),
            Self::Url(url) => f.write_str(url),
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

impl WeightsLocation {
    /// The cache file for a remote location: a hash of the location plus its file name.
    fn cache_path(&self, cache_dir: &Path) -> PathBuf {
        let text = self.to_string();
        let digest = super::hex(&<sha2::Sha256 as sha2::Digest>::digest(text.as_bytes()));
        let name = text.rsplit('/').next().filter(|n| !n.is_empty()).unwrap_or("weights");
        let safe: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || ".-_".contains(c) { c } else { '_' }).collect();
        cache_dir.join(format!("{}-{safe}", &digest[..16]))
    }
}
