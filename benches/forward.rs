//! Forward pass of the whole network per compiled backend at the three input shapes a photo
//! becomes (256x256 square, 256x192 for 4:3, 256x128 for 16:9), with the untrained weights (speed
//! does not depend on their values), once as shipped and, on CPU backends, once with Burn's
//! operations alone (`<backend>-burn-only`). `cargo bench --bench forward`; `BENCH_BACKENDS=flex,ndarray`
//! limits the backends (wgpu on a CPU-only machine runs on lavapipe, which is very slow).

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use midas_serve::backend::{self, Backend, BackendKind};
use midas_serve::pipeline::DepthModel;
use midas_serve::weights::{self, synthetic};

const SIZES: [(usize, usize); 3] = [(256, 256), (256, 192), (256, 128)];

fn forward(c: &mut Criterion) {
    let mut group = c.benchmark_group("forward");
    group.sample_size(20);
    let wanted = std::env::var("BENCH_BACKENDS").ok();
    for kind in BackendKind::compiled() {
        if wanted
            .as_ref()
            .is_some_and(|list| !list.split(',').any(|name| name == kind.name()))
        {
            continue;
        }
        let backend = match Backend::init(kind) {
            Ok(backend) => backend,
            Err(error) => {
                eprintln!("skipping {kind}: {error}");
                continue;
            }
        };
        let (model, _) = weights::untrained(
            midas_serve::model::ModelKind::MidasV21Small256,
            &backend.device,
        );
        // The shipped path (CPU kernels for the decoder on CPU backends) and Burn's ops alone.
        let mut variants = vec![(
            kind.name().to_string(),
            DepthModel::new(model.clone(), backend.device.clone()),
        )];
        if backend::is_cpu(&backend.device) {
            variants.push((
                format!("{}-burn-only", kind.name()),
                DepthModel::burn_only(model, backend.device.clone()),
            ));
        }
        for (name, model) in &variants {
            for (width, height) in SIZES {
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
