//! MiDaS v2.1 small (`midas_v21_small_256`) as Burn modules: the network definition and nothing
//! else. Weight loading lives in [`crate::weights`], image handling in [`crate::pipeline`].
//!
//! The structure mirrors upstream layer for layer (isl-org/MiDaS `midas/midas_net_custom.py`,
//! `midas/blocks.py`, and the `tf_efficientnet_lite3` backbone of rwightman's
//! gen-efficientnet-pytorch) so that every parameter has exactly one upstream key;
//! [`crate::weights::layout`] holds the few renames between the two.

mod efficientnet;
mod fusion;
mod midas;

pub use efficientnet::{DepthwiseSeparableConv, EfficientNetLite3, InvertedResidual};
pub use fusion::{FeatureFusionBlock, OutputHead, ResidualConvUnit};
pub use midas::{MidasSmall, Scratch};

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
