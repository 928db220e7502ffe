//! The ResNet-50 stem and first three stages of DPT-Hybrid's encoder: timm's `ResNetV2` with
//! `preact=False`, `stem_type='same'` and layers (3, 4, 9), as `vit_base_r50_s16_384` builds it.
//!
//! Every convolution is timm's `StdConv2dSame` (no bias): its weights are standardised per
//! output channel, which [`crate::weights`] does once at load, so here they are plain
//! convolutions. TensorFlow's SAME padding is asymmetric on the stride-2 operations; for inputs
//! whose sides are multiples of 16 every stride-2 input side is even, so the padding is the
//! constant `(k - 2) / 2` before and `k / 2` after, written here as explicit padding.

use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, GroupNormConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::relu;
use burn::tensor::module::max_pool2d;
use burn::tensor::ops::MaxPoolOptions;

use super::conv2d;

/// timm's `GroupNormAct` uses 32 groups at every width.
const GROUPS: usize = 32;

/// GroupNorm's epsilon (PyTorch's default; not stored in the weights).
const GN_EPSILON: f64 = 1e-5;

/// Stem convolution width.
const STEM_CHANNELS: usize = 64;

/// Blocks per stage and the bottleneck width of each; the output is four times the width.
const STAGES: [(usize, usize); 3] = [(3, 64), (4, 128), (9, 256)];

fn new_group_norm(device: &Device, channels: usize) -> GroupNorm {
    GroupNormConfig::new(GROUPS, channels)
        .with_epsilon(GN_EPSILON)
        .init(device)
}

/// A bias-free convolution with TensorFlow SAME padding for an even input side.
fn std_conv(device: &Device, channels: [usize; 2], kernel: usize, stride: usize) -> Conv2d {
    let total = if stride == 1 {
        kernel - 1
    } else {
        kernel.saturating_sub(2)
    };
    let (before, after) = (total / 2, total - total / 2);
    conv2d(
        device,
        channels,
        kernel,
        stride,
        1,
        PaddingConfig2d::Explicit(before, before, after, after),
        false,
    )
}

/// A convolution followed by GroupNorm (timm's `conv` + `norm` pairs).
#[derive(Module, Debug)]
pub struct ConvNorm {
    pub(crate) conv: Conv2d,
    pub(crate) norm: GroupNorm,
}

impl ConvNorm {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        group_norm(&self.norm, self.conv.forward(x))
    }
}

/// GroupNorm with its statistics reduced in two stages (over each row, then over the rows of a
/// group) instead of Burn's one reduction over the whole group. The two give the same mean and
/// biased variance, but on wgpu (lavapipe seen, Burn 0.22) a single reduction over 65,536 or
/// more values goes wrong (a 45 % variance error at 73,728), and a group of DPT-Hybrid's first
/// stage holds 8 x 96 x 96 = 73,728 values at 384x384; a row is at most as long as the input's
/// width over 2.
pub fn group_norm(norm: &GroupNorm, x: Tensor<4>) -> Tensor<4> {
    let [batch, channels, height, width] = x.dims();
    let groups = norm.num_groups;
    let grouped = x.reshape([batch, groups, channels / groups * height, width]);
    let mean = grouped.clone().mean_dim(3).mean_dim(2);
    let centred = grouped - mean;
    let variance = centred.clone().square().mean_dim(3).mean_dim(2);
    let normalised = (centred / variance.add_scalar(norm.epsilon).sqrt())
        .reshape([batch, channels, height, width]);
    match (&norm.gamma, &norm.beta) {
        (Some(gamma), Some(beta)) => {
            normalised * gamma.val().reshape([1, channels, 1, 1])
                + beta.val().reshape([1, channels, 1, 1])
        }
        _ => normalised,
    }
}

/// timm's `Bottleneck` (post-activation): 1x1, 3x3 (carrying the stride), 1x1, each with
/// GroupNorm, ReLU after the first two and after the residual sum.
#[derive(Module, Debug)]
pub struct Bottleneck {
    /// 1x1 projection of the shortcut, in the first block of each stage.
    pub(crate) downsample: Option<ConvNorm>,
    pub(crate) conv1: Conv2d,
    pub(crate) norm1: GroupNorm,
    pub(crate) conv2: Conv2d,
    pub(crate) norm2: GroupNorm,
    pub(crate) conv3: Conv2d,
    pub(crate) norm3: GroupNorm,
}

