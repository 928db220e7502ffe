//! Step 2: RGB pixels to the network's input, as upstream's `midas_v21_small_256` transform does
//! (`Resize(256, 256, keep_aspect_ratio=True, ensure_multiple_of=32, resize_method="upper_bound",
//! image_interpolation_method=cv2.INTER_CUBIC)`, `NormalizeImage`, `PrepareForNet`).

use image::RgbImage;

/// The longer side of the network input.
pub const NET_SIZE: u32 = 256;

/// Both sides of the network input are multiples of this.
const MULTIPLE: f64 = 32.0;

/// ImageNet statistics used by `NormalizeImage`.
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// OpenCV's bicubic parameter (Pillow uses -0.5; see [`super::postprocess`]).
const CUBIC_A: f32 = -0.75;

/// A normalised `[3, height, width]` float image, ready for the network.
#[derive(Clone, Debug, PartialEq)]
pub struct NetInput {
    /// Width in pixels (a multiple of 32, at most 256).
    pub width: usize,
    /// Height in pixels (a multiple of 32, at most 256).
    pub height: usize,
    /// Planar RGB, channel-major.
    pub data: Vec<f32>,
}

/// Upstream's `constrain_to_multiple_of` with `max_val`: NumPy's round (half to even) to a
/// multiple of 32, replaced by floor when that would exceed 256.
fn constrain(x: f64) -> usize {
    let rounded = (x / MULTIPLE).round_ties_even() * MULTIPLE;
    let y = if rounded > f64::from(NET_SIZE) {
        (x / MULTIPLE).floor() * MULTIPLE
    } else {
        rounded
    };
    y as usize
}

/// The network input size `(width, height)` for an image: the longer side becomes 256 and both
/// sides multiples of 32, so 1920x1080 gives 256x128 (1080 x 256/1920 = 144 rounds to 128 by
/// half-to-even), 640x480 gives 256x192 and 333x517 gives 160x256.
pub fn target_size(width: u32, height: u32) -> (usize, usize) {
    let (width, height) = (f64::from(width), f64::from(height));
    let scale = (f64::from(NET_SIZE) / width).min(f64::from(NET_SIZE) / height);
    // A side that rounds to 0 (an image over 16 times longer than wide) still gets one block.
    let side = |x: f64| constrain(scale * x).max(MULTIPLE as usize);
    (side(width), side(height))
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

/// Resizes to [`target_size`] with OpenCV-style bicubic interpolation (no antialiasing, values
/// not clamped), scales to [0, 1], normalises with the ImageNet mean and standard deviation and
/// lays the result out channel-major.
pub fn preprocess(image: &RgbImage) -> NetInput {
    let (src_w, src_h) = (image.width() as usize, image.height() as usize);
    let (dst_w, dst_h) = target_size(image.width(), image.height());
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
                data[c * plane + y * dst_w + x] = (value / 255.0 - MEAN[c]) / STD[c];
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
        assert_eq!(target_size(1920, 1080), (256, 128));
        assert_eq!(target_size(640, 480), (256, 192));
        assert_eq!(target_size(333, 517), (160, 256));
        assert_eq!(target_size(40000, 12), (256, 32));
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
