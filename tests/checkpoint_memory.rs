//! Reading a training checkpoint costs what its weights cost, not what the file holds: a
//! PyTorch Lightning checkpoint carries Adam's state (twice the weights) after them, and a
//! loader that read it would need three times the memory. Measured by counting this test
//! binary's allocations (a global allocator), not the process's RSS, so the bound is exact.

mod support;

use burn::prelude::*;
use midas_model::weights;
use support::checkpoints::{Tensor, Value, as_dict, synthetic_state_dict, write_pt};
use support::counting::{Counting, peak_of};

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// How many times the weights' size the optimizer state is made: far above any honest
/// loader's overhead, so reading it cannot pass unnoticed.
const OPTIMIZER_FACTOR: usize = 6;

#[test]
fn a_checkpoint_loads_within_a_bound_set_by_its_weights() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("training.ckpt");
    let state_dict = synthetic_state_dict("model.");
    let weight_bytes: usize = state_dict.iter().map(|t| t.bytes.len()).sum();
    // Adam-like moments after the weights, in chunks of a quarter of the weights' size.
    let chunk = weight_bytes / 4;
    let moments = (0..4 * OPTIMIZER_FACTOR)
        .map(|index| {
            (
                index.to_string(),
                Value::Tensor(Tensor {
                    key: format!("moment{index}"),
                    dtype: "float32".into(),
                    shape: vec![chunk / 4],
                    bytes: vec![0; chunk / 4 * 4],
                }),
            )
        })
        .collect();
    write_pt(
        &path,
        Value::Dict(vec![
            ("state_dict".into(), as_dict(state_dict)),
            ("optimizer_states".into(), Value::Dict(moments)),
        ]),
    );
    let file_bytes = std::fs::metadata(&path).unwrap().len() as usize;
    assert!(file_bytes > (OPTIMIZER_FACTOR + 1) * weight_bytes * 9 / 10);

    let mut loaded = None;
    let peak = peak_of(|| {
        loaded = Some(weights::load_file(&path, None, None, &Device::flex()).unwrap());
    });
    let (network, report) = loaded.unwrap();
    assert_eq!(report.outside_state_dict, 4 * OPTIMIZER_FACTOR);
    println!(
        "weights {:.1} MB, file {:.1} MB, peak allocation while loading {:.1} MB ({:.2}x the weights)",
        weight_bytes as f64 / 1e6,
        file_bytes as f64 / 1e6,
        peak as f64 / 1e6,
        peak as f64 / weight_bytes as f64
    );
    // The network itself (built, then filled), one tensor in flight and the parser's tables.
    assert!(
        peak <= 3 * weight_bytes,
        "loading allocated {peak} bytes at peak for {weight_bytes} bytes of weights"
    );
    drop(network);
}
