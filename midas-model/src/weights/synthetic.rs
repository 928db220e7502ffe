//! Deterministic weights from a formula, used when no weights are given and by the parity tests.
//!
//! `scripts/reference/synthetic.py` implements the same formula bit for bit, which is what lets
//! the tests compare against PyTorch on the full-size network without shipping 85 MB of weights.
//! Each tensor is a SplitMix64 stream seeded by the FNV-1a hash of its upstream key, turned into
//! f32 values in [-1, 1) with 24 exact bits and scaled with f32 arithmetic both languages perform
//! identically. The scales keep activations well inside f32 range through the whole network;
//! the result is a well-conditioned network, not a trained one.

use burn::store::ModuleSnapshot;
use burn::store::burn_pack::{Bytes, DType, Tensor as PackTensor};

use super::layout;
use crate::model::Network;

const FNV_OFFSET: u64 = 0xCBF2_9CE4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01B3;
const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

fn fnv1a64(text: &str) -> u64 {
    text.bytes().fold(FNV_OFFSET, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    })
}

/// `count` values in [-1, 1) from the stream named `name`.
pub fn uniform(name: &str, count: usize) -> Vec<f32> {
    let seed = fnv1a64(name);
    (1..=count as u64)
        .map(|index| {
            let mut x = seed.wrapping_add(index.wrapping_mul(GOLDEN_GAMMA));
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^= x >> 31;
            (x >> 40) as f32 * f32::powi(2.0, -23) - 1.0
        })
        .collect()
}

/// What a tensor is, which decides its scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A convolution kernel: LeCun-uniform, bound `sqrt(3 / fan_in)` (He's `sqrt(6 / fan_in)`
    /// makes the untrained network so ill-conditioned that f32 rounding alone moves the output
    /// by 5e-4 of its range).
    ConvWeight,
    /// A convolution bias: within ±0.05.
    ConvBias,
    /// BatchNorm scale: 1 ± 0.1.
    BnWeight,
    /// BatchNorm shift: within ±0.1.
    BnBias,
    /// BatchNorm running mean: within ±0.1.
    BnRunningMean,
    /// BatchNorm running variance: 0.75 ± 0.25.
    BnRunningVar,
    /// DPT's class token and position embedding: within ±0.1.
    Embedding,
    /// Depth Anything V2's last bias (before the relative head's ReLU): 3 ± 0.05, so that
    /// most of the untrained output is above zero (a parity test over zeros tests little).
    HeadBias,
}

/// The synthetic values of the tensor with upstream key `key`.
pub fn values(key: &str, shape: &[usize], role: Role) -> Vec<f32> {
    let count = shape.iter().product();
    let u = uniform(key, count);
    let affine = |offset: f32, scale: f32| u.iter().map(|v| offset + v * scale).collect();
    match role {
        Role::ConvWeight => {
            let fan_in: usize = shape[1..].iter().product();
            let bound = (3.0 / fan_in as f64).sqrt() as f32;
            u.iter().map(|v| v * bound).collect()
        }
        Role::ConvBias => u.iter().map(|v| v * 0.05).collect(),
        Role::BnWeight => affine(1.0, 0.1),
        Role::BnBias | Role::BnRunningMean | Role::Embedding => u.iter().map(|v| v * 0.1).collect(),
        Role::BnRunningVar => affine(0.75, 0.25),
        Role::HeadBias => affine(3.0, 0.05),
    }
}

/// Depth Anything V2's last bias, whose formula is [`Role::HeadBias`].
const HEAD_BIAS_KEY: &str = "depth_head.scratch.output_conv2.2.bias";

/// A normalised `[1, 3, height, width]` network input in [-2, 2), as the forward fixtures use.
pub fn network_input(width: usize, height: usize) -> Vec<f32> {
    uniform(&format!("input.{width}x{height}"), 3 * height * width)
        .into_iter()
        .map(|v| v * 2.0)
        .collect()
}

