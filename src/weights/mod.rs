//! Model weights: where they come from, what format they are in, and how they become a
//! [`MidasSmall`] with every parameter set.
//!
//! Accepted: PyTorch `.pt`/`.pth` (a bare state dict, or a checkpoint dict holding it under any
//! key such as `state_dict` or `model`), `.safetensors`, both in upstream MiDaS's key layout,
//! and Burn's `.bpk` burnpack written by `model-import`. The format is read from the file's
//! first bytes, not its name. Any missing, unexpected or wrongly shaped tensor is an error that
//! lists them: a model never runs with some layers left at zero.

mod fetch;
pub mod layout;
pub mod synthetic;

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::store::burn_pack::{DType, Tensor as PackTensor};
use burn::store::{
    ApplyResult, BurnpackStore, FloatCastAdapter, ModuleAdapter, ModuleSnapshot, ModuleStore,
    PyTorchToBurnAdapter, PytorchStore, SafetensorsStore,
};
use serde::Serialize;
use sha2::{Digest, Sha256};

pub use fetch::{FetchOptions, WeightsLocation, fetch};

use crate::model::MidasSmall;

/// How many names an error lists per category before summarising the rest.
const LISTED_NAMES: usize = 12;

/// Everything that can go wrong turning a weights argument into a model.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The argument is not a path, `https://`/`http://` URL or `gs://bucket/object`.
    #[error(
        "invalid weights location {0:?}: expected a file path, an https:// URL or gs://bucket/object"
    )]
    InvalidLocation(String),
    /// The local file does not exist or cannot be read.
    #[error("cannot read weights file {path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
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
    /// The first bytes match none of the supported formats.
    #[error(
        "{path}: unknown weights format (expected a PyTorch .pt/.pth, a .safetensors or a Burn .bpk file)"
    )]
    UnknownFormat {
        /// The file.
        path: PathBuf,
    },
    /// The file is of a known format but could not be parsed.
    #[error("{path}: cannot read {format} file: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The detected format.
        format: WeightsFormat,
        /// The parser's message.
        message: String,
    },
    /// No key looks like MiDaS v2.1 small's.
    #[error(
        "{path}: no MiDaS v2.1 small state dict found (no key ends with '{anchor}'); first keys: {sample}",
        anchor = layout::ANCHOR_KEY
    )]
    NotMidas {
        /// The file.
        path: PathBuf,
        /// A few of the keys that were found.
        sample: String,
    },
    /// Tensors are missing, unexpected or of the wrong shape.
    #[error("{path}: weights do not match MiDaS v2.1 small:{details}")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// One line per category, listing the names.
        details: MismatchDetails,
    },
}

/// The three ways a state dict can disagree with the network, each a list of keys.
#[derive(Debug, Default)]
pub struct MismatchDetails {
    /// Keys the network needs that the file lacks.
    pub missing: Vec<String>,
    /// Keys in the file that the network has no place for.
    pub unexpected: Vec<String>,
    /// Keys present on both sides whose tensors cannot be used (shape or type), with why.
    pub unusable: Vec<String>,
}

impl MismatchDetails {
    fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.unusable.is_empty()
    }
}

impl fmt::Display for MismatchDetails {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (label, names) in [
            ("missing", &self.missing),
            ("unexpected", &self.unexpected),
            ("wrong shape or type", &self.unusable),
        ] {
            if names.is_empty() {
                continue;
            }
            let shown: Vec<&str> = names
                .iter()
                .take(LISTED_NAMES)
                .map(String::as_str)
                .collect();
            write!(f, "\n  {} {label}: {}", names.len(), shown.join(", "))?;
            if names.len() > LISTED_NAMES {
                write!(f, ", ... and {} more", names.len() - LISTED_NAMES)?;
            }
        }
        Ok(())
    }
}

/// A weights file format, detected from its content.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightsFormat {
    /// `torch.save` output: ZIP (PyTorch >= 1.6), legacy pickle stream or TAR.
    Pytorch,
    /// Hugging Face safetensors.
    Safetensors,
    /// Burn's burnpack, as written by `model-import` (Burn's parameter names).
    Burnpack,
}

impl fmt::Display for WeightsFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pytorch => "PyTorch",
            Self::Safetensors => "safetensors",
            Self::Burnpack => "burnpack",
        })
    }
}

