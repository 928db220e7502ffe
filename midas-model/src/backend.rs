//! Which Burn backend runs the model, chosen at run time.
//!
//! One binary carries every backend compiled in (Cargo features `flex`, `ndarray`, `wgpu`); the
//! choice is a [`Device`]. Asking for a backend that was not compiled in, or for wgpu on a
//! machine without a usable adapter, is an error at start-up rather than a panic on first use.

use std::fmt;

pub use burn::prelude::Device;
use serde::Serialize;

/// A backend that can run the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Burn's pure-Rust CPU backend (the default: the fastest CPU path).
    Flex,
    /// The ndarray CPU backend.
    Ndarray,
    /// The GPU backend (Vulkan, Metal or DX12 through wgpu).
    Wgpu,
}

impl BackendKind {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Flex => "flex",
            Self::Ndarray => "ndarray",
            Self::Wgpu => "wgpu",
        }
    }

    /// Whether tensors live in host memory, where [`crate::kernels`] can run on them.
    pub fn is_cpu(self) -> bool {
        matches!(self, Self::Flex | Self::Ndarray)
    }

    /// Backends this binary was built with.
    pub fn compiled() -> Vec<BackendKind> {
        [
            (Self::Flex, cfg!(feature = "flex")),
            (Self::Ndarray, cfg!(feature = "ndarray")),
            (Self::Wgpu, cfg!(feature = "wgpu")),
        ]
        .into_iter()
        .filter_map(|(kind, on)| on.then_some(kind))
        .collect()
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The GPU adapter wgpu really selected, so that a software or fallback adapter is visible
/// instead of being reported as "GPU".
#[derive(Clone, Debug, Serialize)]
pub struct AdapterInfo {
    /// Adapter name, e.g. "NVIDIA L4" or "llvmpipe (LLVM 15.0.6, 256 bits)".
    pub name: String,
    /// `DiscreteGpu`, `IntegratedGpu`, `VirtualGpu`, `Cpu` or `Other`.
    pub device_type: String,
    /// Driver name and version.
    pub driver: String,
    /// Graphics API: Vulkan, Metal, Dx12 or Gl.
    pub api: String,
}

/// A ready device plus what it is.
#[derive(Clone, Debug)]
pub struct Backend {
    /// The backend's kind.
    pub kind: BackendKind,
    /// The device tensors and models live on.
    pub device: Device,
    /// For wgpu, the adapter in use.
    pub adapter: Option<AdapterInfo>,
}

/// Why a backend could not be started.
#[derive(Clone, Debug, thiserror::Error)]
pub enum BackendError {
    /// The binary was built without this backend's Cargo feature.
    #[error(
        "backend '{requested}' is not compiled into this binary (available: {available}); rebuild with `--features {requested}`"
    )]
    NotCompiled {
        /// What was asked for.
        requested: BackendKind,
        /// What this binary has.
        available: String,
    },
    /// wgpu found no adapter, or could not create a device on it.
    #[error(
        "wgpu could not start: {0}. On Linux without a GPU, Mesa's lavapipe (apt install mesa-vulkan-drivers) provides a Vulkan adapter"
    )]
    NoAdapter(String),
    /// The adapter runs on OpenGL, where Burn's bilinear upsampling is known to be wrong.
    #[error(
        "wgpu selected the OpenGL adapter '{0}', which gives wrong results for this model; install a Vulkan driver (e.g. mesa-vulkan-drivers) or use --backend flex"
    )]
    OpenGl(String),
}

impl Backend {
    /// Starts the requested backend.
    pub fn init(kind: BackendKind) -> Result<Self, BackendError> {
        let not_compiled = || BackendError::NotCompiled {
            requested: kind,
            available: BackendKind::compiled()
                .iter()
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join(", "),
        };
        let device = match kind {
            #[cfg(feature = "flex")]
            BackendKind::Flex => Device::flex(),
            #[cfg(feature = "ndarray")]
            #[allow(deprecated)]
            // ndarray stays selectable as the design asks, beside flex
            BackendKind::Ndarray => Device::ndarray(),
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => return init_wgpu(),
            #[allow(unreachable_patterns)] // reachable when a feature is off
            _ => return Err(not_compiled()),
        };
        Ok(Self {
            kind,
            device,
            adapter: None,
        })
    }
}

/// wgpu's runtime can be registered once per process, so the first start's outcome is kept and
/// handed to every later caller (tests and benchmarks start backends repeatedly).
#[cfg(feature = "wgpu")]
fn init_wgpu() -> Result<Backend, BackendError> {
    static STARTED: std::sync::OnceLock<Result<Backend, BackendError>> = std::sync::OnceLock::new();
    STARTED.get_or_init(start_wgpu).clone()
}

#[cfg(feature = "wgpu")]
fn start_wgpu() -> Result<Backend, BackendError> {
    let (device, setup) = Device::wgpu_options()
        .init_with_setup()
        .map_err(|e| BackendError::NoAdapter(e.to_string()))?;
    let info = setup.adapter.get_info();
    let adapter = AdapterInfo {
        name: info.name.clone(),
        device_type: format!("{:?}", info.device_type),
        driver: format!("{} {}", info.driver, info.driver_info)
            .trim()
            .to_string(),
        api: format!("{:?}", info.backend),
    };
    if adapter.api == "Gl" {
        return Err(BackendError::OpenGl(adapter.name));
    }
    Ok(Backend {
        kind: BackendKind::Wgpu,
        device,
        adapter: Some(adapter),
    })
}
