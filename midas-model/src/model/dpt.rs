//! `DPTDepthModel` of `midas/dpt_depth.py` with the `vitb_rn50_384` backbone, `features=256`,
//! `readout="project"`, `non_negative=True`: the `dpt_hybrid_384` model (MiDaS v3.0).

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::prelude::*;

use super::resnet::ResNetV2;
use super::transformer::TransformerBlock;
use super::vit::{EMBED_DIM, HybridVit, Reassemble, TokenEmbedding};
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
        let embedded = self.model.embed(input);
        let [layer1, layer2] = embedded.backbone;
        let [tokens3, tokens4] = self.model.blocks(embedded.tokens);
        [
            layer1,
            layer2,
            self.reassemble3.forward(tokens3, embedded.grid),
            self.reassemble4.forward(tokens4, embedded.grid),
        ]
    }
}

/// DPT-Hybrid taken apart, each part whole, so that another engine can run it its own way.
#[derive(Debug)]
pub struct DptParts {
    /// The ResNet-50 stem and stages.
    pub backbone: ResNetV2,
    /// The token embedding of the ResNet's 1/16 features.
    pub embedding: HybridTokens,
    /// The twelve transformer blocks.
    pub blocks: Vec<TransformerBlock>,
    /// The reassembly of the blocks in [`super::HOOKS`] into the decoder's 1/16 and 1/32
    /// features.
    pub reassembly: [Reassemble; 2],
    /// The fusion decoder.
    pub decoder: Scratch,
}

/// The hybrid ViT's token embedding, owned: the projection of the ResNet's 1/16 features, the
/// class token and the position embedding.
#[derive(Debug)]
pub struct HybridTokens {
    proj: Conv2d,
    cls_token: Param<Tensor<3>>,
    pos_embed: Param<Tensor<3>>,
}

impl HybridTokens {
    /// The ResNet's 1/16 features as the tokens the blocks start from, `[batch, 1 + h * w,
    /// 768]`, and the token grid `(h, w)`.
    pub fn tokens(&self, sixteenth: Tensor<4>) -> (Tensor<3>, (usize, usize)) {
        TokenEmbedding {
            proj: &self.proj,
            cls_token: &self.cls_token,
            pos_embed: &self.pos_embed,
        }
        .tokens(sixteenth)
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
        let [_, _, height, width] = input.dims();
        self.scratch
            .forward(self.pretrained.forward(input), [height, width])
    }

    /// The network taken apart (see [`DptParts`]).
    pub fn into_parts(self) -> DptParts {
        let DptEncoder {
            model,
            reassemble3,
            reassemble4,
        } = self.pretrained;
        DptParts {
            backbone: model.patch_embed.backbone,
            embedding: HybridTokens {
                proj: model.patch_embed.proj,
                cls_token: model.cls_token,
                pos_embed: model.pos_embed,
            },
            blocks: model.blocks,
            reassembly: [reassemble3, reassemble4],
            decoder: self.scratch,
        }
    }
}
