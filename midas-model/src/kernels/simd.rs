//! Code vectorised for the CPU the process runs on: [`vectorised`], which every kernel's hot
//! loops run through, and the row-wise maths DPT-Hybrid needs (GELU, softmax, LayerNorm, the
//! GroupNorm statistics) and upsampling's indexed blends ([`RowTaps`]).
//!
//! The crate is built for the x86-64 baseline (SSE2), so a plain loop would use 4 lanes
//! wherever it runs. [`vectorised`] compiles the closure it is given up to three times, for
//! AVX-512, for AVX2 + FMA and for the baseline, and runs the widest the CPU has ([`Isa`],
//! detected once). The compiler vectorises each copy itself; only the indexed loads of
//! [`RowTaps`], which it does not vectorise, are written with AVX2 intrinsics. The
//! transcendental functions are polynomials (libm's scalar `erf` and `exp` were 8 % of a
//! DPT-Hybrid forward), written branch-free so that they vectorise:
//! - `erf`: the rational minimax approximation Eigen and XLA use for float32 (inputs clamped to
//!   ±4, where erf is ±1 in float32), within 5e-7 of the exact value;
//! - `exp`: Cephes' `expf` (range reduction by `ln 2` in two parts, a degree-6 polynomial, the
//!   power of two built in the exponent bits), within 2 ulp.

use std::sync::OnceLock;

/// The widest instruction set this process runs its vectorised loops with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F (16 lanes); only in builds with the `avx512` feature.
    Avx512,
    /// AVX2 with FMA (8 lanes).
    Avx2,
    /// Whatever the build targets (SSE2 on x86-64).
    Baseline,
}

impl Isa {
    /// What this CPU offers, detected once, capped by the `MIDAS_SIMD` environment variable
    /// when it names a narrower path (`avx2` or `baseline`: to compare the paths, or to test
    /// the narrower ones on a wider CPU).
    pub fn detected() -> Self {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let widest = Self::widest();
            match std::env::var("MIDAS_SIMD").as_deref() {
                Ok("baseline") => Isa::Baseline,
                Ok("avx2") if widest == Isa::Avx512 => Isa::Avx2,
                _ => widest,
            }
        })
    }

    /// The widest path this CPU and build support.
    fn widest() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            #[cfg(feature = "avx512")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2;
            }
        }
        Isa::Baseline
    }

    /// Whether this CPU (and build) can run the path: it is the widest one or narrower.
    fn runs_here(self) -> bool {
        match (self, Self::widest()) {
            (Isa::Baseline, _) | (_, Isa::Avx512) => true,
            (Isa::Avx2, widest) => widest == Isa::Avx2,
            (Isa::Avx512, _) => false,
        }
    }

    /// Every path this machine can run, the baseline first.
    #[cfg(test)]
    pub(crate) fn supported() -> Vec<Isa> {
        [Isa::Baseline, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|isa| isa.runs_here())
            .collect()
    }

    /// The name used in logs and benchmark reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Avx512 => "avx512",
            Self::Avx2 => "avx2",
            Self::Baseline => "baseline",
        }
    }
}

/// Runs `work` compiled for the widest instruction set the CPU has: the closure, and all it
/// inlines, is vectorised for it. Mark the closure `#[inline(always)]`, as its callees.
#[inline(always)]
pub fn vectorised<R>(work: impl FnOnce() -> R) -> R {
    vectorised_on(Isa::detected(), work)
}

/// [`vectorised`] on a chosen path: tests run every path the machine supports. A path the CPU
/// lacks is refused here, so the `unsafe` calls below hold whatever a caller passes.
#[inline(always)]
fn vectorised_on<R>(isa: Isa, work: impl FnOnce() -> R) -> R {
    assert!(
        isa.runs_here(),
        "the {} path needs instructions this CPU lacks",
        isa.name()
    );
    match isa {
        #[cfg(all(target_arch = "x86_64", feature = "avx512"))]
        Isa::Avx512 => {
            #[target_feature(enable = "avx512f,avx2,fma")]
            unsafe fn wide<R>(work: impl FnOnce() -> R) -> R {
                work()
            }
            // SAFETY: `runs_here` (asserted above) found AVX-512F.
            unsafe { wide(work) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn wide<R>(work: impl FnOnce() -> R) -> R {
                work()
            }
            // SAFETY: `runs_here` (asserted above) found AVX2 and FMA.
            unsafe { wide(work) }
        }
        _ => work(),
    }
}

/// Lanes of the accumulators in reductions: enough for one AVX-512 register, or two AVX2 ones.
const LANES: usize = 16;

/// `erf(x)` in float32 (see the module's notes).
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = if x > 4.0 { 4.0 } else { x };
    let x = if x < -4.0 { -4.0 } else { x };
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 + -2.101_024e-6;
    p = p * x2 + -5.692_506_4e-5;
    p = p * x2 + -7.349_906_3e-4;
    p = p * x2 + -2.954_600_1e-3;
    p = p * x2 + -1.609_603_3e-2;
    let mut q = -1.456_607_2e-5_f32;
    q = q * x2 + -2.133_740_6e-4;
    q = q * x2 + -1.682_827e-3;
    q = q * x2 + -7.373_329e-3;
    q = q * x2 + -1.426_473_9e-2;
    x * p / q
}

