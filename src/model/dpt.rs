//! `DPTDepthModel` of `midas/dpt_depth.py` with the `vitb_rn50_384` backbone, `features=256`,
//! `readout="project"`, `non_negative=True`: the `dpt_hybrid_384` model (MiDaS v3.0).

use burn::prelude::*;

use super::resnet::ResNetV2;
use super::vit::{EMBED_DIM, HybridVit, Reassemble, TransformerBlock};
use super::{DecoderConfig, Scratch};

/// `pretrained`: the hybrid ViT and the reassembly of its two hooked token sets.
#[derive(Module, Debug)]
pub struct DptEncoder {
    pub(crate) model: HybridVit,
    pub(crate) reassemble3: Reassemble,
    pub(crate) reassemble4: Reassemble,
}

impl DptEncoder {
    fn new(device: &Device) -> Self {
        Self {
            model: HybridVit::new(device),
            reassemble3: Reassemble::new(device, false),
            reassemble4: Reassemble::new(device, true),
        }
    }

    /// The features at 1/4, 1/8, 1/16 and 1/32 of a `[batch, 3, H, W]` input's resolution
    /// (H and W multiples of 16): 256, 512, 768 and 768 channels. Computed per call and
    /// returned, never kept anywhere shared.
    pub fn forward(&self, input: Tensor<4>) -> [Tensor<4>; 4] {
        self.forward_with(
            input,
            |x| self.model.backbone().forward(x),
            |tokens| self.model.blocks(tokens),
        )
    }

    /// [`DptEncoder::forward`] with the ResNet run by `backbone` (the input to its three
    /// stages' outputs) and the transformer blocks by `blocks` (the embedded tokens to the
    /// outputs of the hooked blocks).
    pub fn forward_with(
        &self,
        input: Tensor<4>,
        backbone: impl FnOnce(Tensor<4>) -> [Tensor<4>; 3],
        blocks: impl FnOnce(Tensor<3>) -> [Tensor<3>; 2],
    ) -> [Tensor<4>; 4] {
        let embedded = self.model.embed(input, backbone);
        let [layer1, layer2] = embedded.backbone;
        let [tokens3, tokens4] = blocks(embedded.tokens);
        [
            layer1,
            layer2,
            self.reassemble3.forward(tokens3, embedded.grid),
            self.reassemble4.forward(tokens4, embedded.grid),
        ]
    }

    /// Takes the ResNet's stages and the transformer blocks out, to run them elsewhere (see
    /// `HybridVit::take_heavy_parts`): the encoder then runs through
    /// [`DptEncoder::forward_with`] only.
    pub fn take_heavy_parts(&mut self) -> (ResNetV2, Vec<TransformerBlock>) {
        self.model.take_heavy_parts()
    }
}

/// MiDaS v3.0 DPT-Hybrid: ResNet-50 + ViT-B/16 encoder (`pretrained`) and the fusion decoder
/// (`scratch`).
///
/// Input: `[batch, 3, H, W]`, normalised RGB with H and W multiples of 16.
/// Output: `[batch, H, W]` relative inverse depth, non-negative.
#[derive(Module, Debug)]
pub struct DptHybrid {
    pub(crate) pretrained: DptEncoder,
    pub(crate) scratch: Scratch,
}

/// The decoder of `dpt_hybrid_384`: 256 features at every level, corners aligned in the head.
pub const DPT_DECODER: DecoderConfig = DecoderConfig {
    encoder_channels: [256, 512, EMBED_DIM, EMBED_DIM],
    features: 256,
    expand: false,
    head_align_corners: true,
};

impl DptHybrid {
    /// Builds the network with every parameter zero; fill it with [`crate::weights`].
    pub fn new(device: &Device) -> Self {
        Self {
            pretrained: DptEncoder::new(device),
            scratch: Scratch::new(device, DPT_DECODER),
        }
    }

    /// Runs the network.
    pub fn forward(&self, input: Tensor<4>) -> Tensor<3> {
        self.scratch.forward(self.pretrained.forward(input))
    }

    /// The encoder and the decoder, to run them apart.
    pub fn into_parts(self) -> (DptEncoder, Scratch) {
        (self.pretrained, self.scratch)
    }
}
