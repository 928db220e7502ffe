//! The ViT-B/16 half of DPT-Hybrid's encoder: timm's `VisionTransformer` blocks over the
//! ResNet's 1/16 features (`vit_base_r50_s16_384`), with MiDaS's `forward_flex` (any input size,
//! the position embedding resized to the token grid) and its "project" readout reassembly.

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::nn::{Linear, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::gelu;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};

use super::conv2d;
use super::resnet::ResNetV2;
use super::transformer::{TransformerBlock, linear};

/// Token width.
pub const EMBED_DIM: usize = 768;

/// Transformer blocks.
const DEPTH: usize = 12;

/// Side of the position embedding's grid: 384 / 16.
pub const POS_GRID: usize = 24;

/// Channels of the ResNet features the tokens are projected from.
const BACKBONE_CHANNELS: usize = 1024;

/// The blocks whose outputs MiDaS takes (`hooks=[0, 1, 8, 11]`; the first two are the ResNet's
/// in the hybrid).
pub const HOOKS: [usize; 2] = [8, 11];

/// timm's `HybridEmbed`: the ResNet, then a 1x1 projection of its 1/16 features to tokens.
#[derive(Module, Debug)]
pub struct HybridEmbed {
    pub(crate) backbone: ResNetV2,
    pub(crate) proj: Conv2d,
}

/// `pretrained.model`: embedding, class token, position embedding and the twelve blocks. The
/// final LayerNorm and classifier head exist upstream but MiDaS discards their results, so they
/// are not built (their keys are accepted and dropped).
#[derive(Module, Debug)]
pub struct HybridVit {
    pub(crate) patch_embed: HybridEmbed,
    pub(crate) cls_token: Param<Tensor<3>>,
    pub(crate) pos_embed: Param<Tensor<3>>,
    pub(crate) blocks: Vec<TransformerBlock>,
}

/// The token sequence the blocks start from, and the ResNet features it came with.
pub struct Embedded {
    /// ResNet stage outputs at 1/4 and 1/8 resolution.
    pub backbone: [Tensor<4>; 2],
    /// Class token then one token per grid cell, position embedding added: `[batch, 1 + h * w, 768]`.
    pub tokens: Tensor<3>,
    /// The token grid `(h, w)` = input size / 16.
    pub grid: (usize, usize),
}

impl HybridVit {
    /// Builds the network with zero parameters.
    pub fn new(device: &Device) -> Self {
        let zeros = |shape: [usize; 3]| Param::from_tensor(Tensor::zeros(shape, device));
        Self {
            patch_embed: HybridEmbed {
                backbone: ResNetV2::new(device),
                proj: conv2d(
                    device,
                    [BACKBONE_CHANNELS, EMBED_DIM],
                    1,
                    1,
                    1,
                    PaddingConfig2d::Valid,
                    true,
                ),
            },
            cls_token: zeros([1, 1, EMBED_DIM]),
            pos_embed: zeros([1, 1 + POS_GRID * POS_GRID, EMBED_DIM]),
            blocks: (0..DEPTH)
                .map(|_| TransformerBlock::new(device, EMBED_DIM, false))
                .collect(),
        }
    }

    /// Runs the ResNet on a `[batch, 3, H, W]` input and makes the tokens of its features.
    pub fn embed(&self, x: Tensor<4>) -> Embedded {
        let [quarter, eighth, sixteenth] = self.patch_embed.backbone.forward(x);
        let (tokens, grid) = TokenEmbedding {
            proj: &self.patch_embed.proj,
            cls_token: &self.cls_token,
            pos_embed: &self.pos_embed,
        }
        .tokens(sixteenth);
        Embedded {
            backbone: [quarter, eighth],
            tokens,
            grid,
        }
    }

    /// Runs the blocks on the embedded tokens: the outputs of the blocks in [`HOOKS`].
    pub fn blocks(&self, mut x: Tensor<3>) -> [Tensor<3>; 2] {
        let mut hooked = Vec::with_capacity(HOOKS.len());
        for (index, block) in self.blocks.iter().enumerate() {
            x = block.forward(x);
            if HOOKS.contains(&index) {
                hooked.push(x.clone());
            }
        }
        hooked
            .try_into()
            .expect("both hooks name one of the blocks")
    }
}

