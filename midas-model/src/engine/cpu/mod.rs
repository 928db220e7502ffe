//! The networks assembled from [`crate::kernels`], their weights packed once when the model is
//! loaded: what runs the forward pass on a CPU backend, several times faster than Burn's CPU
//! operations. The Burn modules stay each network's definition and what its weights load into.

mod decoder;
mod encoder;
mod resnet;
mod transformer;

use decoder::CpuDecoder;
use encoder::CpuEncoder;
use resnet::CpuResNet;
use transformer::CpuTransformer;

use burn::prelude::*;

use super::{Engine, InferenceError};
use crate::kernels::FeatureMap;
use crate::model::{DptHybrid, MidasSmall, Network, TokenBridge};

/// Packs a loaded network for the kernels, taking its parameters over.
pub(super) fn pack(network: Network) -> Box<dyn Engine> {
    match network {
        Network::MidasSmall(model) => Box::new(SmallKernels::pack(*model)),
        Network::DptHybrid(model) => Box::new(DptKernels::pack(*model)),
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
        Ok(self.decoder.forward(self.encoder.forward(input)).data)
    }
}

/// DPT-Hybrid: its ResNet, transformer blocks (40 % of the work) and decoder (45 %, nearly all
/// 3x3 convolutions) on the kernels; the token embedding and reassembly between them (3 %) on
/// Burn's CPU operations.
#[derive(Debug)]
struct DptKernels {
    backbone: CpuResNet,
    blocks: CpuTransformer,
    bridge: TokenBridge,
    decoder: CpuDecoder,
}

impl DptKernels {
    fn pack(model: DptHybrid) -> Self {
        let parts = model.into_parts();
        Self {
            backbone: CpuResNet::pack(parts.backbone),
            blocks: CpuTransformer::pack(parts.blocks),
            bridge: parts.bridge,
            decoder: CpuDecoder::pack(parts.decoder),
        }
    }
}

impl Engine for DptKernels {
    fn forward(&self, input: Tensor<4>) -> Result<Vec<f32>, InferenceError> {
        let [quarter, eighth, sixteenth] = self.backbone.forward(input);
        let (tokens, grid) = self.bridge.tokens(sixteenth);
        let [level3, level4] = self.bridge.reassemble(self.blocks.forward(tokens), grid);
        let features = [quarter, eighth, level3, level4].map(FeatureMap::from_tensor);
        Ok(self.decoder.forward(features).data)
    }
}
