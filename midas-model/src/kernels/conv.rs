//! Dense convolutions as matrix products over NCHW data: 1x1 convolutions, and strided ones
//! (the encoders' stems, ResNet's downsampling) through im2col.
//!
//! A convolution is `out[co, p] = bias[co] + sum_k W[co, k] * col[k, p]` where `k` runs over
//! (input channel, ky, kx), the row-major order of PyTorch's and Burn's weight tensor (for a
//! 1x1 convolution `col` is the input itself). `W` is packed once into the panels of
//! [`PanelMatrix`]; each piece of the product is followed, while it is in cache, by a pass that
//! adds the bias and any residuals and applies the activation. The stride-1 3x3 convolutions
//! of the decoders go through [`super::winograd3x3`] instead.

use std::ops::Range;

use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;
use rayon::prelude::*;

use super::buffers::WorkBuffer;
use super::panels::PanelMatrix;
use super::{Activation, Bands, FeatureMap, SharedOut, bias_values, same, simd, tensor_values};

/// Input and output bytes per band of pixels of a 1x1 convolution: a core's L2 cache.
const BAND_BYTES: usize = 1 << 20;

/// Columns of `col` per piece of an im2col product: with the deepest im2col (ResNet's 3x3
/// layers, 1 152 values a column) a piece of `col` is 1 MB, a core's L2 cache.
const IM2COL_CHUNK: usize = 240;

/// A convolution's parameters, packed once for these kernels.
#[derive(Clone, Debug)]
pub struct PackedConv {
    /// `[out_channels, in_channels * kernel * kernel]`.
    weights: PanelMatrix,
    /// One per output channel (zeros for a convolution without bias).
    bias: Vec<f32>,
    out_channels: usize,
    in_channels: usize,
    kernel: usize,
    stride: usize,
}

impl PackedConv {
    /// Packs a Burn convolution (groups 1, square kernel), taking its parameters over.
    pub fn from_conv(conv: Conv2d) -> Self {
        Self::pack(conv, None)
    }

    /// Packs a convolution without bias followed by inference-mode BatchNorm, folded into one:
    /// `w' = w * s` and `b' = beta - mean * s` with `s = gamma / sqrt(var + eps)` per channel.
    pub fn from_conv_bn(conv: Conv2d, bn: BatchNorm) -> Self {
        Self::pack(conv, Some(bn))
    }

    /// [`PackedConv::from_conv`], with `bn` folded in when given.
    fn pack(conv: Conv2d, bn: Option<BatchNorm>) -> Self {
        let [out_channels, in_channels, kernel, kernel_w] = conv.weight.dims();
        assert_eq!(kernel, kernel_w, "square kernels only");
        assert_eq!(
            conv.groups, 1,
            "grouped convolutions are packed as depthwise"
        );
        let stride = conv.stride[0];
        let mut weights = tensor_values(conv.weight.into_value());
        let mut bias = bias_values(conv.bias, out_channels);
        if let Some(bn) = bn {
            let (scale, shift) = fold_batch_norm(bn);
            let depth = weights.len() / out_channels;
            for (channel, weights) in weights.chunks_mut(depth).enumerate() {
                weights.iter_mut().for_each(|w| *w *= scale[channel]);
                bias[channel] = bias[channel] * scale[channel] + shift[channel];
            }
        }
        Self::from_weights(&weights, bias, in_channels, (kernel, stride))
    }

    /// A convolution from its row-major `[out, in_channels, kernel, kernel]` weights and its
    /// bias (one per output channel).
    fn from_weights(
        weights: &[f32],
        bias: Vec<f32>,
        in_channels: usize,
        (kernel, stride): (usize, usize),
    ) -> Self {
        let out_channels = bias.len();
        let depth = in_channels * kernel * kernel;
        Self {
            weights: PanelMatrix::from_rows(weights, out_channels, depth),
            bias,
            out_channels,
            in_channels,
            kernel,
            stride,
        }
    }

    /// Values in one column of the product (`in_channels * kernel * kernel`).
    fn depth(&self) -> usize {
        self.in_channels * self.kernel * self.kernel
    }

