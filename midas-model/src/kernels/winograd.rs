//! Dense 3x3 convolution (stride 1, padding 1) by Winograd's minimal filtering F(m x m, 3x3),
//! with m = 2 or 4.
//!
//! Each m x m block of outputs comes from a t x t tile of inputs (t = m + 2):
//! `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`. The filter transform `U = G g Gᵀ` is done once at load;
//! per call the input tiles are transformed (`V = Bᵀ d B`), the t² element-wise products summed
//! over input channels become t² GEMMs `M[ξ] = U[ξ] · V[ξ]` of `[out, in] x [in, tiles]`, and
//! `Aᵀ M A` gives the outputs. F(2x2, 3x3) makes 16 multiplications per 4 outputs and input
//! channel instead of 36 (2.25x fewer than im2col's GEMM); F(4x4, 3x3) makes 36 per 16, 4x
//! fewer, and reads and writes 2.25 transformed values per output instead of 4, but its
//! filters take 36 values where F(2x2)'s take 16, and its larger constants round a little more
//! (still far inside f32's margin for these layers). Layers with few channels, whose filters
//! are small, take F(4x4), and so do layers of up to 256 channels on the decoder's fine maps,
//! whose hundreds of tiles a call repay the larger filters; the others keep F(2x2) so that
//! their filters (many MB) are not more than doubled in memory. Tiles are processed in bands of tile rows sized to stay in
//! cache, so the transformed inputs and the products never leave it.

use std::ops::{Add, Mul, Sub};

use burn::nn::conv::Conv2d;
use rayon::prelude::*;

use super::buffers::WorkBuffer;
use super::panels::PanelMatrix;
use super::{Activation, Bands, FeatureMap, SharedOut, bias_values, simd, tensor_values};

/// Bytes of transformed inputs and products per band (L2-sized).
const BAND_BYTES: usize = 1 << 20;

/// The fewest tiles a band holds, whatever its bytes. Each band reads every filter panel once
/// to multiply its tiles, and the wide layers' filters (9.4 MB at 256 x 256 channels on
/// F(4x4)) come from memory: a band of one 24-tile row of DPT-Hybrid's 96x96 maps left the
/// products waiting on them (65 GFLOP/s a core against the 100 of a 1x1 convolution). With
/// at least 64 tiles the decoder took 0.88 of its time at 384x384; 192 made the head slower.
const MIN_BAND_TILES: usize = 64;

/// Neighbouring tiles transformed at once on rows of at least as many tiles: one AVX-512
/// register, two AVX2 ones.
const LANES: usize = 16;

/// Neighbouring tiles transformed at once on narrower rows (the deep layers' maps are a few
/// tiles wide, and `LANES` would transform mostly padding there).
const NARROW_LANES: usize = 4;

/// The values of `L` neighbouring tiles at one place of their tiles: the transforms run on
/// these, so that each of their additions is one vector instruction.
#[derive(Clone, Copy)]
struct Lanes<const L: usize>([f32; L]);

impl<const L: usize> Lanes<L> {
    /// The first `L` values of `values`.
    #[inline(always)]
    fn load(values: &[f32]) -> Self {
        Self(values[..L].try_into().expect("L values"))
    }

    /// Writes the lanes to the first `L` values of `out`. Every buffer the transforms write has
    /// room for a whole block past its last tile, so that no store is partial.
    #[inline(always)]
    fn store(self, out: &mut [f32]) {
        out[..L].copy_from_slice(&self.0);
    }

    /// `f(self, other)` lane by lane (a loop over the lanes, which the compiler keeps in
    /// registers; `array::from_fn`'s closures it did not always inline here).
    #[inline(always)]
    fn zip(mut self, other: Self, f: impl Fn(f32, f32) -> f32) -> Self {
        for (value, other) in self.0.iter_mut().zip(other.0) {
            *value = f(*value, other);
        }
        self
    }
}

impl<const L: usize> Add for Lanes<L> {
    type Output = Self;

    #[inline(always)]
    fn add(self, other: Self) -> Self {
        self.zip(other, |a, b| a + b)
    }
}

impl<const L: usize> Sub for Lanes<L> {
    type Output = Self;

