//! `MidasNet_small` of `midas/midas_net_custom.py` with `features=64`, `expand=True`,
//! `non_negative=True` and `align_corners=True`: the `midas_v21_small_256` model.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::prelude::*;

use super::{EfficientNetLite3, FeatureFusionBlock, OutputHead, conv2d};

/// Decoder width (`features=64`); with `expand=True` the four levels use 64, 128, 256 and 512.
const FEATURES: usize = 64;

/// Encoder channels of `layer1`..`layer4` for EfficientNet-Lite3.
const ENCODER_CHANNELS: [usize; 4] = [32, 48, 136, 384];

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
    fn new(device: &Device) -> Self {
        let width = |level: usize| FEATURES << level;
        let projection = |level: usize| {
            conv2d(
                device,
                [ENCODER_CHANNELS[level], width(level)],
                3,
                1,
                1,
                PaddingConfig2d::Explicit(1, 1, 1, 1),
                false,
            )
        };
        Self {
            layer1_rn: projection(0),
            layer2_rn: projection(1),
            layer3_rn: projection(2),
            layer4_rn: projection(3),
            // refinenet1 is built without `expand` upstream, so it keeps 64 channels.
            refinenet1: FeatureFusionBlock::new(device, width(0), false, true),
            refinenet2: FeatureFusionBlock::new(device, width(1), true, true),
            refinenet3: FeatureFusionBlock::new(device, width(2), true, true),
            refinenet4: FeatureFusionBlock::new(device, width(3), true, false),
            output_conv: OutputHead::new(device, FEATURES),
        }
    }

    /// The encoder's features at 1/4, 1/8, 1/16 and 1/32 of the input's resolution to
    /// `[batch, H, W]` inverse depth.
    pub fn forward(&self, features: [Tensor<4>; 4]) -> Tensor<3> {
        let [layer1, layer2, layer3, layer4] = features;
        let path4 = self
            .refinenet4
            .forward(self.layer4_rn.forward(layer4), None);
        let path3 = self
            .refinenet3
            .forward(path4, Some(self.layer3_rn.forward(layer3)));
        let path2 = self
            .refinenet2
            .forward(path3, Some(self.layer2_rn.forward(layer2)));
        let path1 = self
            .refinenet1
            .forward(path2, Some(self.layer1_rn.forward(layer1)));
        self.output_conv.forward(path1).squeeze_dim(1)
    }
}

/// MiDaS v2.1 small: EfficientNet-Lite3 encoder (`pretrained`) and fusion decoder (`scratch`).
///
/// Input: `[batch, 3, H, W]`, normalised RGB with H and W multiples of 32.
/// Output: `[batch, H, W]` relative inverse depth (larger is nearer), non-negative.
#[derive(Module, Debug)]
pub struct MidasSmall {
    pretrained: EfficientNetLite3,
    scratch: Scratch,
}

impl MidasSmall {
    /// Builds the network with every parameter zero; fill it with [`crate::weights`].
    pub fn new(device: &Device) -> Self {
        Self {
            pretrained: EfficientNetLite3::new(device),
            scratch: Scratch::new(device),
        }
    }

    /// Runs the network.
    pub fn forward(&self, input: Tensor<4>) -> Tensor<3> {
        self.scratch.forward(self.pretrained.forward(input))
    }

    /// The encoder and the decoder, to run them apart.
    pub fn into_parts(self) -> (EfficientNetLite3, Scratch) {
        (self.pretrained, self.scratch)
    }
}
