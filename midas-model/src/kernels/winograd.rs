//! Dense 3x3 convolution (stride 1, padding 1) by Winograd's minimal filtering F(2x2, 3x3).
//!
//! Each 2x2 block of outputs comes from a 4x4 tile of inputs: `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`.
//! The filter transform `U = G g Gᵀ` is done once at load; per call the input tiles are
//! transformed (`V = Bᵀ d B`), the 16 element-wise products summed over input channels become
//! 16 GEMMs `M[ξ] = U[ξ] · V[ξ]` of `[out, in] x [in, tiles]`, and `Aᵀ M A` gives the outputs.
//! That is 16 multiplications per 4 outputs and input channel instead of 36: 2.25x fewer than
//! im2col's GEMM, for transforms made of additions. Tiles are processed in bands of tile rows
//! sized to stay in cache, so the transformed inputs (four times the input's size) and the
//! products never leave it.

use burn::nn::conv::Conv2d;
use rayon::prelude::*;

use super::buffers::WorkBuffer;
use super::conv::gemm;
use super::{Activation, Bands, FeatureMap, SharedOut, bias_values, simd, tensor_values};

/// Positions in a transformed 4x4 tile: one GEMM each.
const POSITIONS: usize = 16;

/// Bytes of transformed inputs and products per band (L2-sized).
const BAND_BYTES: usize = 1 << 20;

/// A 3x3 convolution's filters in the Winograd domain, transformed once at load.
#[derive(Clone, Debug)]
pub struct WinogradConv {
    /// `[16, out_channels, in_channels]`: for each tile position ξ, the matrix `U[ξ]`.
    weights: Vec<f32>,
    /// One per output channel (zeros for a convolution without bias).
    bias: Vec<f32>,
    out_channels: usize,
    in_channels: usize,
}

impl WinogradConv {
    /// Transforms a Burn 3x3 convolution (groups 1, stride 1, padding 1), taking it over.
    pub fn from_conv(conv: Conv2d) -> Self {
        let [out_channels, in_channels, kernel, kernel_w] = conv.weight.dims();
        assert_eq!((kernel, kernel_w), (3, 3), "3x3 kernels only");
        assert_eq!(conv.groups, 1, "no grouped convolutions");
        assert_eq!(conv.stride, [1, 1], "stride 1 only");
        let filters = tensor_values(conv.weight.into_value());
        let bias = bias_values(conv.bias, out_channels);
        // This runs at start-up, before the port is bound: one parallel pass, each output
        // channel's filters transformed and written straight to their 16 places.
        let matrix = out_channels * in_channels;
        let mut weights = Vec::with_capacity(POSITIONS * matrix);
        let out = SharedOut(weights.as_mut_ptr());
        filters
            .par_chunks_exact(9 * in_channels)
            .enumerate()
            .for_each(|(channel, channel_filters)| {
                for (input, filter) in channel_filters.chunks_exact(9).enumerate() {
                    let offset = channel * in_channels + input;
                    for (position, value) in transform_filter(filter).into_iter().enumerate() {
                        // SAFETY: (position, channel, input) is written by this task alone,
                        // once, inside the buffer of `POSITIONS * matrix` values.
                        unsafe { out.get().add(position * matrix + offset).write(value) };
                    }
                }
            });
        // SAFETY: every (position, channel, input) was written above.
        unsafe { weights.set_len(POSITIONS * matrix) };
        Self {
            weights,
            bias,
            out_channels,
            in_channels,
        }
    }
}

/// `G g Gᵀ` for one 3x3 filter `g` (row-major), with
/// `G = [[1, 0, 0], [½, ½, ½], [½, -½, ½], [0, 0, 1]]`; computed in f64, rounded once.
fn transform_filter(g: &[f32]) -> [f32; POSITIONS] {
    let g: [f64; 9] = std::array::from_fn(|i| f64::from(g[i]));
    let apply = |a: f64, b: f64, c: f64| [a, (a + b + c) / 2.0, (a - b + c) / 2.0, c];
    // G g: 4 rows of 3, built column by column.
    let columns: [[f64; 4]; 3] = std::array::from_fn(|x| apply(g[x], g[3 + x], g[6 + x]));
    let mut u = [0.0; POSITIONS];
    for row in 0..4 {
        let transformed = apply(columns[0][row], columns[1][row], columns[2][row]);
        for (column, value) in transformed.into_iter().enumerate() {
            u[row * 4 + column] = value as f32;
        }
    }
    u
}