    #[inline(always)]
    fn sub(self, other: Self) -> Self {
        self.zip(other, |a, b| a - b)
    }
}

impl<const L: usize> Mul<Lanes<L>> for f32 {
    type Output = Lanes<L>;

    #[inline(always)]
    fn mul(self, mut lanes: Lanes<L>) -> Lanes<L> {
        for value in &mut lanes.0 {
            *value *= self;
        }
        lanes
    }
}

/// The largest `in_channels * out_channels` given F(4x4, 3x3): 128 x 128, whose filters take
/// 2.4 MB in the Winograd domain (the 256-channel layers' would take 9.4 MB each).
const LARGE_TILE_MAX_WEIGHTS: usize = 128 * 128;

/// The same bound for a layer on a fine map ([`WinogradTile::for_fine_map`]): 256 x 256. On
/// DPT-Hybrid's 48x48 and 96x96 maps (a 384x384 input) its 256-channel fusion layers took
/// 0.76 to 0.86 of their F(2x2) time, worth their filters' 5.2 MB more each; on the deep maps
/// of a few tiles, where MiDaS small has its 256-channel layers, the larger tile gained little
/// and would have cost it 21 MB.
const FINE_LARGE_TILE_MAX_WEIGHTS: usize = 256 * 256;

/// The output block a tile yields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WinogradTile {
    /// F(2x2, 3x3): 4x4 input tiles, 16 transformed values per filter.
    Two,
    /// F(4x4, 3x3): 6x6 input tiles, 36 transformed values per filter.
    Four,
}

impl WinogradTile {
    /// The tile a layer of this many channels gets (see the module's documentation).
    pub fn for_channels(in_channels: usize, out_channels: usize) -> Self {
        Self::within(in_channels * out_channels, LARGE_TILE_MAX_WEIGHTS)
    }

    /// The tile a layer of this many channels gets on a fine map, 1/8 of the input's side or
    /// more (the decoder's two finest levels and its head), where every call has hundreds of
    /// tiles to share the larger filters' cost.
    pub fn for_fine_map(in_channels: usize, out_channels: usize) -> Self {
        Self::within(in_channels * out_channels, FINE_LARGE_TILE_MAX_WEIGHTS)
    }

    fn within(weights: usize, max_weights: usize) -> Self {
        if weights <= max_weights {
            Self::Four
        } else {
            Self::Two
        }
    }
}

/// F(m x m, 3x3) along one axis: `M` outputs from `T = M + 2` inputs.
trait Scheme<const M: usize, const T: usize> {
    /// `G g` for a filter's three taps.
    fn filter(g: [f64; 3]) -> [f64; T];
    /// `Bᵀ d` for `L` tiles: `d[i]` is `load(i)`, and `store(i, value)` takes the `i`-th
    /// value of the result. (Loads and stores rather than arrays in and out: the compiler keeps
    /// these few values in registers, where it would copy whole arrays through memory.)
    fn input<const L: usize>(load: impl Fn(usize) -> Lanes<L>, store: impl FnMut(usize, Lanes<L>));
    /// `Aᵀ m` for `L` tiles, `m` loaded and the result stored as in [`Scheme::input`].
    fn output<const L: usize>(load: impl Fn(usize) -> Lanes<L>, store: impl FnMut(usize, Lanes<L>));
}

/// F(2, 3) on the points 0, 1, -1 and ∞.
struct Two;

impl Scheme<2, 4> for Two {
    /// `G = [[1, 0, 0], [½, ½, ½], [½, -½, ½], [0, 0, 1]]`.
    fn filter([a, b, c]: [f64; 3]) -> [f64; 4] {
        [a, (a + b + c) / 2.0, (a - b + c) / 2.0, c]
    }

    /// `Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`.
    #[inline(always)]
    fn input<const L: usize>(
        load: impl Fn(usize) -> Lanes<L>,
        mut store: impl FnMut(usize, Lanes<L>),
    ) {
        let [d0, d1, d2, d3] = [load(0), load(1), load(2), load(3)];
        store(0, d0 - d2);
        store(1, d1 + d2);
        store(2, d2 - d1);
        store(3, d1 - d3);
    }

