//! Monocular depth estimation on Burn: MiDaS v2.1 small (`midas_v21_small_256`), MiDaS v3.0
//! DPT-Hybrid (`dpt_hybrid_384`) and Depth Anything V2 (`depth_anything_v2_vits`, `_vitb`,
//! `_vitl`, relative or metric), numerically equal to upstream's PyTorch.
//!
//! From a weights file to depth in four steps:
//!
//! 1. [`backend::Backend::init`] starts a backend (`flex` or `ndarray` on the CPU, `wgpu` on a
//!    GPU; each a Cargo feature of this crate).
//! 2. [`weights::load_file`] reads upstream's PyTorch `.pt`/`.ckpt`, a `.safetensors` or a Burn
//!    `.bpk` file and recognises the network from its keys ([`weights::untrained`] builds a
//!    deterministic untrained one instead).
//! 3. [`engine::DepthModel::new`] takes the network over for the backend: on a CPU backend it is
//!    packed for this crate's own [`kernels`], several times faster than Burn's CPU operations.
//! 4. [`engine::DepthModel::depth`] turns a normalised image ([`engine::NetInput`]) into a
//!    depth map ([`engine::DepthMap`]): relative inverse depth, or metres for a metric model.
//!
//! ```no_run
//! use midas_model::backend::{Backend, BackendKind};
//! use midas_model::engine::{DepthModel, NetInput};
//! use midas_model::weights;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let backend = Backend::init(BackendKind::Flex)?;
//! let (network, report) = weights::load_file(
//!     "midas_v21_small_256.pt".as_ref(), None, None, &backend.device)?;
//! println!("loaded {} ({} parameters)", report.model, report.parameters);
//! let model = DepthModel::new(network, &backend);
//! // A 256x256 image, normalised as the model was trained (ImageNet mean and deviation).
//! let input = NetInput { width: 256, height: 256, data: vec![0.0; 3 * 256 * 256] };
//! let depth = model.depth(input)?;
//! assert_eq!(depth.data.len(), 256 * 256);
//! # Ok(())
//! # }
//! ```
//!
//! [`model`] defines the networks as Burn modules, [`weights`] fills them, [`engine`] runs
//! them, [`kernels`] holds the CPU operations the engine assembles.

pub mod backend;
pub mod engine;
pub mod kernels;
pub mod model;
pub mod weights;