/// The exact (erf) GELU, `x/2 * (1 + erf(x/√2))`, as PyTorch's `nn.GELU()`.
#[inline(always)]
fn gelu_of(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `exp(x)` in float32 (see the module's notes); inputs below -87.3 give about 1e-38.
#[inline(always)]
fn exp(x: f32) -> f32 {
    /// 1.5 * 2^23: adding it rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = if x > 88.0 { 88.0 } else { x };
    let x = if x < -87.3 { -87.3 } else { x };
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let power = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((power + 127) << 23) as u32)
}

#[inline(always)]
fn bias_gelu_body(rows: &mut [f32], bias: &[f32]) {
    for row in rows.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v = gelu_of(*v + b);
        }
    }
}

/// `v = gelu(v + bias[column])` over rows as long as `bias`.
pub fn bias_gelu(rows: &mut [f32], bias: &[f32]) {
    bias_gelu_on(Isa::detected(), rows, bias);
}

fn bias_gelu_on(isa: Isa, rows: &mut [f32], bias: &[f32]) {
    assert!(!bias.is_empty() && rows.len().is_multiple_of(bias.len()));
    vectorised_on(
        isa,
        #[inline(always)]
        || bias_gelu_body(rows, bias),
    )
}

#[inline(always)]
fn add_bias_body(rows: &mut [f32], bias: &[f32]) {
    for row in rows.chunks_exact_mut(bias.len()) {
        row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
    }
}

/// `v += bias[column]` over rows as long as `bias`.
pub fn add_bias(rows: &mut [f32], bias: &[f32]) {
    add_bias_on(Isa::detected(), rows, bias);
}

fn add_bias_on(isa: Isa, rows: &mut [f32], bias: &[f32]) {
    assert!(!bias.is_empty() && rows.len().is_multiple_of(bias.len()));
    vectorised_on(
        isa,
        #[inline(always)]
        || add_bias_body(rows, bias),
    )
}

/// The largest value, over lanes so that it vectorises (`-inf` for an empty row).
#[inline(always)]
fn max_of(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (m, v) in lanes.iter_mut().zip(chunk) {
            *m = if *v > *m { *v } else { *m };
        }
    }
    let mut max = tail.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for m in lanes {
        max = max.max(m);
    }
    max
}

#[inline(always)]
fn softmax_body(rows: &mut [f32], width: usize) {
    for row in rows.chunks_exact_mut(width) {
        let max = max_of(row);
        let mut lanes = [0.0_f32; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for chunk in &mut chunks {
            for (sum, v) in lanes.iter_mut().zip(chunk) {
                *v = exp(*v - max);
                *sum += *v;
            }
        }
        let mut sum = 0.0;
        for v in chunks.into_remainder() {
            *v = exp(*v - max);
            sum += *v;
        }
        let scale = 1.0 / (sum + lanes.iter().sum::<f32>());
        row.iter_mut().for_each(|v| *v *= scale);
    }
}

/// Softmax over each row of `width` values, in place.
pub fn softmax(rows: &mut [f32], width: usize) {
    softmax_on(Isa::detected(), rows, width);
}

fn softmax_on(isa: Isa, rows: &mut [f32], width: usize) {
    assert!(width > 0 && rows.len().is_multiple_of(width));
    vectorised_on(
        isa,
        #[inline(always)]
        || softmax_body(rows, width),
    )
}

/// The sum, over lanes so that it vectorises.
#[inline(always)]
fn sum_of(row: &[f32], term: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0.0_f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|&v| term(v)).sum();
    for chunk in chunks {
        for (sum, &v) in lanes.iter_mut().zip(chunk) {
            *sum += term(v);
        }
    }
    tail + lanes.iter().sum::<f32>()
}

#[inline(always)]
fn layer_norm_body(input: &[f32], output: &mut [f32], gamma: &[f32], beta: &[f32], epsilon: f32) {
    let width = gamma.len();
    for (row, out) in input
        .chunks_exact(width)
        .zip(output.chunks_exact_mut(width))
    {
        let mean = sum_of(row, |v| v) / width as f32;
        let variance = sum_of(row, |v| (v - mean) * (v - mean)) / width as f32;
        let scale = 1.0 / (variance + epsilon).sqrt();
        for (((o, &v), &g), &b) in out.iter_mut().zip(row).zip(gamma).zip(beta) {
            *o = (v - mean) * scale * g + b;
        }
    }
}