    /// `Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]]`.
    #[inline(always)]
    fn output<const L: usize>(
        load: impl Fn(usize) -> Lanes<L>,
        mut store: impl FnMut(usize, Lanes<L>),
    ) {
        let [m0, m1, m2, m3] = [load(0), load(1), load(2), load(3)];
        store(0, m0 + m1 + m2);
        store(1, m1 - m2 - m3);
    }
}

/// F(4, 3) on the points 0, 1, -1, 2, -2 and ∞ (Lavin and Gray's matrices).
struct Four;

impl Scheme<4, 6> for Four {
    /// `G = [[¼, 0, 0], [-⅙, -⅙, -⅙], [-⅙, ⅙, -⅙], [1/24, 1/12, ⅙], [1/24, -1/12, ⅙],
    /// [0, 0, 1]]`.
    fn filter([a, b, c]: [f64; 3]) -> [f64; 6] {
        [
            a / 4.0,
            -(a + b + c) / 6.0,
            -(a - b + c) / 6.0,
            a / 24.0 + b / 12.0 + c / 6.0,
            a / 24.0 - b / 12.0 + c / 6.0,
            c,
        ]
    }

    /// `Bᵀ = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
    /// [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]`.
    #[inline(always)]
    fn input<const L: usize>(
        load: impl Fn(usize) -> Lanes<L>,
        mut store: impl FnMut(usize, Lanes<L>),
    ) {
        let [d0, d1, d2, d3, d4, d5] = [load(0), load(1), load(2), load(3), load(4), load(5)];
        let (even, odd) = (d4 - 4.0 * d2, d3 - 4.0 * d1);
        let (even2, odd2) = (d4 - d2, 2.0 * (d3 - d1));
        store(0, 4.0 * d0 - 5.0 * d2 + d4);
        store(1, even + odd);
        store(2, even - odd);
        store(3, even2 + odd2);
        store(4, even2 - odd2);
        store(5, 4.0 * d1 - 5.0 * d3 + d5);
    }

    /// `Aᵀ = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
    /// [0, 1, -1, 8, -8, 1]]`.
    #[inline(always)]
    fn output<const L: usize>(
        load: impl Fn(usize) -> Lanes<L>,
        mut store: impl FnMut(usize, Lanes<L>),
    ) {
        let [m0, m1, m2, m3, m4, m5] = [load(0), load(1), load(2), load(3), load(4), load(5)];
        let (sum1, difference1) = (m1 + m2, m1 - m2);
        let (sum2, difference2) = (m3 + m4, m3 - m4);
        store(0, m0 + sum1 + sum2);
        store(1, difference1 + 2.0 * difference2);
        store(2, sum1 + 4.0 * sum2);
        store(3, difference1 + 8.0 * difference2 + m5);
    }
}

/// A 3x3 convolution's filters in the Winograd domain, transformed once at load.
#[derive(Clone, Debug)]
pub struct WinogradConv {
    /// For each tile position ξ, the matrix `U[ξ]` (`[out_channels, in_channels]`).
    weights: Vec<PanelMatrix>,
    /// One per output channel (zeros for a convolution without bias).
    bias: Vec<f32>,
    out_channels: usize,
    in_channels: usize,
    tile: WinogradTile,
}

impl WinogradConv {
    /// Transforms a Burn 3x3 convolution (groups 1, stride 1, padding 1), taking it over, with
    /// the tile [`WinogradTile::for_channels`] picks.
    pub fn from_conv(conv: Conv2d) -> Self {
        let [out_channels, in_channels, ..] = conv.weight.dims();
        Self::with_tile(conv, WinogradTile::for_channels(in_channels, out_channels))
    }

    /// [`WinogradConv::from_conv`] for a layer on a fine map, with the tile
    /// [`WinogradTile::for_fine_map`] picks.
    pub fn on_fine_map(conv: Conv2d) -> Self {
        let [out_channels, in_channels, ..] = conv.weight.dims();
        Self::with_tile(conv, WinogradTile::for_fine_map(in_channels, out_channels))
    }

