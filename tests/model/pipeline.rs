//! The image pipeline against upstream's transform and the original app's post-processing
//! (fixtures from `scripts/reference/make_fixtures.py`: OpenCV resize, matplotlib tables,
//! Pillow resize, PyTorch forward).

use crate::support;

use midas_serve::pipeline::{
    self, CloudDefaults, Colormap, DecodeLimits, DepthMap, OutputFormat, RenderOptions,
};
use support::{fixture, max_abs_diff, read_npy};

/// Every test image, one of each format and mode.
const IMAGES: [&str; 5] = [
    "camera_odd.png",
    "chelsea.webp",
    "chelsea_small.png",
    "horse_rgba.png",
    "rocket.jpg",
];

const LIMITS: DecodeLimits = DecodeLimits {
    max_pixels: 50_000_000,
    max_aspect_ratio: 0,
};

fn decode(name: &str) -> image::RgbImage {
    pipeline::decode(
        &std::fs::read(fixture(&format!("images/{name}"))).unwrap(),
        &LIMITS,
    )
    .unwrap()
}

fn reference_depth(stem: &str) -> DepthMap {
    let (shape, data) = read_npy(&fixture(&format!("pipeline/{stem}.depth.npy")));
    DepthMap {
        width: shape[1],
        height: shape[0],
        data,
    }
}

fn read_png(path: &std::path::Path) -> image::DynamicImage {
    image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Per-channel absolute differences between two equally sized 8-bit images: (max, mean).
fn pixel_diff(a: &[u8], b: &[u8]) -> (u8, f64) {
    assert_eq!(a.len(), b.len());
    let diffs = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y));
    let (max, sum) = diffs.fold((0u8, 0u64), |(max, sum), d| {
        (max.max(d), sum + u64::from(d))
    });
    (max, sum as f64 / a.len() as f64)
}

#[test]
fn size_rule_matches_upstream() {
    let table = std::fs::read_to_string(fixture("size_rule.tsv")).unwrap();
    let mut checked = 0;
    for line in table.lines() {
        let v: Vec<u32> = line.split('\t').map(|x| x.parse().unwrap()).collect();
        let (width, height, expected_w, expected_h) = (v[0], v[1], v[2] as usize, v[3] as usize);
        let (w, h) = pipeline::target_size(
            midas_model::model::ModelKind::MidasV21Small256,
            width,
            height,
        );
        // Upstream gives a side of 0 for images over 16 times longer than wide (and then fails
        // in OpenCV); here that side gets one 32-pixel block instead.
        assert_eq!(w, expected_w.max(32), "{width}x{height}");
        assert_eq!(h, expected_h.max(32), "{width}x{height}");
        checked += 1;
    }
    assert!(checked > 300);
    assert_eq!(
        pipeline::target_size(midas_model::model::ModelKind::MidasV21Small256, 1920, 1080),
        (256, 128),
        "half-to-even, not 256x160"
    );
}

/// DPT-Hybrid's `minimal` size rule against upstream's `Resize.get_size`
/// (`scripts/reference/dpt_transform.py`): the side whose scale is nearer to 1 sets the scale,
/// NumPy's half-to-even rounding to multiples of 32, no upper bound upstream.
#[test]
fn dpt_size_rule_matches_upstream() {
    let dpt = midas_model::model::ModelKind::DptHybrid384;
    let table = std::fs::read_to_string(fixture("dpt_size_rule.tsv")).unwrap();
    let (mut checked, mut capped) = (0, 0);
    for line in table.lines() {
        let v: Vec<u32> = line.split('\t').map(|x| x.parse().unwrap()).collect();
        let (width, height, expected_w, expected_h) = (v[0], v[1], v[2] as usize, v[3] as usize);
        let (w, h) = pipeline::target_size(dpt, width, height);
        if expected_w.max(expected_h) > 1536 {
            // Beyond 4:1 upstream's input grows without bound; here the longer side is 1536.
            assert_eq!(w.max(h), 1536, "{width}x{height}");
            capped += 1;
            continue;
        }
        // Upstream gives a side of 0 (and then fails in OpenCV) for very elongated images;
        // here that side gets one 32-pixel block.
        assert_eq!(w, expected_w.max(32), "{width}x{height}");
        assert_eq!(h, expected_h.max(32), "{width}x{height}");
        checked += 1;
    }
    assert!(
        checked > 200 && capped > 10,
        "{checked} checked, {capped} capped"
    );
}

