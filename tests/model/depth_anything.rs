//! Depth Anything V2 against PyTorch running upstream's code (DepthAnything/Depth-Anything-V2)
//! on the same synthetic weights and inputs (fixtures from `scripts/reference/depth_anything.py`),
//! and its weights in every accepted format.
//!
//! CI compares ViT-S (relative) at the trained 518x518, where upstream uses the position
//! embedding as it is, and at 126x98, a non-square 9x7 token grid where it is interpolated; the
//! metric head at 126x98; wgpu on lavapipe at 126x98. The other sizes (714x518, 518x364) and
//! ViT-B run with `--ignored` against fixtures written outside the repository
//! (`depth_anything.py --all DIR`, then `MIDAS_DEPTH_ANYTHING_FIXTURES=DIR`).

use crate::support;

use std::path::{Path, PathBuf};

use burn::prelude::*;
use midas_model::backend::{Backend, BackendKind};
use midas_model::engine::DepthModel;
use midas_model::model::{DepthHead, ModelKind, Network, VitSize};
use midas_model::weights::{self, WeightsError, WeightsFormat, layout, synthetic};
use midas_serve::pipeline::{
    self, BandResizer, Colormap, DepthMap, OutputFormat, OutputResize, RenderOptions, Scale,
};
use support::checkpoints::{
    as_dict, depth_anything_layout, synthetic_depth_anything_state_dict, write_pt,
    write_safetensors,
};
use support::{fixture, max_abs_diff, read_npy};

const RELATIVE: ModelKind = ModelKind::DepthAnythingV2(VitSize::Small, DepthHead::Relative);
const METRIC: ModelKind = ModelKind::DepthAnythingV2(VitSize::Small, DepthHead::Metric);

/// The largest depth the metric fixtures were written with (upstream's Hypersim value).
const FIXTURE_MAX_DEPTH: f32 = 20.0;

fn device() -> Device {
    Device::flex()
}

fn fixtures(name: &str, sizes: &[(usize, usize)]) -> Vec<PathBuf> {
    sizes
        .iter()
        .map(|(w, h)| fixture(&format!("forward/{name}_{w}x{h}.npy")))
        .collect()
}

fn metric_network(device: &burn::prelude::Device) -> Network {
    let (mut network, _) = weights::untrained(METRIC, device);
    assert!(network.set_max_depth(FIXTURE_MAX_DEPTH));
    network
}

fn check(kind: BackendKind, relative_tolerance: f32) {
    support::assert_parity(
        kind,
        RELATIVE,
        "depth_anything_v2_vits_",
        &[(518, 518), (126, 98)],
        relative_tolerance,
    );
    support::assert_network_parity(
        kind,
        metric_network,
        &fixtures("depth_anything_v2_metric_vits", &[(126, 98)]),
        relative_tolerance,
    );
}

#[test]
#[cfg_attr(
    not(feature = "flex"),
    ignore = "compiled without the flex backend: run with --features flex"
)]
fn flex_matches_pytorch() {
    check(BackendKind::Flex, 1e-4);
}

#[test]
#[cfg_attr(
    not(feature = "ndarray"),
    ignore = "compiled without the ndarray backend: run with --features ndarray"
)]
fn ndarray_matches_pytorch() {
    check(BackendKind::Ndarray, 1e-4);
}

/// Needs a Vulkan, Metal or DX12 adapter; on a machine without a GPU, Mesa's lavapipe provides
/// one (`scripts/test-deps.sh` installs it).
#[test]
#[cfg_attr(
    not(feature = "wgpu"),
    ignore = "compiled without the wgpu backend: run with --features wgpu"
)]
fn wgpu_matches_pytorch() {
    support::assert_parity(
        BackendKind::Wgpu,
        RELATIVE,
        "depth_anything_v2_vits_",
        &[(126, 98)],
        1e-3,
    );
}

/// Every fixture `depth_anything.py --all DIR` wrote (ViT-S and ViT-B, both heads, every size),
/// on both CPU backends.
#[test]
#[ignore = "needs MIDAS_DEPTH_ANYTHING_FIXTURES=DIR from scripts/reference/depth_anything.py --all DIR"]
fn every_size_and_encoder_matches_pytorch() {
    let dir = std::env::var("MIDAS_DEPTH_ANYTHING_FIXTURES")
        .expect("MIDAS_DEPTH_ANYTHING_FIXTURES names the directory depth_anything.py --all wrote");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("fixture directory")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "npy"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no fixtures in {dir}");
    for kind in ModelKind::ALL {
        let ModelKind::DepthAnythingV2(_, head) = kind else {
            continue;
        };
        let prefix = format!("{}_", kind.name());
        let mine: Vec<PathBuf> = paths
            .iter()
            .filter(|path| {
                let name = path.file_name().unwrap().to_string_lossy();
                name.strip_prefix(&prefix)
                    .is_some_and(|rest| rest.chars().next().is_some_and(|c| c.is_ascii_digit()))
            })
            .cloned()
            .collect();
        if mine.is_empty() {
            continue;
        }
        for backend in [BackendKind::Flex, BackendKind::Ndarray] {
            support::assert_network_parity(
                backend,
                |device| {
                    let (mut network, _) = weights::untrained(kind, device);
                    if head == DepthHead::Metric {
                        network.set_max_depth(FIXTURE_MAX_DEPTH);
                    }
                    network
                },
                &mine,
                1e-4,
            );
        }
    }
}