    /// [`WinogradConv::from_conv`] with the tile given.
    pub fn with_tile(conv: Conv2d, tile: WinogradTile) -> Self {
        let [out_channels, in_channels, kernel, kernel_w] = conv.weight.dims();
        assert_eq!((kernel, kernel_w), (3, 3), "3x3 kernels only");
        assert_eq!(conv.groups, 1, "no grouped convolutions");
        assert_eq!(conv.stride, [1, 1], "stride 1 only");
        let filters = tensor_values(conv.weight.into_value());
        let bias = bias_values(conv.bias, out_channels);
        let weights = match tile {
            WinogradTile::Two => transform_filters::<2, 4, Two>(&filters, in_channels),
            WinogradTile::Four => transform_filters::<4, 6, Four>(&filters, in_channels),
        };
        Self {
            weights,
            bias,
            out_channels,
            in_channels,
            tile,
        }
    }
}

/// `G g Gᵀ` for every 3x3 filter of `[out, in, 3, 3]` `filters`: for each position ξ, the
/// matrix `U[ξ]` (`[out, in]`).
fn transform_filters<const M: usize, const T: usize, S: Scheme<M, T>>(
    filters: &[f32],
    in_channels: usize,
) -> Vec<PanelMatrix> {
    // This runs at start-up, before the port is bound: the filters are transformed in one
    // parallel pass (`[out, in, t²]`), then each position's matrix packed from them.
    let out_channels = filters.len() / (9 * in_channels);
    let positions = T * T;
    let transformed: Vec<f32> = filters
        .par_chunks_exact(9)
        .flat_map_iter(transform_filter::<M, T, S>)
        .collect();
    (0..positions)
        .into_par_iter()
        .map(|position| {
            PanelMatrix::from_fn(out_channels, in_channels, |out, input| {
                transformed[(out * in_channels + input) * positions + position]
            })
        })
        .collect()
}

/// `G g Gᵀ` for one row-major 3x3 filter `g`, row by row of the t x t result; computed in f64,
/// rounded once.
fn transform_filter<const M: usize, const T: usize, S: Scheme<M, T>>(
    g: &[f32],
) -> impl Iterator<Item = f32> {
    let g: [f64; 9] = std::array::from_fn(|i| f64::from(g[i]));
    // G g: t rows of 3, built column by column.
    let columns: [[f64; T]; 3] = std::array::from_fn(|x| S::filter([g[x], g[3 + x], g[6 + x]]));
    (0..T).flat_map(move |row| {
        S::filter([columns[0][row], columns[1][row], columns[2][row]])
            .into_iter()
            .map(|value| value as f32)
    })
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

    /// The values one position of one channel takes in the transformed inputs and products:
    /// the band's tiles, then room for a whole block of lanes written or read past the last.
    fn segment(self) -> usize {
        self.tiles() + LANES
    }
}

/// `N` consecutive slices of `len` values from the start of `values`.
fn slices<const N: usize>(values: &[f32], len: usize) -> [&[f32]; N] {
    std::array::from_fn(|i| &values[i * len..][..len])
}

/// `N` consecutive mutable slices of `len` values from the start of `values`.
fn slices_mut<const N: usize>(values: &mut [f32], len: usize) -> [&mut [f32]; N] {
    let mut chunks = values.chunks_exact_mut(len);
    std::array::from_fn(|_| chunks.next().expect("N slices fit"))
}

