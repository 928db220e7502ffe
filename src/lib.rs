//! midas-serve: monocular depth estimation with MiDaS (v2.1 small and v3.0 DPT-Hybrid), served
//! over HTTP and run over data sets.
//!
//! The networks, their weights and the engine that runs them are the `midas-model` crate; this
//! one puts them to work. The crate is a library so that the binary, the integration tests and
//! the benchmarks all drive the same code: [`config`] reads the flags, [`fetch`] brings the
//! weights, [`lifecycle`] turns flags into a ready model, [`pipeline`] turns images into depth
//! maps, [`server`] answers HTTP, [`batch`] runs a data set, [`storage`] keeps uploads and
//! results; [`malloc`] sets the allocator up for the large maps a forward pass frees.

pub mod batch;
pub mod budget;
pub mod config;
pub mod fetch;
pub mod lifecycle;
pub mod malloc;
pub mod pipeline;
pub mod server;
pub mod storage;
pub mod tls;