/// `Bᵀ x` for four values along one axis, `Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0],
/// [0, 1, 0, -1]]`.
#[inline(always)]
fn input_transform(x0: f32, x1: f32, x2: f32, x3: f32) -> [f32; 4] {
    [x0 - x2, x1 + x2, x2 - x1, x1 - x3]
}

/// `Aᵀ x` for four values along one axis, `Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]]`.
#[inline(always)]
fn output_transform(x0: f32, x1: f32, x2: f32, x3: f32) -> [f32; 2] {
    [x0 + x1 + x2, x1 - x2 - x3]
}

/// One image's geometry in tiles, and the band of tile rows a call works on.
#[derive(Clone, Copy)]
struct Band {
    height: usize,
    width: usize,
    tiles_x: usize,
    /// Tile rows `rows.0..rows.1`.
    rows: (usize, usize),
}

impl Band {
    fn tiles(self) -> usize {
        (self.rows.1 - self.rows.0) * self.tiles_x
    }
}

/// Fills `v` (`[in_channels, 16, tiles]`) with `Bᵀ d B` for every tile of the band and every
/// channel of `image`, ReLU applied to the inputs first when `relu`.
///
/// Tiles start every two columns, so each input row is split into its even and odd padded
/// columns first: the tile at `x` then reads `even[x], odd[x], even[x + 1], odd[x + 1]`, and
/// every loop below runs over contiguous memory and vectorises.
fn transform_inputs(image: &[f32], band: Band, relu: bool, v: &mut [f32], parallel: bool) {
    let (height, width, tiles_x) = (band.height, band.width, band.tiles_x);
    let tiles = band.tiles();
    let split = tiles_x + 1;
    let channel = |(source, v): (&[f32], &mut [f32])| {
        simd::vectorised(
            #[inline(always)]
            || {
                // Rows 0..4 even columns, rows 0..4 odd columns; then the same after Bᵀ.
                let mut columns = WorkBuffer::take(8 * split);
                let mut mixed = WorkBuffer::take(8 * split);
                for tile_row in band.rows.0..band.rows.1 {
                    let (evens, odds) = columns.split_at_mut(4 * split);
                    for r in 0..4 {
                        let even = &mut evens[r * split..(r + 1) * split];
                        let odd = &mut odds[r * split..(r + 1) * split];
                        even.fill(0.0);
                        odd.fill(0.0);
                        let y = (2 * tile_row + r).wrapping_sub(1);
                        if y < height {
                            // Padded column 2i is input column 2i - 1, padded column 2i + 1 is 2i.
                            let pairs = source[y * width..(y + 1) * width].chunks_exact(2);
                            if let [last] = pairs.remainder() {
                                odd[width / 2] = *last;
                            }
                            for (pair, (o, e)) in pairs.zip(odd.iter_mut().zip(&mut even[1..])) {
                                *o = pair[0];
                                *e = pair[1];
                            }
                        }
                    }
                    if relu {
                        columns.iter_mut().for_each(|value| *value = value.max(0.0));
                    }
                    // Bᵀ d: down the columns.
                    for (input, output) in columns
                        .chunks_exact(4 * split)
                        .zip(mixed.chunks_exact_mut(4 * split))
                    {
                        let (p0, rest) = input.split_at(split);
                        let (p1, rest) = rest.split_at(split);
                        let (p2, p3) = rest.split_at(split);
                        let (m0, rest) = output.split_at_mut(split);
                        let (m1, rest) = rest.split_at_mut(split);
                        let (m2, m3) = rest.split_at_mut(split);
                        for x in 0..split {
                            [m0[x], m1[x], m2[x], m3[x]] =
                                input_transform(p0[x], p1[x], p2[x], p3[x]);
                        }
                    }
                    // (Bᵀ d) B: along the rows.
                    let first_tile = (tile_row - band.rows.0) * tiles_x;
                    let (evens, odds) = mixed.split_at(4 * split);
                    let mut positions = v.chunks_exact_mut(tiles);
                    for r in 0..4 {
                        let even = &evens[r * split..(r + 1) * split];
                        let odd = &odds[r * split..(r + 1) * split];
                        let mut next = || {
                            &mut positions.next().expect("16 positions")[first_tile..][..tiles_x]
                        };
                        let (v0, v1, v2, v3) = (next(), next(), next(), next());
                        for x in 0..tiles_x {
                            [v0[x], v1[x], v2[x], v3[x]] =
                                input_transform(even[x], odd[x], even[x + 1], odd[x + 1]);
                        }
                    }
                }
            },
        )
    };
    let plane = height * width;
    if parallel {
        image
            .par_chunks(plane)
            .zip(v.par_chunks_mut(POSITIONS * tiles))
            .for_each(channel);
    } else {
        image
            .chunks(plane)
            .zip(v.chunks_mut(POSITIONS * tiles))
            .for_each(channel);
    }
}