/// Fills `v` (`[in_channels, t², tiles]`) with `Bᵀ d B` for every tile of the band and every
/// channel of `image`, ReLU applied to the inputs first when `relu`.
///
/// Tiles start every m columns, so each padded input row is first split into its m phases
/// (columns `m * i + k` for phase k): the tile at `x` then reads phases 0..m at `x` and phases
/// 0..2 at `x + 1`, and `L` neighbouring tiles read `L` contiguous values of each.
fn transform_inputs<const M: usize, const T: usize, const L: usize, S: Scheme<M, T>>(
    image: &[f32],
    band: Band,
    relu: bool,
    v: &mut [f32],
    parallel: bool,
) {
    let (height, width, tiles_x) = (band.height, band.width, band.tiles_x);
    let segment = band.segment();
    let split = tiles_x + 1;
    // A phase's row, with room for whole blocks of lanes read one column further on.
    let stride = split.next_multiple_of(L) + L;
    // `[phase, tile input row, stride]`, then the same after Bᵀ, then one padded input row.
    let phases_len = M * T * stride;
    let scratch_len = 2 * phases_len + M * stride;
    let channel = |scratch: &mut [f32], (source, v): (&[f32], &mut [f32])| {
        simd::vectorised(
            #[inline(always)]
            || {
                let (phases, rest) = scratch.split_at_mut(phases_len);
                let (mixed, line) = rest.split_at_mut(phases_len);
                for tile_row in band.rows.0..band.rows.1 {
                    for r in 0..T {
                        let y = (M * tile_row + r).wrapping_sub(1);
                        let row = (y < height).then(|| &source[y * width..(y + 1) * width]);
                        split_phases::<M>(row, line, phases, (r * stride, stride), relu);
                    }
                    // Bᵀ d: down the columns, phase by phase.
                    for (input, output) in phases
                        .chunks_exact(T * stride)
                        .zip(mixed.chunks_exact_mut(T * stride))
                    {
                        let rows = slices::<T>(input, stride);
                        let mut out = slices_mut::<T>(output, stride);
                        for x in (0..split).step_by(L) {
                            input_block::<M, T, L, S>(&rows, &mut out, x);
                        }
                    }
                    // (Bᵀ d) B: along the rows.
                    let first_tile = (tile_row - band.rows.0) * tiles_x;
                    for (r, positions) in v.chunks_exact_mut(T * segment).enumerate() {
                        let taps: [&[f32]; T] = std::array::from_fn(|j| {
                            &mixed[((j % M) * T + r) * stride + j / M..][..stride - 1]
                        });
                        let mut out: [&mut [f32]; T] = {
                            let mut chunks = positions.chunks_exact_mut(segment);
                            std::array::from_fn(|_| {
                                &mut chunks.next().expect("t positions")[first_tile..]
                            })
                        };
                        for x in (0..tiles_x).step_by(L) {
                            input_block::<M, T, L, S>(&taps, &mut out, x);
                        }
                    }
                }
            },
        )
    };
    let plane = height * width;
    let per_channel = T * T * segment;
    // One scratch buffer per task, not per channel: a layer of few channels over many bands
    // took its buffers thousands of times.
    if parallel {
        image
            .par_chunks(plane)
            .zip(v.par_chunks_mut(per_channel))
            .for_each_init(
                || WorkBuffer::take(scratch_len),
                |scratch, item| channel(scratch, item),
            );
    } else {
        let mut scratch = WorkBuffer::take(scratch_len);
        image
            .chunks(plane)
            .zip(v.chunks_mut(per_channel))
            .for_each(|item| channel(&mut scratch, item));
    }
}

/// `Bᵀ d` for the `L` tiles from `x` on, along one axis: `d[i]` read from `inputs[i]`, the
/// result's `i`-th value written to `outputs[i]`.
#[inline(always)]
fn input_block<const M: usize, const T: usize, const L: usize, S: Scheme<M, T>>(
    inputs: &[&[f32]; T],
    outputs: &mut [&mut [f32]; T],
    x: usize,
) {
    S::input(
        #[inline(always)]
        |i| Lanes::<L>::load(&inputs[i][x..]),
        #[inline(always)]
        |i, lanes| lanes.store(&mut outputs[i][x..]),
    );
}

/// Writes one padded input row (`None` for a padding row) into its place in each of the
/// `M` phases of `phases` (`[phase, rows, stride]`, the row's at `start` in each): padded
/// column `M * i + k`, input column `M * i + k - 1`, goes to index `i` of phase `k`. Every
/// slot is written, zeros where the row has no column; ReLU when `relu`.
///
/// The row is first copied behind one zero into `line` (`M * stride` long), then split into
/// its phases.
#[inline(always)]
fn split_phases<const M: usize>(
    row: Option<&[f32]>,
    line: &mut [f32],
    phases: &mut [f32],
    (start, stride): (usize, usize),
    relu: bool,
) {
    let phase_len = phases.len() / M;
    let mut chunks = phases.chunks_exact_mut(phase_len);
    let mut lanes: [&mut [f32]; M] =
        std::array::from_fn(|_| &mut chunks.next().expect("M phases")[start..][..stride]);
    let Some(row) = row else {
        lanes.iter_mut().for_each(|lane| lane.fill(0.0));
        return;
    };
    let width = row.len();
    line[0] = 0.0;
    for (padded, value) in line[1..=width].iter_mut().zip(row) {
        *padded = if relu { value.max(0.0) } else { *value };
    }
    line[width + 1..].fill(0.0);
    simd::deinterleave(line.as_chunks::<M>().0, lanes);
}

