//! Model weights: what format a file is in, which network it is for,
//! and how they become a [`Network`] with every parameter set.
//!
//! Accepted: PyTorch `.pt`/`.pth`/`.ckpt` (a bare state dict, or a checkpoint dict holding it
//! under any key such as `state_dict` or `model`, a PyTorch Lightning checkpoint included),
//! `.safetensors`, both in upstream MiDaS's key layout, and Burn's `.bpk` burnpack written by
//! `model-import`. The format is read from the file's first bytes, not its name; the network
//! from the keys. A checkpoint's tensors are read lazily: only the state dict's records are
//! ever read from the file, so a Lightning checkpoint's optimizer state (twice the weights)
//! costs nothing. Any missing, unexpected or wrongly shaped tensor is an error that lists them:
//! a model never runs with some layers left at zero.

pub mod layout;
mod standardise;
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

use crate::model::{MetricDataset, ModelKind, Network, VitSize};

/// How many names an error lists per category before summarising the rest.
const LISTED_NAMES: usize = 12;

/// Everything that can go wrong turning a weights argument into a model.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The local file does not exist or cannot be read.
    #[error("cannot read weights file {path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
    /// The file's sha256 differs from the pinned one.
    #[error("weights sha256 mismatch for {location}: expected {expected}, got {actual}")]
    Checksum {
        /// Where the file came from (its path, or the URL it was downloaded from).
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
    /// No key looks like any model's.
    #[error(
        "{path}: no MiDaS or Depth Anything V2 state dict found (no key ends with '{small}' (midas_v21_small_256), '{dpt}' (dpt_hybrid_384) or '{depth_anything}' (depth_anything_v2_*)); first keys: {sample}",
        small = layout::anchor_key(ModelKind::MidasV21Small256),
        dpt = layout::anchor_key(ModelKind::DptHybrid384),
        depth_anything = layout::anchor_key(ModelKind::ALL[2])
    )]
    NotMidas {
        /// The file.
        path: PathBuf,
        /// A few of the keys that were found.
        sample: String,
    },
    /// `--model` names a network the weights are not for.
    #[error("{path}: --model {requested} was asked for, but the weights are {found}")]
    WrongModel {
        /// The file.
        path: PathBuf,
        /// The network asked for.
        requested: ModelKind,
        /// What the keys look like instead.
        found: String,
    },
    /// Tensors are missing, unexpected or of the wrong shape.
    #[error("{path}: weights do not match {model}:{details}")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// The network the keys were recognised as.
        model: ModelKind,
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
    /// The network the weights are for.
    pub model: ModelKind,
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
    /// Upstream keys accepted but not used (BatchNorm counters, refinenet4's first unit, DPT's
    /// final LayerNorm and classifier).
    pub unused_upstream_keys: usize,
    /// Tensors outside the state dict (optimizer state in a checkpoint, say), ignored.
    pub outside_state_dict: usize,
    /// A metric model's largest depth in metres, where the file says it (a `.bpk`'s metadata,
    /// or the data set a `.pth`'s name mentions); `None` otherwise and for relative models.
    pub max_depth: Option<f32>,
}

/// The model with the deterministic synthetic weights: what runs when no weights are given.
pub fn untrained(kind: ModelKind, device: &Device) -> (Network, WeightsReport) {
    let mut network = Network::new(kind, device);
    let tensors = synthetic::state_dict(&network)
        .into_iter()
        .map(|mut tensor| {
            tensor.name = layout::to_burn(&tensor.name);
            tensor
        })
        .collect();
    let result = apply_upstream(&mut network, tensors);
    debug_assert!(mismatch(&result, layout::upstream_key).is_empty());
    let report = WeightsReport {
        model: kind,
        source: "synthetic".to_string(),
        untrained: true,
        format: None,
        sha256: None,
        tensors: result.applied.len(),
        parameters: network.num_params(),
        prefix_stripped: None,
        unused_upstream_keys: 0,
        outside_state_dict: 0,
        max_depth: None,
    };
    (network, report)
}

