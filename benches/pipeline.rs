//! Every stage around the forward pass, at 640x480 and 1920x1080 (JPEG uploads made from a test
//! photo): decode, pre-process (resize + normalise), post-process (colourise + resize back) and
//! PNG encoding. `cargo bench --bench pipeline`.

#[path = "support/photo.rs"]
mod photo;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use midas_serve::pipeline::{self, Colormap, DecodeLimits, DepthMap, PngChunks};

const SIZES: [(u32, u32); 2] = [(640, 480), (1920, 1080)];
const LIMITS: DecodeLimits = DecodeLimits {
    max_pixels: 50_000_000,
};

/// A smooth depth map like a network's, at the network size for `width` x `height`.
fn depth(width: u32, height: u32) -> DepthMap {
    let (w, h) = pipeline::target_size(width, height);
    let data = (0..w * h)
        .map(|i| {
            ((i % w) as f32 / w as f32 + (i / w) as f32 / h as f32)
                .sin()
                .abs()
                * 5.0
        })
        .collect();
    DepthMap {
        width: w,
        height: h,
        data,
    }
}

fn stages(c: &mut Criterion) {
    let mut group = c.benchmark_group("pipeline");
    group.sample_size(30);
    for (width, height) in SIZES {
        let label = format!("{width}x{height}");
        let bytes = photo::jpeg(width, height);
        let image = pipeline::decode(&bytes, &LIMITS).unwrap();
        let map = depth(width, height);
        let coloured = pipeline::colourise(&map, Colormap::Inferno);
        let resized =
            pipeline::resize_rgb(coloured.clone(), (map.width, map.height), (width, height))
                .unwrap();

        group.bench_with_input(BenchmarkId::new("decode", &label), &bytes, |b, bytes| {
            b.iter(|| pipeline::decode(bytes, &LIMITS).unwrap())
        });
        group.bench_with_input(
            BenchmarkId::new("preprocess", &label),
            &image,
            |b, image| b.iter(|| pipeline::preprocess(image)),
        );
        group.bench_with_input(BenchmarkId::new("postprocess", &label), &map, |b, map| {
            b.iter(|| {
                let rgb = pipeline::colourise(map, Colormap::Inferno);
                pipeline::resize_rgb(rgb, (map.width, map.height), (width, height)).unwrap()
            })
        });
        group.bench_with_input(
            BenchmarkId::new("encode", &label),
            &resized,
            |b, resized| {
                b.iter(|| {
                    PngChunks::rgb8(resized.clone(), width, height)
                        .unwrap()
                        .map(Result::unwrap)
                        .map(|c| c.len())
                        .sum::<usize>()
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