/// Where one image's outputs go and what is added to them.
struct Epilogue<'a> {
    out: SharedOut,
    residuals: Vec<&'a [f32]>,
    bias: &'a [f32],
    activation: Activation,
}

/// `Aᵀ M A` for every tile of the band, from `m` (`[out_channels, 16, tiles]`), plus bias and
/// residuals, through the activation, written into the band's output rows.
///
/// The transform writes each output row's even and odd columns to separate arrays (contiguous,
/// so it vectorises); one interleaving pass then lays them out as a row for the epilogue.
fn transform_outputs(m: &[f32], band: Band, epilogue: &Epilogue, parallel: bool) {
    let (height, width, tiles_x) = (band.height, band.width, band.tiles_x);
    let tiles = band.tiles();
    let plane = height * width;
    let channel = |(out_channel, m): (usize, &[f32])| {
        simd::vectorised(
            #[inline(always)]
            || {
                // Even and odd columns of the tile row's two output rows, then one interleaved row.
                let mut halves = WorkBuffer::take(4 * tiles_x);
                let mut row = WorkBuffer::take(2 * tiles_x);
                let bias = epilogue.bias[out_channel];
                for tile_row in band.rows.0..band.rows.1 {
                    let first_tile = (tile_row - band.rows.0) * tiles_x;
                    let p: [&[f32]; POSITIONS] = std::array::from_fn(|position| {
                        &m[position * tiles + first_tile..][..tiles_x]
                    });
                    let (even0, rest) = halves.split_at_mut(tiles_x);
                    let (odd0, rest) = rest.split_at_mut(tiles_x);
                    let (even1, odd1) = rest.split_at_mut(tiles_x);
                    for x in 0..tiles_x {
                        // Aᵀ M down the columns, then along the rows.
                        let [a0, a1] = output_transform(p[0][x], p[4][x], p[8][x], p[12][x]);
                        let [b0, b1] = output_transform(p[1][x], p[5][x], p[9][x], p[13][x]);
                        let [c0, c1] = output_transform(p[2][x], p[6][x], p[10][x], p[14][x]);
                        let [d0, d1] = output_transform(p[3][x], p[7][x], p[11][x], p[15][x]);
                        [even0[x], odd0[x]] = output_transform(a0, b0, c0, d0);
                        [even1[x], odd1[x]] = output_transform(a1, b1, c1, d1);
                    }
                    for (i, (even, odd)) in [(&*even0, &*odd0), (&*even1, &*odd1)]
                        .into_iter()
                        .enumerate()
                    {
                        let y = 2 * tile_row + i;
                        if y >= height {
                            break;
                        }
                        for (pair, (e, o)) in row.chunks_exact_mut(2).zip(even.iter().zip(odd)) {
                            pair[0] = *e;
                            pair[1] = *o;
                        }
                        let values = &row[..width];
                        let start = out_channel * plane + y * width;
                        // SAFETY: row `y` of plane `out_channel` is inside the image, and only this
                        // channel's task writes it.
                        let target = unsafe { epilogue.out.uninit(start, width) };
                        let activation = epilogue.activation;
                        match epilogue.residuals.as_slice() {
                            [] => {
                                for (t, v) in target.iter_mut().zip(values) {
                                    t.write(activation.of(v + bias));
                                }
                            }
                            [a] => {
                                let a = &a[start..start + width];
                                for ((t, v), a) in target.iter_mut().zip(values).zip(a) {
                                    t.write(activation.of(v + bias + a));
                                }
                            }
                            [a, b, ..] => {
                                let (a, b) = (&a[start..start + width], &b[start..start + width]);
                                for (((t, v), a), b) in target.iter_mut().zip(values).zip(a).zip(b)
                                {
                                    t.write(activation.of(v + bias + a + b));
                                }
                            }
                        }
                    }
                }
            },
        )
    };
    let per_channel = POSITIONS * tiles;
    if parallel {
        m.par_chunks(per_channel).enumerate().for_each(channel);
    } else {
        m.chunks(per_channel).enumerate().for_each(channel);
    }
}