/// A file's state dict, recognised, selected and renamed to Burn's paths, before it meets a
/// network. The tensors' data is still on disk: it is read when applied.
pub struct StateDict {
    /// The file's format.
    pub format: WeightsFormat,
    /// The network the keys are for.
    pub model: ModelKind,
    /// The state dict's tensors, named by Burn's parameter paths.
    pub tensors: Vec<PackTensor>,
    /// The key prefix that was removed (empty for none).
    pub prefix: String,
    /// Upstream keys accepted but not used.
    pub unused_upstream_keys: usize,
    /// Tensors outside the state dict (a checkpoint's optimizer state, say), never read.
    pub outside_state_dict: usize,
    /// A metric model's largest depth in metres, where the file says it.
    pub max_depth: Option<f32>,
}

/// Reads a weights file's keys and selects its state dict.
///
/// `key_prefix` overrides prefix detection for PyTorch and safetensors files (`Some("")` means
/// the keys have no prefix); `kind` overrides recognising the network from the keys (an error
/// if the keys are another network's). Given both, they are trusted as they are.
pub fn read_state_dict(
    path: &Path,
    key_prefix: Option<&str>,
    kind: Option<ModelKind>,
) -> Result<StateDict, WeightsError> {
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
    if format == WeightsFormat::Burnpack {
        let metadata = BurnpackMetadata::read(path).map_err(corrupt)?;
        let found = recognise_burnpack(&tensors, metadata.model);
        let model = check_requested(path, kind, found, &tensors)?;
        return Ok(StateDict {
            format,
            model,
            tensors,
            prefix: String::new(),
            unused_upstream_keys: 0,
            outside_state_dict: 0,
            max_depth: metadata.max_depth.filter(|_| model.is_metric()),
        });
    }
    let (model, prefix) = match (key_prefix, kind) {
        (Some(prefix), Some(kind)) => (kind, prefix.to_string()),
        _ => recognise_upstream(path, key_prefix, kind, &tensors)?,
    };
    let max_depth = path
        .file_name()
        .and_then(|name| MetricDataset::from_file_name(&name.to_string_lossy()))
        .map(MetricDataset::max_depth)
        .filter(|_| model.is_metric());
    let mut state_dict = StateDict {
        format,
        model,
        tensors: Vec::with_capacity(tensors.len()),
        prefix,
        unused_upstream_keys: 0,
        outside_state_dict: 0,
        max_depth,
    };
    for mut tensor in tensors {
        let Some(key) = tensor.name.strip_prefix(&state_dict.prefix) else {
            state_dict.outside_state_dict += 1;
            continue;
        };
        if layout::is_unused_upstream_key(key) {
            state_dict.unused_upstream_keys += 1;
            continue;
        }
        tensor.name = layout::to_burn(key);
        state_dict.tensors.push(tensor);
    }
    Ok(state_dict)
}

/// Loads a local weights file of any supported format (see [`read_state_dict`] for the
/// arguments).
pub fn load_file(
    path: &Path,
    key_prefix: Option<&str>,
    kind: Option<ModelKind>,
    device: &Device,
) -> Result<(Network, WeightsReport), WeightsError> {
    load_hashed(path, hash_file(path)?, key_prefix, kind, device)
}

/// [`load_file`] for a file whose sha256 is pinned to `expected` (hex, any case): the digest is
/// verified before a byte of the file is parsed, so a file that is not what was pinned is
/// never read as weights.
pub fn load_verified(
    path: &Path,
    expected: &str,
    key_prefix: Option<&str>,
    kind: Option<ModelKind>,
    device: &Device,
) -> Result<(Network, WeightsReport), WeightsError> {
    let sha256 = hash_file(path)?;
    if !sha256.eq_ignore_ascii_case(expected) {
        return Err(WeightsError::Checksum {
            location: path.display().to_string(),
            expected: expected.to_string(),
            actual: sha256,
        });
    }
    load_hashed(path, sha256, key_prefix, kind, device)
}

/// [`sha256_file`] with the error naming the file.
fn hash_file(path: &Path) -> Result<String, WeightsError> {
    sha256_file(path).map_err(|error| WeightsError::Io {
        path: path.to_path_buf(),
        error,
    })
}

