//! Step 2: RGB pixels to the network's input, by one of two transforms.
//!
//! [`Transform::Upstream`] is each model's official MiDaS transform (`midas/model_loader.py`):
//! `Resize(net, net, keep_aspect_ratio=True, ensure_multiple_of=32, resize_method=...,
//! image_interpolation_method=cv2.INTER_CUBIC)`, `NormalizeImage`, `PrepareForNet`, with
//! `upper_bound` sizing and ImageNet statistics for MiDaS small, `minimal` sizing and
//! mean = std = 0.5 for DPT-Hybrid; Depth Anything V2's (`image2tensor`) sizes by `lower_bound`
//! to multiples of 14 with ImageNet statistics. [`Transform::Squash`] is the replaced service's own:
//! torchvision's `Resize((net, net))` on a PIL image (Pillow's antialiased bilinear, in 8 bits,
//! aspect ratio not kept) and `ToTensor()` (/255, no normalisation).

use image::RgbImage;

use midas_model::engine::NetInput;
use midas_model::model::ModelKind;

/// MiDaS small's input side (its longer side, with `upper_bound` sizing).
pub const NET_SIZE: u32 = 256;

/// `minimal` (DPT) and `lower_bound` (Depth Anything) sizing keep the image's aspect with one
/// side at the net size, so a very elongated image would give a very long input (a 10:1
/// panorama: 3840x384, ten times the work). The longer side is capped at this many times the
/// net size; only images beyond 4:1 are affected.
const MINIMAL_CAP: u32 = 4;

/// ImageNet statistics used by MiDaS small's and Depth Anything's `NormalizeImage`.
const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// How an image becomes the network's input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transform {
    /// The model's official MiDaS transform: aspect kept, sides multiples of 32, bicubic,
    /// the model's normalisation.
    #[default]
    Upstream,
    /// The replaced service's: squashed to the model's square size with Pillow-style
    /// antialiased bilinear in 8 bits, scaled to [0, 1], no normalisation.
    Squash,
}

impl Transform {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Upstream => "upstream",
            Self::Squash => "squash",
        }
    }
}

/// OpenCV's bicubic parameter (Pillow uses -0.5; see [`super::postprocess`]).
const CUBIC_A: f32 = -0.75;

/// Upstream's `constrain_to_multiple_of(x, min_val, max_val)`: NumPy's round (half to even)
/// to a multiple of `multiple`, replaced by floor when that would exceed `max` and by ceiling
/// when it would fall below `min`.
fn constrain(x: f64, multiple: f64, (min, max): (f64, f64)) -> usize {
    let rounded = (x / multiple).round_ties_even() * multiple;
    let y = if rounded > max {
        (x / multiple).floor() * multiple
    } else if rounded < min {
        (x / multiple).ceil() * multiple
    } else {
        rounded
    };
    y as usize
}

/// Upstream's `ensure_multiple_of`: 32 in MiDaS's transforms (DPT-Hybrid's network would take
/// 16), the patch size 14 in Depth Anything's.
fn size_multiple(kind: ModelKind) -> f64 {
    match kind {
        ModelKind::MidasV21Small256 | ModelKind::DptHybrid384 => 32.0,
        ModelKind::DepthAnythingV2(..) => kind.input_multiple() as f64,
    }
}

/// `upper_bound` sizing: the longer side becomes `bound`, both sides multiples of `multiple`.
fn upper_bound(width: f64, height: f64, bound: f64, multiple: f64) -> (usize, usize) {
    let scale = (bound / width).min(bound / height);
    // A side that rounds to 0 (an image over 16 times longer than wide) still gets one block.
    let side = |x: f64| constrain(scale * x, multiple, (0.0, bound)).max(multiple as usize);
    (side(width), side(height))
}

