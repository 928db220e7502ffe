//! Depthwise convolution (one filter per channel) with TensorFlow "SAME" padding, BatchNorm
//! folded in and the activation fused: EfficientNet-Lite's 3x3 and 5x5, stride 1 and 2.
//!
//! Each plane is first copied zero-padded (at stride 2, split into its even and odd columns), so
//! that sixteen neighbouring outputs are summed in registers over all `kernel * kernel` taps,
//! each tap one contiguous load, and written once: no bounds tests and no partial sums through
//! memory.

use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;
use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::buffers::WorkBuffer;
use super::conv::fold_batch_norm;
use super::{Activation, FeatureMap, SharedOut, same, simd, tensor_values};

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

/// Outputs summed together: one AVX-512 register, two AVX2 ones.
const LANES: usize = 16;

/// Outputs summed at once on wide rows: four registers of independent sums, so that each
/// addition need not wait for the one before it.
const WIDE: usize = 4 * LANES;

/// One output row: `N` outputs at a time, each summed over all taps in registers, then through
/// the activation into `out_row`. `row` starts at the row's first padded input row; each tap
/// `(offset, weight)` reads `row[offset + x]` for output `x`.
#[inline(always)]
fn sum_row<const N: usize>(
    row: &[f32],
    taps: &[(usize, f32)],
    bias: f32,
    activation: Activation,
    out_row: &mut [MaybeUninit<f32>],
) {
    for (block, targets) in out_row.chunks_mut(N).enumerate() {
        let mut sums = [bias; N];
        for &(offset, weight) in taps {
            let start = offset + block * N;
            let source: &[f32; N] = row[start..start + N]
                .try_into()
                .expect("the padded rows hold whole blocks");
            for i in 0..N {
                sums[i] += weight * source[i];
            }
        }
        for (target, sum) in targets.iter_mut().zip(sums) {
            target.write(activation.of(sum));
        }
    }
}

/// Fills `phases` with the plane zero-padded to `rows` rows from `pad_top` above, split into
/// its `stride` column phases of `phase_width` columns each (padded column `c` goes to phase
/// `c % stride`, column `c / stride`), so that every tap of `LANES` neighbouring outputs reads
/// `LANES` contiguous values and no loop needs a bounds test.
#[inline(always)]
fn pad_into_phases(
    plane: &[f32],
    (height, width): (usize, usize),
    (pad_top, pad_left): (usize, usize),
    stride: usize,
    (rows, phase_width): (usize, usize),
    phases: &mut [f32],
) {
    phases.fill(0.0);
    for (phase, phase_rows) in phases.chunks_exact_mut(rows * phase_width).enumerate() {
        for (py, target) in phase_rows.chunks_exact_mut(phase_width).enumerate() {
            let Some(y) = py.checked_sub(pad_top).filter(|&y| y < height) else {
                continue;
            };
            let row = &plane[y * width..(y + 1) * width];
            // Input column x is padded column x + pad_left: the first one in this phase, then
            // every stride-th.
            let first = (phase + stride - pad_left % stride) % stride;
            let values = row.iter().skip(first).step_by(stride);
            for (value, &v) in target[(first + pad_left) / stride..].iter_mut().zip(values) {
                *value = v;
            }
        }
    }
}

/// `activation(depthwise(input) + bias)`.
pub fn depthwise(input: &FeatureMap, conv: &PackedDepthwise, activation: Activation) -> FeatureMap {
    input.assert_shape(conv.bias.len());
    let (kernel, stride) = (conv.kernel, conv.stride);
    let (out_height, pad_top) = same(input.height, kernel, stride);
    let (out_width, pad_left) = same(input.width, kernel, stride);
    let (height, width) = (input.height, input.width);
    let channels = input.channels;
    let out_plane_len = out_height * out_width;
    // Padded rows every output row reads, and columns per phase for whole groups of LANES.
    let rows = (out_height - 1) * stride + kernel;
    let phase_width = out_width.next_multiple_of(WIDE) + (kernel - 1) / stride;
    let plane_task = |out: SharedOut, index: usize| {
        simd::vectorised(
            #[inline(always)]
            || {
                let channel = index % channels;
                let plane = &input.data[index * height * width..(index + 1) * height * width];
                let mut phases = WorkBuffer::take(stride * rows * phase_width);
                pad_into_phases(
                    plane,
                    (height, width),
                    (pad_top, pad_left),
                    stride,
                    (rows, phase_width),
                    &mut phases,
                );
                let filter =
                    &conv.weights[channel * kernel * kernel..(channel + 1) * kernel * kernel];
                // Where each tap's input starts relative to its output row's first padded row.
                let taps: Vec<(usize, f32)> = filter
                    .iter()
                    .enumerate()
                    .map(|(tap, &weight)| {
                        let (ky, kx) = (tap / kernel, tap % kernel);
                        (
                            (kx % stride * rows + ky) * phase_width + kx / stride,
                            weight,
                        )
                    })
                    .collect();
                let bias = conv.bias[channel];
                // SAFETY: plane `index` of the output is this task's alone.
                let out_plane = unsafe { out.uninit(index * out_plane_len, out_plane_len) };
                for (oy, out_row) in out_plane.chunks_mut(out_width).enumerate() {
                    let row = &phases[oy * stride * phase_width..];
                    if out_width >= WIDE {
                        sum_row::<WIDE>(row, &taps, bias, activation, out_row);
                    } else {
                        sum_row::<LANES>(row, &taps, bias, activation, out_row);
                    }
                }
            },
        )
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