    /// Adds the bias and the residuals to the pixels `pixels` of the output planes `channels`
    /// of one image and applies the activation, in one pass over values the product has just
    /// written.
    ///
    /// # Safety
    /// `out` must hold `out_channels` planes of `plane` values, initialised over `pixels` in
    /// `channels`, and no other thread may touch those during the call.
    unsafe fn finish(
        &self,
        out: SharedOut,
        residuals: &[&[f32]],
        plane: usize,
        (channels, pixels): (Range<usize>, Range<usize>),
        activation: Activation,
    ) {
        simd::vectorised(
            #[inline(always)]
            || {
                for channel in channels {
                    let bias = self.bias[channel];
                    let start = channel * plane + pixels.start;
                    // SAFETY: inside the planes, written, and this caller's part alone (the
                    // contract).
                    let target = unsafe { out.slice(start, pixels.len()) };
                    match residuals {
                        [] => target
                            .iter_mut()
                            .for_each(|v| *v = activation.of(*v + bias)),
                        [residual] => {
                            let residual = &residual[start..start + pixels.len()];
                            for (v, r) in target.iter_mut().zip(residual) {
                                *v = activation.of(*v + bias + r);
                            }
                        }
                        _ => {
                            for residual in residuals {
                                let residual = &residual[start..start + pixels.len()];
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

    /// `activation(self · b + bias + residuals)` into one image's output planes, over the
    /// pixels `pixels` of `b` (`[depth, plane]` at row stride `plane`), `chunk` pixels a
    /// piece, the pieces on the thread pool when `parallel`.
    ///
    /// # Safety
    /// `b` must hold `depth` rows of `plane` values; `out` `out_channels` planes of `plane`
    /// values, whose pixels `pixels` no other thread touches during the call.
    #[allow(clippy::too_many_arguments)]
    unsafe fn apply(
        &self,
        b: &[f32],
        out: SharedOut,
        residuals: &[&[f32]],
        plane: usize,
        (pixels, chunk): (Range<usize>, usize),
        parallel: bool,
        activation: Activation,
    ) {
        assert!(b.len() >= self.depth() * plane && pixels.end <= plane);
        // SAFETY: `b` holds its rows (asserted), `out` the planes (the contract); `finish`
        // runs on what each piece wrote.
        unsafe {
            self.weights.multiply(
                (b.as_ptr(), plane),
                out,
                plane,
                pixels,
                chunk,
                parallel,
                |channels, pixels| {
                    self.finish(out, residuals, plane, (channels, pixels), activation)
                },
            )
        }
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
/// The pixels are split into bands whose inputs and outputs fit in a core's L2 cache; each
/// band's product is finished (bias, residuals, activation) panel by panel while it is still in
/// cache, so a large map is written to memory once. Small maps, too few bands to share out,
/// run one band per image with its panels on the thread pool.
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
    let fit = (BAND_BYTES / per_pixel).next_multiple_of(16).min(plane);
    let Bands {
        size: band,
        count: bands,
        parallel_inside,
    } = Bands::split(input.batch, plane, fit);
    // A map shared out inside its one band needs pieces for every thread even where it has
    // few panels (the depth head's single output channel has one).
    let chunk = if parallel_inside {
        let chunks = (4 * rayon::current_num_threads()).div_ceil(conv.weights.panels());
        fit.min(plane.div_ceil(chunks).next_multiple_of(16))
    } else {
        fit
    };
    let task = |out: SharedOut, index: usize| {
        let (image, band_index) = (index / bands, index % bands);
        let pixels = band_index * band..((band_index + 1) * band).min(plane);
        let source = &input.data[image * input.image_len()..][..input.image_len()];
        let residual_images: Vec<&[f32]> = residuals
            .iter()
            .map(|r| &r.data[image * out_len..][..out_len])
            .collect();
        // SAFETY: image `image` of the output holds out_channels planes; this task alone
        // writes their pixels `pixels`.
        unsafe {
            conv.apply(
                source,
                SharedOut(out.get().add(image * out_len)),
                &residual_images,
                plane,
                (pixels, chunk),
                parallel_inside,
                activation,
            )
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
                if parallel_inside {
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
/// rest the patches of a `height x width` grid in row order. The patches are first transposed
/// into the maps' channel-major layout, which the product reads.
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
    let mut patches = WorkBuffer::take(channels * plane);
    // SAFETY: each image's product writes all its output planes.
    unsafe {
        FeatureMap::filled_by(batch, conv.out_channels, height, width, |out| {
            for image in 0..batch {
                let first = (image * per_image + per_image - plane) * channels;
                transpose(&tokens[first..][..plane * channels], channels, &mut patches);
                conv.apply(
                    &patches,
                    SharedOut(out.get().add(image * out_len)),
                    &[],
                    plane,
                    (0..plane, IM2COL_CHUNK),
                    true,
                    Activation::Identity,
                );
            }
        })
    }
}

/// `out[c * rows + r] = values[r * columns + c]` for a row-major `values` of `columns`
/// columns, in square blocks so that both sides are read and written a cache line at a time.
fn transpose(values: &[f32], columns: usize, out: &mut [f32]) {
    const BLOCK: usize = 16;
    let rows = values.len() / columns;
    for row_block in (0..rows).step_by(BLOCK) {
        for column_block in (0..columns).step_by(BLOCK) {
            for row in row_block..(row_block + BLOCK).min(rows) {
                for column in column_block..(column_block + BLOCK).min(columns) {
                    out[column * rows + row] = values[row * columns + column];
                }
            }
        }
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

/// A dense convolution through im2col and one product per image; `rows` and `columns` as
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
    // SAFETY: every image's product writes all its output planes.
    unsafe {
        FeatureMap::filled_by(
            input.batch,
            conv.out_channels,
            out_height,
            out_width,
            |out| {
                for image in 0..input.batch {
                    let source = &input.data[image * input.image_len()..][..input.image_len()];
                    let shape = (conv.kernel, conv.stride);
                    im2col(source, input, shape, rows, columns, &mut col);
                    conv.apply(
                        &col,
                        SharedOut(out.get().add(image * out_len)),
                        &[],
                        plane,
                        (0..plane, IM2COL_CHUNK),
                        true,
                        activation,
                    );
                }
            },
        )
    }
}
