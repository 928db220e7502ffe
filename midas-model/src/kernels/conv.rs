//! Dense convolutions as GEMMs over NCHW data: 1x1 convolutions, and the encoder's strided stem
//! through im2col.
//!
//! A convolution is `out[co, p] = bias[co] + sum_k W[co, k] * col[k, p]` where `k` runs over
//! (input channel, ky, kx), which is exactly the row-major order of PyTorch's and Burn's weight
//! tensor, so the weights need no re-layout (for a 1x1 convolution `col` is the input itself).
//! The output is first filled with the bias and any residual, and the GEMM accumulates onto it.
//! The stride-1 3x3 convolutions of the decoder go through [`super::winograd3x3`] instead.

use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;
use rayon::prelude::*;

use super::buffers::WorkBuffer;
use super::{Activation, Bands, FeatureMap, SharedOut, bias_values, same, simd, tensor_values};

/// Input and output bytes per band of pixels of a 1x1 convolution: a core's L2 cache.
const BAND_BYTES: usize = 1 << 20;

/// A convolution's parameters, packed once for these kernels.
#[derive(Clone, Debug)]
pub struct PackedConv {
    /// `[out_channels, in_channels * kernel * kernel]`, row-major.
    weights: Vec<f32>,
    /// One per output channel (zeros for a convolution without bias).
    bias: Vec<f32>,
    out_channels: usize,
    in_channels: usize,
    kernel: usize,
    stride: usize,
}

impl PackedConv {
    /// Packs a Burn convolution (groups 1, square kernel). It takes the module so
    /// that the parameters move into the packed form instead of being copied: the decoder's
    /// weights are then held once.
    pub fn from_conv(conv: Conv2d) -> Self {
        let [out_channels, in_channels, kernel, kernel_w] = conv.weight.dims();
        assert_eq!(kernel, kernel_w, "square kernels only");
        assert_eq!(
            conv.groups, 1,
            "grouped convolutions are packed as depthwise"
        );
        let weights = tensor_values(conv.weight.into_value());
        let bias = bias_values(conv.bias, out_channels);
        Self {
            weights,
            bias,
            out_channels,
            in_channels,
            kernel,
            stride: conv.stride[0],
        }
    }

    /// Packs a convolution without bias followed by inference-mode BatchNorm, folded into one:
    /// `w' = w * s` and `b' = beta - mean * s` with `s = gamma / sqrt(var + eps)` per channel.
    pub fn from_conv_bn(conv: Conv2d, bn: BatchNorm) -> Self {
        let mut packed = Self::from_conv(conv);
        let (scale, shift) = fold_batch_norm(bn);
        let per_channel = packed.depth();
        for (channel, weights) in packed.weights.chunks_mut(per_channel).enumerate() {
            weights.iter_mut().for_each(|w| *w *= scale[channel]);
            packed.bias[channel] = packed.bias[channel] * scale[channel] + shift[channel];
        }
        packed
    }

    /// The weights of `[out_channels, in_channels * kernel * kernel]` as a GEMM's depth.
    fn depth(&self) -> usize {
        self.in_channels * self.kernel * self.kernel
    }

    /// Adds the bias and the residuals to the part `range` of each output plane of one image
    /// and applies the activation, in one pass over values the GEMM has just written.
    ///
    /// # Safety
    /// `out` must hold `out_channels` planes of `plane` values, initialised in `range`, and no
    /// other thread may touch that part during the call.
    unsafe fn finish(
        &self,
        out: SharedOut,
        residuals: &[&[f32]],
        plane: usize,
        range: (usize, usize),
        activation: Activation,
    ) {
        simd::vectorised(
            #[inline(always)]
            || {
                let len = range.1 - range.0;
                for (channel, &bias) in self.bias.iter().enumerate() {
                    let start = channel * plane + range.0;
                    // SAFETY: inside the planes, written, and this caller's part alone (the contract).
                    let target = unsafe { out.slice(start, len) };
                    match residuals {
                        [] => target
                            .iter_mut()
                            .for_each(|v| *v = activation.of(*v + bias)),
                        [residual] => {
                            let residual = &residual[start..start + len];
                            for (v, r) in target.iter_mut().zip(residual) {
                                *v = activation.of(*v + bias + r);
                            }
                        }
                        _ => {
                            for residual in residuals {
                                let residual = &residual[start..start + len];
                                target.iter_mut().zip(residual).for_each(|(v, r)| *v += r);
                            }
                            target
                                .iter_mut()
                                .for_each(|v| *v = activation.of(*v + bias));
                        }
                    }
                }
            },
        )
    }
}

