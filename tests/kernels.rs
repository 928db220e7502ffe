//! The CPU kernels against Burn's own operations on the same values: every fused variant of the
//! Winograd 3x3 convolution (ReLU before, ReLU after, residual additions, a batch, bands of tile
//! rows, odd sizes), the 1x1 convolution, the strided stem, depthwise convolutions, both
//! upsampling rules, GroupNorm with its fused tails, and both whole networks on kernels against
//! the same networks on Burn's ops.

use burn::module::Param;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig, ConvTranspose2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, GroupNormConfig};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::relu;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use midas_model::backend::{Backend, BackendKind};
use midas_model::engine::DepthModel;
use midas_model::kernels::{
    Activation, FeatureMap, PackedConv, PackedDepthwise, PackedGroupNorm, PackedTranspose,
    WinogradConv, WinogradTile, bilinear_rows, conv_padded, conv_same, conv_transpose, conv1x1,
    conv1x1_tokens, depthwise, group_norm, upsample, upsample2x, winograd3x3,
};
use midas_model::model::ModelKind;
use midas_model::weights::{self, synthetic};

/// `f32::max` that keeps a NaN instead of dropping it, so a difference built on it fails any
/// `<=` check when an output holds a NaN.
fn nan_max(worst: f32, d: f32) -> f32 {
    if worst.is_nan() || d.is_nan() {
        f32::NAN
    } else {
        worst.max(d)
    }
}

fn device() -> Device {
    Device::flex()
}

fn flex() -> Backend {
    Backend::init(BackendKind::Flex).expect("flex starts")
}

fn random(shape: [usize; 4]) -> Tensor<4> {
    Tensor::random(shape, Distribution::Uniform(-1.0, 1.0), &device())
}

fn conv(in_channels: usize, out_channels: usize, kernel: usize) -> Conv2d {
    let padding = if kernel == 3 {
        PaddingConfig2d::Explicit(1, 1, 1, 1)
    } else {
        PaddingConfig2d::Valid
    };
    Conv2dConfig::new([in_channels, out_channels], [kernel, kernel])
        .with_padding(padding)
        .init(&device())
}

fn values(tensor: Tensor<4>) -> Vec<f32> {
    tensor.into_data().try_into_vec::<f32>().unwrap()
}

/// Largest |a - b| relative to the reference's range, after checking the shapes agree.
fn assert_close(ours: FeatureMap, reference: Tensor<4>, what: &str) {
    let dims = reference.dims();
    assert_eq!(
        [ours.batch, ours.channels, ours.height, ours.width],
        dims,
        "{what}: shape"
    );
    let reference = values(reference);
    let range = reference
        .iter()
        .fold(0.0f32, |m, v| m.max(v.abs()))
        .max(1.0);
    let worst = ours
        .data
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, nan_max);
    assert!(
        worst <= 1e-5 * range * 10.0,
        "{what}: max |diff| {worst} (range {range})"
    );
}

#[test]
fn winograd_conv3x3_matches_burn_in_every_fused_form() {
    // (batch, in, out, height, width): odd sizes; shapes big enough to split into row bands.
    for (batch, cin, cout, height, width) in [
        (1, 5, 7, 9, 13),
        (2, 8, 16, 11, 6),
        (1, 64, 32, 64, 64),
        (1, 32, 32, 95, 129),
    ] {
        let layer = conv(cin, cout, 3);
        let x = random([batch, cin, height, width]);
        let r1 = random([batch, cout, height, width]);
        let r2 = random([batch, cout, height, width]);
        let map = |t: &Tensor<4>| FeatureMap::from_tensor(t.clone());
        for tile in [WinogradTile::Two, WinogradTile::Four] {
            let packed = WinogradConv::with_tile(layer.clone(), tile);
            let run = |x: &Tensor<4>, relu_in, activation, residuals: &[&FeatureMap]| {
                winograd3x3(&map(x), &packed, relu_in, activation, residuals)
            };
            let what = format!("{tile:?} {batch}x{cin}->{cout} {height}x{width}");
            assert_close(
                run(&x, false, Activation::Identity, &[]),
                layer.forward(x.clone()),
                &format!("{what} plain"),
            );
            assert_close(
                run(&x, true, Activation::Relu, &[]),
                relu(layer.forward(relu(x.clone()))),
                &format!("{what} relu in and out"),
            );
            assert_close(
                run(&x, true, Activation::Identity, &[&map(&r1)]),
                layer.forward(relu(x.clone())) + r1.clone(),
                &format!("{what} one residual"),
            );
            assert_close(
                run(&x, true, Activation::Identity, &[&map(&r1), &map(&r2)]),
                layer.forward(relu(x.clone())) + r1.clone() + r2.clone(),
                &format!("{what} residuals"),
            );
        }
    }
}

