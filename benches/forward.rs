//! Forward pass of each network per compiled backend, with the untrained weights (speed does
//! not depend on their values), once as shipped and, on CPU backends, once with Burn's
//! operations alone (`<backend>-burn-only`). MiDaS small runs at the three input shapes a photo
//! becomes (256x256 square, 256x192 for 4:3, 256x128 for 16:9), DPT-Hybrid at its 384x384,
//! Depth Anything V2 at its 518x518 (`BENCH_MODELS=depth_anything_v2_vits` for Small alone).
//! `cargo bench --bench forward`; `BENCH_BACKENDS=flex,ndarray` limits the backends (wgpu on a
//! CPU-only machine runs on lavapipe, which is very slow), `BENCH_MODELS=dpt_hybrid_384` the
//! networks. `scripts/reference/bench_pytorch.py` measures PyTorch on the same inputs.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use midas_model::backend::{Backend, BackendKind};
use midas_model::engine::DepthModel;
use midas_model::model::ModelKind;
use midas_model::weights::{self, synthetic};

/// `(width, height)` of the inputs each network is timed at.
fn sizes(model: ModelKind) -> &'static [(usize, usize)] {
    match model {
        ModelKind::MidasV21Small256 => &[(256, 256), (256, 192), (256, 128)],
        ModelKind::DptHybrid384 => &[(384, 384)],
        ModelKind::DepthAnythingV2(..) => &[(518, 518)],
    }
}

/// Whether the comma-separated list in `variable` (all when unset) names `name`.
fn wanted(variable: &str, name: &str) -> bool {
    std::env::var(variable)
        .ok()
        .is_none_or(|list| list.split(',').any(|item| item == name))
}

fn forward(c: &mut Criterion) {
    midas_serve::malloc::tune();
    for model in ModelKind::ALL {
        if wanted("BENCH_MODELS", model.name()) {
            bench_model(c, model);
        }
    }
}

fn bench_model(c: &mut Criterion, model_kind: ModelKind) {
    let mut group = c.benchmark_group(format!("forward/{model_kind}"));
    // DPT-Hybrid and Depth Anything V2 take seconds per pass: criterion's minimum of 10 samples.
    group.sample_size(match model_kind {
        ModelKind::MidasV21Small256 => 20,
        ModelKind::DptHybrid384 | ModelKind::DepthAnythingV2(..) => 10,
    });
    for kind in BackendKind::compiled() {
        if !wanted("BENCH_BACKENDS", kind.name()) {
            continue;
        }
        let backend = match Backend::init(kind) {
            Ok(backend) => backend,
            Err(error) => {
                eprintln!("skipping {kind}: {error}");
                continue;
            }
        };
        let (model, _) = weights::untrained(model_kind, &backend.device);
        // The shipped path (CPU kernels for the decoder on CPU backends) and Burn's ops alone.
        let mut variants = vec![(
            kind.name().to_string(),
            DepthModel::new(model.clone(), &backend),
        )];
        if backend.kind.is_cpu() {
            variants.push((
                format!("{}-burn-only", kind.name()),
                DepthModel::burn_only(model, backend.device.clone()),
            ));
        }
        for (name, model) in &variants {
            for &(width, height) in sizes(model_kind) {
                let input = synthetic::network_input(width, height);
                model.forward(input.clone(), 1, height, width).unwrap();
                group.bench_with_input(
                    BenchmarkId::new(name, format!("{width}x{height}")),
                    &input,
                    |b, input| b.iter(|| model.forward(input.clone(), 1, height, width).unwrap()),
                );
            }
        }
    }
    group.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
