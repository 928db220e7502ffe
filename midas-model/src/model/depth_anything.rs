//! `DepthAnythingV2` of DepthAnything/Depth-Anything-V2 (`depth_anything_v2/dpt.py`, and
//! `metric_depth/depth_anything_v2/dpt.py` for the metric head): the DINOv2 encoder and the
//! `DPTHead` with `use_bn=False`, `use_clstoken=False`.

use burn::module::Param;
use burn::nn::conv::{Conv2d, ConvTranspose2d, ConvTranspose2dConfig};
use burn::nn::{Initializer, LayerNorm, PaddingConfig2d};
use burn::prelude::*;

use super::dinov2::{Dinov2, VitSize, embed_tokens};
use super::{DecoderConfig, Scratch, TransformerBlock, conv2d};

/// The head's widths for an encoder size (upstream's `model_configs`): `features` and the four
/// `out_channels`.
fn head_widths(size: VitSize) -> (usize, [usize; 4]) {
    match size {
        VitSize::Small => (64, [48, 96, 192, 384]),
        VitSize::Base => (128, [96, 192, 384, 768]),
        VitSize::Large => (256, [256, 512, 1024, 1024]),
    }
}

/// A transposed convolution with kernel = stride (each input pixel becomes a `stride x stride`
/// block), parameters at zero until the weights fill them.
fn transpose(device: &Device, channels: usize, stride: usize) -> ConvTranspose2d {
    ConvTranspose2dConfig::new([channels, channels], [stride, stride])
        .with_stride([stride, stride])
        .with_initializer(Initializer::Zeros)
        .init(device)
}

/// The head's reassembly of the hooked tokens into the four feature maps (upstream's
/// `projects` and `resize_layers`): a 1x1 convolution each, then 4x and 2x transposed
/// convolutions, the identity, and a 3x3 stride-2 convolution.
#[derive(Module, Debug)]
pub struct Reassembly {
    pub(crate) projects: Vec<Conv2d>,
    pub(crate) upsample4: ConvTranspose2d,
    pub(crate) upsample2: ConvTranspose2d,
    pub(crate) downsample2: Conv2d,
}

impl Reassembly {
    fn new(device: &Device, dim: usize, out_channels: [usize; 4]) -> Self {
        Self {
            projects: out_channels
                .iter()
                .map(|&out| conv2d(device, [dim, out], 1, 1, 1, PaddingConfig2d::Valid, true))
                .collect(),
            upsample4: transpose(device, out_channels[0], 4),
            upsample2: transpose(device, out_channels[1], 2),
            downsample2: conv2d(
                device,
                [out_channels[3], out_channels[3]],
                3,
                2,
                1,
                PaddingConfig2d::Explicit(1, 1, 1, 1),
                true,
            ),
        }
    }

    /// The hooked patch tokens (`[batch, h * w, dim]` each) as the decoder's four features:
    /// at 4, 2, 1 and 1/2 pixels per token.
    pub fn forward(&self, tokens: [Tensor<3>; 4], (h, w): (usize, usize)) -> [Tensor<4>; 4] {
        let mut maps = tokens
            .into_iter()
            .zip(&self.projects)
            .map(|(tokens, project)| {
                let [batch, _, dim] = tokens.dims();
                project.forward(tokens.swap_dims(1, 2).reshape([batch, dim, h, w]))
            });
        let mut next = || {
            maps.next()
                .unwrap_or_else(|| unreachable!("four projections"))
        };
        [
            self.upsample4.forward(next()),
            self.upsample2.forward(next()),
            next(),
            self.downsample2.forward(next()),
        ]
    }
}

/// `DPTHead`: the reassembly and the MiDaS-style fusion decoder (`scratch`).
#[derive(Module, Debug)]
pub struct DepthAnythingHead {
    pub(crate) reassembly: Reassembly,
    pub(crate) scratch: Scratch,
}

