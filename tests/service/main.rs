//! The service as its users meet it: the server over loopback, the command line, batch tasks,
//! point clouds, the replaced service's clients, the OpenAPI document, the page in a browser and
//! the deployment files. One test binary, a module per topic, so that it links once and its
//! tests share the cores.
//!
//! The tests whose point is timing or memory under pressure (`hostile`, `http2`, `limits`,
//! `gcs_store`, `fuzz`, the counting-allocator ones) keep binaries of their own, so nothing else
//! runs beside them.

#[path = "../support/mod.rs"]
mod support;

mod batch;
mod browser;
mod cli;
mod cloud;
mod deploy_files;
mod dropin;
mod openapi;
mod server;
