//! The full network against PyTorch running upstream's code on the same synthetic weights and
//! inputs (fixtures from `scripts/reference/make_fixtures.py`).

mod support;

use midas_serve::backend::{Backend, BackendKind};
use midas_serve::model::ModelKind;
use midas_serve::pipeline::DepthModel;
use midas_serve::weights::{self, synthetic};
use support::{fixture, max_abs_diff, read_npy, value_range};

const SIZES: [(usize, usize); 3] = [(256, 256), (256, 192), (256, 128)];

fn check_backend(kind: BackendKind, relative_tolerance: f32) {
    let backend = Backend::init(kind).expect("backend starts");
    let (model, _) = weights::untrained(ModelKind::MidasV21Small256, &backend.device);
    let model = DepthModel::new(model, backend.device.clone());
    for (width, height) in SIZES {
        let (shape, expected) = read_npy(&fixture(&format!("forward/{width}x{height}.npy")));
        assert_eq!(shape, vec![1, height, width]);
        let output = model
            .forward(synthetic::network_input(width, height), 1, height, width)
            .unwrap();
        let range = value_range(&expected);
        let diff = max_abs_diff(&output, &expected);
        println!(
            "{kind} {width}x{height}: max |diff| {diff:.3e}, range {range:.3}, ratio {:.3e}",
            diff / range
        );
        assert!(range > 1.0, "reference output is degenerate");
        assert!(
            diff <= relative_tolerance * range,
            "{kind} {width}x{height}: max |diff| {diff} > {relative_tolerance} x {range}"
        );
    }
}

#[cfg(feature = "flex")]
#[test]
fn flex_matches_pytorch() {
    check_backend(BackendKind::Flex, 1e-4);
}

#[cfg(feature = "ndarray")]
#[test]
fn ndarray_matches_pytorch() {
    check_backend(BackendKind::Ndarray, 1e-4);
}

/// Needs a Vulkan, Metal or DX12 adapter; on a machine without a GPU, Mesa's lavapipe provides
/// one (`scripts/test-deps.sh` installs it).
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_matches_pytorch() {
    check_backend(BackendKind::Wgpu, 1e-3);
}
