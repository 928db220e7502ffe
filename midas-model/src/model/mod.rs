//! The two MiDaS networks as Burn modules: the network definitions and nothing else. Weight
//! loading lives in [`crate::weights`], running them in [`crate::engine`].
//!
//! - MiDaS v2.1 small (`midas_v21_small_256`): isl-org/MiDaS `midas/midas_net_custom.py` over the
//!   `tf_efficientnet_lite3` backbone of rwightman's gen-efficientnet-pytorch.
//! - MiDaS v3.0 DPT-Hybrid (`dpt_hybrid_384`): `midas/dpt_depth.py` over timm's
//!   `vit_base_r50_s16_384` (ResNet-50 stages + ViT-B/16).
//!
//! Both share the decoder of `midas/blocks.py`. The structure mirrors upstream layer for layer
//! so that every parameter has exactly one upstream key; [`crate::weights::layout`] holds the
//! few renames between the two.

mod dpt;
mod efficientnet;
mod fusion;
mod kind;
mod midas;
mod resnet;
mod vit;

pub use dpt::{DptEncoder, DptHybrid, DptParts, TokenBridge};
pub use efficientnet::{DepthwiseSeparableConv, EfficientNetLite3, InvertedResidual};
pub use fusion::{DecoderConfig, FeatureFusionBlock, OutputHead, ResidualConvUnit, Scratch};
pub use kind::ModelKind;
pub use midas::MidasSmall;
pub use resnet::{Bottleneck, ConvNorm, ResNetV2, group_norm};
pub use vit::{EMBED_DIM, HEADS, HOOKS, LN_EPSILON, TransformerBlock};

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

/// A loaded network of either kind, with its parameters set.
#[derive(Clone, Debug)]
pub enum Network {
    /// MiDaS v2.1 small.
    MidasSmall(Box<MidasSmall>),
    /// MiDaS v3.0 DPT-Hybrid.
    DptHybrid(Box<DptHybrid>),
}

impl Network {
    /// A network of `kind` with every parameter zero.
    pub fn new(kind: ModelKind, device: &Device) -> Self {
        match kind {
            ModelKind::MidasV21Small256 => Self::MidasSmall(Box::new(MidasSmall::new(device))),
            ModelKind::DptHybrid384 => Self::DptHybrid(Box::new(DptHybrid::new(device))),
        }
    }

    /// Which network this is.
    pub fn kind(&self) -> ModelKind {
        match self {
            Self::MidasSmall(_) => ModelKind::MidasV21Small256,
            Self::DptHybrid(_) => ModelKind::DptHybrid384,
        }
    }

    /// Values in the network.
    pub fn num_params(&self) -> usize {
        match self {
            Self::MidasSmall(model) => model.num_params(),
            Self::DptHybrid(model) => model.num_params(),
        }
    }

    /// Runs the network on Burn's operations: `[batch, 3, H, W]` to `[batch, H, W]`.
    pub fn forward(&self, input: Tensor<4>) -> Tensor<3> {
        match self {
            Self::MidasSmall(model) => model.forward(input),
            Self::DptHybrid(model) => model.forward(input),
        }
    }
}