/// The token embedding's parameters, wherever they are kept: in [`HybridVit`] (where the
/// weights load them under upstream's names) or in [`super::HybridTokens`] (once the network is
/// taken apart).
pub(crate) struct TokenEmbedding<'a> {
    pub(crate) proj: &'a Conv2d,
    pub(crate) cls_token: &'a Param<Tensor<3>>,
    pub(crate) pos_embed: &'a Param<Tensor<3>>,
}

impl TokenEmbedding<'_> {
    /// The ResNet's 1/16 features projected to tokens, the class token first, the position
    /// embedding added: `[batch, 1 + h * w, 768]`, and the token grid `(h, w)`.
    pub(crate) fn tokens(&self, sixteenth: Tensor<4>) -> (Tensor<3>, (usize, usize)) {
        let embedded = self.proj.forward(sixteenth);
        let [batch, _, h, w] = embedded.dims();
        let tokens = embedded.flatten::<3>(2, 3).swap_dims(1, 2);
        let cls = self.cls_token.val().expand([batch, 1, EMBED_DIM]);
        (
            Tensor::cat(vec![cls, tokens], 1) + self.position_embedding((h, w)),
            (h, w),
        )
    }

    /// The position embedding for an `h x w` token grid: upstream's `_resize_pos_embed`
    /// (bilinear, corners not aligned), the identity at the trained 24 x 24.
    fn position_embedding(&self, (h, w): (usize, usize)) -> Tensor<3> {
        let pos = self.pos_embed.val();
        if (h, w) == (POS_GRID, POS_GRID) {
            return pos;
        }
        let cls = pos.clone().narrow(1, 0, 1);
        let grid = pos
            .narrow(1, 1, POS_GRID * POS_GRID)
            .reshape([1, POS_GRID, POS_GRID, EMBED_DIM])
            .permute([0, 3, 1, 2]);
        let options = InterpolateOptions::new(InterpolateMode::Bilinear)
            .with_align_corners(false)
            .with_output_size([h, w]);
        let grid = interpolate(grid, options)
            .permute([0, 2, 3, 1])
            .reshape([1, h * w, EMBED_DIM]);
        Tensor::cat(vec![cls, grid], 1)
    }
}

/// MiDaS's `act_postprocess` for a transformer level: the "project" readout (each token
/// concatenated with the class token, in that order, then Linear + GELU), tokens back to a
/// feature map, a 1x1 convolution and, for the deepest level, a 3x3 stride-2 one.
#[derive(Module, Debug)]
pub struct Reassemble {
    pub(crate) readout: Linear,
    pub(crate) project: Conv2d,
    pub(crate) resample: Option<Conv2d>,
}

impl Reassemble {
    /// `downsample` adds the stride-2 3x3 convolution (level 4).
    pub fn new(device: &Device, downsample: bool) -> Self {
        Self {
            readout: linear(device, 2 * EMBED_DIM, EMBED_DIM),
            project: conv2d(
                device,
                [EMBED_DIM, EMBED_DIM],
                1,
                1,
                1,
                PaddingConfig2d::Valid,
                true,
            ),
            resample: downsample.then(|| {
                conv2d(
                    device,
                    [EMBED_DIM, EMBED_DIM],
                    3,
                    2,
                    1,
                    PaddingConfig2d::Explicit(1, 1, 1, 1),
                    true,
                )
            }),
        }
    }

    /// `[batch, 1 + h * w, 768]` tokens to a `[batch, 768, h', w']` feature map.
    pub fn forward(&self, tokens: Tensor<3>, (h, w): (usize, usize)) -> Tensor<4> {
        let [batch, count, _] = tokens.dims();
        let patches = tokens.clone().narrow(1, 1, count - 1);
        let cls = tokens.narrow(1, 0, 1).expand([batch, count - 1, EMBED_DIM]);
        let read = gelu(self.readout.forward(Tensor::cat(vec![patches, cls], 2)));
        let map = read.swap_dims(1, 2).reshape([batch, EMBED_DIM, h, w]);
        let map = self.project.forward(map);
        match &self.resample {
            Some(conv) => conv.forward(map),
            None => map,
        }
    }
}
