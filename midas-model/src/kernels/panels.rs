//! Matrix products whose left operand is a layer's weights, packed once at load into panels of
//! [`PANEL_ROWS`] rows ([`PanelMatrix`]): `out[r, 0..n] = Σ_i a[r, i] · b[i, 0..n]`, with `b`
//! and `out` read and written in place at any row stride, exactly `n` values of each row.
//!
//! The Winograd products and the 1x1 and im2col convolutions use it instead of the `gemm`
//! crate, which packs its left operand again on every call: for the decoder's deep layers, 8
//! to 64 tiles wide, and the encoder's last blocks, 32 to 256 pixels wide, that packing was
//! the time (a 512 x 512 matrix per tile position read, written and read again to multiply 8
//! columns). Packed once, each panel streams through a call exactly once whatever `n` is.
//!
//! The microkernel keeps a block of `out` in registers, 8 rows x 48 columns on AVX-512 (24 of
//! its 32 registers), 6 rows x 16 columns on AVX2 (12 of 16; at 4 x 24 the compiler spilled an
//! accumulator, and that one's chain through memory set the pace; 8 x 8 and 4 x 16 ran no
//! faster than the `gemm` crate): per step along the depth it loads one row segment of `b` and
//! broadcasts each row's weight from the panel, where the weights sit next to each other.
//! Panels of 24 rows serve both: three passes of 8 rows, four of 6. The last columns run as a
//! narrower block whose last vector is loaded and stored under a mask, so a product touches no
//! value past its `n` columns and callers need no padding.

use std::ops::Range;

use rayon::prelude::*;

use super::simd::Isa;
use super::{SharedIn, SharedOut};

/// Rows of the left operand interleaved in one panel (`[depth, PANEL_ROWS]`).
pub(crate) const PANEL_ROWS: usize = 24;

/// How far ahead in its panel (in values: 32 depth steps, 3 KB) a block's first pass asks
/// for the weights. The deep layers' panels come from memory once per call, a few columns
/// against each weight, and the hardware prefetcher alone left their products waiting on it:
/// asking ahead took 8 to 18 % off their products.
const PREFETCH_DISTANCE: usize = PANEL_ROWS * 32;

/// A `[rows, depth]` matrix in panels of [`PANEL_ROWS`] rows, each panel `[depth, PANEL_ROWS]`
/// (the last padded with zero rows).
#[derive(Clone, Debug)]
pub(crate) struct PanelMatrix {
    values: Vec<f32>,
    rows: usize,
    depth: usize,
}

impl PanelMatrix {
    /// The matrix whose `a[row, step]` is `value(row, step)`.
    pub(crate) fn from_fn(rows: usize, depth: usize, value: impl Fn(usize, usize) -> f32) -> Self {
        let mut values = vec![0.0; rows.next_multiple_of(PANEL_ROWS) * depth];
        for (panel, panel_values) in values.chunks_exact_mut(PANEL_ROWS * depth).enumerate() {
            for (step, weights) in panel_values.chunks_exact_mut(PANEL_ROWS).enumerate() {
                for (offset, weight) in weights.iter_mut().enumerate() {
                    let row = panel * PANEL_ROWS + offset;
                    if row < rows {
                        *weight = value(row, step);
                    }
                }
            }
        }
        Self {
            values,
            rows,
            depth,
        }
    }

    /// Packs a row-major `[rows, depth]` matrix.
    pub(crate) fn from_rows(matrix: &[f32], rows: usize, depth: usize) -> Self {
        assert_eq!(matrix.len(), rows * depth, "a {rows}x{depth} matrix");
        Self::from_fn(rows, depth, |row, step| matrix[row * depth + step])
    }

    /// How many panels the rows fill.
    pub(crate) fn panels(&self) -> usize {
        self.rows.div_ceil(PANEL_ROWS)
    }

    /// The rows of panel `panel`.
    pub(crate) fn panel_rows(&self, panel: usize) -> Range<usize> {
        let first = panel * PANEL_ROWS;
        first..(first + PANEL_ROWS).min(self.rows)
    }