/// LayerNorm over rows as long as `gamma`: `(x - mean) / sqrt(var + epsilon) * gamma + beta`
/// with the biased variance, as PyTorch's.
pub fn layer_norm(input: &[f32], output: &mut [f32], gamma: &[f32], beta: &[f32], epsilon: f32) {
    layer_norm_on(Isa::detected(), input, output, gamma, beta, epsilon);
}

fn layer_norm_on(
    isa: Isa,
    input: &[f32],
    output: &mut [f32],
    gamma: &[f32],
    beta: &[f32],
    epsilon: f32,
) {
    let width = gamma.len();
    assert!(width > 0 && beta.len() == width && input.len().is_multiple_of(width));
    assert_eq!(input.len(), output.len());
    vectorised_on(
        isa,
        #[inline(always)]
        || layer_norm_body(input, output, gamma, beta, epsilon),
    )
}

/// Values summed in float32 lanes before the total moves to double precision: short enough
/// that float32 loses nothing that matters even far from zero, long enough to vectorise.
const BLOCK: usize = 16 * LANES;

/// A sum in double precision of float32 block sums.
#[inline(always)]
fn block_sum(values: &[f32], term: impl Fn(f32) -> f32 + Copy) -> f64 {
    values
        .chunks(BLOCK)
        .map(|block| f64::from(sum_of(block, term)))
        .sum()
}

#[inline(always)]
fn sums_body(values: &[f32], out: &mut [f64; 2]) {
    // Two passes (the mean, then squares about it): one pass of sums of squares cancels
    // catastrophically when the mean is large against the spread. The squares are taken about
    // the mean rounded to float32 and corrected to the exact mean.
    let count = values.len() as f64;
    let mean = block_sum(values, |v| v) / count;
    let centre = mean as f32;
    let squares = block_sum(values, |v| (v - centre) * (v - centre));
    let offset = mean - f64::from(centre);
    *out = [mean, squares - count * offset * offset];
}

/// The mean of `values` and the sum of squared deviations from it (one plane's share of a
/// GroupNorm's statistics; planes are combined in double precision by the caller).
pub fn mean_and_squares(values: &[f32]) -> (f64, f64) {
    mean_and_squares_on(Isa::detected(), values)
}

fn mean_and_squares_on(isa: Isa, values: &[f32]) -> (f64, f64) {
    assert!(!values.is_empty());
    let out = &mut [0.0; 2];
    vectorised_on(
        isa,
        #[inline(always)]
        || sums_body(values, out),
    );
    (out[0], out[1])
}

#[inline(always)]
fn affine_body(values: &mut [f32], scale: f32, shift: f32, residual: &[f32], relu: bool) {
    let finish = |v: f32| if relu && v < 0.0 { 0.0 } else { v };
    if residual.is_empty() {
        values
            .iter_mut()
            .for_each(|v| *v = finish(*v * scale + shift));
    } else {
        for (v, r) in values.iter_mut().zip(residual) {
            *v = finish(*v * scale + shift + r);
        }
    }
}

/// `v = v * scale + shift (+ residual)`, then ReLU if asked: a normalisation's last pass with
/// what follows it in the network. `residual` is empty or as long as `values`.
pub fn affine(values: &mut [f32], scale: f32, shift: f32, residual: &[f32], relu: bool) {
    affine_on(Isa::detected(), values, scale, shift, residual, relu);
}

fn affine_on(isa: Isa, values: &mut [f32], scale: f32, shift: f32, residual: &[f32], relu: bool) {
    assert!(residual.is_empty() || residual.len() == values.len());
    vectorised_on(
        isa,
        #[inline(always)]
        || affine_body(values, scale, shift, residual, relu),
    )
}

/// Source positions and weights of a linear interpolation along a row: output `x` blends
/// `source[first[x]]` and `source[first[x] + 1]`, the second by `weight[x]`. Built once per
/// resize; the check that every position is inside the source is made here, not per row.
#[derive(Clone, Debug)]
pub struct RowTaps {
    first: Vec<i32>,
    weight: Vec<f32>,
    /// The source length the positions need: the largest `first` plus 2.
    source_len: usize,
}

impl RowTaps {
    /// Taps from `(first, weight)` pairs.
    pub fn new(taps: impl IntoIterator<Item = (usize, f32)>) -> Self {
        let (first, weight): (Vec<usize>, Vec<f32>) = taps.into_iter().unzip();
        let source_len = first.iter().max().map_or(0, |&max| max + 2);
        let first = first
            .into_iter()
            .map(|f| i32::try_from(f).expect("row positions fit in 32 bits"))
            .collect();
        Self {
            first,
            weight,
            source_len,
        }
    }

