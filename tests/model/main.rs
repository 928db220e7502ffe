//! The networks, their weights and the image pipeline against the PyTorch and Pillow
//! references: one test binary, a module per topic, so that it links once and its tests share
//! the cores (the wgpu parity, slow on lavapipe, runs beside the CPU ones).

#[path = "../support/mod.rs"]
mod support;

mod depth_anything;
mod dpt_parity;
mod dpt_weights;
mod forward_parity;
mod pipeline;
mod weights;