/// Where one image's outputs go and what is added to them.
struct Epilogue<'a> {
    out: SharedOut,
    residuals: Vec<&'a [f32]>,
    bias: &'a [f32],
    activation: Activation,
}

impl Epilogue<'_> {
    /// Writes `activation(values + bias + residuals)` at `start` of the image's output.
    ///
    /// # Safety
    /// `start..start + values.len()` is inside the image's output, and no other task writes it.
    #[inline(always)]
    unsafe fn write(&self, start: usize, values: &[f32], bias: f32) {
        let width = values.len();
        // SAFETY: the caller's contract.
        let target = unsafe { self.out.uninit(start, width) };
        let activation = self.activation;
        match self.residuals.as_slice() {
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

/// `Aᵀ M A` for every tile of the band, from `m` (`[out_channels, t², segment]`), plus bias and residuals, through the activation, written into the
/// band's output rows.
///
/// The transform writes each output row's m column phases to separate arrays, `L` tiles
/// at a time; one interleaving pass then lays them out as a row for the epilogue.
fn transform_outputs<const M: usize, const T: usize, const L: usize, S: Scheme<M, T>>(
    m: &[f32],
    band: Band,
    epilogue: &Epilogue,
    parallel: bool,
) {
    let (height, width, tiles_x) = (band.height, band.width, band.tiles_x);
    let segment = band.segment();
    let plane = height * width;
    let per_channel = T * T * segment;
    let padded = tiles_x.next_multiple_of(L);
    // `[output row, column phase, padded]`, then one interleaved row, then the column pass's
    // results for one block of lanes.
    let (phases_len, row_len) = (M * M * padded, M * padded);
    let scratch_len = phases_len + row_len + M * T * L;
    let channel = |scratch: &mut [f32], out_channel: usize| {
        simd::vectorised(
            #[inline(always)]
            || {
                let (phases, rest) = scratch.split_at_mut(phases_len);
                let (row, half) = rest.split_at_mut(row_len);
                let bias = epilogue.bias[out_channel];
                let m = &m[out_channel * per_channel..];
                for tile_row in band.rows.0..band.rows.1 {
                    let first_tile = (tile_row - band.rows.0) * tiles_x;
                    // The products at position (r, j) of the tile row's tiles.
                    let p = |r: usize, j: usize| &m[(r * T + j) * segment + first_tile..];
                    {
                        let mut rows = phases.chunks_exact_mut(M * padded);
                        let mut out: [[&mut [f32]; M]; M] = std::array::from_fn(|_| {
                            slices_mut::<M>(rows.next().expect("M rows"), padded)
                        });
                        for x in (0..tiles_x).step_by(L) {
                            // Aᵀ M down the columns, then along the rows.
                            // `half[i * T + j]`: row i of column j's result.
                            for j in 0..T {
                                S::output(
                                    #[inline(always)]
                                    |r| Lanes::<L>::load(&p(r, j)[x..]),
                                    #[inline(always)]
                                    |i, lanes| lanes.store(&mut half[(i * T + j) * L..]),
                                );
                            }
                            for (i, out) in out.iter_mut().enumerate() {
                                S::output(
                                    #[inline(always)]
                                    |j| Lanes::<L>::load(&half[(i * T + j) * L..]),
                                    #[inline(always)]
                                    |k, lanes| lanes.store(&mut out[k][x..]),
                                );
                            }
                        }
                    }
                    for (i, phases) in phases.chunks_exact(M * padded).enumerate() {
                        let y = M * tile_row + i;
                        if y >= height {
                            break;
                        }
                        simd::interleave(slices::<M>(phases, padded), row.as_chunks_mut::<M>().0);
                        // SAFETY: row `y` of plane `out_channel` is inside the image, and only
                        // this channel's task writes it.
                        unsafe {
                            epilogue.write(out_channel * plane + y * width, &row[..width], bias)
                        };
                    }
                }
            },
        )
    };
    let out_channels = epilogue.bias.len();
    if parallel {
        (0..out_channels).into_par_iter().for_each_init(
            || WorkBuffer::take(scratch_len),
            |scratch, out_channel| channel(scratch, out_channel),
        );
    } else {
        let mut scratch = WorkBuffer::take(scratch_len);
        (0..out_channels).for_each(|out_channel| channel(&mut scratch, out_channel));
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
    let layer = Layer {
        input,
        conv,
        relu_in,
        activation,
        residuals,
    };
    match conv.tile {
        WinogradTile::Two => layer.run::<2, 4, Two>(),
        WinogradTile::Four => layer.run::<4, 6, Four>(),
    }
}

/// One call's arguments.
struct Layer<'a> {
    input: &'a FeatureMap,
    conv: &'a WinogradConv,
    relu_in: bool,
    activation: Activation,
    residuals: &'a [&'a FeatureMap],
}

impl Layer<'_> {
    fn run<const M: usize, const T: usize, S: Scheme<M, T>>(&self) -> FeatureMap {
        let (input, conv) = (self.input, self.conv);
        let positions = T * T;
        let (channels, out_channels) = (conv.in_channels, conv.out_channels);
        let (height, width) = (input.height, input.width);
        let (tiles_y, tiles_x) = (height.div_ceil(M), width.div_ceil(M));
        let row_bytes = positions * (channels + out_channels) * tiles_x * 4;
        let Bands {
            size: band_rows,
            count: bands,
            parallel_inside,
        } = Bands::split(
            input.batch,
            tiles_y,
            (BAND_BYTES / row_bytes)
                .max(MIN_BAND_TILES.div_ceil(tiles_x))
                .clamp(1, tiles_y),
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
            let (tiles, segment) = (band.tiles(), band.segment());
            let source = &input.data[image * input.image_len()..(image + 1) * input.image_len()];
            let mut v = WorkBuffer::take(channels * positions * segment);
            if tiles_x >= LANES {
                transform_inputs::<M, T, LANES, S>(
                    source,
                    band,
                    self.relu_in,
                    &mut v,
                    parallel_inside,
                );
            } else {
                transform_inputs::<M, T, NARROW_LANES, S>(
                    source,
                    band,
                    self.relu_in,
                    &mut v,
                    parallel_inside,
                );
            }

            let mut m = WorkBuffer::take(out_channels * positions * segment);
            let products = SharedOut(m.as_mut_ptr());
            let panels = conv.weights[0].panels();
            let multiply = |item: usize| {
                let (position, panel) = (item / panels, item % panels);
                let stride = positions * segment;
                // SAFETY: `v` holds `channels` rows and `m` `out_channels` rows of t² segments
                // of at least `tiles` values; this item alone writes its panel's rows of `m`
                // at this position.
                unsafe {
                    conv.weights[position].multiply_panel(
                        panel,
                        (v[position * segment..].as_ptr(), stride),
                        (products.get().add(position * segment), stride),
                        tiles,
                    )
                };
            };
            if parallel_inside {
                (0..positions * panels).into_par_iter().for_each(multiply);
            } else {
                (0..positions * panels).for_each(multiply);
            }

            let epilogue = Epilogue {
                // SAFETY: image `image` of the output; the band's rows are this task's alone.
                out: SharedOut(unsafe { out.get().add(image * out_len) }),
                residuals: self
                    .residuals
                    .iter()
                    .map(|r| &r.data[image * out_len..(image + 1) * out_len])
                    .collect(),
                bias: &conv.bias,
                activation: self.activation,
            };
            if tiles_x >= LANES {
                transform_outputs::<M, T, LANES, S>(&m, band, &epilogue, parallel_inside);
            } else {
                transform_outputs::<M, T, NARROW_LANES, S>(&m, band, &epilogue, parallel_inside);
            }
        };
        // SAFETY: the bands cover every tile row of every image, and each writes all the
        // output rows and columns its tiles cover.
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
}