#[test]
fn preprocessing_matches_opencv_cubic_and_normalisation() {
    for stem in ["camera_odd", "chelsea_small"] {
        let image = decode(&format!("{stem}.png"));
        let input = pipeline::preprocess(
            &image,
            midas_model::model::ModelKind::MidasV21Small256,
            pipeline::Transform::Upstream,
        );
        let (shape, expected) = read_npy(&fixture(&format!("pipeline/{stem}.pre.npy")));
        assert_eq!(shape, vec![3, input.height, input.width], "{stem}");
        let diff = max_abs_diff(&input.data, &expected);
        println!("{stem}: max |diff| {diff:.2e}");
        assert!(diff < 2e-5, "{stem}: max |diff| {diff}");
    }
}

#[test]
fn postprocessing_matches_the_original_app() {
    for (stem, original) in [
        ("camera_odd", (331, 509)),
        ("chelsea_small", (121, 81)),
        ("rocket", (640, 427)),
    ] {
        let depth = reference_depth(stem);
        let maps: &[Colormap] = if stem == "chelsea_small" {
            &[Colormap::Inferno, Colormap::Viridis, Colormap::Gray]
        } else {
            &[Colormap::Inferno]
        };
        for &colormap in maps {
            let rgb = pipeline::colourise(&depth, colormap);
            let resized = pipeline::resize_rgb(rgb, (depth.width, depth.height), original).unwrap();
            let expected = read_png(&fixture(&format!(
                "pipeline/{stem}.{}.png",
                colormap.name()
            )))
            .into_rgb8();
            assert_eq!(expected.dimensions(), original);
            let (max, mean) = pixel_diff(&resized, expected.as_raw());
            println!("{stem} {}: max {max} mean {mean:.4}", colormap.name());
            // fast_image_resize's Catmull-Rom is within a few levels of Pillow's, not bit-identical.
            assert!(
                max <= 3 && mean < 0.15,
                "{stem} {}: max {max} mean {mean}",
                colormap.name()
            );
        }
    }
}