    /// Writes rows `panel_rows(panel)` of `out = self · b`, `n` columns of each.
    ///
    /// # Safety
    /// `b` must be readable for `depth` rows of `n` values at `b_stride`; `out` (the product's
    /// row 0) writable for those rows of `n` values at `out_stride`, which no other thread
    /// touches during the call.
    pub(crate) unsafe fn multiply_panel(
        &self,
        panel: usize,
        (b, b_stride): (*const f32, usize),
        (out, out_stride): (*mut f32, usize),
        n: usize,
    ) {
        let len = PANEL_ROWS * self.depth;
        let rows = self.panel_rows(panel);
        let product = PanelProduct {
            panel: &self.values[panel * len..][..len],
            rows: rows.len(),
            b,
            b_stride,
            // SAFETY: the panel's first row of `out` (the contract).
            out: unsafe { out.add(rows.start * out_stride) },
            out_stride,
            n,
        };
        // SAFETY: the contract.
        unsafe { product.run() }
    }

    /// `out = self · b` over the columns `columns`, in items of one panel by `chunk` columns,
    /// on the thread pool when `parallel`; after each item, `finish(rows, columns)` runs over
    /// what it wrote, while that is still in cache. The items go column chunk by column chunk,
    /// so a thread that runs several in a row reads the same columns of `b` from its cache.
    ///
    /// # Safety
    /// `b` must be readable for `depth` rows at `b_stride` over `columns`; `out` writable for
    /// `rows` rows at `out_stride` over `columns`, which no other thread touches during the
    /// call; `chunk` ≥ 1.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn multiply(
        &self,
        (b, b_stride): (*const f32, usize),
        out: SharedOut,
        out_stride: usize,
        columns: Range<usize>,
        chunk: usize,
        parallel: bool,
        finish: impl Fn(Range<usize>, Range<usize>) + Sync,
    ) {
        let b = SharedIn(b);
        let chunks = columns.len().div_ceil(chunk);
        let item = |index: usize| {
            let (chunk_index, panel) = (index / self.panels(), index % self.panels());
            let start = columns.start + chunk_index * chunk;
            let part = start..(start + chunk).min(columns.end);
            // SAFETY: inside `b` and `out` (the contract); this item alone writes these rows
            // of these columns.
            unsafe {
                self.multiply_panel(
                    panel,
                    (b.get().add(part.start), b_stride),
                    (out.get().add(part.start), out_stride),
                    part.len(),
                )
            };
            finish(self.panel_rows(panel), part);
        };
        if parallel {
            (0..chunks * self.panels()).into_par_iter().for_each(item);
        } else {
            (0..chunks * self.panels()).for_each(item);
        }
    }
}

/// One panel times `b`: the arguments of one call.
struct PanelProduct<'a> {
    /// `[depth, PANEL_ROWS]`.
    panel: &'a [f32],
    /// The rows of the panel to write (the last panel of a matrix may hold fewer).
    rows: usize,
    /// `[depth, n]` at row stride `b_stride`.
    b: *const f32,
    b_stride: usize,
    /// `[rows, n]` at row stride `out_stride`.
    out: *mut f32,
    out_stride: usize,
    n: usize,
}

impl PanelProduct<'_> {
    /// Writes the product.
    ///
    /// # Safety
    /// `b` must be readable for `depth` rows of `n` values at `b_stride`, and `out` writable
    /// for `rows` rows of `n` values at `out_stride`, which no other thread touches during the
    /// call.
    unsafe fn run(&self) {
        // SAFETY: the caller's contract.
        unsafe { self.run_on(Isa::detected()) }
    }

    /// [`PanelProduct::run`] on a chosen path, which the CPU must have.
    unsafe fn run_on(&self, isa: Isa) {
        assert!(self.rows <= PANEL_ROWS && self.panel.len().is_multiple_of(PANEL_ROWS));
        match isa {
            #[cfg(all(target_arch = "x86_64", feature = "avx512"))]
            // SAFETY: AVX-512F was detected; the rest is the caller's contract.
            Isa::Avx512 => unsafe { avx512::multiply(self) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 and FMA were detected; the rest is the caller's contract.
            Isa::Avx2 => unsafe { avx2::multiply(self) },
            // SAFETY: the caller's contract.
            _ => unsafe { self.portable() },
        }
    }

    /// The baseline path, 4 columns at a time, left to the compiler. It has no fused
    /// multiply-add, and sums of hundreds of rounded products drifted past the networks'
    /// tolerance: it sums in double precision.
    ///
    /// # Safety
    /// [`PanelProduct::run`]'s contract.
    unsafe fn portable(&self) {
        const COLUMNS: usize = 4;
        for column in (0..self.n).step_by(COLUMNS) {
            let width = (self.n - column).min(COLUMNS);
            let mut sums = [[0.0_f64; COLUMNS]; PANEL_ROWS];
            for (step, weights) in self.panel.chunks_exact(PANEL_ROWS).enumerate() {
                // SAFETY: `width` values of row `step` from `column`, inside its `n` (the
                // contract).
                let b = unsafe {
                    std::slice::from_raw_parts(self.b.add(step * self.b_stride + column), width)
                };
                for (sums, &weight) in sums.iter_mut().zip(weights) {
                    for (sum, &value) in sums.iter_mut().zip(b) {
                        *sum += f64::from(weight) * f64::from(value);
                    }
                }
            }
            for (row, sums) in sums.iter().enumerate().take(self.rows) {
                for (j, &sum) in sums.iter().enumerate().take(width) {
                    // SAFETY: as for `b`, on `out`.
                    unsafe {
                        self.out
                            .add(row * self.out_stride + column + j)
                            .write(sum as f32)
                    };
                }
            }
        }
    }
}