/// The upstream transform's network input size `(width, height)` for an image.
///
/// MiDaS small (`upper_bound`): the longer side becomes 256, so 1920x1080 gives 256x128
/// (1080 x 256/1920 = 144 rounds to 128 by half-to-even), 640x480 256x192, 333x517 160x256.
/// DPT-Hybrid (`minimal`): the scale of whichever side needs the smaller change to become 384
/// applies to both, so 640x480 gives 512x384 and 1920x1080 672x384 (longer side capped at
/// 1536, see [`MINIMAL_CAP`]).
/// Depth Anything V2 (`lower_bound`, multiples of 14): the shorter side becomes 518, so 640x480
/// gives 686x518 and 1920x1080 924x518 (longer side capped at 2072).
pub fn target_size(kind: ModelKind, width: u32, height: u32) -> (usize, usize) {
    let (width, height) = (f64::from(width), f64::from(height));
    let net = f64::from(kind.net_size());
    let multiple = size_multiple(kind);
    let cap = net * f64::from(MINIMAL_CAP);
    let (scale_w, scale_h) = (net / width, net / height);
    let scale = match kind {
        ModelKind::MidasV21Small256 => return upper_bound(width, height, net, multiple),
        ModelKind::DptHybrid384 if (1.0 - scale_w).abs() < (1.0 - scale_h).abs() => scale_w,
        ModelKind::DptHybrid384 => scale_h,
        ModelKind::DepthAnythingV2(..) => scale_w.max(scale_h),
    };
    if scale * width.max(height) > cap {
        return upper_bound(width, height, cap, multiple);
    }
    let min = if matches!(kind, ModelKind::DepthAnythingV2(..)) {
        net
    } else {
        0.0
    };
    let side = |x: f64| constrain(scale * x, multiple, (min, f64::INFINITY)).max(multiple as usize);
    (side(width), side(height))
}

/// The most pixels a network input can have under `transform`: what sizes the forward pass's
/// memory. MiDaS small's upstream inputs fit in 256x256; DPT's and Depth Anything's are the net
/// size on one side and at most [`MINIMAL_CAP`] times that on the other.
pub fn max_input_pixels(kind: ModelKind, transform: Transform) -> u64 {
    let net = u64::from(kind.net_size());
    match (transform, kind) {
        (Transform::Squash, _) | (Transform::Upstream, ModelKind::MidasV21Small256) => net * net,
        (Transform::Upstream, ModelKind::DptHybrid384 | ModelKind::DepthAnythingV2(..)) => {
            net * net * u64::from(MINIMAL_CAP)
        }
    }
}

/// Per-channel `(mean, std)` of the upstream transform's `NormalizeImage`.
fn normalisation(kind: ModelKind) -> ([f32; 3], [f32; 3]) {
    match kind {
        ModelKind::MidasV21Small256 | ModelKind::DepthAnythingV2(..) => {
            (IMAGENET_MEAN, IMAGENET_STD)
        }
        ModelKind::DptHybrid384 => ([0.5; 3], [0.5; 3]),
    }
}

/// OpenCV's `interpolateCubic` weights for fractional offset `x`.
fn cubic_weights(x: f32) -> [f32; 4] {
    let a = CUBIC_A;
    let w0 = ((a * (x + 1.0) - 5.0 * a) * (x + 1.0) + 8.0 * a) * (x + 1.0) - 4.0 * a;
    let w1 = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
    let w2 = ((a + 2.0) * (1.0 - x) - (a + 3.0)) * (1.0 - x) * (1.0 - x) + 1.0;
    [w0, w1, w2, 1.0 - w0 - w1 - w2]
}

/// For each output coordinate, the 4 source indices (border replicated) and their weights,
/// with OpenCV's half-pixel mapping `(d + 0.5) * src/dst - 0.5`.
fn taps(src: usize, dst: usize) -> Vec<([usize; 4], [f32; 4])> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|d| {
            let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let start = f.floor();
            let index = |k: i64| (start as i64 + k - 1).clamp(0, src as i64 - 1) as usize;
            (
                [index(0), index(1), index(2), index(3)],
                cubic_weights(f - start),
            )
        })
        .collect()
}

/// The network input for an image under `transform`, laid out channel-major.
pub fn preprocess(image: &RgbImage, kind: ModelKind, transform: Transform) -> NetInput {
    match transform {
        Transform::Upstream => upstream(image, kind),
        Transform::Squash => squash(image, kind.net_size()),
    }
}

/// The replaced service's transform: Pillow's antialiased bilinear to `side x side` in 8 bits,
/// then /255 per channel.
fn squash(image: &RgbImage, side: u32) -> NetInput {
    let resized = pillow_bilinear(image, side as usize, side as usize);
    let side = side as usize;
    let plane = side * side;
    let mut data = vec![0f32; 3 * plane];
    for (index, pixel) in resized.chunks_exact(3).enumerate() {
        for (c, &value) in pixel.iter().enumerate() {
            data[c * plane + index] = f32::from(value) / 255.0;
        }
    }
    NetInput {
        width: side,
        height: side,
        data,
    }
}

