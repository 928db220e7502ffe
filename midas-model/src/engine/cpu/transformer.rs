//! The ViT blocks on the CPU (DPT-Hybrid's ViT-B, Depth Anything V2's DINOv2): the token
//! sequence stays one row-major `[tokens, dim]` buffer per image from the first block to the
//! last, and each step is a GEMM or one vectorised pass over rows.
//!
//! On Burn's operations a block is 19 kernels with a copy for every reshape and permute of the
//! attention, and GELU and softmax call libm's scalar `erf` and `exp`. Here the linears run
//! on the `gemm` crate with their bias added in the pass that next touches the output (GELU
//! after `fc1`) or before the GEMM accumulates onto the residual stream (`proj`, `fc2`, which
//! thereby need no separate residual addition); attention reads `q`, `k` and `v` in place from
//! the `qkv` output through strides, one head and band of queries per task, and `1/sqrt(64)`
//! is folded into the `q` weights at packing (a power of two: exact). DINOv2's LayerScale is
//! folded into the columns of `proj` and `fc2` and their biases at packing: one multiplication
//! moved into the weights, so the residual accumulation stays one GEMM (the result differs
//! from upstream's order by rounding only).

use burn::nn::{LayerNorm, Linear};
use rayon::prelude::*;

use crate::kernels::{SharedOut, WorkBuffer, bias_values, gemm, simd, strided_gemm, tensor_values};
use crate::model::{HEAD_DIM, LN_EPSILON, LayerScale, TransformerBlock};

/// Rows per task of the row-wise passes (LayerNorm, bias, GELU).
const ROWS_PER_TASK: usize = 32;

/// A linear layer's parameters: `weights` `[inputs, outputs]` row-major, as Burn keeps them.
#[derive(Debug)]
pub(super) struct PackedLinear {
    weights: Vec<f32>,
    bias: Vec<f32>,
    inputs: usize,
    outputs: usize,
}

impl PackedLinear {
    pub(super) fn pack(linear: Linear) -> Self {
        let [inputs, outputs] = linear.weight.dims();
        let bias = bias_values(linear.bias, outputs);
        Self {
            weights: tensor_values(linear.weight.into_value()),
            bias,
            inputs,
            outputs,
        }
    }

    /// The layer taken apart at input `at`: the inputs before it with the bias, and those from
    /// it with a zero bias, so that the two products add up to the layer's.
    pub(super) fn split_inputs(mut self, at: usize) -> (Self, Self) {
        assert!(at <= self.inputs);
        let rest = Self {
            weights: self.weights.split_off(at * self.outputs),
            bias: vec![0.0; self.outputs],
            inputs: self.inputs - at,
            outputs: self.outputs,
        };
        self.inputs = at;
        (self, rest)
    }

    /// The bias, one per output.
    pub(super) fn bias(&self) -> &[f32] {
        &self.bias
    }

    /// Multiplies output column `j` (weights and bias) by `scale[j]`: a LayerScale after the
    /// layer, folded in.
    fn scale_outputs(&mut self, scale: &[f32]) {
        assert_eq!(scale.len(), self.outputs);
        for row in self.weights.chunks_exact_mut(self.outputs) {
            row.iter_mut().zip(scale).for_each(|(w, s)| *w *= s);
        }
        self.bias.iter_mut().zip(scale).for_each(|(b, s)| *b *= s);
    }

    /// `out (+)= input @ weights` over `rows` rows, without the bias; `accumulate` adds to what
    /// `out` holds.
    pub(super) fn product(&self, input: &[f32], rows: usize, out: &mut [f32], accumulate: bool) {
        assert_eq!(input.len(), rows * self.inputs);
        assert_eq!(out.len(), rows * self.outputs);
        // SAFETY: `out` holds rows x outputs values at row stride `outputs` (checked above).
        unsafe {
            gemm(
                rows,
                self.outputs,
                self.inputs,
                out.as_mut_ptr(),
                self.outputs,
                input,
                &self.weights,
                self.outputs,
                accumulate,
                true,
            );
        }
    }
}

/// LayerNorm's parameters.
#[derive(Debug)]
pub struct PackedNorm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    epsilon: f32,
}