    /// `out[x] = a + weight[x] * (b - a)` with `a, b = source[first[x]], source[first[x] + 1]`.
    pub fn apply(&self, source: &[f32], out: &mut [f32]) {
        assert!(
            source.len() >= self.source_len,
            "the source row is too short"
        );
        assert_eq!(out.len(), self.first.len(), "one output per tap");
        match Isa::detected() {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 | Isa::Avx2 => {
                // SAFETY: AVX2 was detected; every position + 1 is inside `source` (checked).
                unsafe { self.apply_avx2(source, out) }
            }
            _ => self.apply_from(0, source, out),
        }
    }

    /// The scalar loop from output `start` on.
    #[inline(always)]
    fn apply_from(&self, start: usize, source: &[f32], out: &mut [f32]) {
        for ((value, &first), &t) in out[start..]
            .iter_mut()
            .zip(&self.first[start..])
            .zip(&self.weight[start..])
        {
            let (a, b) = (source[first as usize], source[first as usize + 1]);
            *value = a + t * (b - a);
        }
    }

    /// Eight outputs per step through AVX2's gather (the compiler does not vectorise the
    /// indexed loads itself); the same arithmetic as the scalar loop, so the same values.
    ///
    /// # Safety
    /// AVX2 must be present, and `source` at least `source_len` long.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn apply_avx2(&self, source: &[f32], out: &mut [f32]) {
        use std::arch::x86_64::{
            __m256i, _mm256_add_ps, _mm256_i32gather_ps, _mm256_loadu_ps, _mm256_loadu_si256,
            _mm256_mul_ps, _mm256_storeu_ps, _mm256_sub_ps,
        };
        const STEP: usize = 8;
        let whole = out.len() / STEP * STEP;
        for x in (0..whole).step_by(STEP) {
            // SAFETY: x + 8 <= out.len() = first.len() = weight.len(); the gathered positions
            // and the ones after them are inside `source` (the caller's contract).
            unsafe {
                let first = _mm256_loadu_si256(self.first.as_ptr().add(x).cast::<__m256i>());
                let a = _mm256_i32gather_ps::<4>(source.as_ptr(), first);
                let b = _mm256_i32gather_ps::<4>(source.as_ptr().add(1), first);
                let t = _mm256_loadu_ps(self.weight.as_ptr().add(x));
                let value = _mm256_add_ps(a, _mm256_mul_ps(t, _mm256_sub_ps(b, a)));
                _mm256_storeu_ps(out.as_mut_ptr().add(x), value);
            }
        }
        self.apply_from(whole, source, out);
    }
}

/// Transposes an 8x8 block: `out[c * out_stride + r] = rows[r][c]` for `r, c` in `0..8`,
/// by AVX2's shuffles where the CPU has them (the compiler turns the same loop into gathers or
/// one value at a time).
///
/// # Safety
/// Each `rows[r]` must be readable for 8 values, `out` writable at every index above, and no
/// other thread may touch those values during the call.
#[inline(always)]
pub(crate) unsafe fn transpose8(rows: [*const f32; 8], out: *mut f32, out_stride: usize) {
    match Isa::detected() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 was detected; the rest is the caller's contract.
        Isa::Avx512 | Isa::Avx2 => unsafe { transpose8_avx2(rows, out, out_stride) },
        _ => {
            for (r, row) in rows.into_iter().enumerate() {
                for c in 0..8 {
                    // SAFETY: the caller's contract.
                    unsafe { out.add(c * out_stride + r).write(row.add(c).read()) };
                }
            }
        }
    }
}