/// [`load_file`] for a file whose sha256 is known.
fn load_hashed(
    path: &Path,
    sha256: String,
    key_prefix: Option<&str>,
    kind: Option<ModelKind>,
    device: &Device,
) -> Result<(Network, WeightsReport), WeightsError> {
    let state_dict = read_state_dict(path, key_prefix, kind)?;
    let mut network = Network::new(state_dict.model, device);
    let (result, details) = if state_dict.format == WeightsFormat::Burnpack {
        let result = match &mut network {
            Network::MidasSmall(m) => m.apply(state_dict.tensors, None, None, false),
            Network::DptHybrid(m) => m.apply(state_dict.tensors, None, None, false),
            Network::DepthAnything(m) => m.apply(state_dict.tensors, None, None, false),
        };
        let details = mismatch(&result, |name| name.to_string());
        (result, details)
    } else {
        let result = apply_upstream(&mut network, state_dict.tensors);
        let details = mismatch(&result, layout::upstream_key);
        (result, details)
    };
    if !details.is_empty() {
        return Err(WeightsError::Mismatch {
            path: path.to_path_buf(),
            model: state_dict.model,
            details,
        });
    }
    if let Some(max_depth) = state_dict.max_depth {
        network.set_max_depth(max_depth);
    }
    let report = WeightsReport {
        model: state_dict.model,
        source: path.display().to_string(),
        untrained: false,
        format: Some(state_dict.format),
        sha256: Some(sha256),
        tensors: result.applied.len(),
        parameters: network.num_params(),
        prefix_stripped: (!state_dict.prefix.is_empty()).then_some(state_dict.prefix),
        unused_upstream_keys: state_dict.unused_upstream_keys,
        outside_state_dict: state_dict.outside_state_dict,
        max_depth: state_dict.max_depth,
    };
    Ok((network, report))
}

/// Applies tensors in upstream's form (keys already renamed to Burn's paths) and converts what
/// upstream computes on the fly from them: DPT's weight standardisation.
fn apply_upstream(network: &mut Network, tensors: Vec<PackTensor>) -> ApplyResult {
    let adapter = || {
        Some(
            Box::new(PyTorchToBurnAdapter.chain(FloatCastAdapter::to(DType::F32)))
                as Box<dyn ModuleAdapter>,
        )
    };
    match network {
        Network::MidasSmall(model) => model.apply(tensors, None, adapter(), true),
        Network::DptHybrid(model) => {
            let result = model.apply(tensors, None, adapter(), true);
            standardise::standardise_backbone(model);
            result
        }
        Network::DepthAnything(model) => model.apply(tensors, None, adapter(), true),
    }
}

/// What `model-import` writes beside a burnpack's tensors.
struct BurnpackMetadata {
    /// The network it was converted as.
    model: Option<ModelKind>,
    /// A metric network's largest depth.
    max_depth: Option<f32>,
}

impl BurnpackMetadata {
    fn read(path: &Path) -> Result<Self, String> {
        let reader = burn::store::burn_pack::Reader::from_file(path).map_err(|e| e.to_string())?;
        let metadata = reader.metadata();
        Ok(Self {
            model: metadata
                .get("model")
                .and_then(|name| ModelKind::from_name(name)),
            max_depth: metadata
                .get("max_depth")
                .and_then(|value| value.parse::<f32>().ok())
                .filter(|value| value.is_finite() && *value > 0.0),
        })
    }
}

/// The network a burnpack holds (its keys are Burn's paths): the one its metadata names if its
/// tensors fit it, else the first whose anchor key and shapes it holds.
fn recognise_burnpack(tensors: &[PackTensor], named: Option<ModelKind>) -> Option<ModelKind> {
    let fits = |kind: ModelKind| {
        let anchor = layout::to_burn(layout::anchor_key(kind));
        tensors
            .iter()
            .any(|t| t.name == anchor && shapes_fit(kind, &t.shape))
    };
    named
        .filter(|&kind| fits(kind))
        .or_else(|| ModelKind::ALL.into_iter().find(|&kind| fits(kind)))
}

/// Whether the anchor tensor's shape fits `kind`: Depth Anything V2's encoder size is read from
/// its patch embedding's width; the MiDaS models have one size each.
fn shapes_fit(kind: ModelKind, anchor_shape: &[usize]) -> bool {
    match kind {
        ModelKind::DepthAnythingV2(size, _) => {
            anchor_shape.first().copied().and_then(VitSize::from_dim) == Some(size)
        }
        ModelKind::MidasV21Small256 | ModelKind::DptHybrid384 => true,
    }
}

