//! Depthwise convolution (one filter per channel) with TensorFlow "SAME" padding, BatchNorm
//! folded in and the activation fused: EfficientNet-Lite's 3x3 and 5x5, stride 1 and 2.
//!
//! Each output row accumulates `kernel * kernel` scaled input rows; the range of output columns
//! whose taps fall inside the image is computed once per tap, so the inner loop has no bounds
//! tests and runs over contiguous memory (at stride 2, over the plane's even or odd columns).

use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;
use rayon::prelude::*;

use super::buffers::WorkBuffer;
use super::conv::fold_batch_norm;
use super::{Activation, FeatureMap, SharedOut, same, tensor_values};

/// A depthwise convolution and its BatchNorm, packed.
#[derive(Clone, Debug)]
pub struct PackedDepthwise {
    /// `[channels, kernel * kernel]`, BatchNorm's scale folded in.
    weights: Vec<f32>,
    /// BatchNorm's shift, per channel.
    bias: Vec<f32>,
    kernel: usize,
    stride: usize,
}

impl PackedDepthwise {
    /// Packs a bias-free depthwise convolution followed by BatchNorm.
    pub fn from_conv_bn(conv: Conv2d, bn: BatchNorm) -> Self {
        let [channels, _, kernel, _] = conv.weight.dims();
        let stride = conv.stride[0];
        let mut weights = tensor_values(conv.weight.into_value());
        let (scale, bias) = fold_batch_norm(bn);
        for (filter, scale) in weights.chunks_mut(kernel * kernel).zip(&scale) {
            filter.iter_mut().for_each(|w| *w *= scale);
        }
        assert_eq!(bias.len(), channels, "one BatchNorm channel per filter");
        assert_eq!(
            weights.len(),
            channels * kernel * kernel,
            "one square filter per channel"
        );
        Self {
            weights,
            bias,
            kernel,
            stride,
        }
    }
}

/// The output columns `ox` whose input column `ox * stride + tap - pad` lies in `0..width`.
fn valid_columns(
    out: usize,
    width: usize,
    tap: usize,
    pad: usize,
    stride: usize,
) -> (usize, usize) {
    let first = pad.saturating_sub(tap).div_ceil(stride);
    // Largest ox with ox * stride + tap - pad <= width - 1.
    let end = if width + pad > tap {
        ((width - 1 + pad - tap) / stride + 1).min(out)
    } else {
        0
    };
    (first.min(end), end)
}

/// `activation(depthwise(input) + bias)`.
pub fn depthwise(input: &FeatureMap, conv: &PackedDepthwise, activation: Activation) -> FeatureMap {
    input.assert_shape(conv.bias.len());
    let (kernel, stride) = (conv.kernel, conv.stride);
    let (out_height, pad_top) = same(input.height, kernel, stride);
    let (out_width, pad_left) = same(input.width, kernel, stride);
    let (height, width) = (input.height, input.width);
    let channels = input.channels;
    let columns: Vec<(usize, usize)> = (0..kernel)
        .map(|kx| valid_columns(out_width, width, kx, pad_left, stride))
        .collect();
    let out_plane_len = out_height * out_width;
    // At stride 2 the taps of consecutive outputs are two columns apart: the plane is split
    // into its even and odd columns first (its phases), so every tap reads a contiguous run.
    let phase_width = width.div_ceil(stride);
    let plane_task = |out: SharedOut, index: usize| {
        let channel = index % channels;
        let plane = &input.data[index * height * width..(index + 1) * height * width];
        let split = (stride > 1).then(|| {
            let mut split = WorkBuffer::take(stride * height * phase_width);
            for (phase, rows) in split.chunks_exact_mut(height * phase_width).enumerate() {
                let rows = rows.chunks_exact_mut(phase_width);
                for (target, row) in rows.zip(plane.chunks_exact(width)) {
                    target.fill(0.0);
                    let values = row.iter().skip(phase).step_by(stride);
                    target.iter_mut().zip(values).for_each(|(t, v)| *t = *v);
                }
            }
            split
        });
        let phases = split.as_deref().unwrap_or(plane);
        let filter = &conv.weights[channel * kernel * kernel..(channel + 1) * kernel * kernel];
        // SAFETY: plane `index` of the output is this task's alone.
        let out_plane =
            unsafe { out.filled(index * out_plane_len, out_plane_len, conv.bias[channel]) };
        for (oy, out_row) in out_plane.chunks_mut(out_width).enumerate() {
            for ky in 0..kernel {
                let iy = oy * stride + ky;
                if iy < pad_top || iy - pad_top >= height {
                    continue;
                }
                let y = iy - pad_top;
                for (kx, &(first, end)) in columns.iter().enumerate() {
                    if first == end {
                        continue;
                    }
                    let weight = filter[ky * kernel + kx];
                    // Input column of output `first`, as (phase, column within the phase).
                    let start = first * stride + kx - pad_left;
                    let row = &phases[((start % stride) * height + y) * phase_width..];
                    let source = &row[start / stride..start / stride + (end - first)];
                    for (o, s) in out_row[first..end].iter_mut().zip(source) {
                        *o += weight * s;
                    }
                }
            }
        }
        activation.apply(out_plane);
    };
    // SAFETY: one task per plane, each writing all of it.
    unsafe {
        FeatureMap::filled_by(input.batch, channels, out_height, out_width, |out| {
            (0..input.batch * channels)
                .into_par_iter()
                .for_each(|index| plane_task(out, index));
        })
    }
}
