//! A matrix product whose left operand is a layer's weights, packed once at load into panels
//! of [`PANEL_ROWS`] rows: `out[r, 0..n] = Σ_i a[r, i] · b[i, 0..n]`, with `b` and `out` read
//! and written in place at any row stride.
//!
//! The Winograd products use it instead of the `gemm` crate, which packs its left operand again
//! on every call: for the decoder's deep layers, 8 to 64 tiles wide, that packing was the
//! time (a 512 x 512 matrix per tile position read, written and read again to multiply 8
//! columns). Packed once, each panel streams through a call exactly once whatever `n` is.
//!
//! The microkernel keeps a block of `out` in registers, 8 rows x 48 columns on AVX-512 (24 of
//! its 32 registers), 6 rows x 16 columns on AVX2 (12 of 16; at 4 x 24 the compiler spilled an
//! accumulator, and that one's chain through memory set the pace; 8 x 8 and 4 x 16 ran no
//! faster than the `gemm` crate): per step along the depth it loads one row segment of `b` and
//! broadcasts each row's weight from the panel, where the weights sit next to each other.
//! Panels of 24 rows serve both: three passes of 8 rows, four of 6.

use super::simd::Isa;

/// Rows of the left operand interleaved in one panel (`[depth, PANEL_ROWS]`).
pub(crate) const PANEL_ROWS: usize = 24;

/// Values past column `n` that a product may read from each row of `b` and write to each row
/// of `out`: the microkernel loads and stores whole vectors. They must be inside the buffers;
/// what is written there is not the product's.
pub(crate) const SLACK: usize = 16;

/// Where `a[row, step]` of a `[rows, depth]` matrix goes in its panels.
pub(crate) fn panel_index(row: usize, step: usize, depth: usize) -> usize {
    (row / PANEL_ROWS * depth + step) * PANEL_ROWS + row % PANEL_ROWS
}

/// Values in the panels of a `[rows, depth]` matrix (the last panel padded with zero rows).
pub(crate) fn panels_len(rows: usize, depth: usize) -> usize {
    rows.next_multiple_of(PANEL_ROWS) * depth
}

/// One panel times `b`: the arguments of one call.
pub(crate) struct PanelProduct<'a> {
    /// `[depth, PANEL_ROWS]`.
    pub panel: &'a [f32],
    /// The rows of the panel to write (the last panel of a matrix may hold fewer).
    pub rows: usize,
    /// `[depth, n]` at row stride `b_stride`.
    pub b: *const f32,
    pub b_stride: usize,
    /// `[rows, n]` at row stride `out_stride`.
    pub out: *mut f32,
    pub out_stride: usize,
    pub n: usize,
}