/// Whether a weights file's name says it holds a metric model (`metric`, or the name of a data
/// set the metric models were fine-tuned on).
fn named_metric(path: &Path) -> bool {
    path.file_name().is_some_and(|name| {
        let name = name.to_string_lossy();
        name.to_ascii_lowercase().contains("metric")
            || MetricDataset::from_file_name(&name).is_some()
    })
}

/// A few of the keys, for error messages: parameter-like keys (`.weight`, `.bias`) first, as
/// they show where a state dict sits; a checkpoint's other entries (callbacks, loops) after.
fn sample_keys(tensors: &[PackTensor]) -> String {
    let mut names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable_by_key(|name| {
        let parameter = name.ends_with(".weight") || name.ends_with(".bias");
        (!parameter, *name)
    });
    names.truncate(5);
    names.join(", ")
}

/// The network to build: the one asked for, which must be the one found, else the one found.
fn check_requested(
    path: &Path,
    requested: Option<ModelKind>,
    found: Option<ModelKind>,
    tensors: &[PackTensor],
) -> Result<ModelKind, WeightsError> {
    match (requested, found) {
        (Some(requested), Some(found)) if requested == found => Ok(found),
        (None, Some(found)) => Ok(found),
        (Some(requested), Some(found)) => Err(WeightsError::WrongModel {
            path: path.to_path_buf(),
            requested,
            found: found.to_string(),
        }),
        (Some(requested), None) => Err(WeightsError::WrongModel {
            path: path.to_path_buf(),
            requested,
            found: format!(
                "none of the supported models (first keys: {})",
                sample_keys(tensors)
            ),
        }),
        (None, None) => Err(WeightsError::NotMidas {
            path: path.to_path_buf(),
            sample: sample_keys(tensors),
        }),
    }
}

/// The network an upstream-layout file holds and where its state dict starts.
fn recognise_upstream(
    path: &Path,
    key_prefix: Option<&str>,
    requested: Option<ModelKind>,
    tensors: &[PackTensor],
) -> Result<(ModelKind, String), WeightsError> {
    let names = || tensors.iter().map(|t| t.name.as_str());
    let mut found: Vec<(ModelKind, String)> = ModelKind::ALL
        .into_iter()
        .filter_map(|kind| match key_prefix {
            Some(prefix) => names()
                .any(|name| name.strip_prefix(prefix) == Some(layout::anchor_key(kind)))
                .then(|| (kind, prefix.to_string())),
            None => layout::detect_prefix(kind, names()).map(|prefix| (kind, prefix)),
        })
        .filter(|(kind, prefix)| {
            let anchor = format!("{prefix}{}", layout::anchor_key(*kind));
            tensors
                .iter()
                .any(|t| t.name == anchor && shapes_fit(*kind, &t.shape))
        })
        .collect();
    // A metric head has the same keys as a relative one: the file's name tells them apart.
    let metric = named_metric(path);
    found.sort_by_key(|(kind, _)| kind.is_metric() != metric);
    // The requested network if its keys are there, else the first one whose keys are.
    let recognised = requested
        .filter(|kind| found.iter().any(|(k, _)| k == kind))
        .or_else(|| found.first().map(|(kind, _)| *kind));
    let kind = check_requested(path, requested, recognised, tensors)?;
    let prefix = found
        .into_iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, prefix)| prefix)
        .unwrap_or_default();
    Ok((kind, prefix))
}

/// Reads every tensor of a store (lazily: data stays on disk until applied).
fn read_all(mut store: impl ModuleStore) -> Result<Vec<PackTensor>, String> {
    store
        .get_all_tensors()
        .map(|all| all.values().cloned().collect())
        .map_err(|e| e.to_string())
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
///
/// DPT's ResNet weights are written standardised: loading the burnpack needs no conversion.
pub fn save_burnpack(
    network: &Network,
    path: &Path,
    metadata: &[(&str, &str)],
) -> Result<(), WeightsError> {
    let mut store = BurnpackStore::from_file(path)
        .auto_extension(false)
        .metadata("model", network.kind().name());
    for (key, value) in metadata {
        store = store.metadata(*key, *value);
    }
    if let Some(max_depth) = network.max_depth() {
        store = store.metadata("max_depth", max_depth.to_string());
    }
    match network {
        Network::MidasSmall(model) => model.save_into(&mut store),
        Network::DptHybrid(model) => model.save_into(&mut store),
        Network::DepthAnything(model) => model.save_into(&mut store),
    }
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
