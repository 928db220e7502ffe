//! Dense 3x3 convolution (stride 1, padding 1) by Winograd's minimal filtering F(2x2, 3x3).
//!
//! Each 2x2 block of outputs comes from a 4x4 tile of inputs: `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`.
//! The filter transform `U = G g Gᵀ` is done once at load; per call the input tiles are
//! transformed (`V = Bᵀ d B`), the 16 element-wise products summed over input channels become
//! 16 GEMMs `M[ξ] = U[ξ] · V[ξ]` of `[out, in] x [in, tiles]`, and `Aᵀ M A` gives the outputs.
//! That is 16 multiplications per 4 outputs and input channel instead of 36: 2.25x fewer than
//! im2col's GEMM, for transforms made of additions. Tiles are processed in bands of tile rows
//! sized to stay in cache, like [`super::conv3x3`]'s im2col bands.

use burn::nn::conv::Conv2d;
use rayon::prelude::*;

use super::conv::gemm;
use super::scratch::Scratch;
use super::{Activation, FeatureMap, SharedOut, tensor_values};

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
        debug_assert_eq!((kernel, kernel_w), (3, 3), "3x3 kernels only");
        let filters = tensor_values(conv.weight.into_value());
        let bias = match conv.bias {
            Some(bias) => tensor_values(bias.into_value()),
            None => vec![0.0; out_channels],
        };
        let mut weights = vec![0.0; POSITIONS * out_channels * in_channels];
        for (pair, g) in filters.chunks_exact(9).enumerate() {
            let (out, input) = (pair / in_channels, pair % in_channels);
            for (position, u) in transform_filter(g).into_iter().enumerate() {
                weights[(position * out_channels + out) * in_channels + input] = u;
            }
        }
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
    let g: Vec<f64> = g.iter().map(|&v| f64::from(v)).collect();
    let apply = |a: f64, b: f64, c: f64| [a, (a + b + c) / 2.0, (a - b + c) / 2.0, c];
    // G g: 4 rows of 3, built column by column.
    let columns: Vec<[f64; 4]> = (0..3).map(|x| apply(g[x], g[3 + x], g[6 + x])).collect();
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
fn transform_inputs(image: &[f32], band: Band, relu: bool, v: &mut [f32], parallel: bool) {
    let (height, width, tiles_x) = (band.height, band.width, band.tiles_x);
    let tiles = band.tiles();
    // The four input rows a tile row reads, with zero borders, and their column transform.
    let padded_width = 2 * tiles_x + 2;
    let channel = |(source, v): (&[f32], &mut [f32])| {
        let mut padded = Scratch::take(4 * padded_width);
        let mut mixed = Scratch::take(4 * padded_width);
        for tile_row in band.rows.0..band.rows.1 {
            for (r, row) in padded.chunks_exact_mut(padded_width).enumerate() {
                row.fill(0.0);
                let y = (2 * tile_row + r).wrapping_sub(1);
                if y < height {
                    let src = &source[y * width..(y + 1) * width];
                    let inside = &mut row[1..=width];
                    if relu {
                        inside
                            .iter_mut()
                            .zip(src)
                            .for_each(|(d, s)| *d = s.max(0.0));
                    } else {
                        inside.copy_from_slice(src);
                    }
                }
            }
            // Bᵀ d: down the columns, every tile of the row at once.
            let (p0, rest) = padded.split_at(padded_width);
            let (p1, rest) = rest.split_at(padded_width);
            let (p2, p3) = rest.split_at(padded_width);
            let (m0, rest) = mixed.split_at_mut(padded_width);
            let (m1, rest) = rest.split_at_mut(padded_width);
            let (m2, m3) = rest.split_at_mut(padded_width);
            for x in 0..padded_width {
                [m0[x], m1[x], m2[x], m3[x]] = input_transform(p0[x], p1[x], p2[x], p3[x]);
            }
            // (Bᵀ d) B: along the rows, tiles two columns apart.
            let first_tile = (tile_row - band.rows.0) * tiles_x;
            for (r, row) in mixed.chunks_exact(padded_width).enumerate() {
                let [v0, v1, v2, v3] = [0, 1, 2, 3].map(|c| {
                    let start = (r * 4 + c) * tiles + first_tile;
                    start..start + tiles_x
                });
                for tile_x in 0..tiles_x {
                    let x = 2 * tile_x;
                    let t = input_transform(row[x], row[x + 1], row[x + 2], row[x + 3]);
                    v[v0.start + tile_x] = t[0];
                    v[v1.start + tile_x] = t[1];
                    v[v2.start + tile_x] = t[2];
                    v[v3.start + tile_x] = t[3];
                }
            }
        }
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
fn transform_outputs(m: &[f32], band: Band, epilogue: &Epilogue, parallel: bool) {
    let (height, width, tiles_x) = (band.height, band.width, band.tiles_x);
    let tiles = band.tiles();
    let plane = height * width;
    let channel = |(out_channel, m): (usize, &[f32])| {
        // Two output rows per tile row, two columns per tile.
        let mut rows = Scratch::take(2 * 2 * tiles_x);
        let bias = epilogue.bias[out_channel];
        for tile_row in band.rows.0..band.rows.1 {
            let first_tile = (tile_row - band.rows.0) * tiles_x;
            let at = |position: usize| &m[position * tiles + first_tile..][..tiles_x];
            let products: [&[f32]; POSITIONS] = std::array::from_fn(at);
            let (y0, y1) = rows.split_at_mut(2 * tiles_x);
            for tile_x in 0..tiles_x {
                let p = |position: usize| products[position][tile_x];
                // Aᵀ M down the columns, then along the rows.
                let columns: [[f32; 2]; 4] =
                    std::array::from_fn(|c| output_transform(p(c), p(4 + c), p(8 + c), p(12 + c)));
                [y0[2 * tile_x], y0[2 * tile_x + 1]] =
                    output_transform(columns[0][0], columns[1][0], columns[2][0], columns[3][0]);
                [y1[2 * tile_x], y1[2 * tile_x + 1]] =
                    output_transform(columns[0][1], columns[1][1], columns[2][1], columns[3][1]);
            }
            for (i, values) in [&*y0, &*y1].into_iter().enumerate() {
                let y = 2 * tile_row + i;
                if y >= height {
                    break;
                }
                let start = out_channel * plane + y * width;
                // SAFETY: row `y` of plane `out_channel` is inside the image, and only this
                // channel's task writes it.
                let target = unsafe {
                    std::slice::from_raw_parts_mut(
                        epilogue
                            .out
                            .get()
                            .add(start)
                            .cast::<std::mem::MaybeUninit<f32>>(),
                        width,
                    )
                };
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
                        for (((t, v), a), b) in target.iter_mut().zip(values).zip(a).zip(b) {
                            t.write(activation.of(v + bias + a + b));
                        }
                    }
                }
            }
        }
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
    debug_assert_eq!(conv.in_channels, input.channels);
    debug_assert!(residuals.len() <= 2, "the decoder adds at most two maps");
    let (channels, out_channels) = (conv.in_channels, conv.out_channels);
    let (height, width) = (input.height, input.width);
    let (tiles_y, tiles_x) = (height.div_ceil(2), width.div_ceil(2));
    let row_bytes = POSITIONS * (channels + out_channels) * tiles_x * 4;
    let band_rows = (BAND_BYTES / row_bytes).clamp(1, tiles_y);
    let bands = tiles_y.div_ceil(band_rows);
    let threads = rayon::current_num_threads();
    // Too few bands to keep every thread busy: one band per image, parallel inside it.
    let (band_rows, bands, parallel_inside) = if input.batch * bands < 2 * threads {
        (tiles_y, 1, true)
    } else {
        (band_rows, bands, false)
    };

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
        let mut v = Scratch::take(channels * POSITIONS * tiles);
        transform_inputs(source, band, relu_in, &mut v, parallel_inside);

        let mut m = Scratch::take(out_channels * POSITIONS * tiles);
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