/// Inference-mode BatchNorm as a per-channel `(scale, shift)`.
pub(super) fn fold_batch_norm(bn: BatchNorm) -> (Vec<f32>, Vec<f32>) {
    let gamma = tensor_values(bn.gamma.into_value());
    let beta = tensor_values(bn.beta.into_value());
    let mean = tensor_values(bn.running_mean.value());
    let var = tensor_values(bn.running_var.value());
    let scale: Vec<f32> = gamma
        .iter()
        .zip(&var)
        .map(|(g, v)| (f64::from(*g) / (f64::from(*v) + bn.epsilon).sqrt()) as f32)
        .collect();
    let shift = beta
        .iter()
        .zip(&mean)
        .zip(&scale)
        .map(|((b, m), s)| b - m * s)
        .collect();
    (scale, shift)
}

/// `dst[m, n] (+)= lhs[m, k] * rhs[k, n]`, all row-major with the given row strides: added to
/// `dst` when `accumulate`, written over it otherwise.
///
/// # Safety
/// `dst` must be valid for `m` rows of `n` values at stride `dst_rs` (initialised when
/// `accumulate`), and no other thread may touch those values during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    lhs: &[f32],
    rhs: &[f32],
    rhs_rs: usize,
    accumulate: bool,
    parallel: bool,
) {
    // What the reads below reach, checked here rather than trusted to the callers' shapes.
    assert!(
        lhs.len() >= m * k,
        "lhs holds {} values, not {m}x{k}",
        lhs.len()
    );
    assert!(
        k == 0 || n == 0 || (rhs_rs >= n && rhs.len() >= (k - 1) * rhs_rs + n),
        "rhs holds {} values, not {k} rows of {n} at stride {rhs_rs}",
        rhs.len()
    );
    // SAFETY: lhs holds m*k values at row stride k and rhs k rows of n at stride rhs_rs
    // (asserted above); dst is the caller's contract.
    unsafe {
        strided_gemm(
            (m, n, k),
            dst,
            dst_rs,
            (lhs.as_ptr(), k, 1),
            (rhs.as_ptr(), rhs_rs, 1),
            accumulate,
            parallel,
        )
    }
}