#[test]
fn winograd_conv3x3_without_bias_matches_burn() {
    let layer = Conv2dConfig::new([6, 4], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .with_bias(false)
        .init(&device());
    let x = random([1, 6, 5, 8]);
    assert_close(
        winograd3x3(
            &FeatureMap::from_tensor(x.clone()),
            &WinogradConv::from_conv(layer.clone()),
            false,
            Activation::Identity,
            &[],
        ),
        layer.forward(x),
        "no bias",
    );
}

#[test]
fn conv1x1_matches_burn() {
    // The last shape is split into bands of pixels.
    for (batch, cin, cout, height, width) in
        [(1, 64, 32, 17, 9), (2, 32, 1, 8, 8), (2, 16, 8, 100, 131)]
    {
        let layer = conv(cin, cout, 1);
        let x = random([batch, cin, height, width]);
        let packed = PackedConv::from_conv(layer.clone());
        assert_close(
            conv1x1(
                &FeatureMap::from_tensor(x.clone()),
                &packed,
                Activation::Identity,
                &[],
            ),
            layer.forward(x.clone()),
            "1x1",
        );
        assert_close(
            conv1x1(
                &FeatureMap::from_tensor(x.clone()),
                &packed,
                Activation::Relu,
                &[],
            ),
            relu(layer.forward(x)),
            "1x1 relu",
        );
    }
}

/// A BatchNorm with non-trivial statistics, as a trained network has.
fn batch_norm(channels: usize) -> BatchNorm {
    let mut bn = BatchNormConfig::new(channels)
        .with_epsilon(1e-3)
        .init(&device());
    let values = |low: f32, high: f32| {
        Tensor::<1>::random(
            [channels],
            Distribution::Uniform(low.into(), high.into()),
            &device(),
        )
    };
    bn.gamma = bn.gamma.map(|_| values(0.5, 1.5));
    bn.beta = bn.beta.map(|_| values(-0.5, 0.5));
    bn.running_mean = burn::module::RunningState::new(values(-0.5, 0.5));
    bn.running_var = burn::module::RunningState::new(values(0.5, 1.5));
    bn
}

#[test]
fn batch_norm_folds_into_the_1x1_convolution_with_relu6_and_a_residual() {
    let layer = Conv2dConfig::new([24, 40], [1, 1])
        .with_bias(false)
        .init(&device());
    let bn = batch_norm(40);
    let x = random([2, 24, 9, 5]).mul_scalar(4.0);
    let r = random([2, 40, 9, 5]);
    let packed = PackedConv::from_conv_bn(layer.clone(), bn.clone());
    assert_close(
        conv1x1(
            &FeatureMap::from_tensor(x.clone()),
            &packed,
            Activation::Relu6,
            &[&FeatureMap::from_tensor(r.clone())],
        ),
        (bn.forward(layer.forward(x)) + r).clamp(0.0, 6.0),
        "1x1 + bn + residual + relu6",
    );
}

#[test]
fn strided_stem_convolution_matches_burn_with_same_padding() {
    for [batch, height, width] in [[1, 32, 32], [2, 17, 10]] {
        let layer = Conv2dConfig::new([3, 32], [3, 3])
            .with_stride([2, 2])
            .with_padding(PaddingConfig2d::Same)
            .with_bias(false)
            .init(&device());
        let bn = batch_norm(32);
        let x = random([batch, 3, height, width]).mul_scalar(4.0);
        assert_close(
            conv_same(
                &FeatureMap::from_tensor(x.clone()),
                &PackedConv::from_conv_bn(layer.clone(), bn.clone()),
                Activation::Relu6,
            ),
            bn.forward(layer.forward(x)).clamp(0.0, 6.0),
            &format!("stem {batch}x{height}x{width}"),
        );
    }
}

/// Depth Anything's reassembly: a 3x3 stride-2 convolution with one row of zeros around (on
/// an odd and an even side, where it differs from SAME padding), transposed convolutions whose
/// kernel is their stride (x4 and x2), and a 1x1 projection read from tokens (class token
/// first) of two images, each against Burn's layer.
#[test]
fn reassembly_layers_match_burn() {
    for [batch, height, width] in [[1, 9, 7], [2, 6, 10]] {
        let layer = Conv2dConfig::new([24, 16], [3, 3])
            .with_stride([2, 2])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(&device());
        let x = random([batch, 24, height, width]);
        assert_close(
            conv_padded(
                &FeatureMap::from_tensor(x.clone()),
                &PackedConv::from_conv(layer.clone()),
                1,
                Activation::Identity,
            ),
            layer.forward(x),
            &format!("3x3 stride 2, {batch}x{height}x{width}"),
        );
    }
    for stride in [4, 2] {
        let layer = ConvTranspose2dConfig::new([12, 20], [stride, stride])
            .with_stride([stride, stride])
            .init(&device());
        let x = random([2, 12, 5, 7]);
        assert_close(
            conv_transpose(
                &FeatureMap::from_tensor(x.clone()),
                &PackedTranspose::from_conv(layer.clone()),
            ),
            layer.forward(x),
            &format!("transposed x{stride}"),
        );
    }
    let (batch, dim, (h, w)) = (2, 32, (5, 3));
    let tokens: Tensor<3> = Tensor::random(
        [batch, 1 + h * w, dim],
        Distribution::Uniform(-1.0, 1.0),
        &device(),
    );
    let layer = conv(dim, 8, 1);
    let patches = tokens
        .clone()
        .narrow(1, 1, h * w)
        .swap_dims(1, 2)
        .reshape([batch, dim, h, w]);
    let flat = tokens.into_data().try_into_vec::<f32>().unwrap();
    assert_close(
        conv1x1_tokens(
            &flat,
            1 + h * w,
            (h, w),
            &PackedConv::from_conv(layer.clone()),
        ),
        layer.forward(patches),
        "1x1 from tokens",
    );
}

#[test]
fn depthwise_matches_burn_with_same_padding() {
    for (kernel, stride) in [(3, 1), (3, 2), (5, 1), (5, 2)] {
        for [batch, channels, height, width] in [
            [1, 6, 9, 13],
            [2, 4, 16, 16],
            [1, 3, 2, 5],
            [2, 5, 7, 45],
            [1, 3, 12, 66],
            // Multiples of 16 channels on rows under 16 wide: the channel-blocked path.
            [1, 32, 8, 8],
            [2, 48, 15, 11],
            [1, 16, 3, 2],
            [1, 16, 20, 15],
            [1, 32, 9, 24],
        ] {
            let layer = Conv2dConfig::new([channels, channels], [kernel, kernel])
                .with_stride([stride, stride])
                .with_groups(channels)
                .with_padding(PaddingConfig2d::Same)
                .with_bias(false)
                .init(&device());
            let bn = batch_norm(channels);
            let x = random([batch, channels, height, width]).mul_scalar(4.0);
            let packed = PackedDepthwise::from_conv_bn(layer.clone(), bn.clone());
            let what = format!("{kernel}x{kernel}/{stride} on {height}x{width}");
            assert_close(
                depthwise(
                    &FeatureMap::from_tensor(x.clone()),
                    &packed,
                    Activation::Relu6,
                ),
                bn.forward(layer.forward(x.clone())).clamp(0.0, 6.0),
                &what,
            );
            assert_close(
                depthwise(
                    &FeatureMap::from_tensor(x.clone()),
                    &packed,
                    Activation::Identity,
                ),
                bn.forward(layer.forward(x)),
                &what,
            );
        }
    }
}

#[test]
fn upsampling_matches_burn_with_and_without_aligned_corners() {
    for align_corners in [true, false] {
        for [batch, channels, height, width] in [[1, 3, 5, 7], [2, 4, 8, 8], [1, 2, 1, 3]] {
            let x = random([batch, channels, height, width]);
            let mut options = InterpolateOptions::new(InterpolateMode::Bilinear);
            options.align_corners = align_corners;
            options.output_size = Some([2 * height, 2 * width]);
            assert_close(
                upsample2x(&FeatureMap::from_tensor(x.clone()), align_corners),
                interpolate(x, options),
                &format!("{height}x{width} align_corners={align_corners}"),
            );
        }
    }
}

/// Every band of rows of a resize to an odd size, the first and last included, equals the
/// same rows of the whole resize, value for value.
#[test]
fn upsampled_bands_are_the_rows_of_the_whole_resize() {
    let input = FeatureMap::from_tensor(random([2, 3, 7, 9]));
    let size = (23, 31);
    for align_corners in [false, true] {
        let whole = upsample(&input, size, align_corners);
        for rows in [0..1, 0..5, 4..17, 17..23, 22..23] {
            let band = bilinear_rows(&input, size, align_corners, rows.clone());
            assert_eq!((band.height, band.width), (rows.len(), size.1));
            for plane in 0..2 * 3 {
                let start = plane * size.0 * size.1;
                let expected = &whole.data[start + rows.start * size.1..start + rows.end * size.1];
                let got =
                    &band.data[plane * rows.len() * size.1..(plane + 1) * rows.len() * size.1];
                assert_eq!(
                    got, expected,
                    "rows {rows:?}, align_corners={align_corners}"
                );
            }
        }
    }
}

/// GroupNorm with every fused tail (none, ReLU, a residual then ReLU), on an odd-sized map
/// whose values sit far from zero (a one-pass variance would lose them), against Burn's
/// GroupNorm followed by the same operations.
#[test]
fn group_norm_matches_burn_with_its_fused_residual_and_relu() {
    let channels = 64;
    let mut norm = GroupNormConfig::new(32, channels).init(&device());
    let values = |low: f64, high: f64| {
        Param::from_tensor(Tensor::<1>::random(
            [channels],
            Distribution::Uniform(low, high),
            &device(),
        ))
    };
    norm.gamma = Some(values(0.5, 1.5));
    norm.beta = Some(values(-0.5, 0.5));
    let input = random([2, channels, 13, 11]).add_scalar(20.0);
    let residual = random([2, channels, 13, 11]);
    let packed = PackedGroupNorm::pack(norm.clone());
    let normed = norm.forward(input.clone());
    for (with_residual, with_relu) in [(false, false), (false, true), (true, true)] {
        let mut reference = normed.clone();
        if with_residual {
            reference = reference + residual.clone();
        }
        if with_relu {
            reference = relu(reference);
        }
        let residual_map = FeatureMap::from_tensor(residual.clone());
        let ours = group_norm(
            FeatureMap::from_tensor(input.clone()),
            &packed,
            with_residual.then_some(&residual_map),
            with_relu,
        );
        assert_close(
            ours,
            reference,
            &format!("residual {with_residual}, relu {with_relu}"),
        );
    }
}

/// Both networks on the kernels against the same networks on Burn's operations: a batch of two
/// different inputs, at a size that is a multiple of 16 but not of 32 for DPT-Hybrid.
#[test]
fn whole_networks_are_the_same_on_kernels_and_on_burn_ops() {
    for (kind, height, width) in [
        (ModelKind::MidasV21Small256, 96, 64),
        (ModelKind::DptHybrid384, 48, 80),
    ] {
        whole_network_is_the_same_on_kernels_and_on_burn_ops(kind, height, width);
    }
}

fn whole_network_is_the_same_on_kernels_and_on_burn_ops(
    kind: ModelKind,
    height: usize,
    width: usize,
) {
    let (model, _) = weights::untrained(kind, &device());
    let one = synthetic::network_input(width, height);
    let input = [one.clone(), one.iter().map(|v| -v).collect()].concat();
    let kernels = DepthModel::new(model.clone(), &flex())
        .forward(input.clone(), 2, height, width)
        .unwrap();
    let burn = DepthModel::burn_only(model, device())
        .forward(input, 2, height, width)
        .unwrap();
    assert_eq!(kernels.len(), 2 * height * width);
    let range =
        burn.iter().fold(0.0f32, |m, v| m.max(*v)) - burn.iter().fold(f32::MAX, |m, v| m.min(*v));
    assert!(
        range > 0.0,
        "{kind}: the synthetic model gives a varied output"
    );
    let worst = kernels
        .iter()
        .zip(&burn)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, nan_max);
    assert!(
        worst <= 1e-4 * range,
        "{kind}: max |diff| {worst}, range {range}"
    );
}

