//! The MiDaS decoder (`scratch`) every model shares, from `midas/blocks.py` (Depth Anything V2's
//! `util/blocks.py` is the same code): `ResidualConvUnit_custom`, `FeatureFusionBlock_custom`
//! (with `bn=False`, `deconv=False`) and the output head. The models differ only in widths, in
//! the head's bilinear convention ([`DecoderConfig`]) and, for Depth Anything V2's metric
//! models, in the head's last activation ([`OutputHead`]).

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::prelude::*;
use burn::tensor::activation::{relu, sigmoid};
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};

use super::conv2d;

/// Upstream's 3x3, stride 1, padding 1 convolution with bias.
fn conv3x3(device: &Device, in_channels: usize, out_channels: usize) -> Conv2d {
    conv2d(
        device,
        [in_channels, out_channels],
        3,
        1,
        1,
        PaddingConfig2d::Explicit(1, 1, 1, 1),
        true,
    )
}

/// Bilinear resizing to `[height, width]`. The fusion blocks align corners; MiDaS small's head
/// does not (its `Interpolate` defaults to `align_corners=False`) while DPT's does; mixing them
/// up moves the output.
fn resize(x: Tensor<4>, size: [usize; 2], align_corners: bool) -> Tensor<4> {
    let options = InterpolateOptions::new(InterpolateMode::Bilinear)
        .with_align_corners(align_corners)
        .with_output_size(size);
    interpolate(x, options)
}

/// Twice the spatial size of a feature map.
fn doubled(x: &Tensor<4>) -> [usize; 2] {
    let [_, _, height, width] = x.dims();
    [2 * height, 2 * width]
}

/// The spatial size of a feature map.
fn spatial(x: &Tensor<4>) -> [usize; 2] {
    let [_, _, height, width] = x.dims();
    [height, width]
}

/// `ResidualConvUnit_custom`: `x + conv2(relu(conv1(relu(x))))`.
#[derive(Module, Debug)]
pub struct ResidualConvUnit {
    pub(crate) conv1: Conv2d,
    pub(crate) conv2: Conv2d,
}

impl ResidualConvUnit {
    fn new(device: &Device, features: usize) -> Self {
        Self {
            conv1: conv3x3(device, features, features),
            conv2: conv3x3(device, features, features),
        }
    }

    fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let x = self.conv1.forward(relu(input.clone()));
        let x = self.conv2.forward(relu(x));
        x + input
    }
}

/// `FeatureFusionBlock_custom`: adds the refined skip connection (when there is one), refines,
/// upsamples x2 with aligned corners and projects with a 1x1 convolution.
#[derive(Module, Debug)]
pub struct FeatureFusionBlock {
    /// Refines the skip input. The deepest block has no skip input, so upstream's copy of this
    /// unit there is never called and is not built here (its keys are accepted and ignored).
    pub(crate) res_conf_unit1: Option<ResidualConvUnit>,
    pub(crate) res_conf_unit2: ResidualConvUnit,
    pub(crate) out_conv: Conv2d,
}

impl FeatureFusionBlock {
    /// `features` in; `features / 2` out when `expand`, as upstream's `expand=True` decoder does.
    pub fn new(device: &Device, features: usize, expand: bool, has_skip: bool) -> Self {
        let out_features = if expand { features / 2 } else { features };
        Self {
            res_conf_unit1: has_skip.then(|| ResidualConvUnit::new(device, features)),
            res_conf_unit2: ResidualConvUnit::new(device, features),
            out_conv: conv2d(
                device,
                [features, out_features],
                1,
                1,
                1,
                PaddingConfig2d::Valid,
                true,
            ),
        }
    }

    /// `skip` is the encoder feature at this resolution (`None` for the deepest block);
    /// `size` is the next level's (upstream passes it explicitly, which matters when a side is
    /// not a multiple of 32).
    pub fn forward(
        &self,
        input: Tensor<4>,
        skip: Option<Tensor<4>>,
        size: [usize; 2],
    ) -> Tensor<4> {
        let x = match (&self.res_conf_unit1, skip) {
            (Some(unit), Some(skip)) => input + unit.forward(skip),
            _ => input,
        };
        let x = self.res_conf_unit2.forward(x);
        self.out_conv.forward(resize(x, size, true))
    }
}

/// `scratch.output_conv` (MiDaS) or `output_conv1` and `output_conv2` (Depth Anything V2): conv
/// 3x3 (features -> features/2), bilinear to the input's size (x2 in MiDaS), conv 3x3 -> 32,
/// ReLU, conv 1x1 -> 1, then ReLU (relative output: MiDaS's `non_negative=True`) or, for a
/// metric Depth Anything V2 head, a sigmoid times the largest depth.
#[derive(Module, Debug)]
pub struct OutputHead {
    pub(crate) conv1: Conv2d,
    pub(crate) conv2: Conv2d,
    pub(crate) conv3: Conv2d,
    /// The upsampling's convention: false for MiDaS small, true for DPT and Depth Anything.
    pub(crate) align_corners: bool,
    /// For a metric head, the depth in metres a sigmoid of one maps to; `None` for relative
    /// output.
    pub(crate) max_depth: Option<f32>,
}