impl PanelProduct<'_> {
    /// Writes the product.
    ///
    /// # Safety
    /// `b` must be readable for `depth` rows of `n + SLACK` values at `b_stride`, and `out`
    /// writable for `rows` rows of `n + SLACK` values at `out_stride`, which no other thread
    /// touches during the call.
    pub(crate) unsafe fn run(&self) {
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
            let mut sums = [[0.0_f64; COLUMNS]; PANEL_ROWS];
            for (step, weights) in self.panel.chunks_exact(PANEL_ROWS).enumerate() {
                // SAFETY: column + 4 <= n + SLACK values of row `step` (the contract).
                let b = unsafe {
                    std::slice::from_raw_parts(self.b.add(step * self.b_stride + column), COLUMNS)
                };
                for (sums, &weight) in sums.iter_mut().zip(weights) {
                    for (sum, &value) in sums.iter_mut().zip(b) {
                        *sum += f64::from(weight) * f64::from(value);
                    }
                }
            }
            for (row, sums) in sums.iter().enumerate().take(self.rows) {
                for (j, &sum) in sums.iter().enumerate() {
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
/// vectors of columns by `$pass` rows (the panel's rows in `PANEL_ROWS / $pass` passes), and
/// single-vector blocks for the last columns.
#[cfg(target_arch = "x86_64")]
macro_rules! microkernel {
    ($path:ident, $features:literal, $lanes:literal, $wide:literal, $pass:literal,
     $zero:ident, $load:ident, $store:ident, $splat:ident, $fma:ident) => {
        mod $path {
            use std::arch::x86_64::{$fma, $load, $splat, $store, $zero};

            use super::{PANEL_ROWS, PanelProduct, SLACK};

            /// # Safety
            /// The CPU has `$features`; the rest is [`PanelProduct::run`]'s contract.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn multiply(product: &PanelProduct) {
                let mut column = 0;
                while column < product.n {
                    // A wide block may end past `n`, never past `n + SLACK`.
                    let width = if product.n - column + SLACK >= $wide * $lanes {
                        $wide
                    } else {
                        1
                    };
                    for first in (0..product.rows).step_by($pass) {
                        // SAFETY: the caller's contract; the block ends by `n + SLACK`.
                        unsafe {
                            if width == $wide {
                                block::<$wide>(product, column, first)
                            } else {
                                block::<1>(product, column, first)
                            }
                        }
                    }
                    column += width * $lanes;
                }
            }

            /// Rows `first..first + $pass` (those below `rows`) by `V` vectors of columns
            /// from `column`.
            ///
            /// # Safety
            /// As [`multiply`], with `column + V * $lanes <= n + SLACK`.
            #[target_feature(enable = $features)]
            unsafe fn block<const V: usize>(product: &PanelProduct, column: usize, first: usize) {
                let mut sums = [[$zero(); V]; $pass];
                for (step, weights) in product.panel.chunks_exact(PANEL_ROWS).enumerate() {
                    // SAFETY: inside row `step` of `b` (the contract).
                    let row = unsafe { product.b.add(step * product.b_stride + column) };
                    let mut b = [$zero(); V];
                    for (j, b) in b.iter_mut().enumerate() {
                        // SAFETY: as above.
                        *b = unsafe { $load(row.add(j * $lanes)) };
                    }
                    for (sums, &weight) in sums.iter_mut().zip(&weights[first..first + $pass]) {
                        let weight = $splat(weight);
                        for (sum, &b) in sums.iter_mut().zip(&b) {
                            *sum = $fma(b, weight, *sum);
                        }
                    }
                }
                let rows = (product.rows - first).min($pass);
                for (r, sums) in sums.iter().enumerate().take(rows) {
                    // SAFETY: row `first + r` of `out`, inside its `n + SLACK` (the contract).
                    let out = unsafe { product.out.add((first + r) * product.out_stride + column) };
                    for (j, &sum) in sums.iter().enumerate() {
                        // SAFETY: as above.
                        unsafe { $store(out.add(j * $lanes), sum) };
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
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_set1_ps,
    _mm512_fmadd_ps
);

#[cfg(target_arch = "x86_64")]
microkernel!(
    avx2,
    "avx2,fma",
    8,
    2,
    6,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_set1_ps,
    _mm256_fmadd_ps
);

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shape of edge: rows short of a panel, widths around each path's blocks, a
    /// depth of one; against a double-precision product, on every path the CPU has.
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
                let a: Vec<f32> = (0..rows * depth)
                    .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 2.0)
                    .collect();
                let mut panel = vec![0.0; panels_len(rows, depth)];
                for row in 0..rows {
                    for step in 0..depth {
                        panel[panel_index(row, step, depth)] = a[row * depth + step];
                    }
                }
                let b_stride = n + SLACK + 3;
                let b: Vec<f32> = (0..depth * b_stride)
                    .map(|i| ((i as f32 * 0.414_214).fract() - 0.5) * 2.0)
                    .collect();
                let out_stride = n + SLACK + 5;
                let mut out = vec![f32::NAN; rows * out_stride];
                let product = PanelProduct {
                    panel: &panel,
                    rows,
                    b: b.as_ptr(),
                    b_stride,
                    out: out.as_mut_ptr(),
                    out_stride,
                    n,
                };
                // SAFETY: `b` and `out` hold their rows with more than SLACK values to spare.
                unsafe { product.run_on(isa) };
                for row in 0..rows {
                    for column in 0..n {
                        let expected: f64 = (0..depth)
                            .map(|i| {
                                f64::from(a[row * depth + i]) * f64::from(b[i * b_stride + column])
                            })
                            .sum();
                        let got = out[row * out_stride + column];
                        assert!(
                            (f64::from(got) - expected).abs() <= 1e-5 * depth as f64,
                            "{isa:?} rows {rows} depth {depth} n {n} at ({row}, {column}): \
                             {got} against {expected}"
                        );
                    }
                }
            }
        }
    }
}
