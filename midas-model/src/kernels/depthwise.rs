//! Depthwise convolution (one filter per channel) with TensorFlow "SAME" padding, BatchNorm
//! folded in and the activation fused: EfficientNet-Lite's 3x3 and 5x5, stride 1 and 2.
//!
//! Two paths, by the width of the output rows:
//! - wide rows, plane by plane: each plane is first copied zero-padded (at stride 2, split into
//!   its even and odd columns), so that sixteen neighbouring outputs are summed in registers over
//!   all `kernel * kernel` taps, each tap one contiguous load, and written once: no bounds tests
//!   and no partial sums through memory.
//! - narrow rows (the deepest layers' 8-column maps, with 816 and 1,392 channels), sixteen
//!   channels at a time: their planes are copied zero-padded and transposed (8x8
//!   blocks by shuffles) so that each pixel's sixteen channels are contiguous, and each tap is
//!   one vector multiply-add over sixteen channels, four pixels sharing each tap's weights. An
//!   8-column row half fills a vector along it; channels always fill one.

use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;
use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::buffers::WorkBuffer;
use super::conv::fold_batch_norm;
use super::simd::Isa;
use super::{Activation, FeatureMap, SharedOut, multiply_add, same, simd, tensor_values};

/// A depthwise convolution and its BatchNorm, packed.
#[derive(Clone, Debug)]
pub struct PackedDepthwise {
    /// `[channels, kernel * kernel]`, BatchNorm's scale folded in.
    weights: Vec<f32>,
    /// The same weights `[channels / LANES, kernel * kernel, LANES]`, for the channel-blocked
    /// path: one tap's weights for sixteen channels are one load.
    blocked_weights: Vec<f32>,
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
        assert!(kernel * kernel <= MAX_TAPS, "filters up to 5x5");
        let taps = kernel * kernel;
        let blocked_weights = (0..channels / LANES * taps * LANES)
            .map(|index| {
                let (block, tap, lane) =
                    (index / (taps * LANES), index / LANES % taps, index % LANES);
                weights[(block * LANES + lane) * taps + tap]
            })
            .collect();
        Self {
            weights,
            blocked_weights,
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
const WIDE: usize = WIDE_VECTORS * LANES;

/// Registers of sums on wide rows.
const WIDE_VECTORS: usize = 4;

/// Narrow rows summed together, a register each.
const NARROW_ROWS: usize = 4;

/// Outputs summed at once on rows of `out_width`: `WIDE` on wide rows, `LANES` on narrow ones,
/// whose padded copies are then no wider than they need (a 16-wide row padded to `WIDE` made
/// the copy of the deep layers' small maps cost more than their sums).
fn block_width(out_width: usize) -> usize {
    if out_width >= WIDE { WIDE } else { LANES }
}

/// One wide output row, `WIDE` outputs at a time, each summed over all taps in registers, then
/// through the activation into `out_row`. `row` starts at the row's first padded input row;
/// each tap `(offset, weight)` reads `row[offset + x]` for output `x`.
#[inline(always)]
fn sum_row<const FMA: bool>(
    row: &[f32],
    taps: &[(usize, f32)],
    bias: f32,
    activation: Activation,
    out_row: &mut [MaybeUninit<f32>],
) {
    let reach = furthest_tap(taps) + out_row.len().next_multiple_of(WIDE);
    assert!(reach <= row.len(), "the padded rows hold whole blocks");
    for (block, targets) in out_row.chunks_mut(WIDE).enumerate() {
        // One array per register, passed by value, so that the sums stay in registers across
        // the taps instead of going through memory at each.
        let mut sums = [[bias; LANES]; WIDE_VECTORS];
        for &(offset, weight) in taps {
            let start = offset + block * WIDE;
            for (vector, sum) in sums.iter_mut().enumerate() {
                // SAFETY: `start + (vector + 1) * LANES <= reach <= row.len()`, asserted above.
                let source = unsafe { lanes_at(row, start + vector * LANES) };
                *sum = add_product::<FMA>(*sum, weight, source);
            }
        }
        for (target, sum) in targets.iter_mut().zip(sums.as_flattened()) {
            target.write(activation.of(*sum));
        }
    }
}

/// Narrow output rows (under `WIDE` outputs) summed together.
#[derive(Clone, Copy)]
struct Rows<'a> {
    /// From the first row's first padded input row on.
    phases: &'a [f32],
    /// Values from one output row's input to the next's.
    step: usize,
    out_width: usize,
}

/// `ROWS` narrow output rows, `LANES` columns at a time with one register of sums per row:
/// a row's taps form one chain of dependent additions, so several rows keep the FMA units
/// busy where one row would wait on each addition (a 5x5 filter is 25 in a row).
#[inline(always)]
fn sum_rows<const ROWS: usize, const FMA: bool>(
    rows: Rows,
    taps: &[(usize, f32)],
    bias: f32,
    activation: Activation,
    out: &mut [MaybeUninit<f32>],
) {
    let out_width = rows.out_width;
    let reach = furthest_tap(taps) + (ROWS - 1) * rows.step + out_width.next_multiple_of(LANES);
    assert!(
        reach <= rows.phases.len(),
        "the padded rows hold whole blocks"
    );
    for block in 0..out_width.div_ceil(LANES) {
        let mut sums = [[bias; LANES]; ROWS];
        for &(offset, weight) in taps {
            for (row, sum) in sums.iter_mut().enumerate() {
                let from = offset + row * rows.step + block * LANES;
                // SAFETY: `from + LANES <= reach <= rows.phases.len()`, asserted above.
                let source = unsafe { lanes_at(rows.phases, from) };
                *sum = add_product::<FMA>(*sum, weight, source);
            }
        }
        let columns = block * LANES..out_width.min((block + 1) * LANES);
        for (out_row, sum) in out.chunks_mut(out_width).zip(&sums) {
            for (target, value) in out_row[columns.clone()].iter_mut().zip(sum) {
                target.write(activation.of(*value));
            }
        }
    }
}

/// The largest input offset among `taps`.
fn furthest_tap(taps: &[(usize, f32)]) -> usize {
    taps.iter().map(|&(offset, _)| offset).max().unwrap_or(0)
}

/// The `LANES` values of `values` from `from` on, unchecked: the tap loops check their whole
/// reach once per row instead of at each load, which cost two compares and branches per
/// multiply-add.
///
/// # Safety
/// `from + LANES <= values.len()`.
#[inline(always)]
unsafe fn lanes_at(values: &[f32], from: usize) -> &[f32; LANES] {
    debug_assert!(from + LANES <= values.len());
    // SAFETY: the caller's contract.
    unsafe { &*values.as_ptr().add(from).cast::<[f32; LANES]>() }
}

/// `sums + weight * values`, lane by lane.
#[inline(always)]
fn add_product<const FMA: bool>(
    sums: [f32; LANES],
    weight: f32,
    values: &[f32; LANES],
) -> [f32; LANES] {
    std::array::from_fn(|i| multiply_add::<FMA>(weight, values[i], sums[i]))
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
    for (phase, phase_rows) in phases.chunks_exact_mut(rows * phase_width).enumerate() {
        // Input column x is padded column x + pad_left: the first one in this phase, then
        // every stride-th.
        let first = (phase + stride - pad_left % stride) % stride;
        let start = (first + pad_left) / stride;
        let count = width.saturating_sub(first).div_ceil(stride);
        for (py, target) in phase_rows.chunks_exact_mut(phase_width).enumerate() {
            let Some(y) = py.checked_sub(pad_top).filter(|&y| y < height) else {
                target.fill(0.0);
                continue;
            };
            let (before, rest) = target.split_at_mut(start);
            let (values, after) = rest.split_at_mut(count);
            before.fill(0.0);
            after.fill(0.0);
            let row = &plane[y * width + first..(y + 1) * width];
            if stride == 1 {
                values.copy_from_slice(row);
            } else {
                let columns = row.chunks_exact(stride);
                if let Some(&last) = columns.remainder().first() {
                    values[count - 1] = last;
                }
                for (value, column) in values.iter_mut().zip(columns) {
                    *value = column[0];
                }
            }
        }
    }
}

/// Where a depthwise layer reads and writes on one input size: TensorFlow's SAME padding, and
/// the layout of the padded, phase-split copy that each channel is summed from.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    kernel: usize,
    stride: usize,
    out_height: usize,
    out_width: usize,
    pad_top: usize,
    pad_left: usize,
    /// Columns per phase, for whole blocks of outputs (see [`block_width`]).
    phase_width: usize,
}