/// The upstream key and role of a Burn parameter path (normalisation layers' `gamma`/`beta`
/// are upstream's `weight`/`bias`; Burn's BatchNorm and GroupNorm/LayerNorm share the names).
fn upstream_key_and_role(burn_path: &str, rank: usize) -> (String, Role) {
    let leaf = burn_path.rsplit('.').next().unwrap_or(burn_path);
    let role = match leaf {
        // A norm's scale, or DINOv2's LayerScale factor: 1 ± 0.1 either way.
        "gamma" => Role::BnWeight,
        "beta" => Role::BnBias,
        "running_mean" => Role::BnRunningMean,
        "running_var" => Role::BnRunningVar,
        "cls_token" | "pos_embed" => Role::Embedding,
        "weight" if rank >= 2 => Role::ConvWeight,
        _ => Role::ConvBias,
    };
    let key = layout::upstream_key(burn_path);
    let role = if key == HEAD_BIAS_KEY {
        Role::HeadBias
    } else {
        role
    };
    (key, role)
}

/// The synthetic state dict of `kind` in upstream's form: upstream keys, upstream shapes
/// (Linear weights `[out, in]`), exactly what `scripts/reference/synthetic.py` feeds PyTorch.
/// `network` only lends its parameter paths and shapes.
pub fn state_dict(network: &Network) -> Vec<PackTensor> {
    let snapshots = match network {
        Network::MidasSmall(model) => model.collect(None, None, false),
        Network::DptHybrid(model) => model.collect(None, None, false),
        Network::DepthAnything(model) => model.collect(None, None, false),
    };
    snapshots
        .into_iter()
        .map(|snapshot| {
            let path = snapshot.name;
            let mut shape = snapshot.shape.to_vec();
            // Burn keeps Linear weights as [in, out]; upstream as [out, in].
            if shape.len() == 2 {
                shape.swap(0, 1);
            }
            let (key, role) = upstream_key_and_role(&path, shape.len());
            let data = values(&key, &shape, role);
            PackTensor::new(key, DType::F32, shape, None, Bytes::from_elems(data))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_is_stable_and_in_range() {
        let values = uniform("pretrained.layer1.0.weight", 1000);
        assert!(values.iter().all(|v| (-1.0..1.0).contains(v)));
        // Pinned against scripts/reference/synthetic.py.
        assert_eq!(fnv1a64("a"), 0xAF63_DC4C_8601_EC8C);
        let mean = values.iter().sum::<f32>() / values.len() as f32;
        assert!(mean.abs() < 0.1, "mean {mean}");
    }

    #[test]
    fn dpt_roles() {
        assert_eq!(
            upstream_key_and_role("pretrained.model.cls_token", 3),
            ("pretrained.model.cls_token".to_string(), Role::Embedding)
        );
        assert_eq!(
            upstream_key_and_role("pretrained.model.blocks.0.norm1.gamma", 1),
            (
                "pretrained.model.blocks.0.norm1.weight".to_string(),
                Role::BnWeight
            )
        );
        assert_eq!(
            upstream_key_and_role("pretrained.reassemble4.readout.weight", 2),
            (
                "pretrained.act_postprocess4.0.project.0.weight".to_string(),
                Role::ConvWeight
            )
        );
    }

    #[test]
    fn depth_anything_roles() {
        assert_eq!(
            upstream_key_and_role("pretrained.blocks.4.ls2.gamma", 1),
            ("pretrained.blocks.4.ls2.gamma".to_string(), Role::BnWeight)
        );
        assert_eq!(
            upstream_key_and_role("pretrained.norm.gamma", 1),
            ("pretrained.norm.weight".to_string(), Role::BnWeight)
        );
        assert_eq!(
            upstream_key_and_role("depth_head.reassembly.upsample4.weight", 4),
            (
                "depth_head.resize_layers.0.weight".to_string(),
                Role::ConvWeight
            )
        );
    }

    #[test]
    fn batch_norm_leaves_map_to_upstream_names() {
        assert_eq!(
            upstream_key_and_role("pretrained.stages.0.1.bn2.gamma", 1),
            (
                "pretrained.layer1.4.1.bn2.weight".to_string(),
                Role::BnWeight
            )
        );
        assert_eq!(
            upstream_key_and_role("scratch.output_conv.conv3.weight", 4),
            ("scratch.output_conv.4.weight".to_string(), Role::ConvWeight)
        );
    }
}