/// The x86 microkernel for one instruction set: `$lanes`-wide vectors, blocks of `$wide`
/// vectors of columns by `$pass` rows (the panel's rows in `PANEL_ROWS / $pass` passes), the
/// last columns in a block of as many vectors as they need, its last one under a mask.
/// Narrower blocks take more rows a pass (`$narrow`: rows for blocks of 1, 2, ... vectors),
/// as many accumulators as the wide block: on the deep layers' few columns every pass reads
/// the panel again, and one pass that broadcasts each weight once halves the loads per
/// multiply-add. `$helpers` defines, for the instruction set, `Mask`, `mask(count)` (the
/// first `count` lanes), `load_part` and `store_part`.
#[cfg(target_arch = "x86_64")]
macro_rules! microkernel {
    ($path:ident, $features:literal, $lanes:literal, $wide:literal, $pass:literal,
     [$narrow1:literal, $narrow2:literal], $zero:ident, $load:ident, $store:ident, $splat:ident, $fma:ident,
     { $($helpers:item)* }) => {
        mod $path {
            #[allow(clippy::wildcard_imports)]
            use std::arch::x86_64::*;

            use super::{PANEL_ROWS, PREFETCH_DISTANCE, PanelProduct};

            $($helpers)*

            /// # Safety
            /// The CPU has `$features`; the rest is [`PanelProduct::run`]'s contract.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn multiply(product: &PanelProduct) {
                let block_columns = $wide * $lanes;
                let full = product.n / block_columns * block_columns;
                let all = mask($lanes);
                for column in (0..full).step_by(block_columns) {
                    for first in (0..product.rows).step_by($pass) {
                        // SAFETY: the caller's contract; the block ends by `n`.
                        unsafe { block::<$wide, $pass, false>(product, column, first, all) };
                    }
                }
                let rest = product.n - full;
                if rest == 0 {
                    return;
                }
                let vectors = rest.div_ceil($lanes);
                let last = mask(rest - (vectors - 1) * $lanes);
                // A panel of at most `$pass` rows (a matrix's last) keeps passes of `$pass`:
                // taller ones would multiply its zero rows.
                let short = product.rows <= $pass;
                let rows = if short {
                    $pass
                } else {
                    [$narrow1, $narrow2, $pass][vectors.min(3) - 1]
                };
                for first in (0..product.rows).step_by(rows) {
                    // SAFETY: the caller's contract; the last vector stops at `n`.
                    unsafe {
                        match (vectors, short) {
                            (1, false) => block::<1, $narrow1, true>(product, full, first, last),
                            (2, false) => block::<2, $narrow2, true>(product, full, first, last),
                            (1, true) => block::<1, $pass, true>(product, full, first, last),
                            (2, true) => block::<2, $pass, true>(product, full, first, last),
                            _ => block::<$wide, $pass, true>(product, full, first, last),
                        }
                    }
                }
            }

            /// Rows `first..first + R` (those below `rows`) by `V` vectors of columns from
            /// `column`, the last vector's lanes limited to `last` when `PARTIAL`.
            ///
            /// # Safety
            /// As [`multiply`], with `column + V * $lanes <= n`, or, when `PARTIAL`,
            /// `column + (V - 1) * $lanes` plus the lanes of `last` `<= n`.
            #[target_feature(enable = $features)]
            unsafe fn block<const V: usize, const R: usize, const PARTIAL: bool>(
                product: &PanelProduct,
                column: usize,
                first: usize,
                last: Mask,
            ) {
                let mut sums = [[$zero(); V]; R];
                for (step, weights) in product.panel.chunks_exact(PANEL_ROWS).enumerate() {
                    if first == 0 {
                        // A hint, never a fault, even past the panel's end.
                        let ahead = weights.as_ptr().wrapping_add(PREFETCH_DISTANCE);
                        _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
                    }
                    // SAFETY: inside row `step` of `b` (the contract).
                    let row = unsafe { product.b.add(step * product.b_stride + column) };
                    let mut b = [$zero(); V];
                    for (j, b) in b.iter_mut().enumerate() {
                        // SAFETY: as above; a partial vector reads only its lanes.
                        *b = unsafe {
                            if PARTIAL && j == V - 1 {
                                load_part(row.add(j * $lanes), last)
                            } else {
                                $load(row.add(j * $lanes))
                            }
                        };
                    }
                    for (sums, &weight) in sums.iter_mut().zip(&weights[first..first + R]) {
                        let weight = $splat(weight);
                        for (sum, &b) in sums.iter_mut().zip(&b) {
                            *sum = $fma(b, weight, *sum);
                        }
                    }
                }
                let rows = (product.rows - first).min(R);
                for (r, sums) in sums.iter().enumerate().take(rows) {
                    // SAFETY: row `first + r` of `out`, inside its `n` (the contract).
                    let out = unsafe { product.out.add((first + r) * product.out_stride + column) };
                    for (j, &sum) in sums.iter().enumerate() {
                        // SAFETY: as above; a partial vector writes only its lanes.
                        unsafe {
                            if PARTIAL && j == V - 1 {
                                store_part(out.add(j * $lanes), sum, last)
                            } else {
                                $store(out.add(j * $lanes), sum)
                            }
                        }
                    }
                }
            }
        }
    };
}

