//! DPT-Hybrid against PyTorch running upstream's code (isl-org/MiDaS with timm 0.6.13) on the
//! same synthetic weights and inputs (fixtures from `scripts/reference/dpt.py`).
//!
//! The CPU backends run every size: 384x384 (the trained size: the position embedding is used
//! as is), 576x384 and 384x256 (resized), and two small ones, 80x48 with a side that is a
//! multiple of 16 but not of 32 (odd token grids, explicit fusion sizes). On lavapipe a forward
//! costs far more, so CI runs wgpu at 64x64 and the full size runs with `--ignored`.

use crate::support;

use midas_model::backend::{Backend, BackendKind};
use midas_model::engine::DepthModel;
use midas_model::model::ModelKind;
use midas_model::weights::{self, synthetic};
use support::max_abs_diff;

/// (width, height) of every fixture.
const SIZES: [(usize, usize); 5] = [(64, 64), (80, 48), (384, 384), (576, 384), (384, 256)];

fn check(kind: BackendKind, sizes: &[(usize, usize)], relative_tolerance: f32) {
    support::assert_parity(
        kind,
        ModelKind::DptHybrid384,
        "dpt_hybrid_",
        sizes,
        relative_tolerance,
    );
}

#[test]
#[cfg_attr(
    not(feature = "flex"),
    ignore = "compiled without the flex backend: run with --features flex"
)]
fn flex_matches_pytorch() {
    check(BackendKind::Flex, &SIZES, 1e-4);
}

#[test]
#[cfg_attr(
    not(feature = "ndarray"),
    ignore = "compiled without the ndarray backend: run with --features ndarray"
)]
fn ndarray_matches_pytorch() {
    check(BackendKind::Ndarray, &SIZES, 1e-4);
}

/// Needs a Vulkan, Metal or DX12 adapter; on a machine without a GPU, Mesa's lavapipe provides
/// one (`scripts/test-deps.sh` installs it).
#[test]
#[cfg_attr(
    not(feature = "wgpu"),
    ignore = "compiled without the wgpu backend: run with --features wgpu"
)]
fn wgpu_matches_pytorch() {
    check(BackendKind::Wgpu, &SIZES[..1], 1e-3);
}

#[cfg(feature = "wgpu")]
#[test]
#[ignore = "full-size on lavapipe: minutes; run with --ignored"]
fn wgpu_matches_pytorch_full_size() {
    check(BackendKind::Wgpu, &SIZES[2..3], 1e-3);
}

/// Upstream passes the hooked features through a module-global dict, so concurrent requests in
/// one process can read each other's; here features live in each call. Four different inputs
/// run at once, repeatedly, and each must give what it gives alone.
#[test]
#[cfg_attr(
    not(feature = "flex"),
    ignore = "compiled without the flex backend: run with --features flex"
)]
fn concurrent_forwards_equal_sequential_ones() {
    let backend = Backend::init(BackendKind::Flex).expect("backend starts");
    let (network, _) = weights::untrained(ModelKind::DptHybrid384, &backend.device);
    let model = DepthModel::new(network, &backend);
    let inputs: Vec<Vec<f32>> = (0..4)
        .map(|index| synthetic::uniform(&format!("concurrent.{index}"), 3 * 64 * 64))
        .collect();
    let alone: Vec<Vec<f32>> = inputs
        .iter()
        .map(|input| model.forward(input.clone(), 1, 64, 64).unwrap())
        .collect();
    for (a, b) in alone.iter().zip(alone.iter().skip(1)) {
        assert!(
            max_abs_diff(a, b) > 1e-3,
            "the inputs must give different outputs"
        );
    }
    std::thread::scope(|scope| {
        for (input, expected) in inputs.iter().zip(&alone) {
            let model = &model;
            scope.spawn(move || {
                for _ in 0..3 {
                    let output = model.forward(input.clone(), 1, 64, 64).unwrap();
                    let diff = max_abs_diff(&output, expected);
                    assert!(diff <= 1e-6, "a concurrent forward differs by {diff}");
                }
            });
        }
    });
}

/// DPT's GroupNorm over groups of 73,728 values (the first stage at 384x384) on wgpu against
/// flex: Burn's own single reduction is wrong there on lavapipe, the model's two-stage one is
/// not. Cheap enough for CI, unlike a full-size wgpu forward.
#[cfg(all(feature = "wgpu", feature = "flex"))]
#[test]
fn wgpu_group_norm_over_large_groups() {
    use burn::nn::GroupNormConfig;
    use burn::prelude::*;
    use burn::tensor::TensorData;
    let wgpu = Backend::init(BackendKind::Wgpu)
        .expect("backend starts")
        .device;
    let shape = [1, 256, 96, 96];
    let values = synthetic::uniform("group-norm", shape.iter().product());
    let run = |device: &Device| {
        let norm = GroupNormConfig::new(32, 256).init(device);
        let input = Tensor::<4>::from_data(TensorData::new(values.clone(), shape), device);
        midas_model::model::group_norm(&norm, input)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
    };
    let diff = max_abs_diff(&run(&wgpu), &run(&Device::flex()));
    println!("group norm over 73,728 values: wgpu vs flex max |diff| {diff:.3e}");
    assert!(diff <= 1e-4, "wgpu group norm differs by {diff}");
}
