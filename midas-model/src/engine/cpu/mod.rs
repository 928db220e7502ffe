//! The networks assembled from [`crate::kernels`], their weights packed once when the model is
//! loaded: what runs the forward pass on a CPU backend, several times faster than Burn's CPU
//! operations. The Burn modules stay each network's definition and what its weights load into.

mod decoder;
mod encoder;
mod reassembly;
mod resnet;
mod transformer;

use decoder::CpuDecoder;
use encoder::CpuEncoder;
use reassembly::{CpuReadoutReassembly, CpuReassembly};
use resnet::CpuResNet;
use transformer::{CpuTransformer, PackedNorm};

use burn::prelude::*;

use super::{Engine, InferenceError};
use crate::kernels::{FeatureMap, tensor_values};
use crate::model::{
    DepthAnythingV2, DptHybrid, HOOKS, HybridTokens, MidasSmall, Network, TokenEmbedding, VitSize,
};

/// The `(height, width)` of a `[batch, channels, height, width]` input.
fn spatial(input: &Tensor<4>) -> (usize, usize) {
    let [_, _, height, width] = input.dims();
    (height, width)
}

/// Packs a loaded network for the kernels, taking its parameters over.
pub(super) fn pack(network: Network) -> Box<dyn Engine> {
    match network {
        Network::MidasSmall(model) => Box::new(SmallKernels::pack(*model)),
        Network::DptHybrid(model) => Box::new(DptKernels::pack(*model)),
        Network::DepthAnything(model) => Box::new(DepthAnythingKernels::pack(*model)),
    }
}

/// MiDaS small: its EfficientNet-Lite3 encoder and its decoder.
#[derive(Debug)]
struct SmallKernels {
    encoder: CpuEncoder,
    decoder: CpuDecoder,
}

impl SmallKernels {
    fn pack(model: MidasSmall) -> Self {
        let (encoder, decoder) = model.into_parts();
        Self {
            encoder: CpuEncoder::pack(encoder),
            decoder: CpuDecoder::pack(decoder),
        }
    }
}

impl Engine for SmallKernels {
    fn forward(&self, input: Tensor<4>) -> Result<Vec<f32>, InferenceError> {
        let size = spatial(&input);
        Ok(self.decoder.forward(self.encoder.forward(input), size).data)
    }
}

/// DPT-Hybrid: its ResNet, transformer blocks, reassembly and decoder on the kernels; the token
/// embedding between the ResNet and the blocks (under 1 % of the work) on Burn's CPU
/// operations.
#[derive(Debug)]
struct DptKernels {
    backbone: CpuResNet,
    embedding: HybridTokens,
    blocks: CpuTransformer,
    reassembly: CpuReadoutReassembly,
    decoder: CpuDecoder,
}

impl DptKernels {
    fn pack(model: DptHybrid) -> Self {
        let parts = model.into_parts();
        Self {
            backbone: CpuResNet::pack(parts.backbone),
            embedding: parts.embedding,
            blocks: CpuTransformer::pack(parts.blocks),
            reassembly: CpuReadoutReassembly::pack(parts.reassembly),
            decoder: CpuDecoder::pack(parts.decoder),
        }
    }
}

impl Engine for DptKernels {
    fn forward(&self, input: Tensor<4>) -> Result<Vec<f32>, InferenceError> {
        let size = spatial(&input);
        let [quarter, eighth, sixteenth] = self.backbone.forward(input);
        let (tokens, grid) = self.embedding.tokens(sixteenth);
        let per_image = tokens.dims()[1];
        let hooked = self.blocks.run(tensor_values(tokens), per_image, HOOKS);
        let [level3, level4] = self.reassembly.forward(hooked, per_image, grid);
        let features = [
            FeatureMap::from_tensor(quarter),
            FeatureMap::from_tensor(eighth),
            level3,
            level4,
        ];
        Ok(self.decoder.forward(features, size).data)
    }
}

/// Depth Anything V2: its DINOv2 blocks (nearly all the encoder's work) and final LayerNorm,
/// the reassembly of the hooked tokens and the decoder on the kernels; the patch embedding
/// (about 1 % of the work) on Burn's CPU operations.
#[derive(Debug)]
struct DepthAnythingKernels {
    size: VitSize,
    embedding: TokenEmbedding,
    blocks: CpuTransformer,
    norm: PackedNorm,
    reassembly: CpuReassembly,
    decoder: CpuDecoder,
}

impl DepthAnythingKernels {
    fn pack(model: DepthAnythingV2) -> Self {
        let parts = model.into_parts();
        Self {
            size: parts.size,
            embedding: parts.embedding,
            blocks: CpuTransformer::pack(parts.blocks),
            norm: PackedNorm::pack(parts.norm),
            reassembly: CpuReassembly::pack(parts.reassembly),
            decoder: CpuDecoder::pack(parts.decoder),
        }
    }
}

impl Engine for DepthAnythingKernels {
    fn forward(&self, input: Tensor<4>) -> Result<Vec<f32>, InferenceError> {
        let size = spatial(&input);
        let (tokens, grid) = self.embedding.tokens(input);
        let per_image = tokens.dims()[1];
        let hooked = self
            .blocks
            .run(tensor_values(tokens), per_image, self.size.hooks())
            .map(|values| {
                let mut normed = vec![0.0; values.len()];
                self.norm.apply(&values, &mut normed);
                normed
            });
        let features = self.reassembly.forward(hooked, per_image, grid);
        Ok(self.decoder.forward(features, size).data)
    }
}