impl Geometry {
    /// The layer `conv` on inputs of `height x width`.
    fn of(conv: &PackedDepthwise, height: usize, width: usize) -> Self {
        let (kernel, stride) = (conv.kernel, conv.stride);
        let (out_height, pad_top) = same(height, kernel, stride);
        let (out_width, pad_left) = same(width, kernel, stride);
        Self {
            kernel,
            stride,
            out_height,
            out_width,
            pad_top,
            pad_left,
            phase_width: out_width.next_multiple_of(block_width(out_width)) + (kernel - 1) / stride,
        }
    }

    /// Padded input rows that `out_rows` output rows read.
    fn padded_rows(&self, out_rows: usize) -> usize {
        (out_rows - 1) * self.stride + self.kernel
    }

    /// Values of the phase-split copy of `out_rows` output rows' input.
    fn phases_len(&self, out_rows: usize) -> usize {
        self.stride * self.padded_rows(out_rows) * self.phase_width
    }
}

/// Output plane `out` of channel `channel`, `activation(depthwise + bias)`, from its input
/// `plane` of `height x width`: the plane is copied zero-padded and phase-split into `phases`
/// (`geometry.phases_len(out_height)` values), then each output row summed in registers and
/// written once.
#[inline(always)]
fn channel_rows(
    conv: &PackedDepthwise,
    geometry: &Geometry,
    channel: usize,
    (plane, height, width): (&[f32], usize, usize),
    phases: &mut [f32],
    activation: Activation,
    out: &mut [MaybeUninit<f32>],
) {
    let Geometry {
        kernel,
        stride,
        out_width,
        pad_left,
        phase_width,
        ..
    } = *geometry;
    let out_rows = out.len() / out_width;
    let rows = geometry.padded_rows(out_rows);
    pad_into_phases(
        plane,
        (height, width),
        (geometry.pad_top, pad_left),
        stride,
        (rows, phase_width),
        phases,
    );
    let filter = &conv.weights[channel * kernel * kernel..(channel + 1) * kernel * kernel];
    // Where each tap's input starts relative to its output row's first padded row.
    let mut taps = [(0usize, 0f32); MAX_TAPS];
    for (tap, (slot, &weight)) in taps.iter_mut().zip(filter).enumerate() {
        let (ky, kx) = (tap / kernel, tap % kernel);
        *slot = (
            (kx % stride * rows + ky) * phase_width + kx / stride,
            weight,
        );
    }
    let taps = &taps[..kernel * kernel];
    let bias = conv.bias[channel];
    let fma = Isa::detected() != Isa::Baseline;
    let row_step = stride * phase_width;
    if block_width(out_width) == WIDE {
        for (oy, out_row) in out.chunks_mut(out_width).enumerate() {
            let row = &phases[oy * row_step..];
            if fma {
                sum_row::<true>(row, taps, bias, activation, out_row);
            } else {
                sum_row::<false>(row, taps, bias, activation, out_row);
            }
        }
        return;
    }
    for (group, out_rows) in out.chunks_mut(NARROW_ROWS * out_width).enumerate() {
        let first = group * NARROW_ROWS * row_step;
        let rows = Rows {
            phases: &phases[first..],
            step: row_step,
            out_width,
        };
        if out_rows.len() == NARROW_ROWS * out_width {
            if fma {
                sum_rows::<NARROW_ROWS, true>(rows, taps, bias, activation, out_rows);
            } else {
                sum_rows::<NARROW_ROWS, false>(rows, taps, bias, activation, out_rows);
            }
        } else {
            for (index, out_row) in out_rows.chunks_mut(out_width).enumerate() {
                let row = Rows {
                    phases: &phases[first + index * row_step..],
                    ..rows
                };
                if fma {
                    sum_rows::<1, true>(row, taps, bias, activation, out_row);
                } else {
                    sum_rows::<1, false>(row, taps, bias, activation, out_row);
                }
            }
        }
    }
}

