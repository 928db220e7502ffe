//! The DINOv2 ViT encoder of Depth Anything V2, as vendored in DepthAnything/Depth-Anything-V2
//! (`depth_anything_v2/dinov2.py`): patch 14, class token, no register tokens, LayerScale, the
//! position embedding interpolated as upstream does it, four hooked blocks normalised by the
//! final LayerNorm.

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::nn::{LayerNorm, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::TensorData;

use super::conv2d;
use super::transformer::{TransformerBlock, layer_norm};

/// Pixels per token side.
pub const PATCH: usize = 14;

/// Side of the position embedding's grid: the trained 518 / 14.
pub const POS_GRID: usize = 37;

/// Upstream's `interpolate_offset`: added to the token grid's sides before the scale factors of
/// the position embedding's resizing are computed.
const INTERPOLATE_OFFSET: f64 = 0.1;

/// Keys' cubic convolution constant of PyTorch's bicubic interpolation.
const CUBIC_A: f32 = -0.75;

/// The three encoder sizes Depth Anything V2 publishes (upstream's `model_configs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VitSize {
    /// ViT-S/14: 384 wide, 6 heads, 12 blocks.
    Small,
    /// ViT-B/14: 768 wide, 12 heads, 12 blocks.
    Base,
    /// ViT-L/14: 1024 wide, 16 heads, 24 blocks.
    Large,
}

impl VitSize {
    /// Every size, smallest first.
    pub const ALL: [VitSize; 3] = [Self::Small, Self::Base, Self::Large];

    /// Upstream's short name (`vits`, `vitb`, `vitl`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Small => "vits",
            Self::Base => "vitb",
            Self::Large => "vitl",
        }
    }

    /// Upstream's title for the size (`Small`, `Base`, `Large`).
    pub fn title(self) -> &'static str {
        match self {
            Self::Small => "Small",
            Self::Base => "Base",
            Self::Large => "Large",
        }
    }

    /// Token width.
    pub fn dim(self) -> usize {
        match self {
            Self::Small => 384,
            Self::Base => 768,
            Self::Large => 1024,
        }
    }

    /// Transformer blocks.
    pub fn depth(self) -> usize {
        match self {
            Self::Small | Self::Base => 12,
            Self::Large => 24,
        }
    }

    /// The blocks whose outputs the head takes (upstream's `intermediate_layer_idx`).
    pub fn hooks(self) -> [usize; 4] {
        match self {
            Self::Small | Self::Base => [2, 5, 8, 11],
            Self::Large => [4, 11, 17, 23],
        }
    }

    /// The size whose tokens are `dim` wide.
    pub fn from_dim(dim: usize) -> Option<Self> {
        Self::ALL.into_iter().find(|size| size.dim() == dim)
    }
}

/// `PatchEmbed`: a 14x14 stride-14 convolution from RGB to tokens.
#[derive(Module, Debug)]
pub struct PatchEmbed {
    pub(crate) proj: Conv2d,
}

/// `pretrained`: DINOv2's `DinoVisionTransformer`. Its `mask_token` (training only) exists in
/// the weights but is not built (the key is accepted and dropped).
#[derive(Module, Debug)]
pub struct Dinov2 {
    pub(crate) patch_embed: PatchEmbed,
    pub(crate) cls_token: Param<Tensor<3>>,
    pub(crate) pos_embed: Param<Tensor<3>>,
    pub(crate) blocks: Vec<TransformerBlock>,
    pub(crate) norm: LayerNorm,
}

impl Dinov2 {
    /// Builds the encoder with zero parameters.
    pub fn new(device: &Device, size: VitSize) -> Self {
        let dim = size.dim();
        let zeros = |shape: [usize; 3]| Param::from_tensor(Tensor::zeros(shape, device));
        Self {
            patch_embed: PatchEmbed {
                proj: conv2d(
                    device,
                    [3, dim],
                    PATCH,
                    PATCH,
                    1,
                    PaddingConfig2d::Valid,
                    true,
                ),
            },
            cls_token: zeros([1, 1, dim]),
            pos_embed: zeros([1, 1 + POS_GRID * POS_GRID, dim]),
            blocks: (0..size.depth())
                .map(|_| TransformerBlock::new(device, dim, true))
                .collect(),
            norm: layer_norm(device, dim),
        }
    }

