//! Every stage around the forward pass, at 640x480 and 1920x1080 (JPEG uploads made from a test
//! photo): decode, pre-process (resize + normalise), post-process (colourise + resize back) and
//! PNG encoding; and the PNG's size against its encoding time at each zlib level the `png` crate
//! offers. `cargo bench --bench pipeline`.

#[path = "support/photo.rs"]
mod photo;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use midas_serve::pipeline::{
    self, CloudDefaults, Colormap, DecodeLimits, DepthMap, OutputFormat, PngChunks, PointSamples,
    RenderOptions,
};

const SIZES: [(u32, u32); 2] = [(640, 480), (1920, 1080)];
/// The `png` crate's levels, for the README's size-against-time table.
const LEVELS: [(&str, png::Compression); 5] = [
    ("none", png::Compression::NoCompression),
    ("fastest", png::Compression::Fastest),
    ("fast", png::Compression::Fast),
    ("balanced", png::Compression::Balanced),
    ("high", png::Compression::High),
];
const LIMITS: DecodeLimits = DecodeLimits {
    max_pixels: 50_000_000,
    max_aspect_ratio: 0,
};

/// A smooth depth map like a network's, at the network size for `width` x `height`.
fn depth(width: u32, height: u32) -> DepthMap {
    let (w, h) = pipeline::target_size(
        midas_model::model::ModelKind::MidasV21Small256,
        width,
        height,
    );
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
            |b, image| {
                b.iter(|| {
                    pipeline::preprocess(
                        image,
                        midas_model::model::ModelKind::MidasV21Small256,
                        pipeline::Transform::Upstream,
                    )
                })
            },
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

/// What `format=ply` adds to a 1920x1080 request against `format=png`: the render and encode
/// step as `/predict` runs it (the cloud's samples taken from the decoded image included), to
/// the last byte, at the default density.
fn png_against_ply(c: &mut Criterion) {
    let mut group = c.benchmark_group("render");
    group.sample_size(20);
    let (width, height) = (1920, 1080);
    let bytes = photo::jpeg(width, height);
    let image = pipeline::decode(&bytes, &LIMITS).unwrap();
    let map = depth(width, height);
    let defaults = CloudDefaults::default();
    for format in [OutputFormat::Png, OutputFormat::Ply] {
        let options = RenderOptions {
            format,
            ..RenderOptions::default()
        };
        group.bench_function(BenchmarkId::new(format.name(), "1920x1080"), |b| {
            b.iter(|| {
                let samples = (format == OutputFormat::Ply).then(|| {
                    PointSamples::take(
                        &image,
                        pipeline::focal_length_35mm(&bytes),
                        &options.cloud,
                        &defaults,
                        midas_model::model::ModelKind::MidasV21Small256,
                    )
                });
                pipeline::render(&map, (width, height), options, samples)
                    .unwrap()
                    .map(|chunk| chunk.unwrap().len())
                    .sum::<usize>()
            })
        });
    }
    group.finish();
}

/// One colourised depth map, resized to the upload's size, encoded whole at `level`.
fn encode_at(pixels: &[u8], width: u32, height: u32, level: png::Compression) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(level);
    let mut writer = encoder.write_header().unwrap();
    writer.write_image_data(pixels).unwrap();
    writer.finish().unwrap();
    out
}

fn png_levels(c: &mut Criterion) {
    let mut group = c.benchmark_group("png-level");
    group.sample_size(20);
    for (width, height) in SIZES {
        let map = depth(width, height);
        let coloured = pipeline::colourise(&map, Colormap::Inferno);
        let pixels =
            pipeline::resize_rgb(coloured, (map.width, map.height), (width, height)).unwrap();
        for (name, level) in LEVELS {
            let bytes = encode_at(&pixels, width, height, level).len();
            println!("png-level/{name}/{width}x{height}: {bytes} bytes");
            group.bench_function(BenchmarkId::new(name, format!("{width}x{height}")), |b| {
                b.iter(|| encode_at(&pixels, width, height, level))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, stages, png_levels, png_against_ply);
criterion_main!(benches);