/// Taps of the largest filter, EfficientNet-Lite's 5x5.
const MAX_TAPS: usize = 25;

/// Output rows narrower than this take the channel-blocked path (see the module's notes). At
/// 16 columns it measured faster alone under 5x5 filters (816 channels, two threads: 0.23 →
/// 0.19 ms) but slower inside the network (the blocks 0.87 → 0.96 ms), and slower under 3x3
/// filters, whose fewer taps leave the transposes to dominate.
const BLOCKED_BELOW: usize = 16;

/// Neighbouring outputs of a row summed together on the channel-blocked path: each tap's
/// weights are loaded once for all of them.
const PIXELS: usize = 4;

/// One block of `LANES` channels, transposed and zero-padded (`[row, column, LANES]`), and its
/// weights (`[tap, LANES]`).
struct PaddedBlock<'a> {
    padded: &'a [f32],
    padded_width: usize,
    weights: &'a [f32],
    stride: usize,
}

impl PaddedBlock<'_> {
    /// `N` neighbouring outputs of row `oy` from column `ox` on, each `LANES` channels'
    /// `depthwise + bias`, for a `K x K` filter: the taps unrolled, the sums in registers.
    #[inline(always)]
    fn sum<const K: usize, const N: usize, const FMA: bool>(
        &self,
        (oy, ox): (usize, usize),
        bias: [f32; LANES],
    ) -> [[f32; LANES]; N] {
        let mut sums = [bias; N];
        for ky in 0..K {
            let row = (oy * self.stride + ky) * self.padded_width + ox * self.stride;
            for kx in 0..K {
                let tap = ky * K + kx;
                let weights: &[f32; LANES] = self.weights[tap * LANES..(tap + 1) * LANES]
                    .try_into()
                    .expect("LANES weights");
                for (n, sum) in sums.iter_mut().enumerate() {
                    let at = (row + n * self.stride + kx) * LANES;
                    let values: &[f32; LANES] = self.padded[at..at + LANES]
                        .try_into()
                        .expect("the padded block holds every tap");
                    *sum =
                        std::array::from_fn(|i| multiply_add::<FMA>(weights[i], values[i], sum[i]));
                }
            }
        }
        sums
    }

    /// Every output of the block, `write(pixel, sums)` for each output pixel (row-major).
    #[inline(always)]
    fn sum_all<const K: usize, const FMA: bool>(
        &self,
        (out_height, out_width): (usize, usize),
        bias: [f32; LANES],
        mut write: impl FnMut(usize, [f32; LANES]),
    ) {
        for oy in 0..out_height {
            let mut ox = 0;
            while ox + PIXELS <= out_width {
                let sums = self.sum::<K, PIXELS, FMA>((oy, ox), bias);
                for (n, sums) in sums.into_iter().enumerate() {
                    write(oy * out_width + ox + n, sums);
                }
                ox += PIXELS;
            }
            for ox in ox..out_width {
                let [sums] = self.sum::<K, 1, FMA>((oy, ox), bias);
                write(oy * out_width + ox, sums);
            }
        }
    }
}