impl PackedNorm {
    /// Packs a LayerNorm with the ViTs' epsilon.
    pub fn pack(norm: LayerNorm) -> Self {
        let gamma = tensor_values(norm.gamma.into_value());
        let beta = bias_values(norm.beta, gamma.len());
        Self {
            gamma,
            beta,
            // Burn keeps the epsilon private; it is timm's for every ViT LayerNorm.
            epsilon: LN_EPSILON as f32,
        }
    }

    /// `output = LayerNorm(input)` row by row, rows in parallel.
    pub fn apply(&self, input: &[f32], output: &mut [f32]) {
        let chunk = ROWS_PER_TASK * self.gamma.len();
        input
            .par_chunks(chunk)
            .zip(output.par_chunks_mut(chunk))
            .for_each(|(input, output)| {
                simd::layer_norm(input, output, &self.gamma, &self.beta, self.epsilon)
            });
    }
}

/// One pre-norm block, packed.
#[derive(Debug)]
struct PackedBlock {
    /// Token width.
    dim: usize,
    norm1: PackedNorm,
    qkv: PackedLinear,
    proj: PackedLinear,
    norm2: PackedNorm,
    fc1: PackedLinear,
    fc2: PackedLinear,
}

impl PackedBlock {
    fn pack(block: TransformerBlock) -> Self {
        let dim = block.dim();
        let mut qkv = PackedLinear::pack(block.attn.qkv);
        let scale = (HEAD_DIM as f32).powf(-0.5);
        for row in qkv.weights.chunks_exact_mut(qkv.outputs) {
            row[..dim].iter_mut().for_each(|w| *w *= scale);
        }
        qkv.bias[..dim].iter_mut().for_each(|b| *b *= scale);
        let mut proj = PackedLinear::pack(block.attn.proj);
        let mut fc2 = PackedLinear::pack(block.mlp.fc2);
        for (linear, layer_scale) in [(&mut proj, block.ls1), (&mut fc2, block.ls2)] {
            if let Some(LayerScale { gamma }) = layer_scale {
                linear.scale_outputs(&tensor_values(gamma.into_value()));
            }
        }
        Self {
            dim,
            norm1: PackedNorm::pack(block.norm1),
            qkv,
            proj,
            norm2: PackedNorm::pack(block.norm2),
            fc1: PackedLinear::pack(block.mlp.fc1),
            fc2,
        }
    }

    /// Runs the block on `x`, `[images * tokens, dim]`, in place.
    fn forward(&self, x: &mut [f32], tokens: usize, buffers: &mut Buffers) {
        let dim = self.dim;
        let rows = x.len() / dim;
        self.norm1.apply(x, &mut buffers.normed);
        self.qkv
            .product(&buffers.normed, rows, &mut buffers.qkv, false);
        for_row_chunks(&mut buffers.qkv, self.qkv.outputs, |chunk| {
            simd::add_bias(chunk, &self.qkv.bias)
        });
        attention(&buffers.qkv, tokens, dim, &mut buffers.attended);
        for_row_chunks(x, dim, |chunk| simd::add_bias(chunk, &self.proj.bias));
        self.proj.product(&buffers.attended, rows, x, true);

        self.norm2.apply(x, &mut buffers.normed);
        self.fc1
            .product(&buffers.normed, rows, &mut buffers.hidden, false);
        for_row_chunks(&mut buffers.hidden, self.fc1.outputs, |chunk| {
            simd::bias_gelu(chunk, &self.fc1.bias)
        });
        for_row_chunks(x, dim, |chunk| simd::add_bias(chunk, &self.fc2.bias));
        self.fc2.product(&buffers.hidden, rows, x, true);
    }
}

/// Runs `pass` on chunks of whole rows of `width` values, in parallel.
pub(super) fn for_row_chunks(
    values: &mut [f32],
    width: usize,
    pass: impl Fn(&mut [f32]) + Send + Sync,
) {
    values.par_chunks_mut(ROWS_PER_TASK * width).for_each(pass);
}

/// A forward's intermediate values, allocated once for all blocks.
struct Buffers {
    normed: Vec<f32>,
    qkv: Vec<f32>,
    attended: Vec<f32>,
    hidden: Vec<f32>,
}

