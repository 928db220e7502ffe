//! midas-serve: monocular depth estimation with MiDaS (v2.1 small and v3.0 DPT-Hybrid) on Burn,
//! served over HTTP.
//!
//! The crate is a library so that the binary, `model-import`, the integration tests and the
//! benchmarks all drive the same code: [`model`] defines the networks, [`weights`] fills them,
//! [`backend`] picks the device, [`lifecycle`] turns flags into a ready model, [`pipeline`]
//! turns images into depth maps.

pub mod backend;
pub mod batch;
pub mod budget;
pub mod config;
pub mod kernels;
pub mod lifecycle;
pub mod model;
pub mod pipeline;
pub mod server;
pub mod storage;
pub mod tls;
pub mod weights;