#[cfg(all(target_arch = "x86_64", feature = "avx512"))]
microkernel!(
    avx512,
    "avx512f",
    16,
    3,
    8,
    [24, 12],
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_set1_ps,
    _mm512_fmadd_ps,
    {
        type Mask = __mmask16;

        /// The first `count` (1 to 16) lanes.
        fn mask(count: usize) -> Mask {
            (((1_u32 << count) - 1) & 0xffff) as Mask
        }

        /// # Safety
        /// The masked lanes must be readable.
        #[target_feature(enable = "avx512f")]
        unsafe fn load_part(from: *const f32, mask: Mask) -> __m512 {
            // SAFETY: the contract.
            unsafe { _mm512_maskz_loadu_ps(mask, from) }
        }

        /// # Safety
        /// The masked lanes must be writable.
        #[target_feature(enable = "avx512f")]
        unsafe fn store_part(to: *mut f32, values: __m512, mask: Mask) {
            // SAFETY: the contract.
            unsafe { _mm512_mask_storeu_ps(to, mask, values) }
        }
    }
);

#[cfg(target_arch = "x86_64")]
microkernel!(
    avx2,
    "avx2,fma",
    8,
    2,
    6,
    [12, 6],
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_set1_ps,
    _mm256_fmadd_ps,
    {
        type Mask = __m256i;

        /// The first `count` (1 to 8) lanes.
        #[target_feature(enable = "avx2")]
        fn mask(count: usize) -> Mask {
            _mm256_cmpgt_epi32(
                _mm256_set1_epi32(count as i32),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            )
        }

        /// # Safety
        /// The masked lanes must be readable.
        #[target_feature(enable = "avx2")]
        unsafe fn load_part(from: *const f32, mask: Mask) -> __m256 {
            // SAFETY: the contract.
            unsafe { _mm256_maskload_ps(from, mask) }
        }

        /// # Safety
        /// The masked lanes must be writable.
        #[target_feature(enable = "avx2")]
        unsafe fn store_part(to: *mut f32, values: __m256, mask: Mask) {
            // SAFETY: the contract.
            unsafe { _mm256_maskstore_ps(to, mask, values) }
        }
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    /// Values in [-1, 1) that do not repeat with any short period.
    fn values(len: usize, step: f32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as f32 * step).fract() - 0.5) * 2.0)
            .collect()
    }

    /// Checks `out` (`rows` rows at `out_stride`) against a double-precision `a · b` over
    /// `columns`, and that every other value still holds the sentinel it was filled with.
    fn check(
        (a, b, out): (&[f32], &[f32], &[f32]),
        (rows, depth): (usize, usize),
        (b_stride, out_stride): (usize, usize),
        columns: Range<usize>,
        context: &str,
    ) {
        for (index, &got) in out.iter().enumerate() {
            let (row, column) = (index / out_stride, index % out_stride);
            if row >= rows || !columns.contains(&column) {
                assert!(
                    got.to_bits() == SENTINEL.to_bits(),
                    "{context}: ({row}, {column}) was written"
                );
                continue;
            }
            let expected: f64 = (0..depth)
                .map(|i| f64::from(a[row * depth + i]) * f64::from(b[i * b_stride + column]))
                .sum();
            assert!(
                (f64::from(got) - expected).abs() <= 1e-5 * depth as f64,
                "{context} at ({row}, {column}): {got} against {expected}"
            );
        }
    }

    /// What `out` holds before a product: a NaN no product writes.
    const SENTINEL: f32 = f32::from_bits(0x7fc0_1234);

    /// Every shape of edge: rows short of a panel, widths around each path's blocks, a depth
    /// of one; against a double-precision product, on every path the CPU has, touching no
    /// value past the `n` columns of each row.
    #[test]
    fn panel_products_match_the_reference_on_every_path() {
        for isa in Isa::supported() {
            for (rows, depth, n) in [
                (24, 37, 1),
                (8, 37, 7),
                (5, 16, 16),
                (24, 1, 17),
                (3, 29, 24),
                (13, 64, 31),
                (7, 33, 32),
                (19, 20, 33),
                (1, 9, 47),
                (24, 70, 64),
                (6, 13, 100),
            ] {
                let a = values(rows * depth, 0.618_034);
                let matrix = PanelMatrix::from_rows(&a, rows, depth);
                let (b_stride, out_stride) = (n + 3, n + 5);
                let b = values(depth * b_stride, 0.414_214);
                let mut out = vec![SENTINEL; rows * out_stride];
                let product = PanelProduct {
                    panel: &matrix.values,
                    rows,
                    b: b.as_ptr(),
                    b_stride,
                    out: out.as_mut_ptr(),
                    out_stride,
                    n,
                };
                // SAFETY: `b` and `out` hold `n` values of every row.
                unsafe { product.run_on(isa) };
                let context = format!("{isa:?} rows {rows} depth {depth} n {n}");
                check(
                    (&a, &b, &out),
                    (rows, depth),
                    (b_stride, out_stride),
                    0..n,
                    &context,
                );
            }
        }
    }

    /// Several panels by several column chunks on the thread pool, over a range of columns
    /// that starts inside the rows: each item's rows and columns written once, and `finish`
    /// called on exactly those.
    #[test]
    fn a_matrix_product_covers_its_panels_and_chunks() {
        let (rows, depth, stride) = (53, 40, 150);
        let a = values(rows * depth, 0.618_034);
        let matrix = PanelMatrix::from_rows(&a, rows, depth);
        let b = values(depth * stride, 0.414_214);
        let mut out = vec![SENTINEL; rows * stride];
        let columns = 9..140;
        let finished = std::sync::Mutex::new(Vec::new());
        // SAFETY: `b` and `out` hold `stride` values of each row, past the columns' end.
        unsafe {
            matrix.multiply(
                (b.as_ptr(), stride),
                SharedOut(out.as_mut_ptr()),
                stride,
                columns.clone(),
                50,
                true,
                |rows, columns| finished.lock().unwrap().push((rows.start, columns.start)),
            )
        };
        check(
            (&a, &b, &out),
            (rows, depth),
            (stride, stride),
            columns,
            "matrix",
        );
        let mut finished = finished.into_inner().unwrap();
        finished.sort_unstable();
        let expected: Vec<_> = [0, 24, 48]
            .into_iter()
            .flat_map(|row| [9, 59, 109].map(|column| (row, column)))
            .collect();
        assert_eq!(finished, expected);
    }
}