/// [`transpose8`] on AVX2: pairs of rows interleaved, then pairs of pairs, then the 128-bit
/// halves exchanged.
///
/// # Safety
/// AVX2 must be present; the rest is [`transpose8`]'s contract.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose8_avx2(rows: [*const f32; 8], out: *mut f32, out_stride: usize) {
    use std::arch::x86_64::{
        _mm256_loadu_ps, _mm256_permute2f128_ps, _mm256_shuffle_ps, _mm256_storeu_ps,
        _mm256_unpackhi_ps, _mm256_unpacklo_ps,
    };
    // SAFETY: the caller's contract: 8 values readable from each row, the outputs writable.
    unsafe {
        let r = rows.map(|row| _mm256_loadu_ps(row));
        let t = [
            _mm256_unpacklo_ps(r[0], r[1]),
            _mm256_unpackhi_ps(r[0], r[1]),
            _mm256_unpacklo_ps(r[2], r[3]),
            _mm256_unpackhi_ps(r[2], r[3]),
            _mm256_unpacklo_ps(r[4], r[5]),
            _mm256_unpackhi_ps(r[4], r[5]),
            _mm256_unpacklo_ps(r[6], r[7]),
            _mm256_unpackhi_ps(r[6], r[7]),
        ];
        let u = [
            _mm256_shuffle_ps::<0x44>(t[0], t[2]),
            _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
            _mm256_shuffle_ps::<0x44>(t[1], t[3]),
            _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
            _mm256_shuffle_ps::<0x44>(t[4], t[6]),
            _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
            _mm256_shuffle_ps::<0x44>(t[5], t[7]),
            _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
        ];
        for c in 0..4 {
            _mm256_storeu_ps(
                out.add(c * out_stride),
                _mm256_permute2f128_ps::<0x20>(u[c], u[c + 4]),
            );
            _mm256_storeu_ps(
                out.add((c + 4) * out_stride),
                _mm256_permute2f128_ps::<0x31>(u[c], u[c + 4]),
            );
        }
    }
}

/// Splits groups of `M` values into their `M` phases: `lanes[k][i] = groups[i][k]` for every
/// `i` below the lanes' common length (at most `groups.len()`). Winograd's transforms read
/// each row of a map this way (tiles start every m columns); the compiler leaves the loop
/// one value at a time, so pairs and fours go by AVX2 shuffles, eight groups a step.
#[inline(always)]
pub(crate) fn deinterleave<const M: usize>(groups: &[[f32; M]], lanes: [&mut [f32]; M]) {
    let len = lanes[0].len();
    assert!(lanes.iter().all(|lane| lane.len() == len) && len <= groups.len());
    let mut lanes = lanes.map(|lane| lane.as_mut_ptr());
    let done = shuffled::<M>(len);
    #[cfg(target_arch = "x86_64")]
    if done > 0 {
        // SAFETY: AVX2 was detected; `done <= len` values of each lane and `done` groups
        // are in bounds (asserted above).
        unsafe { deinterleave_avx2::<M>(groups.as_ptr().cast(), lanes, done) };
    }
    for (i, group) in groups.iter().enumerate().take(len).skip(done) {
        for (lane, value) in lanes.iter_mut().zip(group) {
            // SAFETY: `i < len`, each lane's length.
            unsafe { lane.add(i).write(*value) };
        }
    }
}

/// Joins `M` phases into groups of `M` values, the inverse of [`deinterleave`]:
/// `groups[i][k] = lanes[k][i]` for every `i` below the lanes' common length.
#[inline(always)]
pub(crate) fn interleave<const M: usize>(lanes: [&[f32]; M], groups: &mut [[f32; M]]) {
    let len = lanes[0].len();
    assert!(lanes.iter().all(|lane| lane.len() == len) && len <= groups.len());
    let done = shuffled::<M>(len);
    #[cfg(target_arch = "x86_64")]
    if done > 0 {
        // SAFETY: as in `deinterleave`.
        unsafe {
            interleave_avx2::<M>(
                lanes.map(|lane| lane.as_ptr()),
                groups.as_mut_ptr().cast(),
                done,
            )
        };
    }
    for (i, group) in groups.iter_mut().enumerate().take(len).skip(done) {
        for (value, lane) in group.iter_mut().zip(&lanes) {
            *value = lane[i];
        }
    }
}

/// How many of `len` groups of `M` [`deinterleave`] and [`interleave`] move by AVX2 shuffles
/// (whole steps of eight, for pairs and fours on a vector path); the rest go one by one.
fn shuffled<const M: usize>(len: usize) -> usize {
    let shuffles = cfg!(target_arch = "x86_64") && Isa::detected() != Isa::Baseline;
    if shuffles && (M == 2 || M == 4) {
        len / 8 * 8
    } else {
        0
    }
}