/// Query rows per attention task. A task's scores (`QUERY_ROWS x tokens`: 1.4 MB at 1,370
/// tokens, 2.5 MB at 2,442) are what a thread holds, where a whole head's would be 7.5 MB and
/// 24 MB, kept per thread for reuse; with 64 to 512 rows the forward takes the same time (the
/// products run as fast on a tile as on the whole head), so the size is chosen for memory and
/// for tasks enough to share between threads.
const QUERY_ROWS: usize = 256;

/// Multi-head self-attention over `qkv` (`[images * tokens, 3 * dim]`, columns `[q | k | v]`,
/// heads of 64 columns in each), into `out` (`[images * tokens, dim]`, heads side by side):
/// `softmax(q kᵀ) v` per image and head, one task per [`QUERY_ROWS`] rows of queries (a row's
/// softmax needs only its own scores). A thread takes consecutive tasks, so the head's `k`
/// and `v` (2 x 350 KB at 1,370 tokens) stay in its cache from one tile to the next.
fn attention(qkv: &[f32], tokens: usize, dim: usize, out: &mut [f32]) {
    let heads = dim / HEAD_DIM;
    let stride = 3 * dim;
    let images = qkv.len() / (tokens * stride);
    assert_eq!(dim, heads * HEAD_DIM);
    assert_eq!(qkv.len(), images * tokens * stride);
    assert_eq!(out.len(), images * tokens * dim);
    let tiles = tokens.div_ceil(QUERY_ROWS);
    let target = SharedOut(out.as_mut_ptr());
    (0..images * heads * tiles)
        .into_par_iter()
        .for_each(|task| {
            let (image, head, tile) = (task / (heads * tiles), task / tiles % heads, task % tiles);
            let first = tile * QUERY_ROWS;
            let rows = QUERY_ROWS.min(tokens - first);
            let base = image * tokens * stride + head * HEAD_DIM;
            let q = qkv[base + first * stride..].as_ptr();
            let k = qkv[base + dim..].as_ptr();
            let v = qkv[base + 2 * dim..].as_ptr();
            let mut scores = WorkBuffer::take(rows * tokens);
            // SAFETY: q indexes `rows` rows and k and v `tokens` rows of 64 values at row stride
            // `stride` inside `qkv` (its length is checked above); `scores` holds rows x tokens
            // values; this task alone writes its head's 64 columns of its rows of `out`.
            unsafe {
                strided_gemm(
                    (rows, tokens, HEAD_DIM),
                    scores.as_mut_ptr(),
                    tokens,
                    (q, stride, 1),
                    (k, 1, stride),
                    false,
                    false,
                );
                simd::softmax(&mut scores, tokens);
                strided_gemm(
                    (rows, HEAD_DIM, tokens),
                    target
                        .get()
                        .add((image * tokens + first) * dim + head * HEAD_DIM),
                    dim,
                    (scores.as_ptr(), tokens, 1),
                    (v, stride, 1),
                    false,
                    false,
                );
            }
        });
}

/// The transformer blocks with their weights packed; built once after the weights load.
#[derive(Debug)]
pub struct CpuTransformer {
    blocks: Vec<PackedBlock>,
}

impl CpuTransformer {
    /// Packs loaded blocks, taking their parameters over.
    pub fn pack(blocks: Vec<TransformerBlock>) -> Self {
        Self {
            blocks: blocks.into_iter().map(PackedBlock::pack).collect(),
        }
    }