impl WeightsFormat {
    /// Detects the format from the first bytes of a file.
    pub fn detect(path: &Path) -> Result<Self, WeightsError> {
        let io_error = |error| WeightsError::Io {
            path: path.to_path_buf(),
            error,
        };
        let mut head = Vec::with_capacity(512);
        File::open(path)
            .map_err(io_error)?
            .take(512)
            .read_to_end(&mut head)
            .map_err(io_error)?;
        let unknown = || WeightsError::UnknownFormat {
            path: path.to_path_buf(),
        };
        if head.starts_with(b"PK\x03\x04") || head.starts_with(&[0x80, 0x02, 0x8a, 0x0a]) {
            return Ok(Self::Pytorch);
        }
        if head.len() >= 262 && &head[257..262] == b"ustar" {
            return Ok(Self::Pytorch);
        }
        if head.starts_with(b"NRUB") {
            return Ok(Self::Burnpack);
        }
        // safetensors: an 8-byte little-endian header length, then the JSON header.
        if head.len() > 8 && head[8] == b'{' {
            let header_len = u64::from_le_bytes(head[..8].try_into().map_err(|_| unknown())?);
            if header_len > 1 && header_len < 100_000_000 {
                return Ok(Self::Safetensors);
            }
        }
        Err(unknown())
    }
}

/// What was loaded, for logs, the welcome page and `model-import`'s summary.
#[derive(Clone, Debug, Serialize)]
pub struct WeightsReport {
    /// Where the weights came from (a path, URL or `gs://` location), or `synthetic`.
    pub source: String,
    /// True for the deterministic formula weights: the model is untrained.
    pub untrained: bool,
    /// The file format; `None` for the synthetic weights.
    pub format: Option<WeightsFormat>,
    /// sha256 of the weights file, hex; `None` for the synthetic weights.
    pub sha256: Option<String>,
    /// Tensors set in the model.
    pub tensors: usize,
    /// Values in the model (parameters and BatchNorm statistics).
    pub parameters: usize,
    /// The key prefix that was removed (`module.`, `state_dict.`, ...), if any.
    pub prefix_stripped: Option<String>,
    /// Upstream keys accepted but not used (BatchNorm counters, refinenet4's first unit).
    pub unused_upstream_keys: usize,
    /// Tensors outside the state dict (optimizer state in a checkpoint, say), ignored.
    pub outside_state_dict: usize,
}

/// The model with the deterministic synthetic weights: what runs when no weights are given.
pub fn untrained(device: &Device) -> (MidasSmall, WeightsReport) {
    let mut model = MidasSmall::new(device);
    let tensors = synthetic::fill(&mut model);
    let report = WeightsReport {
        source: "synthetic".to_string(),
        untrained: true,
        format: None,
        sha256: None,
        tensors,
        parameters: model.num_params(),
        prefix_stripped: None,
        unused_upstream_keys: 0,
        outside_state_dict: 0,
    };
    (model, report)
}

/// Builds the model from `location` (downloaded once into the cache if remote), or the
/// untrained synthetic model when there is no location.
pub async fn load(
    location: Option<&WeightsLocation>,
    options: &FetchOptions,
    key_prefix: Option<&str>,
    device: &Device,
) -> Result<(MidasSmall, WeightsReport), WeightsError> {
    let Some(location) = location else {
        return Ok(untrained(device));
    };
    let path = fetch(location, options).await?;
    let (model, mut report) = load_file(&path, key_prefix, device)?;
    if let (Some(expected), Some(actual)) = (&options.sha256, &report.sha256)
        && !actual.eq_ignore_ascii_case(expected)
    {
        return Err(WeightsError::Checksum {
            location: location.to_string(),
            expected: expected.clone(),
            actual: actual.clone(),
        });
    }
    report.source = location.to_string();
    Ok((model, report))
}