/// The synthetic state dict in upstream's form has exactly upstream's keys and shapes, less
/// the two it never uses (the mask token and `refinenet4`'s first unit).
#[test]
fn layout_matches_upstream() {
    let (network, _) = weights::untrained(RELATIVE, &device());
    let mut ours: Vec<(String, Vec<usize>)> = synthetic::state_dict(&network)
        .into_iter()
        .map(|tensor| (tensor.name, tensor.shape.to_vec()))
        .collect();
    let mut upstream: Vec<(String, Vec<usize>)> = depth_anything_layout()
        .into_iter()
        .filter(|entry| !layout::is_unused_upstream_key(&entry.key))
        .map(|entry| (entry.key, entry.shape))
        .collect();
    ours.sort();
    upstream.sort();
    assert_eq!(ours.len(), upstream.len());
    for (a, b) in ours.iter().zip(&upstream) {
        assert_eq!(a, b);
    }
    let used: usize = upstream
        .iter()
        .map(|(_, shape)| shape.iter().product::<usize>())
        .sum();
    assert_eq!(network.num_params(), used);
}

/// The network's output on a small probe input (a non-square token grid).
fn probe(network: Network) -> Vec<f32> {
    let backend = Backend::init(BackendKind::Flex).expect("flex starts");
    DepthModel::new(network, &backend)
        .forward(synthetic::network_input(70, 56), 1, 56, 70)
        .unwrap()
}

fn load(
    path: &Path,
    kind: Option<ModelKind>,
) -> Result<(Network, weights::WeightsReport), WeightsError> {
    weights::load_file(path, None, kind, &device())
}

#[test]
fn every_format_loads_the_same_network() {
    let dir = tempfile::tempdir().unwrap();
    let expected = probe(weights::untrained(RELATIVE, &device()).0);

    let pth = dir.path().join("depth_anything_v2_vits.pth");
    write_pt(&pth, as_dict(synthetic_depth_anything_state_dict("")));
    let safetensors = dir.path().join("depth_anything_v2_vits.safetensors");
    write_safetensors(&safetensors, &synthetic_depth_anything_state_dict(""));
    for (path, format) in [
        (&pth, WeightsFormat::Pytorch),
        (&safetensors, WeightsFormat::Safetensors),
    ] {
        let (network, report) = load(path, None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(report.model, RELATIVE);
        assert_eq!(report.format, Some(format));
        assert_eq!(report.max_depth, None);
        // The mask token and refinenet4's first unit (4 tensors), accepted.
        assert_eq!(report.unused_upstream_keys, 5);
        assert_eq!(probe(network), expected, "{}", path.display());
    }

    let (network, _) = load(&pth, None).unwrap();
    let burnpack = dir.path().join("vits.bpk");
    weights::save_burnpack(&network, &burnpack, &[]).unwrap();
    let (network, report) = load(&burnpack, None).unwrap();
    assert_eq!(report.model, RELATIVE);
    assert_eq!(probe(network), expected);

    // --model must agree with the keys.
    let error = load(&pth, Some(ModelKind::DptHybrid384)).unwrap_err();
    assert!(matches!(error, WeightsError::WrongModel { .. }), "{error}");
    let base = ModelKind::DepthAnythingV2(VitSize::Base, DepthHead::Relative);
    let error = load(&pth, Some(base)).unwrap_err();
    assert!(matches!(error, WeightsError::WrongModel { .. }), "{error}");
}

/// A metric head has the same keys as a relative one: the file's name (or `--model`) says it
/// is metric, and which data set (so the largest depth) when it names one; a `.bpk` carries it.
#[test]
fn metric_models_are_told_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = synthetic_depth_anything_state_dict("");
    let mut outputs = Vec::new();
    for (name, max_depth) in [
        ("depth_anything_v2_metric_hypersim_vits.pth", Some(20.0)),
        ("depth_anything_v2_metric_vkitti_vits.pth", Some(80.0)),
        ("my_metric_finetune.pth", None),
    ] {
        let path = dir.path().join(name);
        write_pt(&path, as_dict(tensors.clone()));
        let (mut network, report) = load(&path, None).unwrap();
        assert_eq!(report.model, METRIC, "{name}");
        assert_eq!(report.max_depth, max_depth, "{name}");
        if max_depth.is_none() {
            assert!(network.set_max_depth(20.0));
        }
        outputs.push((max_depth.unwrap_or(20.0), probe(network)));
    }
    // Metres scale with the largest depth; the same file under another name is the same net.
    let (_, hypersim) = &outputs[0];
    let (_, vkitti) = &outputs[1];
    for (a, b) in hypersim.iter().zip(vkitti) {
        assert!(
            (a * 4.0 - b).abs() <= 1e-4 * b.abs().max(1.0),
            "{a} x 4 != {b}"
        );
        assert!(*a > 0.0 && *a < 20.0, "{a} outside (0, 20) m");
    }
    assert_eq!(outputs[0].1, outputs[2].1);

    // Asked for by --model under a name that says nothing.
    let plain = dir.path().join("weights.pth");
    write_pt(&plain, as_dict(tensors));
    assert_eq!(load(&plain, None).unwrap().1.model, RELATIVE);
    assert_eq!(load(&plain, Some(METRIC)).unwrap().1.model, METRIC);

    // A burnpack keeps the kind and the largest depth.
    let (network, _) = load(
        &dir.path().join("depth_anything_v2_metric_vkitti_vits.pth"),
        None,
    )
    .unwrap();
    let burnpack = dir.path().join("metric.bpk");
    weights::save_burnpack(&network, &burnpack, &[]).unwrap();
    let (network, report) = load(&burnpack, None).unwrap();
    assert_eq!((report.model, report.max_depth), (METRIC, Some(80.0)));
    assert_eq!(probe(network), outputs[1].1);
}

