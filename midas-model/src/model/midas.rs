//! `MidasNet_small` of `midas/midas_net_custom.py` with `features=64`, `expand=True`,
//! `non_negative=True` and `align_corners=True`: the `midas_v21_small_256` model.

use burn::prelude::*;

use super::{DecoderConfig, EfficientNetLite3, Scratch};

/// The decoder of `midas_v21_small_256`: `features=64` with `expand=True` (64, 128, 256 and 512
/// channels over the EfficientNet-Lite3 features), head corners not aligned.
pub const SMALL_DECODER: DecoderConfig = DecoderConfig {
    encoder_channels: [32, 48, 136, 384],
    features: 64,
    expand: true,
    head_align_corners: false,
};

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
            scratch: Scratch::new(device, SMALL_DECODER),
        }
    }

    /// Runs the network.
    pub fn forward(&self, input: Tensor<4>) -> Tensor<3> {
        let [_, _, height, width] = input.dims();
        self.scratch
            .forward(self.pretrained.forward(input), [height, width])
    }

    /// The encoder and the decoder, to run them apart.
    pub fn into_parts(self) -> (EfficientNetLite3, Scratch) {
        (self.pretrained, self.scratch)
    }
}