/// The side of the squares [`simd::transpose8`] transposes: pixels by channels, a block's
/// sixteen channels in two halves.
const SQUARE: usize = 8;

/// Copies `LANES` planes (`height x width` each, one after the other) into `padded`
/// (`[row, column, LANES]`, `padded_width` columns), transposed so that each pixel's channels
/// are contiguous, with `pad` rows and columns of zeros before them and as many as fill the
/// rest after them.
#[inline(always)]
fn pad_block(
    (planes, height, width): (&[f32], usize, usize),
    (pad_top, pad_left): (usize, usize),
    padded_width: usize,
    padded: &mut [f32],
) {
    let plane = height * width;
    assert_eq!(planes.len(), LANES * plane, "LANES planes");
    for (py, target) in padded.chunks_exact_mut(padded_width * LANES).enumerate() {
        let Some(y) = py.checked_sub(pad_top).filter(|&y| y < height) else {
            target.fill(0.0);
            continue;
        };
        let (before, rest) = target.split_at_mut(pad_left * LANES);
        let (values, after) = rest.split_at_mut(width * LANES);
        before.fill(0.0);
        after.fill(0.0);
        let whole = width / SQUARE * SQUARE;
        for x in (0..whole).step_by(SQUARE) {
            for half in 0..LANES / SQUARE {
                let rows = std::array::from_fn(|r| {
                    planes[(SQUARE * half + r) * plane + y * width + x..].as_ptr()
                });
                // SAFETY: each row has SQUARE columns from x (x + SQUARE <= width); `values`
                // holds `width` pixels of LANES, and this call writes pixels x..x + SQUARE.
                unsafe {
                    simd::transpose8(
                        rows,
                        values[x * LANES + SQUARE * half..].as_mut_ptr(),
                        LANES,
                    )
                };
            }
        }
        for x in whole..width {
            for lane in 0..LANES {
                values[x * LANES + lane] = planes[lane * plane + y * width + x];
            }
        }
    }
}