/// [`deinterleave`]'s first `len` (a multiple of 8) groups on AVX2: the eight groups' 128-bit
/// halves regrouped so that each 128-bit lane holds four groups' pairs or fours, then one
/// shuffle per phase (and, for fours, an in-lane 4x4 transpose first).
///
/// # Safety
/// AVX2 must be present; `groups` readable for `len * M` values, each lane writable for `len`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn deinterleave_avx2<const M: usize>(groups: *const f32, lanes: [*mut f32; M], len: usize) {
    use std::arch::x86_64::{
        _mm256_loadu_ps, _mm256_permute2f128_ps, _mm256_shuffle_ps, _mm256_storeu_ps,
        _mm256_unpackhi_ps, _mm256_unpacklo_ps,
    };
    // SAFETY: the caller's contract; step `i` reads groups `i..i + 8` and writes lane values
    // `i..i + 8`.
    unsafe {
        for i in (0..len).step_by(8) {
            let from = groups.add(i * M);
            if M == 4 {
                // Vectors of two groups each: [g0|g1], [g2|g3], [g4|g5], [g6|g7].
                let [a, b, c, d] = std::array::from_fn(|v| _mm256_loadu_ps(from.add(8 * v)));
                // [g0|g4], [g1|g5], [g2|g6], [g3|g7].
                let v0 = _mm256_permute2f128_ps::<0x20>(a, c);
                let v1 = _mm256_permute2f128_ps::<0x31>(a, c);
                let v2 = _mm256_permute2f128_ps::<0x20>(b, d);
                let v3 = _mm256_permute2f128_ps::<0x31>(b, d);
                let (t0, t1) = (_mm256_unpacklo_ps(v0, v1), _mm256_unpackhi_ps(v0, v1));
                let (t2, t3) = (_mm256_unpacklo_ps(v2, v3), _mm256_unpackhi_ps(v2, v3));
                _mm256_storeu_ps(lanes[0].add(i), _mm256_shuffle_ps::<0x44>(t0, t2));
                _mm256_storeu_ps(lanes[1].add(i), _mm256_shuffle_ps::<0xEE>(t0, t2));
                _mm256_storeu_ps(lanes[2].add(i), _mm256_shuffle_ps::<0x44>(t1, t3));
                _mm256_storeu_ps(lanes[3].add(i), _mm256_shuffle_ps::<0xEE>(t1, t3));
            } else {
                // [g0 g1|g2 g3], [g4 g5|g6 g7] to [g0 g1|g4 g5], [g2 g3|g6 g7].
                let (a, b) = (_mm256_loadu_ps(from), _mm256_loadu_ps(from.add(8)));
                let v0 = _mm256_permute2f128_ps::<0x20>(a, b);
                let v1 = _mm256_permute2f128_ps::<0x31>(a, b);
                _mm256_storeu_ps(lanes[0].add(i), _mm256_shuffle_ps::<0x88>(v0, v1));
                _mm256_storeu_ps(lanes[1].add(i), _mm256_shuffle_ps::<0xDD>(v0, v1));
            }
        }
    }
}