/// Depth Anything V2: DINOv2 encoder (`pretrained`) and DPT head (`depth_head`).
///
/// Input: `[batch, 3, H, W]`, normalised RGB (ImageNet mean and deviation), H and W multiples
/// of 14. Output: `[batch, H, W]`, relative inverse depth (non-negative) or, for a metric head,
/// metres in `(0, max_depth)`.
#[derive(Module, Debug)]
pub struct DepthAnythingV2 {
    pub(crate) pretrained: Dinov2,
    pub(crate) depth_head: DepthAnythingHead,
}

/// DINOv2's token embedding, out of the encoder.
#[derive(Debug)]
pub struct TokenEmbedding {
    proj: Conv2d,
    cls_token: Param<Tensor<3>>,
    pos_embed: Param<Tensor<3>>,
}

impl TokenEmbedding {
    /// See [`Dinov2::tokens`].
    pub fn tokens(&self, input: Tensor<4>) -> (Tensor<3>, (usize, usize)) {
        embed_tokens(&self.proj, &self.cls_token, &self.pos_embed, input)
    }
}

/// Depth Anything V2 taken apart for an engine that runs the transformer blocks and the
/// decoder its own way.
#[derive(Debug)]
pub struct DepthAnythingParts {
    /// The encoder's size (which blocks are hooked).
    pub size: VitSize,
    /// The patch embedding, class token and position embedding.
    pub embedding: TokenEmbedding,
    /// The transformer blocks.
    pub blocks: Vec<TransformerBlock>,
    /// The final LayerNorm, applied to each hooked block's output.
    pub norm: LayerNorm,
    /// The tokens-to-feature-maps reassembly.
    pub reassembly: Reassembly,
    /// The fusion decoder and output head.
    pub decoder: Scratch,
}

impl DepthAnythingV2 {
    /// Builds the network with every parameter zero; fill it with [`crate::weights`]. A metric
    /// head's largest depth is `max_depth` metres (`None` for a relative head).
    pub fn new(device: &Device, size: VitSize, max_depth: Option<f32>) -> Self {
        let (features, out_channels) = head_widths(size);
        let mut scratch = Scratch::new(
            device,
            DecoderConfig {
                encoder_channels: out_channels,
                features,
                expand: false,
                head_align_corners: true,
            },
        );
        scratch.output_conv.max_depth = max_depth;
        Self {
            pretrained: Dinov2::new(device, size),
            depth_head: DepthAnythingHead {
                reassembly: Reassembly::new(device, size.dim(), out_channels),
                scratch,
            },
        }
    }

    /// The encoder's size.
    pub fn size(&self) -> VitSize {
        self.pretrained.size()
    }

    /// A metric head's largest depth in metres; `None` for a relative head.
    pub fn max_depth(&self) -> Option<f32> {
        self.depth_head.scratch.output_conv.max_depth
    }

    /// Sets a metric head's largest depth (upstream's `max_depth`: 20 for the Hypersim
    /// fine-tunes, 80 for the VKITTI ones).
    pub fn set_max_depth(&mut self, max_depth: f32) {
        self.depth_head.scratch.output_conv.max_depth = Some(max_depth);
    }

    /// Runs the network.
    pub fn forward(&self, input: Tensor<4>) -> Tensor<3> {
        let [_, _, height, width] = input.dims();
        let (tokens, grid) = self.pretrained.forward(input);
        let features = self.depth_head.reassembly.forward(tokens, grid);
        self.depth_head.scratch.forward(features, [height, width])
    }

    /// The network taken apart (see [`DepthAnythingParts`]).
    pub fn into_parts(self) -> DepthAnythingParts {
        let size = self.size();
        let Dinov2 {
            patch_embed,
            cls_token,
            pos_embed,
            blocks,
            norm,
        } = self.pretrained;
        DepthAnythingParts {
            size,
            embedding: TokenEmbedding {
                proj: patch_embed.proj,
                cls_token,
                pos_embed,
            },
            blocks,
            norm,
            reassembly: self.depth_head.reassembly,
            decoder: self.depth_head.scratch,
        }
    }
}