    /// Which of the three sizes this is.
    pub fn size(&self) -> VitSize {
        let dim = self.cls_token.dims()[2];
        VitSize::from_dim(dim).unwrap_or(VitSize::Small)
    }

    /// The tokens the blocks start from, `[batch, 1 + h * w, dim]` (class token first,
    /// position embedding added) for a `[batch, 3, 14 h, 14 w]` input, and the grid `(h, w)`.
    pub fn tokens(&self, input: Tensor<4>) -> (Tensor<3>, (usize, usize)) {
        embed_tokens(
            &self.patch_embed.proj,
            &self.cls_token,
            &self.pos_embed,
            input,
        )
    }

    /// `get_intermediate_layers(x, hooks, return_class_token=True, norm=True)` without the class
    /// tokens (the head does not read them): the hooked blocks' patch tokens after the final
    /// LayerNorm, `[batch, h * w, dim]` each, and the grid.
    pub fn forward(&self, input: Tensor<4>) -> ([Tensor<3>; 4], (usize, usize)) {
        let (mut x, grid) = self.tokens(input);
        let hooks = self.size().hooks();
        let mut hooked = Vec::with_capacity(hooks.len());
        for (index, block) in self.blocks.iter().enumerate().take(hooks[3] + 1) {
            x = block.forward(x);
            if hooks.contains(&index) {
                hooked.push(patch_tokens(self.norm.forward(x.clone())));
            }
        }
        let hooked = hooked
            .try_into()
            .unwrap_or_else(|_| unreachable!("every size has four hooks among its blocks"));
        (hooked, grid)
    }
}

/// Drops the class token: `[batch, 1 + n, dim]` to `[batch, n, dim]`.
fn patch_tokens(tokens: Tensor<3>) -> Tensor<3> {
    let count = tokens.dims()[1];
    tokens.narrow(1, 1, count - 1)
}

/// `prepare_tokens_with_masks` without masks, from the parameters wherever they are kept.
pub(crate) fn embed_tokens(
    proj: &Conv2d,
    cls_token: &Param<Tensor<3>>,
    pos_embed: &Param<Tensor<3>>,
    input: Tensor<4>,
) -> (Tensor<3>, (usize, usize)) {
    let [_, _, height, width] = input.dims();
    let embedded = proj.forward(input);
    let [batch, dim, h, w] = embedded.dims();
    let tokens = embedded.flatten::<3>(2, 3).swap_dims(1, 2);
    let cls = cls_token.val().expand([batch, 1, dim]);
    let pos = position_embedding(pos_embed.val(), (h, w), height == width);
    (Tensor::cat(vec![cls, tokens], 1) + pos, (h, w))
}

/// Upstream's `interpolate_pos_encoding`: the trained 37x37 grid as is when the grid is 37x37
/// and the input square (upstream's early exit), else resized by PyTorch's bicubic
/// interpolation with *scale factors* `(h + 0.1) / 37` and `(w + 0.1) / 37`. Given scale
/// factors, PyTorch maps output to input coordinates by their inverse, not by the ratio of the
/// sizes, so this is not a resize to `(h, w)`: it is computed here exactly as upstream's is,
/// on the host (a few thousand values per channel, once per forward).
fn position_embedding(pos: Tensor<3>, (h, w): (usize, usize), square: bool) -> Tensor<3> {
    if (h, w) == (POS_GRID, POS_GRID) && square {
        return pos;
    }
    let device = pos.device();
    let dim = pos.dims()[2];
    let values = pos
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap_or_default();
    let (cls, grid) = values.split_at(dim);
    let rows = cubic_taps(
        POS_GRID,
        h,
        (h as f64 + INTERPOLATE_OFFSET) / POS_GRID as f64,
    );
    let cols = cubic_taps(
        POS_GRID,
        w,
        (w as f64 + INTERPOLATE_OFFSET) / POS_GRID as f64,
    );
    let mut out = Vec::with_capacity((1 + h * w) * dim);
    out.extend_from_slice(cls);
    let mut acc = vec![0.0f64; dim];
    for (row_index, row_weights) in &rows {
        for (col_index, col_weights) in &cols {
            acc.fill(0.0);
            for (&y, &wy) in row_index.iter().zip(row_weights) {
                for (&x, &wx) in col_index.iter().zip(col_weights) {
                    let source = &grid[(y * POS_GRID + x) * dim..][..dim];
                    let weight = wy * wx;
                    for (a, &v) in acc.iter_mut().zip(source) {
                        *a += weight * f64::from(v);
                    }
                }
            }
            out.extend(acc.iter().map(|&a| a as f32));
        }
    }
    Tensor::from_data(TensorData::new(out, [1, 1 + h * w, dim]), &device)
}

