//! The network's operations one by one, Burn's CPU ops (`flex`) next to
//! [`midas_model::kernels`], at the shapes a 256x256 input gives them. `cargo bench --bench ops`.

use burn::nn::conv::Conv2dConfig;
use burn::nn::{BatchNormConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use midas_model::kernels::{
    Activation, FeatureMap, PackedConv, PackedDepthwise, WinogradConv, WinogradTile, conv1x1,
    depthwise, upsample2x, winograd3x3,
};

/// (in channels, out channels, side): the 3x3 convolutions of the four decoder levels and the
/// output head's two.
const CONV3X3: [(usize, usize, usize); 6] = [
    (512, 512, 8),
    (256, 256, 16),
    (128, 128, 32),
    (64, 64, 64),
    (64, 32, 128),
    (32, 32, 256),
];

/// (channels, input side, kernel, stride): encoder depthwise convolutions, from the widest map
/// to the deepest.
const DEPTHWISE: [(usize, usize, usize, usize); 5] = [
    (144, 128, 3, 2),
    (192, 64, 3, 1),
    (288, 32, 5, 1),
    (816, 16, 5, 1),
    (1392, 8, 5, 1),
];

/// (channels, side) of the upsamplings.
const UPSAMPLE: [(usize, usize); 3] = [(128, 32), (64, 64), (32, 128)];

fn random(shape: [usize; 4], device: &Device) -> Tensor<4> {
    Tensor::random(shape, Distribution::Uniform(-1.0, 1.0), device)
}

fn ops(c: &mut Criterion) {
    let device = Device::flex();
    let mut group = c.benchmark_group("ops");
    group.sample_size(20);
    for (cin, cout, side) in CONV3X3 {
        let layer = Conv2dConfig::new([cin, cout], [3, 3])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(&device);
        let x = random([1, cin, side, side], &device);
        let map = FeatureMap::from_tensor(x.clone());
        let id = format!("{cin}-{cout}@{side}");
        group.bench_with_input(BenchmarkId::new("conv3x3/burn", &id), &x, |b, x| {
            b.iter(|| layer.forward(x.clone()).into_data())
        });
        // Both Winograd tiles at every shape, to check where `WinogradTile::for_channels`
        // draws its line.
        for tile in [WinogradTile::Two, WinogradTile::Four] {
            let winograd = WinogradConv::with_tile(layer.clone(), tile);
            let name = format!("conv3x3/kernels-{tile:?}");
            group.bench_with_input(BenchmarkId::new(name, &id), &map, |b, map| {
                b.iter(|| winograd3x3(map, &winograd, false, Activation::Identity, &[]))
            });
        }
    }
    for (cin, side) in [(128, 32), (64, 64)] {
        let layer = Conv2dConfig::new([cin, cin / 2], [1, 1]).init(&device);
        let packed = PackedConv::from_conv(layer.clone());
        let x = random([1, cin, side, side], &device);
        let map = FeatureMap::from_tensor(x.clone());
        let id = format!("{cin}-{}@{side}", cin / 2);
        group.bench_with_input(BenchmarkId::new("conv1x1/burn", &id), &x, |b, x| {
            b.iter(|| layer.forward(x.clone()).into_data())
        });
        group.bench_with_input(BenchmarkId::new("conv1x1/kernels", &id), &map, |b, map| {
            b.iter(|| conv1x1(map, &packed, Activation::Identity, &[]))
        });
    }
    for (channels, side, kernel, stride) in DEPTHWISE {
        let layer = Conv2dConfig::new([channels, channels], [kernel, kernel])
            .with_stride([stride, stride])
            .with_groups(channels)
            .with_padding(PaddingConfig2d::Same)
            .with_bias(false)
            .init(&device);
        let norm = BatchNormConfig::new(channels).init(&device);
        let packed = PackedDepthwise::from_conv_bn(layer.clone(), norm.clone());
        let x = random([1, channels, side, side], &device);
        let map = FeatureMap::from_tensor(x.clone());
        let id = format!("{channels}-k{kernel}s{stride}@{side}");
        group.bench_with_input(BenchmarkId::new("depthwise/burn", &id), &x, |b, x| {
            b.iter(|| {
                norm.forward(layer.forward(x.clone()))
                    .clamp(0.0, 6.0)
                    .into_data()
            })
        });
        group.bench_with_input(
            BenchmarkId::new("depthwise/kernels", &id),
            &map,
            |b, map| b.iter(|| depthwise(map, &packed, Activation::Relu6)),
        );
    }
    for (channels, side) in UPSAMPLE {
        let x = random([1, channels, side, side], &device);
        let map = FeatureMap::from_tensor(x.clone());
        let id = format!("{channels}@{side}");
        group.bench_with_input(BenchmarkId::new("upsample/burn", &id), &x, |b, x| {
            b.iter(|| {
                let mut options = InterpolateOptions::new(InterpolateMode::Bilinear);
                options.align_corners = true;
                options.output_size = Some([2 * side, 2 * side]);
                interpolate(x.clone(), options).into_data()
            })
        });
        group.bench_with_input(BenchmarkId::new("upsample/kernels", &id), &map, |b, map| {
            b.iter(|| upsample2x(map, true))
        });
    }
    group.finish();
}

criterion_group!(benches, ops);
criterion_main!(benches);
