//! Step 4: network output to an image of the input's size, as the original service did: depth
//! scaled by its maximum, painted through a 256-entry colour table, resized back with Pillow's
//! antialiased bicubic (`Image.resize(size, Image.BICUBIC)`, a Catmull-Rom kernel).

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

use super::Colormap;

/// A `[height, width]` relative inverse depth map, as the network produces it.
#[derive(Clone, Debug, PartialEq)]
pub struct DepthMap {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Row-major values, larger is nearer.
    pub data: Vec<f32>,
}

/// Why post-processing failed (only on sizes no caller should produce).
#[derive(Debug, thiserror::Error)]
#[error("cannot resize {from:?} to {to:?}: {message}")]
pub struct ResizeError {
    from: (usize, usize),
    to: (u32, u32),
    message: String,
}

/// Colour-table indices: `trunc(d / max(d) * 256)` clamped to 255, matplotlib's rule for floats
/// in [0, 1]. An all-zero (or non-finite) map paints index 0 everywhere.
pub fn colour_indices(depth: &[f32]) -> impl Iterator<Item = usize> + '_ {
    let peak = depth.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let valid = peak.is_finite() && peak > 0.0;
    depth.iter().map(move |&d| {
        if valid {
            ((d / peak * 256.0) as usize).min(255)
        } else {
            0
        }
    })
}

/// Paints the depth map with a colour table, at the network's resolution (RGB, row-major).
pub fn colourise(depth: &DepthMap, colormap: Colormap) -> Vec<u8> {
    let table = colormap.table();
    colour_indices(&depth.data)
        .flat_map(|i| [table[3 * i], table[3 * i + 1], table[3 * i + 2]])
        .collect()
}

fn resize(
    pixels: Vec<u8>,
    from: (usize, usize),
    to: (u32, u32),
    pixel_type: PixelType,
) -> Result<Vec<u8>, ResizeError> {
    let error = |message: String| ResizeError { from, to, message };
    let src = Image::from_vec_u8(from.0 as u32, from.1 as u32, pixels, pixel_type)
        .map_err(|e| error(e.to_string()))?;
    let mut dst = Image::new(to.0, to.1, pixel_type);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom));
    Resizer::new()
        .resize(&src, &mut dst, &options)
        .map_err(|e| error(e.to_string()))?;
    Ok(dst.into_vec())
}

/// Resizes an RGB image the way Pillow's bicubic does (antialiased when shrinking).
pub fn resize_rgb(
    rgb: Vec<u8>,
    from: (usize, usize),
    to: (u32, u32),
) -> Result<Vec<u8>, ResizeError> {
    resize(rgb, from, to, PixelType::U8x3)
}

/// MiDaS's `write_depth(bits=2)`: the depth resized to `to`, then min-max scaled to 0..65535
/// (truncated); a constant map becomes all zeros.
pub fn depth16(depth: &DepthMap, to: (u32, u32)) -> Result<Vec<u16>, ResizeError> {
    let bytes = depth.data.iter().flat_map(|v| v.to_ne_bytes()).collect();
    let resized = resize(bytes, (depth.width, depth.height), to, PixelType::F32)?;
    let values: Vec<f32> = resized
        .chunks_exact(4)
        .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let (low, high) = values
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let range = f64::from(high) - f64::from(low);
    Ok(if range > f64::EPSILON {
        values
            .iter()
            .map(|&v| (65535.0 * (f64::from(v) - f64::from(low)) / range) as u16)
            .collect()
    } else {
        vec![0; values.len()]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_follow_matplotlib() {
        let depth = [0.0, 1.0, 2.0, 4.0, 3.999];
        let indices: Vec<usize> = colour_indices(&depth).collect();
        assert_eq!(indices, vec![0, 64, 128, 255, 255]);
        assert_eq!(colour_indices(&[0.0, 0.0]).collect::<Vec<_>>(), vec![0, 0]);
    }
}