/// The four source indices (clamped to the grid) and weights of each of `out` outputs of
/// PyTorch's bicubic interpolation along an axis of `size`, `align_corners=False`, given the
/// scale factor `scale`. The source coordinate is computed in f32 as PyTorch's CPU kernel does
/// for f32 tensors (`1 / scale` rounded to f32, then `(i + 0.5) * s - 0.5`), so the fractional
/// offsets match it bit for bit.
fn cubic_taps(size: usize, out: usize, scale: f64) -> Vec<([usize; 4], [f64; 4])> {
    let last = size as i64 - 1;
    let inverse = (1.0 / scale) as f32;
    (0..out)
        .map(|index| {
            let real = inverse * (index as f32 + 0.5) - 0.5;
            let floor = (real.floor() as i64).min(last);
            let t = (real - floor as f32).clamp(0.0, 1.0);
            let indices = [-1i64, 0, 1, 2].map(|offset| (floor + offset).clamp(0, last) as usize);
            (indices, cubic_weights(t).map(f64::from))
        })
        .collect()
}

/// Keys's cubic convolution weights at fractional offset `t` (PyTorch's
/// `get_cubic_upsample_coefficients`, in the f32 it computes them in).
fn cubic_weights(t: f32) -> [f32; 4] {
    let a = CUBIC_A;
    let near = |x: f32| ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
    let far = |x: f32| ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cubic_weights_sum_to_one_and_interpolate() {
        for t in [0.0, 0.25, 0.5, 0.9] {
            let weights = cubic_weights(t);
            let sum: f32 = weights.iter().sum();
            assert!((sum - 1.0).abs() < 1e-6, "t {t}: sum {sum}");
        }
        assert_eq!(cubic_weights(0.0), [0.0, 1.0, 0.0, 0.0]);
    }

    /// At scale one every output copies its source; at upstream's scale the taps sit around
    /// `(i + 0.5) / scale - 0.5`, clamped at the borders. (Keys' cubic with a = -0.75 does not
    /// reproduce a ramp, so the values themselves are checked by the parity tests.)
    #[test]
    fn taps_follow_the_scale_factor() {
        for (index, (indices, weights)) in cubic_taps(37, 37, 1.0).into_iter().enumerate() {
            assert_eq!(indices[1], index);
            assert_eq!(weights, [0.0, 1.0, 0.0, 0.0]);
        }
        let (size, out) = (37, 26);
        let scale = (out as f64 + INTERPOLATE_OFFSET) / size as f64;
        let taps = cubic_taps(size, out, scale);
        for (index, (indices, weights)) in taps.iter().enumerate() {
            let real = (index as f64 + 0.5) / scale - 0.5;
            let floor = real.floor() as i64;
            let expected = [-1, 0, 1, 2].map(|k| (floor + k).clamp(0, 36) as usize);
            assert_eq!(*indices, expected, "output {index}");
            let sum: f64 = weights.iter().sum();
            assert!(
                (sum - 1.0).abs() < 1e-6,
                "output {index}: weights sum to {sum}"
            );
        }
    }
}