/// `dst (+)= lhs @ rhs` for `(m, n, k)`, each operand `(pointer, row stride, column stride)`
/// (so either may be read transposed), `dst` row-major at row stride `dst_rs`; added to `dst`
/// when `accumulate`; on the thread pool when `parallel`.
///
/// # Safety
/// Every index the shapes and strides reach must be inside its buffer (`dst` initialised when
/// `accumulate`), and `dst`'s values this caller's alone during the call.
pub(crate) unsafe fn strided_gemm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
    accumulate: bool,
    parallel: bool,
) {
    let parallelism = if parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs.0,
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0,
            rhs.2 as isize,
            rhs.1 as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// 1x1 convolution: `activation(conv(input) + bias + residuals)`.
///
/// The pixels are split into bands whose inputs and outputs fit in a core's L2 cache; each band's
/// GEMM writes its outputs and `PackedConv::finish` adds bias and residuals and applies the
/// activation while they are still in cache, so a large map is written to memory once.
pub fn conv1x1(
    input: &FeatureMap,
    conv: &PackedConv,
    activation: Activation,
    residuals: &[&FeatureMap],
) -> FeatureMap {
    assert_eq!(
        (conv.kernel, conv.stride),
        (1, 1),
        "a 1x1, stride-1 convolution only"
    );
    input.assert_shape(conv.in_channels);
    FeatureMap::assert_residuals(
        residuals,
        input.batch,
        conv.out_channels,
        input.height,
        input.width,
    );
    let plane = input.plane();
    let out_len = conv.out_channels * plane;
    let per_pixel = 4 * (conv.in_channels + conv.out_channels);
    let Bands {
        size: band,
        count: bands,
        parallel_inside: parallel_gemm,
    } = Bands::split(
        input.batch,
        plane,
        (BAND_BYTES / per_pixel).next_multiple_of(16).min(plane),
    );
    let task = |out: SharedOut, index: usize| {
        let (image, band_index) = (index / bands, index % bands);
        let range = (band_index * band, ((band_index + 1) * band).min(plane));
        let source = &input.data[image * input.image_len()..(image + 1) * input.image_len()];
        let residual_images: Vec<&[f32]> = residuals
            .iter()
            .map(|r| &r.data[image * out_len..(image + 1) * out_len])
            .collect();
        // SAFETY: image `image` of the output holds out_channels planes; this task alone writes
        // their part `range`, first through the GEMM, then in `finish`.
        unsafe {
            let out_image = SharedOut(out.get().add(image * out_len));
            gemm(
                conv.out_channels,
                range.1 - range.0,
                conv.in_channels,
                out_image.get().add(range.0),
                plane,
                &conv.weights,
                &source[range.0..],
                plane,
                false,
                parallel_gemm,
            );
            conv.finish(out_image, &residual_images, plane, range, activation);
        }
    };
    // SAFETY: the bands cover every pixel of every image, each writing all output channels.
    unsafe {
        FeatureMap::filled_by(
            input.batch,
            conv.out_channels,
            input.height,
            input.width,
            |out| {
                if parallel_gemm {
                    (0..input.batch * bands).for_each(|index| task(out, index));
                } else {
                    (0..input.batch * bands)
                        .into_par_iter()
                        .for_each(|index| task(out, index));
                }
            },
        )
    }
}

/// 1x1 convolution of ViT tokens into a feature map, `conv(patches) + bias`: `tokens` holds
/// `batch` images of `per_image` tokens of `in_channels` values (row-major, as the transformer
/// leaves them), the first `per_image - height * width` of each (the class token) skipped, the
/// rest the patches of a `height x width` grid in row order. The GEMM reads them transposed,
/// so the tokens need no pass into the maps' channel-major layout first.
pub fn conv1x1_tokens(
    tokens: &[f32],
    per_image: usize,
    (height, width): (usize, usize),
    conv: &PackedConv,
) -> FeatureMap {
    assert_eq!(
        (conv.kernel, conv.stride),
        (1, 1),
        "a 1x1, stride-1 convolution"
    );
    let (plane, channels) = (height * width, conv.in_channels);
    assert!(per_image >= plane && tokens.len().is_multiple_of(per_image * channels));
    let batch = tokens.len() / (per_image * channels);
    let out_len = conv.out_channels * plane;
    // SAFETY: each image's GEMM writes all its output planes; the reads stay inside `tokens`
    // (its length is checked above).
    unsafe {
        FeatureMap::filled_by(batch, conv.out_channels, height, width, |out| {
            for image in 0..batch {
                let patches = tokens[(image * per_image + per_image - plane) * channels..].as_ptr();
                let out_image = SharedOut(out.get().add(image * out_len));
                strided_gemm(
                    (conv.out_channels, plane, channels),
                    out_image.get(),
                    plane,
                    (conv.weights.as_ptr(), channels, 1),
                    (patches, 1, channels),
                    false,
                    true,
                );
                conv.finish(out_image, &[], plane, (0, plane), Activation::Identity);
            }
        })
    }
}

/// The im2col matrix of one image (`[in_channels * kernel * kernel, out_height * out_width]`):
/// the input values each output position's taps read, zero in the padding; `rows` and
/// `columns` are each axis's `(output length, padding before the first input)`.
fn im2col(
    image: &[f32],
    input: &FeatureMap,
    (kernel, stride): (usize, usize),
    (out_height, pad_top): (usize, usize),
    (out_width, pad_left): (usize, usize),
    col: &mut [f32],
) {
    let (height, width) = (input.height, input.width);
    let taps = col.chunks_exact_mut(out_height * out_width);
    for (tap, row) in taps.enumerate() {
        let (channel, ky, kx) = (tap / (kernel * kernel), tap / kernel % kernel, tap % kernel);
        let plane = &image[channel * height * width..(channel + 1) * height * width];
        for (oy, out) in row.chunks_exact_mut(out_width).enumerate() {
            let y = (oy * stride + ky).wrapping_sub(pad_top);
            for (ox, value) in out.iter_mut().enumerate() {
                let x = (ox * stride + kx).wrapping_sub(pad_left);
                *value = if y < height && x < width {
                    plane[y * width + x]
                } else {
                    0.0
                };
            }
        }
    }
}

/// A dense convolution of any kernel size and stride with TensorFlow's SAME padding, the
/// encoder's stem: `activation(conv(input) + bias)`.
pub fn conv_same(input: &FeatureMap, conv: &PackedConv, activation: Activation) -> FeatureMap {
    let rows = same(input.height, conv.kernel, conv.stride);
    let columns = same(input.width, conv.kernel, conv.stride);
    conv_im2col(input, conv, rows, columns, activation)
}

/// A dense convolution of any kernel size and stride with `padding` zeros on every side, as
/// PyTorch's `Conv2d(padding=padding)`: `activation(conv(input) + bias)`.
pub fn conv_padded(
    input: &FeatureMap,
    conv: &PackedConv,
    padding: usize,
    activation: Activation,
) -> FeatureMap {
    let axis = |length: usize| {
        let padded = length + 2 * padding;
        assert!(
            padded >= conv.kernel,
            "the kernel is larger than the padded input"
        );
        ((padded - conv.kernel) / conv.stride + 1, padding)
    };
    conv_im2col(
        input,
        conv,
        axis(input.height),
        axis(input.width),
        activation,
    )
}

/// A dense convolution through im2col and one GEMM per image; `rows` and `columns` as
/// [`im2col`]'s.
fn conv_im2col(
    input: &FeatureMap,
    conv: &PackedConv,
    rows: (usize, usize),
    columns: (usize, usize),
    activation: Activation,
) -> FeatureMap {
    input.assert_shape(conv.in_channels);
    let (out_height, out_width) = (rows.0, columns.0);
    let plane = out_height * out_width;
    let out_len = conv.out_channels * plane;
    let mut col = WorkBuffer::take(conv.depth() * plane);
    // SAFETY: every image's GEMM writes all its output planes.
    unsafe {
        FeatureMap::filled_by(
            input.batch,
            conv.out_channels,
            out_height,
            out_width,
            |out| {
                for image in 0..input.batch {
                    let source =
                        &input.data[image * input.image_len()..(image + 1) * input.image_len()];
                    let shape = (conv.kernel, conv.stride);
                    im2col(source, input, shape, rows, columns, &mut col);
                    let out_image = SharedOut(out.get().add(image * out_len));
                    gemm(
                        conv.out_channels,
                        plane,
                        conv.depth(),
                        out_image.get(),
                        plane,
                        &conv.weights,
                        &col,
                        plane,
                        false,
                        true,
                    );
                    conv.finish(out_image, &[], plane, (0, plane), activation);
                }
            },
        )
    }
}
