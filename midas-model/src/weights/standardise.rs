//! DPT-Hybrid's weight standardisation, done once when weights in upstream's form are loaded.
//!
//! timm's `StdConv2dSame` standardises its weights on every forward, per output channel:
//! `w' = (w - mean) / sqrt(var + eps)` with the biased variance (it calls `F.batch_norm` in
//! training mode on the reshaped weights). The weights are constants at inference, so the
//! result is computed here, in double precision, and the network's convolutions are plain.
//! A burnpack written by `model-import` holds the standardised weights.

use burn::prelude::*;
use burn::tensor::TensorData;

use crate::model::DptHybrid;

/// The epsilon DPT-Hybrid's backbone uses (`partial(StdConv2dSame, eps=1e-8)` in timm's
/// `vision_transformer_hybrid`; the class default of 1e-6 would shift the output by 7e-4 of
/// its range).
const EPSILON: f64 = 1e-8;

/// Standardises every convolution of the ResNet backbone in place.
pub fn standardise_backbone(model: &mut DptHybrid) {
    for conv in model.pretrained.model.patch_embed.backbone.convs_mut() {
        let weight = conv.weight.val();
        let device = weight.device();
        let shape = weight.dims();
        // Parameters are float32 (the loader casts them), so the conversion cannot fail.
        let values = weight.into_data().try_into_vec::<f32>().unwrap_or_default();
        let per_channel = (shape[1] * shape[2] * shape[3]).max(1);
        let mut out = Vec::with_capacity(values.len());
        for channel in values.chunks(per_channel) {
            out.extend(standardise(channel));
        }
        let standardised = Tensor::<4>::from_data(TensorData::new(out, shape), &device);
        conv.weight = conv.weight.clone().map(|_| standardised);
    }
}

/// One output channel's weights, standardised.
fn standardise(channel: &[f32]) -> impl Iterator<Item = f32> + '_ {
    let n = channel.len() as f64;
    let mean = channel.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let variance = channel
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    let scale = 1.0 / (variance + EPSILON).sqrt();
    channel
        .iter()
        .map(move |&v| ((f64::from(v) - mean) * scale) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_mean_unit_biased_variance() {
        let channel = [1.0f32, 2.0, 3.0, 6.0];
        let out: Vec<f32> = standardise(&channel).collect();
        let mean = out.iter().sum::<f32>() / 4.0;
        let variance = out.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 4.0;
        assert!(
            mean.abs() < 1e-6 && (variance - 1.0).abs() < 1e-6,
            "{out:?}"
        );
        // Biased (divide by n): the population variance of [1, 2, 3, 6] is 3.5.
        assert!((out[3] - (6.0 - 3.0) / 3.5f32.sqrt()).abs() < 1e-6);
    }
}