/// The encoder's size is read from the patch embedding's width: a file whose embedding is
/// ViT-B's is taken for ViT-B, and its missing ViT-B tensors are listed.
#[test]
fn encoder_size_is_read_from_the_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = synthetic_depth_anything_state_dict("");
    for tensor in &mut tensors {
        if tensor.key == layout::anchor_key(RELATIVE) {
            tensor.shape = vec![768, 3, 14, 14];
            tensor.bytes = vec![0; 768 * 3 * 14 * 14 * 4];
        }
    }
    let path = dir.path().join("vitb.safetensors");
    write_safetensors(&path, &tensors);
    let error = load(&path, None).unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(&error, WeightsError::Mismatch { model, .. } if *model == ModelKind::DepthAnythingV2(VitSize::Base, DepthHead::Relative)),
        "{message}"
    );
    assert!(
        message.contains("pretrained.blocks.0.attn.qkv.weight"),
        "{message}"
    );
}

/// The output returns to the image's size as upstream's `infer_image` does it (PyTorch's
/// bilinear, `align_corners=True`), enlarged and shrunk, whole and in bands; the 16-bit PNG
/// `render` writes is that map min-max scaled, and the colour PNG that map painted.
#[test]
fn output_is_resized_back_as_infer_image_does() {
    let (shape, data) = read_npy(&fixture("forward/depth_anything_v2_vits_126x98.npy"));
    let depth = DepthMap {
        width: shape[2],
        height: shape[1],
        data,
    };
    for (width, height) in [(171u32, 133u32), (100, 75)] {
        let (_, expected) = read_npy(&fixture(&format!(
            "forward/depth_anything_v2_vits_126x98_to_{width}x{height}.npy"
        )));
        let resizer = BandResizer::depth(&depth, (width, height), OutputResize::BilinearAligned);
        let whole = resizer.depth_band(0, height).unwrap();
        let (low, high) = expected
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
                (l.min(v), h.max(v))
            });
        let worst = max_abs_diff(&whole, &expected);
        assert!(
            worst <= 1e-5 * (high - low),
            "{width}x{height}: max |diff| {worst}, range {}",
            high - low
        );
        let mut banded = resizer.depth_band(0, 40).unwrap();
        banded.extend(resizer.depth_band(40, height - 40).unwrap());
        assert_eq!(
            banded, whole,
            "{width}x{height}: bands differ from the whole"
        );

        let rendered = |format| {
            let options = RenderOptions {
                format,
                resize: OutputResize::BilinearAligned,
                ..RenderOptions::default()
            };
            let bytes: Vec<u8> = pipeline::render(&depth, (width, height), options, None)
                .unwrap()
                .flat_map(|chunk| chunk.unwrap().to_vec())
                .collect();
            image::load_from_memory(&bytes).unwrap()
        };
        let levels = rendered(OutputFormat::Png16).into_luma16();
        assert_eq!(levels.dimensions(), (width, height));
        let got: Vec<f32> = levels.as_raw().iter().map(|&l| f32::from(l)).collect();
        let want: Vec<f32> = expected
            .iter()
            .map(|&v| 65535.0 * (v - low) / (high - low))
            .collect();
        // NaN-keeping: a NaN in the expected levels fails the bound below.
        let off = max_abs_diff(&got, &want);
        assert!(off <= 2.0, "{width}x{height}: 16-bit levels off by {off}");
        let colours = rendered(OutputFormat::Png).into_rgb8();
        let painted = Scale::of(&depth, None).paint(&expected, Colormap::default());
        let differing = colours
            .as_raw()
            .chunks(3)
            .zip(painted.chunks(3))
            .filter(|(a, b)| a != b)
            .count();
        // A value on a colour's boundary may fall either side by a rounding.
        assert!(
            differing * 1000 <= (width * height) as usize,
            "{width}x{height}: {differing} pixels painted differently"
        );
    }
}