impl Bottleneck {
    fn new(device: &Device, in_channels: usize, width: usize, stride: usize) -> Self {
        let out_channels = 4 * width;
        let downsample = (in_channels != out_channels || stride != 1).then(|| ConvNorm {
            conv: std_conv(device, [in_channels, out_channels], 1, stride),
            norm: new_group_norm(device, out_channels),
        });
        Self {
            downsample,
            conv1: std_conv(device, [in_channels, width], 1, 1),
            norm1: new_group_norm(device, width),
            conv2: std_conv(device, [width, width], 3, stride),
            norm2: new_group_norm(device, width),
            conv3: std_conv(device, [width, out_channels], 1, 1),
            norm3: new_group_norm(device, out_channels),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let shortcut = match &self.downsample {
            Some(downsample) => downsample.forward(x.clone()),
            None => x.clone(),
        };
        let y = relu(group_norm(&self.norm1, self.conv1.forward(x)));
        let y = relu(group_norm(&self.norm2, self.conv2.forward(y)));
        let y = group_norm(&self.norm3, self.conv3.forward(y));
        relu(y + shortcut)
    }

    /// The convolutions timm standardises (all of them).
    pub(crate) fn convs_mut(&mut self) -> Vec<&mut Conv2d> {
        let mut convs = vec![&mut self.conv1, &mut self.conv2, &mut self.conv3];
        if let Some(downsample) = &mut self.downsample {
            convs.push(&mut downsample.conv);
        }
        convs
    }
}

/// One stage: its blocks in order (`stages.S.blocks.B`).
#[derive(Module, Debug)]
pub struct Stage {
    pub(crate) blocks: Vec<Bottleneck>,
}

/// The backbone: stem, then three stages whose outputs are the encoder's features at 1/4, 1/8
/// and 1/16 of the input's resolution (256, 512 and 1024 channels).
#[derive(Module, Debug)]
pub struct ResNetV2 {
    pub(crate) stem: ConvNorm,
    pub(crate) stages: Vec<Stage>,
}

impl ResNetV2 {
    /// Builds the backbone with zero parameters.
    pub fn new(device: &Device) -> Self {
        let mut in_channels = STEM_CHANNELS;
        let stages = STAGES
            .iter()
            .enumerate()
            .map(|(index, &(blocks, width))| {
                let stride = if index == 0 { 1 } else { 2 };
                let blocks = (0..blocks)
                    .map(|block| {
                        let b = Bottleneck::new(
                            device,
                            in_channels,
                            width,
                            if block == 0 { stride } else { 1 },
                        );
                        in_channels = 4 * width;
                        b
                    })
                    .collect();
                Stage { blocks }
            })
            .collect();
        Self {
            stem: ConvNorm {
                conv: std_conv(device, [3, STEM_CHANNELS], 7, 2),
                norm: new_group_norm(device, STEM_CHANNELS),
            },
            stages,
        }
    }

    /// The three stages' outputs for a `[batch, 3, H, W]` input (H, W multiples of 16).
    pub fn forward(&self, x: Tensor<4>) -> [Tensor<4>; 3] {
        let x = relu(self.stem.forward(x));
        // timm's MaxPool2dSame pads (0, 1) with -inf; the input is post-ReLU, so any padding
        // value <= 0 gives the same maxima.
        let x = max_pool2d(
            x,
            MaxPoolOptions::new([3, 3])
                .with_stride([2, 2])
                .with_padding_pairs([(0, 1), (0, 1)]),
        );
        let stage = |x: Tensor<4>, index: usize| {
            self.stages[index]
                .blocks
                .iter()
                .fold(x, |x, block| block.forward(x))
        };
        let quarter = stage(x, 0);
        let eighth = stage(quarter.clone(), 1);
        let sixteenth = stage(eighth.clone(), 2);
        [quarter, eighth, sixteenth]
    }

    /// Every convolution whose weights timm standardises: all of the backbone's.
    pub(crate) fn convs_mut(&mut self) -> Vec<&mut Conv2d> {
        let mut convs = vec![&mut self.stem.conv];
        for stage in &mut self.stages {
            for block in &mut stage.blocks {
                convs.extend(block.convs_mut());
            }
        }
        convs
    }
}