/// Writes `sums` (`[pixel, LANES]`, the activation applied) into `LANES` output planes.
#[inline(always)]
fn unpack_block(sums: &[f32], out: &mut [MaybeUninit<f32>]) {
    let out_plane = out.len() / LANES;
    assert_eq!(sums.len(), LANES * out_plane, "LANES values a pixel");
    let whole = out_plane / SQUARE * SQUARE;
    for pixel in (0..whole).step_by(SQUARE) {
        for half in 0..LANES / SQUARE {
            let rows =
                std::array::from_fn(|r| sums[(pixel + r) * LANES + SQUARE * half..].as_ptr());
            // SAFETY: the SQUARE pixels' values are inside `sums`; channel SQUARE * half + c
            // of pixel `pixel + r` goes to plane SQUARE * half + c at `pixel + r`, inside `out`.
            unsafe {
                let target = out[SQUARE * half * out_plane + pixel..]
                    .as_mut_ptr()
                    .cast::<f32>();
                simd::transpose8(rows, target, out_plane);
            }
        }
    }
    for pixel in whole..out_plane {
        for (lane, value) in sums[pixel * LANES..(pixel + 1) * LANES].iter().enumerate() {
            out[lane * out_plane + pixel].write(*value);
        }
    }
}

/// The channel-blocked path (see the module's notes) over every block of `LANES` channels of
/// every image; the channels are a multiple of `LANES`.
fn depthwise_blocked(
    input: &FeatureMap,
    conv: &PackedDepthwise,
    geometry: &Geometry,
    activation: Activation,
) -> FeatureMap {
    let (height, width, channels) = (input.height, input.width, input.channels);
    let (out_height, out_width) = (geometry.out_height, geometry.out_width);
    let padded_width = (out_width - 1) * geometry.stride + geometry.kernel;
    let padded_len = geometry.padded_rows(out_height) * padded_width * LANES;
    let blocks = channels / LANES;
    let taps = conv.kernel * conv.kernel;
    let (plane, out_plane) = (height * width, out_height * out_width);
    let task = |out: SharedOut, index: usize| {
        simd::vectorised(
            #[inline(always)]
            || {
                let (image, block) = (index / blocks, index % blocks);
                let first = image * channels + block * LANES;
                let mut padded = WorkBuffer::take(padded_len);
                pad_block(
                    (
                        &input.data[first * plane..(first + LANES) * plane],
                        height,
                        width,
                    ),
                    (geometry.pad_top, geometry.pad_left),
                    padded_width,
                    &mut padded,
                );
                let padded = PaddedBlock {
                    padded: &padded,
                    padded_width,
                    weights: &conv.blocked_weights[block * taps * LANES..][..taps * LANES],
                    stride: geometry.stride,
                };
                let bias: [f32; LANES] = conv.bias[block * LANES..(block + 1) * LANES]
                    .try_into()
                    .expect("LANES channels");
                let mut sums = WorkBuffer::take(out_plane * LANES);
                let write = |pixel: usize, values: [f32; LANES]| {
                    for (target, value) in sums[pixel * LANES..][..LANES].iter_mut().zip(values) {
                        *target = activation.of(value);
                    }
                };
                let size = (out_height, out_width);
                match (conv.kernel, Isa::detected() != Isa::Baseline) {
                    (3, true) => padded.sum_all::<3, true>(size, bias, write),
                    (3, false) => padded.sum_all::<3, false>(size, bias, write),
                    (_, true) => padded.sum_all::<5, true>(size, bias, write),
                    (_, false) => padded.sum_all::<5, false>(size, bias, write),
                }
                // SAFETY: the block's LANES output planes are this task's alone.
                let out = unsafe { out.uninit(first * out_plane, LANES * out_plane) };
                unpack_block(&sums, out);
            },
        )
    };
    // SAFETY: one task per block of LANES planes, each writing all of them.
    unsafe {
        FeatureMap::filled_by(input.batch, channels, out_height, out_width, |out| {
            (0..input.batch * blocks)
                .into_par_iter()
                .for_each(|index| task(out, index));
        })
    }
}
/// `activation(depthwise(input) + bias)`.
pub fn depthwise(input: &FeatureMap, conv: &PackedDepthwise, activation: Activation) -> FeatureMap {
    input.assert_shape(conv.bias.len());
    let (height, width) = (input.height, input.width);
    let geometry = Geometry::of(conv, height, width);
    let channels = input.channels;
    if geometry.out_width < BLOCKED_BELOW && channels.is_multiple_of(LANES) {
        return depthwise_blocked(input, conv, &geometry, activation);
    }
    let out_plane_len = geometry.out_height * geometry.out_width;
    let plane_task = |out: SharedOut, index: usize| {
        simd::vectorised(
            #[inline(always)]
            || {
                let plane = &input.data[index * height * width..(index + 1) * height * width];
                let mut phases = WorkBuffer::take(geometry.phases_len(geometry.out_height));
                // SAFETY: plane `index` of the output is this task's alone.
                let out_plane = unsafe { out.uninit(index * out_plane_len, out_plane_len) };
                channel_rows(
                    conv,
                    &geometry,
                    index % channels,
                    (plane, height, width),
                    &mut phases,
                    activation,
                    out_plane,
                );
            },
        )
    };
    // SAFETY: one task per plane, each writing all of it.
    unsafe {
        FeatureMap::filled_by(
            input.batch,
            channels,
            geometry.out_height,
            geometry.out_width,
            |out| {
                (0..input.batch * channels)
                    .into_par_iter()
                    .for_each(|index| plane_task(out, index));
            },
        )
    }
}