/// Fixed-point fraction bits of Pillow's 8-bit resampling (`PRECISION_BITS` = 32 - 8 - 2).
const PILLOW_PRECISION: u32 = 22;

/// One output coordinate's first source index and fixed-point weights.
struct PillowTaps {
    first: usize,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the bilinear (triangle) filter:
/// the support widens with the downscale factor (antialiasing), weights are normalised in
/// double precision, then rounded to 22-bit fixed point.
fn pillow_taps(input: usize, output: usize) -> Vec<PillowTaps> {
    let scale = input as f64 / output as f64;
    let filter_scale = scale.max(1.0);
    let support = filter_scale;
    (0..output)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            // C's (int) cast: truncation toward zero, then clamped to the image.
            let first = ((center - support + 0.5) as i64).max(0) as usize;
            let last = ((center + support + 0.5) as i64).min(input as i64) as usize;
            let raw: Vec<f64> = (first..last)
                .map(|x| {
                    let t = ((x as f64 - center + 0.5) / filter_scale).abs();
                    if t < 1.0 { 1.0 - t } else { 0.0 }
                })
                .collect();
            let total: f64 = raw.iter().sum();
            let one = f64::from(1u32 << PILLOW_PRECISION);
            let weights = raw
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    if w < 0.0 {
                        (-0.5 + w * one) as i32
                    } else {
                        (0.5 + w * one) as i32
                    }
                })
                .collect();
            PillowTaps { first, weights }
        })
        .collect()
}

/// Pillow's `clip8`: the fixed-point sum back to a byte.
fn pillow_clip(sum: i64) -> u8 {
    (sum >> PILLOW_PRECISION).clamp(0, 255) as u8
}

/// One separable pass of Pillow's 8-bit resampling over an interleaved RGB buffer of
/// `lines` lines: along each line (`along_rows`: resample each row's pixels; otherwise resample
/// each column's), writing bytes rounded as Pillow's `clip8` does.
fn pillow_pass(
    source: &[u8],
    (width, height): (usize, usize),
    taps: &[PillowTaps],
    along_rows: bool,
) -> Vec<u8> {
    let half = 1i64 << (PILLOW_PRECISION - 1);
    let (out_w, out_h) = if along_rows {
        (taps.len(), height)
    } else {
        (width, taps.len())
    };
    let mut out = vec![0u8; out_w * out_h * 3];
    for y in 0..out_h {
        for x in 0..out_w {
            let (tap, fixed) = if along_rows {
                (&taps[x], y)
            } else {
                (&taps[y], x)
            };
            for c in 0..3 {
                let sum = tap.weights.iter().enumerate().fold(half, |sum, (k, &w)| {
                    let index = if along_rows {
                        (fixed * width + tap.first + k) * 3 + c
                    } else {
                        ((tap.first + k) * width + fixed) * 3 + c
                    };
                    sum + i64::from(source[index]) * i64::from(w)
                });
                out[(y * out_w + x) * 3 + c] = pillow_clip(sum);
            }
        }
    }
    out
}

/// `Image.resize((width, height), Image.BILINEAR)` on an RGB image, bit for bit, as Pillow 13
/// computes it (`ImagingResampleInner`): two separable passes rounded to bytes in between, the
/// horizontal one first unless the height shrinks markedly more than the width (then the
/// vertical one first, which changes the rounding). The horizontal-first pass reads only the
/// source rows the vertical pass needs. fast_image_resize's convolution uses coarser fixed-point
/// weights and differs by one level on about a sixth of the values, which the network then
/// amplifies; the replaced service's weights were served with Pillow's.
fn pillow_bilinear(image: &RgbImage, width: usize, height: usize) -> Vec<u8> {
    let (src_w, src_h) = (image.width() as usize, image.height() as usize);
    let columns = pillow_taps(src_w, width);
    let mut rows = pillow_taps(src_h, height);
    let (x_scale, y_scale) = (src_w as f64 / width as f64, src_h as f64 / height as f64);
    let vertical_first = height < src_h && 2.0 * x_scale < y_scale + 1.0;
    if vertical_first {
        let tall = pillow_pass(image.as_raw(), (src_w, src_h), &rows, false);
        return pillow_pass(&tall, (src_w, height), &columns, true);
    }
    let first_row = rows.first().map_or(0, |taps| taps.first);
    let end_row = rows
        .last()
        .map_or(0, |taps| taps.first + taps.weights.len());
    let band = &image.as_raw()[first_row * src_w * 3..end_row * src_w * 3];
    let wide = pillow_pass(band, (src_w, end_row - first_row), &columns, true);
    rows.iter_mut().for_each(|taps| taps.first -= first_row);
    pillow_pass(&wide, (width, end_row - first_row), &rows, false)
}

