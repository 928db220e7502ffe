//! Bilinear resizing (x2, to an explicit size, or a band of an output's rows) as two separable
//! passes (rows, then columns), each output value a blend of two inputs with precomputed taps.

use std::ops::Range;

use rayon::prelude::*;

use super::{FeatureMap, SharedOut, simd};

/// For one axis of `length` inputs and `outputs` outputs: each output's two source indices and
/// the weight of the second. PyTorch's rules: with aligned corners the ends map onto the ends
/// (`o * (length - 1) / (outputs - 1)`); without, half-pixel centres
/// (`(o + 0.5) * length / outputs - 0.5`, clamped at 0).
fn taps(length: usize, outputs: usize, align_corners: bool) -> Vec<(usize, usize, f32)> {
    let scale = length as f32 / outputs as f32;
    (0..outputs)
        .map(|o| {
            let source = if align_corners {
                if outputs > 1 {
                    o as f32 * (length - 1) as f32 / (outputs - 1) as f32
                } else {
                    0.0
                }
            } else {
                ((o as f32 + 0.5) * scale - 0.5).max(0.0)
            };
            let first = (source.floor() as usize).min(length - 1);
            let second = (first + 1).min(length - 1);
            (first, second, source - first as f32)
        })
        .collect()
}

/// Doubles the height and width of every plane.
pub fn upsample2x(input: &FeatureMap, align_corners: bool) -> FeatureMap {
    upsample(input, (2 * input.height, 2 * input.width), align_corners)
}

/// Resizes every plane to `(out_height, out_width)`, each side at least the input's (both at
/// least 1).
pub fn upsample(
    input: &FeatureMap,
    (out_height, out_width): (usize, usize),
    align_corners: bool,
) -> FeatureMap {
    assert!(
        out_height >= input.height && out_width >= input.width,
        "upsampling only"
    );
    bilinear_rows(input, (out_height, out_width), align_corners, 0..out_height)
}

/// Rows `rows` of every plane resized bilinearly to `(out_height, out_width)` (PyTorch's
/// `interpolate(mode="bilinear")` without antialiasing, so shrinking takes the same two taps),
/// computed from the source rows they blend only: a consumer that works a band of rows at a
/// time never holds the whole resized map.
pub fn bilinear_rows(
    input: &FeatureMap,
    (out_height, out_width): (usize, usize),
    align_corners: bool,
    rows: Range<usize>,
) -> FeatureMap {
    input.assert_shape(input.channels);
    let (height, width) = (input.height, input.width);
    assert!(height > 0 && width > 0 && out_width > 0, "empty map");
    assert!(
        rows.start < rows.end && rows.end <= out_height,
        "rows {rows:?} outside 0..{out_height}"
    );
    let row_taps = &taps(height, out_height, align_corners)[rows.clone()];
    // The source rows the band blends: from its first row's first tap to its last row's second.
    let first_source = row_taps[0].0;
    let sources = row_taps[row_taps.len() - 1].1 + 1 - first_source;
    let column_taps = taps(width, out_width, align_corners);
    let out_plane = rows.len() * out_width;
    let columns = simd::RowTaps::new(column_taps.into_iter().map(|(a, _, t)| (a, t)));
    let plane_task = |out: SharedOut, buffers: &mut (Vec<f32>, Vec<f32>), index: usize| {
        simd::vectorised(
            #[inline(always)]
            || {
                let (wide, padded) = buffers;
                let plane = &input.data[index * height * width..(index + 1) * height * width];
                let source_rows = plane.chunks(width).skip(first_source).take(sources);
                for (source_row, wide_row) in source_rows.zip(wide.chunks_mut(out_width)) {
                    // The row and its last value again, so that every tap's second source is
                    // the one after its first, and no index needs a bounds test.
                    padded[..width].copy_from_slice(source_row);
                    padded[width] = source_row[width - 1];
                    columns.apply(padded, wide_row);
                }
                // SAFETY: plane `index` of the output is this task's alone.
                let out_rows = unsafe { out.uninit(index * out_plane, out_plane) };
                for (out_row, &(a, b, t)) in out_rows.chunks_mut(out_width).zip(row_taps) {
                    let (a, b) = (a - first_source, b - first_source);
                    let first = &wide[a * out_width..(a + 1) * out_width];
                    let second = &wide[b * out_width..(b + 1) * out_width];
                    for ((value, x), y) in out_row.iter_mut().zip(first).zip(second) {
                        value.write(x + t * (y - x));
                    }
                }
            },
        )
    };
    // SAFETY: one task per plane, each writing every row of it.
    unsafe {
        FeatureMap::filled_by(input.batch, input.channels, rows.len(), out_width, |out| {
            (0..input.batch * input.channels)
                .into_par_iter()
                .for_each_init(
                    || (vec![0.0f32; sources * out_width], vec![0.0f32; width + 1]),
                    |buffers, index| plane_task(out, buffers, index),
                );
        })
    }
}
