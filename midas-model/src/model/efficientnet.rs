//! The EfficientNet-Lite3 encoder, as `tf_efficientnet_lite3` in gen-efficientnet-pytorch builds it
//! (`geffnet/gen_efficientnet.py`, `geffnet/efficientnet_builder.py`): TensorFlow "SAME" padding,
//! BatchNorm with TensorFlow's epsilon, ReLU6, no squeeze-excite.

use burn::nn::conv::Conv2d;
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::relu;

use super::conv2d;

/// TensorFlow's BatchNorm epsilon, which the `tf_` EfficientNet ports keep. It is not part of the
/// state dict; PyTorch's default (1e-5) would shift the output noticeably.
const BN_EPSILON: f64 = 1e-3;

/// Channel expansion of every inverted-residual block (`_e6` in the architecture strings).
const EXPANSION: usize = 6;

/// One stage of the backbone after the stem block: `(repeats, kernel, stride, out_channels)`,
/// already scaled by Lite3's depth (x1.4, rounded up) and width (x1.2, rounded to 8) multipliers.
const STAGES: [(usize, usize, usize, usize); 6] = [
    (3, 3, 2, 32),
    (3, 5, 2, 48),
    (5, 3, 2, 96),
    (5, 5, 1, 136),
    (6, 5, 2, 232),
    (1, 3, 1, 384),
];

/// Channels of the stem convolution (`stem_size=32`, fixed for the Lite variants).
const STEM_CHANNELS: usize = 32;

/// Output channels of the stem's depthwise-separable block (16 scaled by 1.2, rounded to 24).
const STEM_BLOCK_CHANNELS: usize = 24;

fn batch_norm(device: &Device, channels: usize) -> BatchNorm {
    BatchNormConfig::new(channels)
        .with_epsilon(BN_EPSILON)
        .init(device)
}

/// ReLU6 written as `relu` then `clamp_max`, which Burn's CPU backends run faster than `clamp`.
fn relu6(x: Tensor<4>) -> Tensor<4> {
    relu(x).clamp_max(6.0)
}

/// `DepthwiseSeparableConv` of gen-efficientnet: depthwise conv, BN, ReLU6, pointwise conv, BN.
#[derive(Module, Debug)]
pub struct DepthwiseSeparableConv {
    pub(crate) conv_dw: Conv2d,
    pub(crate) bn1: BatchNorm,
    pub(crate) conv_pw: Conv2d,
    pub(crate) bn2: BatchNorm,
    /// Upstream adds the input back only when the block keeps its shape.
    pub(crate) has_residual: bool,
}

impl DepthwiseSeparableConv {
    fn new(device: &Device, in_channels: usize, out_channels: usize) -> Self {
        let same = PaddingConfig2d::Same;
        Self {
            conv_dw: conv2d(
                device,
                [in_channels, in_channels],
                3,
                1,
                in_channels,
                same.clone(),
                false,
            ),
            bn1: batch_norm(device, in_channels),
            conv_pw: conv2d(device, [in_channels, out_channels], 1, 1, 1, same, false),
            bn2: batch_norm(device, out_channels),
            has_residual: in_channels == out_channels,
        }
    }

    fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let x = relu6(self.bn1.forward(self.conv_dw.forward(input.clone())));
        let x = self.bn2.forward(self.conv_pw.forward(x));
        if self.has_residual { x + input } else { x }
    }
}

/// `InvertedResidual` of gen-efficientnet: pointwise expansion, depthwise conv, pointwise
/// projection, each followed by BN (ReLU6 after the first two), plus the input when shapes allow.
#[derive(Module, Debug)]
pub struct InvertedResidual {
    pub(crate) conv_pw: Conv2d,
    pub(crate) bn1: BatchNorm,
    pub(crate) conv_dw: Conv2d,
    pub(crate) bn2: BatchNorm,
    pub(crate) conv_pwl: Conv2d,
    pub(crate) bn3: BatchNorm,
    /// Upstream adds the input back only for stride 1 with equal channel counts.
    pub(crate) has_residual: bool,
}

impl InvertedResidual {
    fn new(
        device: &Device,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
    ) -> Self {
        let mid = in_channels * EXPANSION;
        let same = PaddingConfig2d::Same;
        Self {
            conv_pw: conv2d(device, [in_channels, mid], 1, 1, 1, same.clone(), false),
            bn1: batch_norm(device, mid),
            conv_dw: conv2d(device, [mid, mid], kernel, stride, mid, same.clone(), false),
            bn2: batch_norm(device, mid),
            conv_pwl: conv2d(device, [mid, out_channels], 1, 1, 1, same, false),
            bn3: batch_norm(device, out_channels),
            has_residual: stride == 1 && in_channels == out_channels,
        }
    }

    fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let x = relu6(self.bn1.forward(self.conv_pw.forward(input.clone())));
        let x = relu6(self.bn2.forward(self.conv_dw.forward(x)));
        let x = self.bn3.forward(self.conv_pwl.forward(x));
        if self.has_residual { x + input } else { x }
    }
}

/// The EfficientNet-Lite3 trunk up to its last block (MiDaS drops the classifier head).
#[derive(Module, Debug)]
pub struct EfficientNetLite3 {
    pub(crate) conv_stem: Conv2d,
    pub(crate) bn1: BatchNorm,
    pub(crate) stem_block: DepthwiseSeparableConv,
    pub(crate) stages: Vec<Vec<InvertedResidual>>,
}

impl EfficientNetLite3 {
    /// Builds the trunk with zeroed parameters.
    pub fn new(device: &Device) -> Self {
        let mut in_channels = STEM_BLOCK_CHANNELS;
        let stages = STAGES
            .iter()
            .map(|&(repeats, kernel, stride, out_channels)| {
                (0..repeats)
                    .map(|i| {
                        // Only the first block of a stage strides (EfficientNetBuilder._make_stack).
                        let block_stride = if i == 0 { stride } else { 1 };
                        let block = InvertedResidual::new(
                            device,
                            in_channels,
                            out_channels,
                            kernel,
                            block_stride,
                        );
                        in_channels = out_channels;
                        block
                    })
                    .collect()
            })
            .collect();
        Self {
            conv_stem: conv2d(
                device,
                [3, STEM_CHANNELS],
                3,
                2,
                1,
                PaddingConfig2d::Same,
                false,
            ),
            bn1: batch_norm(device, STEM_CHANNELS),
            stem_block: DepthwiseSeparableConv::new(device, STEM_CHANNELS, STEM_BLOCK_CHANNELS),
            stages,
        }
    }

    /// The four feature maps MiDaS decodes (its `layer1`..`layer4`: 32, 48, 136 and 384 channels
    /// at 1/4, 1/8, 1/16 and 1/32 of the input size).
    pub fn forward(&self, input: Tensor<4>) -> [Tensor<4>; 4] {
        let run = |x: Tensor<4>, stage: &[InvertedResidual]| {
            stage.iter().fold(x, |x, block| block.forward(x))
        };
        let x = relu6(self.bn1.forward(self.conv_stem.forward(input)));
        let x = self.stem_block.forward(x);
        let layer1 = run(x, &self.stages[0]);
        let layer2 = run(layer1.clone(), &self.stages[1]);
        let layer3 = run(run(layer2.clone(), &self.stages[2]), &self.stages[3]);
        let layer4 = run(run(layer3.clone(), &self.stages[4]), &self.stages[5]);
        [layer1, layer2, layer3, layer4]
    }
}
