//! Reading a training checkpoint costs what its weights cost, not what the file holds: a
//! PyTorch Lightning checkpoint carries Adam's state (twice the weights) after them, and a
//! loader that read it would need three times the memory. Measured by counting this test
//! binary's allocations (a global allocator), not the process's RSS, so the bound is exact.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::prelude::*;
use midas_model::weights;
use support::checkpoints::{Tensor, Value, as_dict, synthetic_state_dict, write_pt};

/// The system allocator, counting the bytes held now and the most held since the last reset.
struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    let held = HELD.fetch_add(bytes, Ordering::SeqCst) + bytes;
    PEAK.fetch_max(held, Ordering::SeqCst);
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let pointer = unsafe { System.alloc(layout) };
        if !pointer.is_null() {
            grew(layout.size());
        }
        pointer
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let pointer = unsafe { System.alloc_zeroed(layout) };
        if !pointer.is_null() {
            grew(layout.size());
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(pointer, layout) };
        HELD.fetch_sub(layout.size(), Ordering::SeqCst);
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let moved = unsafe { System.realloc(pointer, layout, new_size) };
        if !moved.is_null() {
            HELD.fetch_sub(layout.size(), Ordering::SeqCst);
            grew(new_size);
        }
        moved
    }
}

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

    let before = HELD.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let (network, report) = weights::load_file(&path, None, None, &Device::flex()).unwrap();
    let peak = PEAK.load(Ordering::SeqCst) - before;
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
