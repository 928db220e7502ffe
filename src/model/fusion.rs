//! The MiDaS decoder blocks of `midas/blocks.py`: `ResidualConvUnit_custom`,
//! `FeatureFusionBlock_custom` (with `bn=False`, `deconv=False`) and the output head.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::prelude::*;
use burn::tensor::activation::relu;
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

/// Bilinear x2 upsampling. The fusion blocks align corners, the output head does not
/// (upstream's `Interpolate` defaults to `align_corners=False`); mixing them up moves the output.
fn upsample2x(x: Tensor<4>, align_corners: bool) -> Tensor<4> {
    let [_, _, height, width] = x.dims();
    let mut options = InterpolateOptions::new(InterpolateMode::Bilinear);
    options.align_corners = align_corners;
    options.output_size = Some([height * 2, width * 2]);
    interpolate(x, options)
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

    /// `skip` is the encoder feature at this resolution; `None` for the deepest block.
    pub fn forward(&self, input: Tensor<4>, skip: Option<Tensor<4>>) -> Tensor<4> {
        let x = match (&self.res_conf_unit1, skip) {
            (Some(unit), Some(skip)) => input + unit.forward(skip),
            _ => input,
        };
        let x = self.res_conf_unit2.forward(x);
        self.out_conv.forward(upsample2x(x, true))
    }
}

/// `scratch.output_conv`: conv 3x3 (features -> features/2), bilinear x2 (corners not aligned),
/// conv 3x3 -> 32, ReLU, conv 1x1 -> 1, ReLU (`non_negative=True`).
#[derive(Module, Debug)]
pub struct OutputHead {
    pub(crate) conv1: Conv2d,
    pub(crate) conv2: Conv2d,
    pub(crate) conv3: Conv2d,
}

/// Channels of the head's hidden convolution (hard-coded upstream).
const HEAD_CHANNELS: usize = 32;

impl OutputHead {
    /// A head for a decoder of `features` channels.
    pub fn new(device: &Device, features: usize) -> Self {
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
        }
    }

    /// Maps the finest decoder feature to a `[batch, 1, H, W]` non-negative inverse depth.
    pub fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let x = upsample2x(self.conv1.forward(input), false);
        let x = relu(self.conv2.forward(x));
        relu(self.conv3.forward(x))
    }
}