/// [`interleave`]'s first `len` (a multiple of 8) groups on AVX2: [`deinterleave_avx2`]'s
/// steps in reverse.
///
/// # Safety
/// AVX2 must be present; each lane readable for `len` values, `groups` writable for `len * M`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn interleave_avx2<const M: usize>(lanes: [*const f32; M], groups: *mut f32, len: usize) {
    use std::arch::x86_64::{
        _mm256_loadu_ps, _mm256_permute2f128_ps, _mm256_shuffle_ps, _mm256_storeu_ps,
        _mm256_unpackhi_ps, _mm256_unpacklo_ps,
    };
    // SAFETY: the caller's contract; step `i` reads lane values `i..i + 8` and writes groups
    // `i..i + 8`.
    unsafe {
        for i in (0..len).step_by(8) {
            let to = groups.add(i * M);
            let p: [_; M] = std::array::from_fn(|k| _mm256_loadu_ps(lanes[k].add(i)));
            if M == 4 {
                let (s0, s1) = (
                    _mm256_unpacklo_ps(p[0], p[1]),
                    _mm256_unpackhi_ps(p[0], p[1]),
                );
                let (s2, s3) = (
                    _mm256_unpacklo_ps(p[2], p[3]),
                    _mm256_unpackhi_ps(p[2], p[3]),
                );
                // [g0|g4], [g1|g5], [g2|g6], [g3|g7].
                let v0 = _mm256_shuffle_ps::<0x44>(s0, s2);
                let v1 = _mm256_shuffle_ps::<0xEE>(s0, s2);
                let v2 = _mm256_shuffle_ps::<0x44>(s1, s3);
                let v3 = _mm256_shuffle_ps::<0xEE>(s1, s3);
                _mm256_storeu_ps(to, _mm256_permute2f128_ps::<0x20>(v0, v1));
                _mm256_storeu_ps(to.add(8), _mm256_permute2f128_ps::<0x20>(v2, v3));
                _mm256_storeu_ps(to.add(16), _mm256_permute2f128_ps::<0x31>(v0, v1));
                _mm256_storeu_ps(to.add(24), _mm256_permute2f128_ps::<0x31>(v2, v3));
            } else {
                // [g0 g1|g4 g5], [g2 g3|g6 g7].
                let (s0, s1) = (
                    _mm256_unpacklo_ps(p[0], p[1]),
                    _mm256_unpackhi_ps(p[0], p[1]),
                );
                _mm256_storeu_ps(to, _mm256_permute2f128_ps::<0x20>(s0, s1));
                _mm256_storeu_ps(to.add(8), _mm256_permute2f128_ps::<0x31>(s0, s1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_split_and_join_on_every_path() {
        fn check<const M: usize>(isa: Isa, len: usize) {
            let groups: Vec<[f32; M]> = (0..len + 3)
                .map(|i| std::array::from_fn(|k| (i * M + k) as f32))
                .collect();
            let mut lanes = vec![f32::NAN; M * len];
            let mut joined = vec![[f32::NAN; M]; len + 3];
            vectorised_on(isa, || {
                let mut chunks = lanes.chunks_exact_mut(len);
                let split: [&mut [f32]; M] =
                    std::array::from_fn(|_| &mut chunks.next().expect("M lanes")[..len]);
                deinterleave(&groups, split);
            });
            for k in 0..M {
                for i in 0..len {
                    assert_eq!(
                        lanes[k * len + i],
                        groups[i][k],
                        "{isa:?} M={M} {len} {k} {i}"
                    );
                }
            }
            vectorised_on(isa, || {
                let mut chunks = lanes.chunks_exact(len);
                let split: [&[f32]; M] =
                    std::array::from_fn(|_| &chunks.next().expect("M lanes")[..len]);
                interleave(split, &mut joined);
            });
            assert_eq!(&joined[..len], &groups[..len], "{isa:?} M={M} {len}");
            assert!(
                joined[len..].iter().flatten().all(|v| v.is_nan()),
                "past the lanes"
            );
        }
        for isa in Isa::supported() {
            for len in [1, 7, 8, 9, 16, 23, 40] {
                check::<2>(isa, len);
                check::<4>(isa, len);
                check::<3>(isa, len);
            }
        }
    }

    #[test]
    fn transpose8_transposes_on_every_path() {
        let input: Vec<f32> = (0..8 * 11).map(|i| i as f32).collect();
        for isa in Isa::supported() {
            let mut out = vec![f32::NAN; 8 * 13];
            vectorised_on(isa, || {
                let rows = std::array::from_fn(|r| input[r * 11 + 2..].as_ptr());
                // SAFETY: rows of 11 read from column 2 for 8; out has 8 rows of 13.
                unsafe { transpose8(rows, out.as_mut_ptr().add(1), 13) };
            });
            for r in 0..8 {
                for c in 0..8 {
                    assert_eq!(
                        out[c * 13 + 1 + r],
                        input[r * 11 + 2 + c],
                        "{isa:?} {r} {c}"
                    );
                }
            }
        }
    }

    /// Odd lengths, so that the tails after the full vectors run too.
    fn values(len: usize, spread: f32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 2.0 * spread)
            .collect()
    }

    #[test]
    fn erf_and_exp_stay_close_to_the_exact_values() {
        for i in -100_000..=100_000 {
            let x = i as f32 * 1e-4 * 6.0;
            let exact = libm_erf(f64::from(x));
            assert!((f64::from(erf(x)) - exact).abs() < 5e-7, "erf({x})");
            let x = i as f32 * 8.7e-4;
            let exact = f64::from(x).exp();
            let got = f64::from(exp(x));
            assert!(
                (got - exact).abs() <= 3e-7 * exact,
                "exp({x}) = {got}, not {exact}"
            );
        }
        assert!(exp(-1e4) >= 0.0 && exp(-1e4) < 1e-37);
    }

    /// erf in double precision (Abramowitz–Stegun 7.1.26 is too coarse; this is the series
    /// near 0 and the continued fraction's complement beyond, both to ~1e-15).
    fn libm_erf(x: f64) -> f64 {
        if x.abs() < 2.5 {
            let mut sum = 0.0;
            let mut term = x;
            let mut n = 0.0;
            while term.abs() > 1e-17 {
                sum += term / (2.0 * n + 1.0);
                n += 1.0;
                term *= -x * x / n;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            let t = x.abs();
            let mut fraction = 0.0;
            for k in (1..200).rev() {
                fraction = f64::from(k) / 2.0 / (t + fraction);
            }
            let complement = (-t * t).exp() / std::f64::consts::PI.sqrt() / (t + fraction);
            (1.0 - complement).copysign(x)
        }
    }

    #[test]
    fn every_path_gives_the_same_rows_as_scalar_code() {
        for isa in Isa::supported() {
            for width in [1, 7, 16, 577] {
                let bias = values(width, 0.5);
                let mut rows = values(3 * width, 8.0);
                let expected: Vec<f32> = rows
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        let x = f64::from(v + bias[i % width]);
                        (0.5 * x * (1.0 + libm_erf(x / 2f64.sqrt()))) as f32
                    })
                    .collect();
                bias_gelu_on(isa, &mut rows, &bias);
                for (got, want) in rows.iter().zip(&expected) {
                    assert!((got - want).abs() <= 2e-6, "{isa:?} gelu: {got} vs {want}");
                }

                let mut rows = values(3 * width, 30.0);
                let expected: Vec<f64> = rows
                    .chunks(width)
                    .flat_map(|row| {
                        let max = row.iter().fold(f32::MIN, |m, &v| m.max(v));
                        let exps: Vec<f64> =
                            row.iter().map(|&v| f64::from(v - max).exp()).collect();
                        let sum: f64 = exps.iter().sum();
                        exps.into_iter().map(move |e| e / sum)
                    })
                    .collect();
                softmax_on(isa, &mut rows, width);
                for (got, want) in rows.iter().zip(&expected) {
                    assert!((f64::from(*got) - want).abs() <= 1e-6, "{isa:?} softmax");
                }

                let mut rows = values(3 * width, 8.0);
                let expected: Vec<f32> = rows
                    .iter()
                    .enumerate()
                    .map(|(i, v)| v + bias[i % width])
                    .collect();
                add_bias_on(isa, &mut rows, &bias);
                assert_eq!(rows, expected, "{isa:?} bias");

                let input = values(3 * width, 4.0);
                let (gamma, beta) = (values(width, 2.0), values(width, 1.0));
                let mut output = vec![f32::NAN; input.len()];
                layer_norm_on(isa, &input, &mut output, &gamma, &beta, 1e-6);
                for (r, row) in input.chunks(width).enumerate() {
                    let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / width as f64;
                    let var = row
                        .iter()
                        .map(|&v| (f64::from(v) - mean).powi(2))
                        .sum::<f64>()
                        / width as f64;
                    for c in 0..width {
                        let want = (f64::from(row[c]) - mean) / (var + 1e-6).sqrt()
                            * f64::from(gamma[c])
                            + f64::from(beta[c]);
                        let got = f64::from(output[r * width + c]);
                        assert!(
                            (got - want).abs() <= 1e-4,
                            "{isa:?} layer norm {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn row_taps_blend_the_two_sources_of_every_output() {
        let source = values(23, 5.0);
        for outputs in [1, 7, 8, 9, 45] {
            let taps: Vec<(usize, f32)> = (0..outputs)
                .map(|x| (x * 21 / outputs.max(2), (x as f32 * 0.37).fract()))
                .collect();
            let row_taps = RowTaps::new(taps.iter().copied());
            let mut out = vec![f32::NAN; outputs];
            row_taps.apply(&source, &mut out);
            for (x, &(first, t)) in taps.iter().enumerate() {
                let (a, b) = (source[first], source[first + 1]);
                assert_eq!(out[x], a + t * (b - a), "output {x} of {outputs}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "too short")]
    fn row_taps_refuse_a_short_source() {
        RowTaps::new([(0, 0.5), (9, 0.5)]).apply(&[0.0; 10], &mut [0.0; 2]);
    }

    #[test]
    fn every_path_gives_the_same_statistics_and_affine_pass() {
        for isa in Isa::supported() {
            for len in [1, 15, 16, 17, 9216 + 5] {
                // An offset mean far larger than the spread: the case a one-pass variance loses.
                let input: Vec<f32> = values(len, 1.0).iter().map(|v| v + 1000.0).collect();
                let mean = input.iter().map(|&v| f64::from(v)).sum::<f64>() / len as f64;
                let squares: f64 = input.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum();
                let (got_mean, got_squares) = mean_and_squares_on(isa, &input);
                assert!((got_mean - mean).abs() <= 1e-4, "{isa:?} mean");
                assert!(
                    (got_squares - squares).abs() <= 1e-3 * squares.max(1e-3),
                    "{isa:?} squares {got_squares} vs {squares}"
                );

                let residual = values(len, 3.0);
                for (with_residual, relu) in
                    [(false, false), (true, false), (false, true), (true, true)]
                {
                    let mut got = values(len, 2.0);
                    let residual: &[f32] = if with_residual { &residual } else { &[] };
                    let expected: Vec<f32> = got
                        .iter()
                        .enumerate()
                        .map(|(i, &v)| {
                            let y = v * 1.5 - 0.25 + residual.get(i).copied().unwrap_or(0.0);
                            if relu { y.max(0.0) } else { y }
                        })
                        .collect();
                    affine_on(isa, &mut got, 1.5, -0.25, residual, relu);
                    for (g, e) in got.iter().zip(&expected) {
                        assert!((g - e).abs() <= 1e-6, "{isa:?} affine {g} vs {e}");
                    }
                }
            }
        }
    }
}