/// Channels of the head's hidden convolution (hard-coded upstream).
const HEAD_CHANNELS: usize = 32;

impl OutputHead {
    /// A head for a decoder of `features` channels.
    pub fn new(device: &Device, features: usize, align_corners: bool) -> Self {
        Self {
            conv1: conv3x3(device, features, features / 2),
            conv2: conv3x3(device, features / 2, HEAD_CHANNELS),
            conv3: conv2d(
                device,
                [HEAD_CHANNELS, 1],
                1,
                1,
                1,
                PaddingConfig2d::Valid,
                true,
            ),
            align_corners,
            max_depth: None,
        }
    }

    /// Maps the finest decoder feature to the `[batch, 1, H, W]` output (`size` is `[H, W]`,
    /// the network input's): non-negative inverse depth, or metres for a metric head.
    pub fn forward(&self, input: Tensor<4>, size: [usize; 2]) -> Tensor<4> {
        let x = self.conv1.forward(input);
        let x = resize(x, size, self.align_corners);
        let x = relu(self.conv2.forward(x));
        let x = self.conv3.forward(x);
        match self.max_depth {
            Some(max_depth) => sigmoid(x).mul_scalar(max_depth),
            None => relu(x),
        }
    }
}

/// The widths and conventions that make [`Scratch`] one model's decoder.
#[derive(Clone, Copy, Debug)]
pub struct DecoderConfig {
    /// Channels of the encoder's four features, finest first.
    pub encoder_channels: [usize; 4],
    /// Decoder width at the finest level.
    pub features: usize,
    /// Upstream's `expand`: level `k` is `features << k` wide (except the finest fusion block).
    pub expand: bool,
    /// The output head's bilinear convention.
    pub head_align_corners: bool,
}

/// Upstream's `scratch`: the 3x3 projections of the encoder features (`layerN_rn`, no bias),
/// the four fusion blocks and the output head.
#[derive(Module, Debug)]
pub struct Scratch {
    pub(crate) layer1_rn: Conv2d,
    pub(crate) layer2_rn: Conv2d,
    pub(crate) layer3_rn: Conv2d,
    pub(crate) layer4_rn: Conv2d,
    pub(crate) refinenet1: FeatureFusionBlock,
    pub(crate) refinenet2: FeatureFusionBlock,
    pub(crate) refinenet3: FeatureFusionBlock,
    pub(crate) refinenet4: FeatureFusionBlock,
    pub(crate) output_conv: OutputHead,
}

impl Scratch {
    /// Builds the decoder `config` describes, with zero parameters.
    pub fn new(device: &Device, config: DecoderConfig) -> Self {
        let width = |level: usize| {
            if config.expand {
                config.features << level
            } else {
                config.features
            }
        };
        let projection = |level: usize| {
            conv2d(
                device,
                [config.encoder_channels[level], width(level)],
                3,
                1,
                1,
                PaddingConfig2d::Explicit(1, 1, 1, 1),
                false,
            )
        };
        let fusion = |level: usize| {
            // refinenet1 is built without `expand` upstream, so it keeps its width.
            FeatureFusionBlock::new(device, width(level), config.expand && level > 0, level < 3)
        };
        Self {
            layer1_rn: projection(0),
            layer2_rn: projection(1),
            layer3_rn: projection(2),
            layer4_rn: projection(3),
            refinenet1: fusion(0),
            refinenet2: fusion(1),
            refinenet3: fusion(2),
            refinenet4: fusion(3),
            output_conv: OutputHead::new(device, config.features, config.head_align_corners),
        }
    }

    /// The encoder's four features, finest first (1/4, 1/8, 1/16 and 1/32 of the input's
    /// resolution in MiDaS; 4, 2, 1 and 1/2 tokens per token in Depth Anything V2) to the
    /// `[batch, H, W]` output, `size` being `[H, W]`.
    pub fn forward(&self, features: [Tensor<4>; 4], size: [usize; 2]) -> Tensor<3> {
        let [layer1, layer2, layer3, layer4] = features;
        let layer1 = self.layer1_rn.forward(layer1);
        let layer2 = self.layer2_rn.forward(layer2);
        let layer3 = self.layer3_rn.forward(layer3);
        let layer4 = self.layer4_rn.forward(layer4);
        let path4 = self.refinenet4.forward(layer4, None, spatial(&layer3));
        let path3 = self
            .refinenet3
            .forward(path4, Some(layer3), spatial(&layer2));
        let size2 = spatial(&layer1);
        let size1 = doubled(&layer1);
        let path2 = self.refinenet2.forward(path3, Some(layer2), size2);
        let path1 = self.refinenet1.forward(path2, Some(layer1), size1);
        self.output_conv.forward(path1, size).squeeze_dim(1)
    }
}