/// The public entry points check their preconditions in release builds too: a map whose data
/// does not match its dimensions, a wrong channel count or a residual of another shape is a
/// panic with a message, never an out-of-bounds access.
#[test]
fn kernel_entry_points_refuse_inconsistent_maps() {
    let expect_panic = |what: &str, run: &(dyn Fn() + std::panic::RefUnwindSafe)| {
        let message = std::panic::catch_unwind(run)
            .err()
            .unwrap_or_else(|| panic!("{what}: no panic"));
        let text = message
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| message.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        assert!(
            text.contains("map") || text.contains("residual") || text.contains("only"),
            "{what}: {text}"
        );
    };
    let one = PackedConv::from_conv(conv(8, 4, 1));
    let three = WinogradConv::from_conv(conv(8, 4, 3));
    let good = FeatureMap::from_tensor(random([1, 8, 6, 5]));
    let mut short = good.clone();
    short.data.truncate(10);
    let wrong_channels = FeatureMap::from_tensor(random([1, 7, 6, 5]));
    let wrong_residual = FeatureMap::from_tensor(random([1, 4, 6, 4]));
    expect_panic("1x1, short data", &|| {
        conv1x1(&short, &one, Activation::Identity, &[]);
    });
    expect_panic("1x1, channels", &|| {
        conv1x1(&wrong_channels, &one, Activation::Identity, &[]);
    });
    expect_panic("1x1, residual", &|| {
        conv1x1(&good, &one, Activation::Identity, &[&wrong_residual]);
    });
    expect_panic("3x3, short data", &|| {
        winograd3x3(&short, &three, false, Activation::Identity, &[]);
    });
    expect_panic("3x3, residual", &|| {
        winograd3x3(
            &good,
            &three,
            false,
            Activation::Identity,
            &[&wrong_residual],
        );
    });
    expect_panic("3x3 from a 1x1 layer", &|| {
        WinogradConv::from_conv(conv(8, 4, 1));
    });
    expect_panic("upsample, short data", &|| {
        upsample2x(&short, false);
    });
}

/// Every test above again in a child process on each narrower instruction-set path this CPU
/// has (`MIDAS_SIMD` caps the kernels' dispatch): the vectorised loops are compiled once per
/// path, and each must agree with Burn.
#[test]
fn every_kernel_test_passes_on_the_narrower_instruction_sets() {
    // Run whatever MIDAS_SIMD this process has: each child sets its own, and skips this test.
    for path in ["avx2", "baseline"] {
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .env("MIDAS_SIMD", path)
            .args(["--skip", "narrower_instruction_sets", "--test-threads", "1"])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "MIDAS_SIMD={path}:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let summary = String::from_utf8_lossy(&output.stdout);
        assert!(
            summary.contains("test result: ok") && !summary.contains(" 0 passed"),
            "MIDAS_SIMD={path} ran no test:\n{summary}"
        );
    }
}