/// Loads a local weights file of any supported format.
///
/// `key_prefix` overrides prefix detection for PyTorch and safetensors files (`Some("")` means
/// the keys have no prefix).
pub fn load_file(
    path: &Path,
    key_prefix: Option<&str>,
    device: &Device,
) -> Result<(MidasSmall, WeightsReport), WeightsError> {
    let format = WeightsFormat::detect(path)?;
    let corrupt = |message: String| WeightsError::Corrupt {
        path: path.to_path_buf(),
        format,
        message,
    };
    let tensors: Vec<PackTensor> = match format {
        WeightsFormat::Pytorch => {
            read_all(PytorchStore::from_file(path).map_indices_contiguous(false))
        }
        WeightsFormat::Safetensors => {
            read_all(SafetensorsStore::from_file(path).map_indices_contiguous(false))
        }
        WeightsFormat::Burnpack => read_all(BurnpackStore::from_file(path)),
    }
    .map_err(corrupt)?;

    let mut model = MidasSmall::new(device);
    let mut report = WeightsReport {
        source: path.display().to_string(),
        untrained: false,
        format: Some(format),
        sha256: Some(sha256_file(path).map_err(|error| WeightsError::Io {
            path: path.to_path_buf(),
            error,
        })?),
        tensors: 0,
        parameters: 0,
        prefix_stripped: None,
        unused_upstream_keys: 0,
        outside_state_dict: 0,
    };

    let (result, details) = if format == WeightsFormat::Burnpack {
        let result = model.apply(tensors, None, None, false);
        let details = mismatch(&result, |name| name.to_string());
        (result, details)
    } else {
        let selected = select_state_dict(path, tensors, key_prefix, &mut report)?;
        let adapter = PyTorchToBurnAdapter.chain(FloatCastAdapter::to(DType::F32));
        let result = model.apply(selected, None, Some(Box::new(adapter)), true);
        let details = mismatch(&result, upstream_name);
        (result, details)
    };
    if !details.is_empty() {
        return Err(WeightsError::Mismatch {
            path: path.to_path_buf(),
            details,
        });
    }
    report.tensors = result.applied.len();
    report.parameters = model.num_params();
    Ok((model, report))
}

/// Reads every tensor of a store (lazily: data stays on disk until applied).
fn read_all(mut store: impl ModuleStore) -> Result<Vec<PackTensor>, String> {
    store
        .get_all_tensors()
        .map(|all| all.values().cloned().collect())
        .map_err(|e| e.to_string())
}

/// Keeps the tensors of the state dict, renamed to Burn's paths; counts what is left out.
fn select_state_dict(
    path: &Path,
    tensors: Vec<PackTensor>,
    key_prefix: Option<&str>,
    report: &mut WeightsReport,
) -> Result<Vec<PackTensor>, WeightsError> {
    let prefix = match key_prefix {
        Some(prefix) => prefix.to_string(),
        None => {
            layout::detect_prefix(tensors.iter().map(|t| t.name.as_str())).ok_or_else(|| {
                let mut names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
                names.sort_unstable();
                names.truncate(5);
                WeightsError::NotMidas {
                    path: path.to_path_buf(),
                    sample: names.join(", "),
                }
            })?
        }
    };
    let mut selected = Vec::with_capacity(tensors.len());
    for mut tensor in tensors {
        let Some(key) = tensor.name.strip_prefix(&prefix) else {
            report.outside_state_dict += 1;
            continue;
        };
        if layout::is_unused_upstream_key(key) {
            report.unused_upstream_keys += 1;
            continue;
        }
        tensor.name = layout::to_burn(key);
        selected.push(tensor);
    }
    report.prefix_stripped = (!prefix.is_empty()).then_some(prefix);
    Ok(selected)
}

/// The upstream key a Burn path is loaded from, for error messages about upstream files.
fn upstream_name(burn_path: &str) -> String {
    let upstream = layout::to_upstream(burn_path);
    match upstream.rsplit_once('.') {
        Some((parent, "gamma")) => format!("{parent}.weight"),
        Some((parent, "beta")) => format!("{parent}.bias"),
        _ => upstream,
    }
}

fn mismatch(result: &ApplyResult, name: impl Fn(&str) -> String) -> MismatchDetails {
    let mut details = MismatchDetails {
        missing: result.missing.iter().map(|(path, _)| name(path)).collect(),
        unexpected: result.unused.iter().map(|path| name(path)).collect(),
        unusable: result.errors.iter().map(ToString::to_string).collect(),
    };
    details.missing.sort();
    details.unexpected.sort();
    details
}

/// Writes the model's parameters as a burnpack (Burn's native format: parameter names as the
/// model uses them, so loading needs no remapping), refusing to replace an existing file.
pub fn save_burnpack(
    model: &MidasSmall,
    path: &Path,
    metadata: &[(&str, &str)],
) -> Result<(), WeightsError> {
    let mut store = BurnpackStore::from_file(path).auto_extension(false);
    for (key, value) in metadata {
        store = store.metadata(*key, *value);
    }
    model
        .save_into(&mut store)
        .map_err(|e| WeightsError::Corrupt {
            path: path.to_path_buf(),
            format: WeightsFormat::Burnpack,
            message: e.to_string(),
        })
}

/// sha256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut file = File::open(path)?;
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buffer)? {
            0 => return Ok(hex(&hasher.finalize())),
            n => hasher.update(&buffer[..n]),
        }
    }
}

/// Lowercase hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
