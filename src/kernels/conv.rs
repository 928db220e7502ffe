//! Dense 3x3 (stride 1, padding 1) and 1x1 convolutions as GEMMs over NCHW data.
//!
//! A 3x3 convolution is `out[co, p] = bias[co] + sum_k W[co, k] * col[k, p]` where `k` runs over
//! (input channel, ky, kx), which is exactly the row-major order of PyTorch's and Burn's weight
//! tensor, so the weights need no re-layout. `col` (im2col) is built one band of output rows at
//! a time, sized to stay in cache, and each band's GEMM writes straight into the output planes.
//! The output is first filled with the bias and any residual, and the GEMM accumulates onto it.

use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;
use rayon::prelude::*;

use super::scratch::Scratch;
use super::{Activation, FeatureMap, tensor_values};

/// im2col bytes per band that keep a band's working set in a core's L2 cache.
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
}

impl PackedConv {
    /// Packs a Burn convolution (groups 1, stride 1, square kernel). It takes the module so
    /// that the parameters move into the packed form instead of being copied: the decoder's
    /// weights are then held once.
    pub fn from_conv(conv: Conv2d) -> Self {
        let [out_channels, in_channels, kernel, kernel_w] = conv.weight.dims();
        debug_assert_eq!(kernel, kernel_w, "square kernels only");
        let weights = tensor_values(conv.weight.into_value());
        let bias = match conv.bias {
            Some(bias) => tensor_values(bias.into_value()),
            None => vec![0.0; out_channels],
        };
        Self {
            weights,
            bias,
            out_channels,
            in_channels,
            kernel,
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

    /// Fills the part `range` of each output plane with its bias plus the residuals there.
    ///
    /// # Safety
    /// `out` must point at `out_channels` planes of `plane` values, and no other thread may
    /// touch their part `range` during the call.
    unsafe fn prefill(
        &self,
        out: *mut f32,
        residuals: &[&[f32]],
        plane: usize,
        range: (usize, usize),
    ) {
        for (channel, bias) in self.bias.iter().enumerate() {
            let start = channel * plane;
            // SAFETY: inside the planes, and this caller's part alone (the contract).
            let target = unsafe {
                std::slice::from_raw_parts_mut(out.add(start + range.0), range.1 - range.0)
            };
            target.fill(*bias);
            for residual in residuals {
                let source = &residual[start + range.0..start + range.1];
                target.iter_mut().zip(source).for_each(|(t, r)| *t += r);
            }
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

/// A raw output pointer shared by tasks that write disjoint parts of the same buffer.
#[derive(Clone, Copy)]
pub(super) struct SharedOut(pub(super) *mut f32);
// SAFETY: every task writes a disjoint set of indices (its own band of rows), and the buffer
// outlives the parallel loop that uses it.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}

/// `dst[m, n] (+)= lhs[m, k] * rhs[k, n]`, all row-major with the given row strides: added to
/// `dst` when `accumulate`, written over it otherwise.
///
/// # Safety
/// `dst` must be valid for `m` rows of `n` values at stride `dst_rs` (initialised when
/// `accumulate`), and no other thread may touch those values during the call.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm(
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
    let parallelism = if parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: lhs holds m*k values at row stride k and rhs k rows at stride rhs_rs (checked by
    // the callers' shapes); dst is the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            1,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Applies `activation` in place over the part `range` of each of `channels` planes.
///
/// # Safety
/// As [`PackedConv::prefill`]: `out` holds the planes and the part is the caller's alone.
unsafe fn activate_rows(
    out: *mut f32,
    channels: usize,
    plane: usize,
    range: (usize, usize),
    activation: Activation,
) {
    if activation == Activation::Identity {
        return;
    }
    for channel in 0..channels {
        // SAFETY: the caller's contract.
        let target = unsafe {
            std::slice::from_raw_parts_mut(out.add(channel * plane + range.0), range.1 - range.0)
        };
        activation.apply(target);
    }
}

/// Builds the im2col rows of output rows `rows.0..rows.1` for one image:
/// `col[(c * 9 + ky * 3 + kx), (y - rows.0) * width + x] = input[c, y + ky - 1, x + kx - 1]`,
/// zero outside the image, passed through ReLU first when `relu` is set.
fn im2col3x3(
    image: &[f32],
    channels: usize,
    height: usize,
    width: usize,
    rows: (usize, usize),
    relu: bool,
    col: &mut [f32],
) {
    let cols = (rows.1 - rows.0) * width;
    let activate = |v: f32| if relu { v.max(0.0) } else { v };
    for channel in 0..channels {
        let plane = &image[channel * height * width..(channel + 1) * height * width];
        for ky in 0..3 {
            for kx in 0..3 {
                let row_start = (channel * 9 + ky * 3 + kx) * cols;
                let dst = &mut col[row_start..row_start + cols];
                for (band_row, y) in (rows.0..rows.1).enumerate() {
                    let out = &mut dst[band_row * width..(band_row + 1) * width];
                    let source_y = y + ky;
                    if source_y == 0 || source_y > height {
                        out.fill(0.0);
                        continue;
                    }
                    let src = &plane[(source_y - 1) * width..source_y * width];
                    match kx {
                        0 => {
                            out[0] = 0.0;
                            out[1..]
                                .iter_mut()
                                .zip(src)
                                .for_each(|(o, s)| *o = activate(*s));
                        }
                        1 => out.iter_mut().zip(src).for_each(|(o, s)| *o = activate(*s)),
                        _ => {
                            out[width - 1] = 0.0;
                            out[..width - 1]
                                .iter_mut()
                                .zip(&src[1..])
                                .for_each(|(o, s)| *o = activate(*s));
                        }
                    }
                }
            }
        }
    }
}

/// 3x3 convolution, stride 1, padding 1: `activation(conv(relu_in?(input)) + bias + residuals)`.
pub fn conv3x3(
    input: &FeatureMap,
    conv: &PackedConv,
    relu_in: bool,
    activation: Activation,
    residuals: &[&FeatureMap],
) -> FeatureMap {
    debug_assert_eq!(conv.kernel, 3);
    debug_assert_eq!(conv.in_channels, input.channels);
    let (height, width, plane) = (input.height, input.width, input.plane());
    let depth = conv.depth();
    let mut output = FeatureMap::zeros(input.batch, conv.out_channels, height, width);
    let out_len = output.image_len();

    let band_rows = (BAND_BYTES / (4 * depth * width)).clamp(1, height);
    let bands = height.div_ceil(band_rows);
    let threads = rayon::current_num_threads();
    // Too few bands to keep every thread busy: one band per image, and the GEMM itself in parallel.
    let (band_rows, bands, parallel_gemm) = if input.batch * bands < 2 * threads {
        (height, 1, true)
    } else {
        (band_rows, bands, false)
    };

    let out = SharedOut(output.data.as_mut_ptr());
    let task = |index: usize| {
        let (image, band) = (index / bands, index % bands);
        let rows = (band * band_rows, ((band + 1) * band_rows).min(height));
        let range = (rows.0 * width, rows.1 * width);
        let source = &input.data[image * input.image_len()..(image + 1) * input.image_len()];
        let residual_images: Vec<&[f32]> = residuals
            .iter()
            .map(|r| &r.data[image * out_len..(image + 1) * out_len])
            .collect();
        let mut col = Scratch::take(depth * (range.1 - range.0));
        im2col3x3(
            source,
            input.channels,
            height,
            width,
            rows,
            relu_in,
            &mut col,
        );
        // SAFETY: the output holds `batch` images of `out_channels` planes, and this task alone
        // writes the part `range` (its band of rows) of the planes of image `image`.
        unsafe {
            let out_image = out.get().add(image * out_len);
            conv.prefill(out_image, &residual_images, plane, range);
            gemm(
                conv.out_channels,
                range.1 - range.0,
                depth,
                out_image.add(range.0),
                plane,
                &conv.weights,
                &col,
                range.1 - range.0,
                true,
                parallel_gemm,
            );
            activate_rows(out_image, conv.out_channels, plane, range, activation);
        }
    };
    if parallel_gemm {
        (0..input.batch * bands).for_each(task);
    } else {
        (0..input.batch * bands).into_par_iter().for_each(task);
    }
    output
}

/// 1x1 convolution: `activation(conv(input) + bias + residuals)`, one GEMM per image.
pub fn conv1x1(
    input: &FeatureMap,
    conv: &PackedConv,
    activation: Activation,
    residuals: &[&FeatureMap],
) -> FeatureMap {
    debug_assert_eq!(conv.kernel, 1);
    debug_assert_eq!(conv.in_channels, input.channels);
    let plane = input.plane();
    let mut output = FeatureMap::zeros(input.batch, conv.out_channels, input.height, input.width);
    let out_len = output.image_len();
    for image in 0..input.batch {
        let source = &input.data[image * input.image_len()..(image + 1) * input.image_len()];
        let residual_images: Vec<&[f32]> = residuals
            .iter()
            .map(|r| &r.data[image * out_len..(image + 1) * out_len])
            .collect();
        // SAFETY: image `image` of the output, exclusively borrowed, holds out_channels planes.
        unsafe {
            let out_image = output.data.as_mut_ptr().add(image * out_len);
            conv.prefill(out_image, &residual_images, plane, (0, plane));
            gemm(
                conv.out_channels,
                plane,
                conv.in_channels,
                out_image,
                plane,
                &conv.weights,
                source,
                plane,
                true,
                true,
            );
            activate_rows(out_image, conv.out_channels, plane, (0, plane), activation);
        }
    }
    output
}
