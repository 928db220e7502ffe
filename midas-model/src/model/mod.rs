//! The networks as Burn modules: the network definitions and nothing else. Weight
//! loading lives in [`crate::weights`], running them in [`crate::engine`].
//!
//! - MiDaS v2.1 small (`midas_v21_small_256`): isl-org/MiDaS `midas/midas_net_custom.py` over the
//!   `tf_efficientnet_lite3` backbone of rwightman's gen-efficientnet-pytorch.
//! - MiDaS v3.0 DPT-Hybrid (`dpt_hybrid_384`): `midas/dpt_depth.py` over timm's
//!   `vit_base_r50_s16_384` (ResNet-50 stages + ViT-B/16).
//!
//! - Depth Anything V2 (`depth_anything_v2_vits`, `_vitb`, `_vitl`, and their metric
//!   fine-tunes): DepthAnything/Depth-Anything-V2's `DepthAnythingV2`, a DINOv2 encoder and a
//!   DPT head.
//!
//! All three share the decoder of `midas/blocks.py`. The structure mirrors upstream layer for layer
//! so that every parameter has exactly one upstream key; [`crate::weights::layout`] holds the
//! few renames between the two.

mod depth_anything;
mod dinov2;
mod dpt;
mod efficientnet;
mod fusion;
mod kind;
mod midas;
mod resnet;
mod transformer;
mod vit;

pub use depth_anything::{
    DepthAnythingHead, DepthAnythingParts, DepthAnythingV2, Reassembly, TokenEmbedding,
};
pub use dinov2::{Dinov2, PATCH, VitSize};
pub use dpt::{DptEncoder, DptHybrid, DptParts, HybridTokens};
pub use efficientnet::{DepthwiseSeparableConv, EfficientNetLite3, InvertedResidual};
pub use fusion::{DecoderConfig, FeatureFusionBlock, OutputHead, ResidualConvUnit, Scratch};
pub use kind::{
    DEPTH_ANYTHING_RELEASES, DepthHead, MIDAS_RELEASES, MetricDataset, ModelKind, PublishedWeights,
    published_weights,
};
pub use midas::MidasSmall;
pub use resnet::{Bottleneck, ConvNorm, ResNetV2, group_norm};
pub use transformer::{HEAD_DIM, LN_EPSILON, LayerScale, TransformerBlock};
pub use vit::{EMBED_DIM, HOOKS, Reassemble};

use burn::nn::Initializer;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::prelude::*;

/// A convolution whose parameters start at zero: every model is filled from weights (a file or
/// the synthetic formula) right after construction, so drawing random values would be wasted work.
fn conv2d(
    device: &Device,
    channels: [usize; 2],
    kernel: usize,
    stride: usize,
    groups: usize,
    padding: PaddingConfig2d,
    bias: bool,
) -> Conv2d {
    Conv2dConfig::new(channels, [kernel, kernel])
        .with_stride([stride, stride])
        .with_groups(groups)
        .with_padding(padding)
        .with_bias(bias)
        .with_initializer(Initializer::Zeros)
        .init(device)
}

/// A loaded network of any kind, with its parameters set.
#[derive(Clone, Debug)]
pub enum Network {
    /// MiDaS v2.1 small.
    MidasSmall(Box<MidasSmall>),
    /// MiDaS v3.0 DPT-Hybrid.
    DptHybrid(Box<DptHybrid>),
    /// Depth Anything V2, relative or metric.
    DepthAnything(Box<DepthAnythingV2>),
}

/// The largest depth a metric head starts with until [`Network::set_max_depth`] gives the
/// real one: one, so that its output is the fraction of the largest depth.
const UNIT_MAX_DEPTH: f32 = 1.0;

impl Network {
    /// A network of `kind` with every parameter zero (a metric head's largest depth one metre
    /// until [`Network::set_max_depth`]).
    pub fn new(kind: ModelKind, device: &Device) -> Self {
        match kind {
            ModelKind::MidasV21Small256 => Self::MidasSmall(Box::new(MidasSmall::new(device))),
            ModelKind::DptHybrid384 => Self::DptHybrid(Box::new(DptHybrid::new(device))),
            ModelKind::DepthAnythingV2(size, head) => {
                let max_depth = (head == DepthHead::Metric).then_some(UNIT_MAX_DEPTH);
                Self::DepthAnything(Box::new(DepthAnythingV2::new(device, size, max_depth)))
            }
        }
    }

    /// Which network this is.
    pub fn kind(&self) -> ModelKind {
        match self {
            Self::MidasSmall(_) => ModelKind::MidasV21Small256,
            Self::DptHybrid(_) => ModelKind::DptHybrid384,
            Self::DepthAnything(model) => {
                let head = match model.max_depth() {
                    Some(_) => DepthHead::Metric,
                    None => DepthHead::Relative,
                };
                ModelKind::DepthAnythingV2(model.size(), head)
            }
        }
    }

    /// A metric network's largest depth in metres (`None` for relative output).
    pub fn max_depth(&self) -> Option<f32> {
        match self {
            Self::DepthAnything(model) => model.max_depth(),
            _ => None,
        }
    }

    /// Sets a metric network's largest depth in metres; `false` (nothing changed) for a
    /// network with relative output.
    pub fn set_max_depth(&mut self, max_depth: f32) -> bool {
        match self {
            Self::DepthAnything(model) if model.max_depth().is_some() => {
                model.set_max_depth(max_depth);
                true
            }
            _ => false,
        }
    }

    /// Values in the network.
    pub fn num_params(&self) -> usize {
        match self {
            Self::MidasSmall(model) => model.num_params(),
            Self::DptHybrid(model) => model.num_params(),
            Self::DepthAnything(model) => model.num_params(),
        }
    }

    /// Runs the network on Burn's operations: `[batch, 3, H, W]` to `[batch, H, W]`.
    pub fn forward(&self, input: Tensor<4>) -> Tensor<3> {
        match self {
            Self::MidasSmall(model) => model.forward(input),
            Self::DptHybrid(model) => model.forward(input),
            Self::DepthAnything(model) => model.forward(input),
        }
    }
}
