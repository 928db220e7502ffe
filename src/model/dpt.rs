//! `DPTDepthModel` of `midas/dpt_depth.py` with the `vitb_rn50_384` backbone, `features=256`,
//! `readout="project"`, `non_negative=True`: the `dpt_hybrid_384` model (MiDaS v3.0).

use burn::prelude::*;

use super::vit::{EMBED_DIM, HybridVit, Reassemble};
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
        let features = self.model.forward(input);
        let [layer1, layer2] = features.backbone;
        let [tokens3, tokens4] = features.tokens;
        [
            layer1,
            layer2,
            self.reassemble3.forward(tokens3, features.grid),
            self.reassemble4.forward(tokens4, features.grid),
        ]
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

    /// Replaces every ResNet convolution's weights by their standardisation (timm's
    /// `StdConv2dSame`, eps 1e-8, biased variance), which upstream recomputes on every forward
    /// from constant weights. Done once, after weights in upstream's form are loaded.
    pub fn standardise_backbone(&mut self) {
        for conv in self.pretrained.model.patch_embed.backbone.convs_mut() {
            let weight = conv.weight.val();
            let shape = weight.dims();
            // Parameters are float32 (the loader casts them), so the conversion cannot fail.
            let values = weight.into_data().try_into_vec::<f32>().unwrap_or_default();
            let per_channel = shape[1] * shape[2] * shape[3];
            let mut out = Vec::with_capacity(values.len());
            for channel in values.chunks(per_channel.max(1)) {
                let n = channel.len() as f64;
                let mean = channel.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
                let var = channel
                    .iter()
                    .map(|&v| (f64::from(v) - mean).powi(2))
                    .sum::<f64>()
                    / n;
                let scale = 1.0 / (var + STD_CONV_EPSILON).sqrt();
                out.extend(
                    channel
                        .iter()
                        .map(|&v| ((f64::from(v) - mean) * scale) as f32),
                );
            }
            let device = conv.weight.val().device();
            let standardised =
                Tensor::<4>::from_data(burn::tensor::TensorData::new(out, shape), &device);
            conv.weight = conv.weight.clone().map(|_| standardised);
        }
    }
}

/// The weight standardisation's epsilon in DPT-Hybrid (`partial(StdConv2dSame, eps=1e-8)` in
/// timm's `vision_transformer_hybrid`; the class default of 1e-6 would be wrong).
const STD_CONV_EPSILON: f64 = 1e-8;
