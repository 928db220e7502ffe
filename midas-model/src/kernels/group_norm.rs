//! GroupNorm over NCHW feature maps, in place, with the residual sum and ReLU that follow it in
//! ResNet-50 fused into its last pass.
//!
//! In NCHW a group's channels are contiguous, so each (image, group) is one slice: its
//! statistics are two vectorised passes over it (the mean, then squares about the mean; each
//! plane summed in float32 lanes, planes combined in double), and the normalisation one more,
//! with `gamma` and `beta` folded into one scale and shift per channel. Burn's GroupNorm is
//! some ten passes over the map, each a new tensor.

use burn::nn::GroupNorm;
use rayon::prelude::*;

use super::{FeatureMap, simd, tensor_values};

/// GroupNorm's parameters.
#[derive(Clone, Debug)]
pub struct PackedGroupNorm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    groups: usize,
    epsilon: f64,
}

impl PackedGroupNorm {
    /// Takes a Burn GroupNorm's parameters over (ones and zeros when it has none).
    pub fn pack(norm: GroupNorm) -> Self {
        let channels = norm.num_channels;
        Self {
            gamma: norm
                .gamma
                .map_or_else(|| vec![1.0; channels], |g| tensor_values(g.into_value())),
            beta: norm
                .beta
                .map_or_else(|| vec![0.0; channels], |b| tensor_values(b.into_value())),
            groups: norm.num_groups,
            epsilon: norm.epsilon,
        }
    }
}

/// `relu?(GroupNorm(map) + residual?)`, in place.
pub fn group_norm(
    mut map: FeatureMap,
    norm: &PackedGroupNorm,
    residual: Option<&FeatureMap>,
    relu: bool,
) -> FeatureMap {
    map.assert_shape(norm.gamma.len());
    assert!(
        map.channels.is_multiple_of(norm.groups),
        "the channels do not split into the groups"
    );
    if let Some(residual) = residual {
        FeatureMap::assert_residuals(&[residual], map.batch, map.channels, map.height, map.width);
    }
    let plane = map.plane();
    let per_group = map.channels / norm.groups;
    let group_len = per_group * plane;
    map.data
        .par_chunks_mut(group_len)
        .enumerate()
        .for_each(|(index, values)| {
            let first_channel = index % norm.groups * per_group;
            let (mean, variance) = statistics(values, plane);
            let inverse = 1.0 / (variance + norm.epsilon).sqrt();
            let residual = residual.map(|r| &r.data[index * group_len..(index + 1) * group_len]);
            for (offset, channel_values) in values.chunks_exact_mut(plane).enumerate() {
                let channel = first_channel + offset;
                let scale = f64::from(norm.gamma[channel]) * inverse;
                let shift = f64::from(norm.beta[channel]) - mean * scale;
                let residual =
                    residual.map_or(&[][..], |r| &r[offset * plane..(offset + 1) * plane]);
                simd::affine(channel_values, scale as f32, shift as f32, residual, relu);
            }
        });
    map
}

/// Mean and biased variance of a group, from each plane's mean and squared deviations
/// (Chan et al.'s pairwise combination, exact in double precision).
fn statistics(values: &[f32], plane: usize) -> (f64, f64) {
    let (mut count, mut mean, mut squares) = (0.0_f64, 0.0_f64, 0.0_f64);
    for part in values.chunks_exact(plane) {
        let (part_mean, part_squares) = simd::mean_and_squares(part);
        let part_count = part.len() as f64;
        let total = count + part_count;
        let delta = part_mean - mean;
        mean += delta * part_count / total;
        squares += part_squares + delta * delta * count * part_count / total;
        count = total;
    }
    (mean, squares / count)
}
