//! The full network against PyTorch running upstream's code on the same synthetic weights and
//! inputs (fixtures from `scripts/reference/make_fixtures.py`).
//!
//! The CPU backends run every size. On lavapipe each new input shape compiles its own kernels
//! (most of a wgpu forward's time there), so CI runs wgpu at the smallest size and the other two
//! run with `--ignored`.

use crate::support;

use midas_model::backend::BackendKind;
use midas_model::model::ModelKind;

const SIZES: [(usize, usize); 3] = [(256, 256), (256, 192), (256, 128)];

fn check(kind: BackendKind, sizes: &[(usize, usize)], relative_tolerance: f32) {
    support::assert_parity(
        kind,
        ModelKind::MidasV21Small256,
        "",
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
    check(BackendKind::Wgpu, &SIZES[2..], 1e-3);
}

#[cfg(feature = "wgpu")]
#[test]
#[ignore = "every size on lavapipe: minutes; run with --ignored"]
fn wgpu_matches_pytorch_other_sizes() {
    check(BackendKind::Wgpu, &SIZES[..2], 1e-3);
}