/// 3x3 convolution, stride 1, padding 1: `activation(conv(relu_in?(input)) + bias + residuals)`,
/// at most two residuals.
pub fn winograd3x3(
    input: &FeatureMap,
    conv: &WinogradConv,
    relu_in: bool,
    activation: Activation,
    residuals: &[&FeatureMap],
) -> FeatureMap {
    input.assert_shape(conv.in_channels);
    assert!(residuals.len() <= 2, "the decoder adds at most two maps");
    FeatureMap::assert_residuals(
        residuals,
        input.batch,
        conv.out_channels,
        input.height,
        input.width,
    );
    let (channels, out_channels) = (conv.in_channels, conv.out_channels);
    let (height, width) = (input.height, input.width);
    let (tiles_y, tiles_x) = (height.div_ceil(2), width.div_ceil(2));
    let row_bytes = POSITIONS * (channels + out_channels) * tiles_x * 4;
    let Bands {
        size: band_rows,
        count: bands,
        parallel_inside,
    } = Bands::split(
        input.batch,
        tiles_y,
        (BAND_BYTES / row_bytes).clamp(1, tiles_y),
    );

    let out_len = out_channels * height * width;
    let task = |out: SharedOut, index: usize| {
        let (image, band_index) = (index / bands, index % bands);
        let band = Band {
            height,
            width,
            tiles_x,
            rows: (
                band_index * band_rows,
                ((band_index + 1) * band_rows).min(tiles_y),
            ),
        };
        let tiles = band.tiles();
        let source = &input.data[image * input.image_len()..(image + 1) * input.image_len()];
        let mut v = WorkBuffer::take(channels * POSITIONS * tiles);
        transform_inputs(source, band, relu_in, &mut v, parallel_inside);

        let mut m = WorkBuffer::take(out_channels * POSITIONS * tiles);
        let products = SharedOut(m.as_mut_ptr());
        let multiply = |position: usize| {
            let u = &conv.weights[position * out_channels * channels..][..out_channels * channels];
            // SAFETY: `m` holds out_channels rows of 16 * tiles; this position's GEMM alone
            // writes columns position * tiles.. of each, and `v` holds channels such rows.
            unsafe {
                gemm(
                    out_channels,
                    tiles,
                    channels,
                    products.get().add(position * tiles),
                    POSITIONS * tiles,
                    u,
                    &v[position * tiles..],
                    POSITIONS * tiles,
                    false,
                    false,
                );
            }
        };
        if parallel_inside {
            (0..POSITIONS).into_par_iter().for_each(multiply);
        } else {
            (0..POSITIONS).for_each(multiply);
        }

        let epilogue = Epilogue {
            // SAFETY: image `image` of the output; the band's rows are this task's alone.
            out: SharedOut(unsafe { out.get().add(image * out_len) }),
            residuals: residuals
                .iter()
                .map(|r| &r.data[image * out_len..(image + 1) * out_len])
                .collect(),
            bias: &conv.bias,
            activation,
        };
        transform_outputs(&m, band, &epilogue, parallel_inside);
    };
    // SAFETY: the bands cover every tile row of every image, and each writes all the output
    // rows and columns its tiles cover.
    unsafe {
        FeatureMap::filled_by(input.batch, out_channels, height, width, |out| {
            let task = |index: usize| task(out, index);
            if parallel_inside {
                (0..input.batch * bands).for_each(task);
            } else {
                (0..input.batch * bands).into_par_iter().for_each(task);
            }
        })
    }
}