    /// Runs every block on `x`, `[images, tokens, dim]` row-major, and returns the outputs of
    /// the blocks `hooks` names (indices from 0, ascending).
    pub fn run<const N: usize>(
        &self,
        mut x: Vec<f32>,
        tokens: usize,
        hooks: [usize; N],
    ) -> [Vec<f32>; N] {
        let dim = self.blocks.first().map_or(1, |block| block.dim);
        assert!(tokens > 0 && x.len().is_multiple_of(tokens * dim));
        let rows = x.len() / dim;
        let mut buffers = Buffers {
            normed: vec![0.0; rows * dim],
            qkv: vec![0.0; rows * 3 * dim],
            attended: vec![0.0; rows * dim],
            hidden: vec![0.0; rows * self.blocks.first().map_or(0, |b| b.fc1.outputs)],
        };
        let mut hooked = Vec::with_capacity(N);
        let last = hooks.iter().max().copied().unwrap_or(0);
        for (index, block) in self.blocks.iter().enumerate().take(last + 1) {
            block.forward(&mut x, tokens, &mut buffers);
            if hooks.contains(&index) {
                hooked.push(if index == last {
                    std::mem::take(&mut x)
                } else {
                    x.clone()
                });
            }
        }
        hooked
            .try_into()
            .unwrap_or_else(|_| panic!("hooks {hooks:?} name blocks that do not exist"))
    }
}

#[cfg(test)]
mod tests {
    use burn::module::Param;
    use burn::nn::LayerNormConfig;
    use burn::prelude::*;
    use burn::tensor::Distribution;

    use super::*;

    fn device() -> Device {
        Device::flex()
    }

    fn random<const D: usize>(shape: [usize; D], spread: f64) -> Param<Tensor<D>> {
        Param::from_tensor(Tensor::random(
            shape,
            Distribution::Uniform(-spread, spread),
            &device(),
        ))
    }

    fn randomise_linear(linear: &mut Linear) {
        let [inputs, outputs] = linear.weight.dims();
        linear.weight = random([inputs, outputs], (inputs as f64).powf(-0.5));
        linear.bias = Some(random([outputs], 0.2));
    }

    fn randomise_norm(norm: &mut LayerNorm, dim: usize) {
        *norm = LayerNormConfig::new(dim).with_epsilon(1e-6).init(&device());
        norm.gamma = Param::from_tensor(norm.gamma.val() + random([dim], 0.5).val());
        norm.beta = Some(random([dim], 0.5));
    }

    /// Blocks of `dim`-wide tokens (with LayerScale when `layer_scale`) with random parameters
    /// (the zero-initialised ones would test nothing).
    fn random_blocks(count: usize, dim: usize, layer_scale: bool) -> Vec<TransformerBlock> {
        let mut blocks: Vec<_> = (0..count)
            .map(|_| TransformerBlock::new(&device(), dim, layer_scale))
            .collect();
        for block in &mut blocks {
            randomise_norm(&mut block.norm1, dim);
            randomise_norm(&mut block.norm2, dim);
            randomise_linear(&mut block.attn.qkv);
            randomise_linear(&mut block.attn.proj);
            randomise_linear(&mut block.mlp.fc1);
            randomise_linear(&mut block.mlp.fc2);
            for scale in [&mut block.ls1, &mut block.ls2].into_iter().flatten() {
                scale.gamma = Param::from_tensor(random([dim], 1.0).val());
            }
        }
        blocks
    }

    /// DPT-Hybrid's ViT-B blocks and DINOv2's ViT-S ones with LayerScale.
    #[test]
    fn blocks_match_burn() {
        check_blocks(768, false);
        check_blocks(384, true);
    }

    /// Two images of an odd token count (not a multiple of any vector width or GEMM tile) and
    /// three blocks, hooks on the second and third, against Burn's operations on the same
    /// blocks; NaN fails.
    fn check_blocks(dim: usize, layer_scale: bool) {
        let blocks = random_blocks(3, dim, layer_scale);
        let (images, tokens) = (2, 37);
        let x: Tensor<3> = random([images, tokens, dim], 2.0).val();
        let mut expected = Vec::new();
        let mut reference = x.clone();
        for block in &blocks {
            reference = block.forward(reference);
            expected.push(tensor_values(reference.clone()));
        }
        let ours = CpuTransformer::pack(blocks).run(tensor_values(x), tokens, [1, 2]);
        for (got, want) in ours.iter().zip(&expected[1..]) {
            let range = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert!(range > 1.0, "the blocks change their input");
            let worst = got
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, |m, d| {
                    if d.is_nan() || m.is_nan() {
                        f32::NAN
                    } else {
                        m.max(d)
                    }
                });
            assert!(worst <= 1e-5 * range, "max |diff| {worst}, range {range}");
        }
    }
}