#[test]
fn depth16_matches_midas_write_depth() {
    for (stem, original) in [("camera_odd", (331, 509)), ("chelsea_small", (121, 81))] {
        let values = pipeline::depth16(&reference_depth(stem), original).unwrap();
        let expected = read_png(&fixture(&format!("pipeline/{stem}.png16.png"))).into_luma16();
        let max = values
            .iter()
            .zip(expected.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        println!("{stem}: max 16-bit diff {max}");
        assert!(max <= 64, "{stem}: max diff {max} of 65535");
        assert_eq!(values.iter().max(), Some(&65535));
        assert_eq!(values.iter().min(), Some(&0));
    }
}

/// The untrained MiDaS small pipeline on flex with `transform`.
fn untrained_pipeline(transform: pipeline::Transform) -> pipeline::LoadedModel {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let args = midas_serve::config::ModelArgs {
        weights: None,
        weights_mirror: midas_serve::fetch::UPSTREAM_RELEASES.to_string(),
        weights_sha256: None,
        key_prefix: None,
        kind: None,
        max_depth: None,
        backend: midas_model::backend::BackendKind::Flex,
        cache_dir: None,
    };
    runtime
        .block_on(midas_serve::lifecycle::load(&args, transform))
        .unwrap()
}

/// `--transform squash --default-colormap viridis` against the replaced service's own code
/// path (Pillow's antialiased bilinear in, no normalisation, matplotlib's viridis, Pillow's
/// bicubic back; `scripts/reference/squash.py`), the network being MiDaS small at 256x256.
/// Pillow resizes `camera_odd` (331x509) vertically first and the others horizontally first;
/// the wrong order alone leaves only 98 % of `camera_odd`'s pixels within 2 levels.
#[test]
fn squash_reproduces_the_replaced_service() {
    let pipeline = untrained_pipeline(pipeline::Transform::Squash);
    let options = RenderOptions {
        colormap: Colormap::Viridis,
        ..RenderOptions::default()
    };
    for name in IMAGES {
        let stem = name.split('.').next().unwrap();
        let bytes = std::fs::read(fixture(&format!("images/{name}"))).unwrap();
        let png: Vec<u8> = pipeline
            .run_image(&bytes, &LIMITS, options, &CloudDefaults::default())
            .unwrap()
            .map(Result::unwrap)
            .collect::<Vec<_>>()
            .concat();
        let actual = image::load_from_memory(&png).unwrap().into_rgb8();
        // The replaced service answered RGBA with alpha 255; its colours are what count.
        let expected = read_png(&fixture(&format!("squash/{stem}.png"))).into_rgb8();
        assert_eq!(actual.dimensions(), expected.dimensions(), "{name}");
        let levels = if name.ends_with(".jpg") { 4 } else { 2 };
        let pixels = actual.pixels().count();
        let close = actual
            .pixels()
            .zip(expected.pixels())
            .filter(|(a, b)| a.0.iter().zip(b.0).all(|(x, y)| x.abs_diff(y) <= levels))
            .count();
        let share = close as f64 / pixels as f64;
        println!(
            "{name}: {:.3} % of pixels within {levels} levels",
            share * 100.0
        );
        assert!(
            share >= 0.995,
            "{name}: only {:.3} % of pixels within {levels} levels",
            share * 100.0
        );
    }
}

#[test]
fn end_to_end_matches_the_reference() {
    let pipeline = untrained_pipeline(pipeline::Transform::Upstream);
    for name in IMAGES {
        let stem = name.split('.').next().unwrap();
        let bytes = std::fs::read(fixture(&format!("images/{name}"))).unwrap();
        let chunks = pipeline
            .run_image(
                &bytes,
                &LIMITS,
                RenderOptions::default(),
                &CloudDefaults::default(),
            )
            .unwrap();
        let png: Vec<u8> = chunks.map(Result::unwrap).collect::<Vec<_>>().concat();
        let actual = image::load_from_memory(&png).unwrap().into_rgb8();
        let expected = read_png(&fixture(&format!("pipeline/{stem}.inferno.png"))).into_rgb8();
        assert_eq!(actual.dimensions(), expected.dimensions(), "{name}");
        let (max, mean) = pixel_diff(actual.as_raw(), expected.as_raw());
        println!("{name}: max {max} mean {mean:.4}");

        // Raw output: the network's depth map at its own resolution.
        let chunks = pipeline
            .run_image(
                &bytes,
                &LIMITS,
                RenderOptions {
                    format: OutputFormat::Npy,
                    ..Default::default()
                },
                &CloudDefaults::default(),
            )
            .unwrap();
        let npy: Vec<u8> = chunks.map(Result::unwrap).collect::<Vec<_>>().concat();
        let file = npyz::NpyFile::new(&npy[..]).unwrap();
        let shape: Vec<u64> = file.shape().to_vec();
        let raw = file.into_vec::<f32>().unwrap();
        let reference = reference_depth(stem);
        assert_eq!(shape, vec![reference.height as u64, reference.width as u64]);
        let depth_diff =
            max_abs_diff(&raw, &reference.data) / support::value_range(&reference.data);
        println!("{name}: raw depth max |diff| / range {depth_diff:.2e}");

        // JPEG decoders (zune-jpeg here, libjpeg-turbo in OpenCV) differ by a few levels on some
        // pixels; lossless formats decode identically, leaving float and resize rounding.
        let jpeg = name.ends_with(".jpg");
        let (max_level, mean_level, depth_tolerance) = if jpeg {
            (8, 0.5, 1e-2)
        } else {
            (4, 0.15, 1e-4)
        };
        assert!(
            max <= max_level && mean < mean_level,
            "{name}: max {max} mean {mean}"
        );
        assert!(
            depth_diff < depth_tolerance,
            "{name}: raw depth differs by {depth_diff} of its range"
        );
    }
}