/// The upstream transform: resizes to [`target_size`] with OpenCV-style bicubic interpolation
/// (no antialiasing, values not clamped), scales to [0, 1] and normalises with the model's
/// statistics.
fn upstream(image: &RgbImage, kind: ModelKind) -> NetInput {
    let (mean, std) = normalisation(kind);
    let (src_w, src_h) = (image.width() as usize, image.height() as usize);
    let (dst_w, dst_h) = target_size(kind, image.width(), image.height());
    let x_taps = taps(src_w, dst_w);
    let y_taps = taps(src_h, dst_h);
    let pixels = image.as_raw();

    // Horizontal pass over only the source rows the vertical pass reads (at most four per
    // output row), in [0, 255]: the buffer is sized by the network input, never by the image's
    // height, so a 1 x 24,000,000 image costs what a small one does.
    let mut slot = vec![usize::MAX; src_h];
    let mut rows_read = Vec::new();
    for (rows, _) in &y_taps {
        for &row in rows {
            if slot[row] == usize::MAX {
                slot[row] = rows_read.len();
                rows_read.push(row);
            }
        }
    }
    let mut horizontal = vec![0f32; rows_read.len() * dst_w * 3];
    for (&y, out_row) in rows_read.iter().zip(horizontal.chunks_exact_mut(dst_w * 3)) {
        let src_row = &pixels[y * src_w * 3..(y + 1) * src_w * 3];
        for (x, (columns, weights)) in x_taps.iter().enumerate() {
            for c in 0..3 {
                out_row[x * 3 + c] = columns
                    .iter()
                    .zip(weights)
                    .map(|(&column, &w)| f32::from(src_row[column * 3 + c]) * w)
                    .sum();
            }
        }
    }

    // Vertical pass, then scale and normalise into planar output.
    let plane = dst_w * dst_h;
    let mut data = vec![0f32; 3 * plane];
    for (y, (rows, weights)) in y_taps.iter().enumerate() {
        for x in 0..dst_w {
            for c in 0..3 {
                let value: f32 = rows
                    .iter()
                    .zip(weights)
                    .map(|(&row, &w)| horizontal[(slot[row] * dst_w + x) * 3 + c] * w)
                    .sum();
                data[c * plane + y * dst_w + x] = (value / 255.0 - mean[c]) / std[c];
            }
        }
    }
    NetInput {
        width: dst_w,
        height: dst_h,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_rule_examples_from_upstream() {
        let small = ModelKind::MidasV21Small256;
        assert_eq!(target_size(small, 1920, 1080), (256, 128));
        assert_eq!(target_size(small, 640, 480), (256, 192));
        assert_eq!(target_size(small, 333, 517), (160, 256));
        assert_eq!(target_size(small, 40000, 12), (256, 32));
        let dpt = ModelKind::DptHybrid384;
        assert_eq!(target_size(dpt, 640, 480), (512, 384));
        assert_eq!(target_size(dpt, 1920, 1080), (672, 384));
        assert_eq!(target_size(dpt, 384, 384), (384, 384));
        assert_eq!(target_size(dpt, 100, 100), (384, 384));
        // Beyond 4:1 the longer side is capped at 1536.
        assert_eq!(target_size(dpt, 10_000, 1000), (1536, 160));
        let vits = ModelKind::ALL[2];
        assert_eq!(target_size(vits, 640, 480), (686, 518));
        assert_eq!(target_size(vits, 1920, 1080), (924, 518));
        assert_eq!(target_size(vits, 518, 518), (518, 518));
        assert_eq!(target_size(vits, 100, 60), (868, 518));
        assert_eq!(target_size(vits, 530, 520), (532, 518));
        assert_eq!(target_size(vits, 10_000, 1000), (2072, 210));
    }

    #[test]
    fn cubic_weights_sum_to_one_and_interpolate() {
        for x in [0.0, 0.25, 0.5, 0.9] {
            let w = cubic_weights(x);
            assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        assert_eq!(cubic_weights(0.0), [0.0, 1.0, 0.0, 0.0]);
    }
}
