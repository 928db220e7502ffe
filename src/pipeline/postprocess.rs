//! Step 4: network output to an image of the input's size. For MiDaS as the original service
//! did it: depth scaled by its maximum, painted through a 256-entry colour table, resized back
//! with Pillow's antialiased bicubic (`Image.resize(size, Image.BICUBIC)`, a Catmull-Rom
//! kernel). For Depth Anything V2 as its `infer_image` does it: the depth resized back with
//! bilinear, `align_corners=True`, then painted ([`OutputResize`]).

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

use midas_model::engine::DepthMap;
use midas_model::kernels::{FeatureMap, bilinear_rows};
use midas_model::model::ModelKind;

use super::Colormap;

/// Why post-processing failed (only on sizes no caller should produce).
#[derive(Debug, thiserror::Error)]
#[error("cannot resize {from:?} to {to:?}: {message}")]
pub struct ResizeError {
    from: (usize, usize),
    to: (u32, u32),
    message: String,
}

/// Colour-table indices: `trunc(d / max(d) * 256)` clamped to 255, matplotlib's rule for floats
/// in [0, 1]. An all-zero map paints index 0 everywhere. Non-finite values never get here:
/// [`super::render`] refuses a map that holds one.
pub fn colour_indices(depth: &[f32]) -> impl Iterator<Item = usize> + '_ {
    let scale = Scale::relative(depth);
    depth.iter().map(move |&d| scale.index(d))
}

/// How a depth becomes a colour-table index.
#[derive(Clone, Copy, Debug)]
pub enum Scale {
    /// A relative map scaled by its `peak` ([`colour_indices`]'s rule).
    Relative {
        /// The map's largest value.
        peak: f32,
    },
    /// Metres on a fixed scale: 0 m at the top of the colour table and `max_depth` at its
    /// bottom, so that near is bright as in a relative map, and one colour means one distance
    /// in every image: `trunc((1 - d / max_depth) * 256)`, clamped.
    Metres {
        /// The model's largest depth.
        max_depth: f32,
    },
}

impl Scale {
    /// The scale of `depth`'s map: metres when the model's `max_depth` is known, else
    /// relative to the map's peak.
    pub fn of(depth: &DepthMap, max_depth: Option<f32>) -> Self {
        match max_depth {
            Some(max_depth) => Self::Metres { max_depth },
            None => Self::relative(&depth.data),
        }
    }

    /// A relative map scaled by its own largest value.
    fn relative(depth: &[f32]) -> Self {
        Self::Relative {
            peak: depth.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        }
    }

    fn index(self, d: f32) -> usize {
        match self {
            Self::Relative { peak } if peak.is_finite() && peak > 0.0 => {
                ((d / peak * 256.0) as usize).min(255)
            }
            Self::Relative { .. } => 0,
            Self::Metres { max_depth } => {
                ((1.0 - d / max_depth).clamp(0.0, 1.0) * 256.0).min(255.0) as usize
            }
        }
    }

    /// Paints `depth` (RGB, row-major).
    pub fn paint(self, depth: &[f32], colormap: Colormap) -> Vec<u8> {
        paint(depth.iter().map(|&d| self.index(d)), colormap)
    }
}

/// Paints the depth map with a colour table, at the network's resolution (RGB, row-major).
pub fn colourise(depth: &DepthMap, colormap: Colormap) -> Vec<u8> {
    paint(colour_indices(&depth.data), colormap)
}

fn paint(indices: impl Iterator<Item = usize>, colormap: Colormap) -> Vec<u8> {
    let table = colormap.table();
    indices
        .flat_map(|i| [table[3 * i], table[3 * i + 1], table[3 * i + 2]])
        .collect()
}

/// A 16-bit PNG's units per metre for a metric model: KITTI's depth-map convention
/// (`uint16 = metres x 256`, up to 255.996 m at 3.9 mm steps).
pub const METRIC_UNITS_PER_METRE: f32 = 256.0;

/// Most output rows one resize call produces: the resizer's coefficient tables grow with the
/// output's height, so a 1 x 24,000,000 output is resized in bands of this many rows.
const BAND_ROWS: u32 = 1 << 14;

/// Widest tile one resize call produces, for the same reason across a very wide output.
const TILE_COLUMNS: u32 = 1 << 16;

/// How the network's output returns to the image's size: each model family as its upstream
/// code does it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutputResize {
    /// MiDaS's (and the replaced service's): Pillow's antialiased bicubic, after painting for
    /// colour PNGs.
    #[default]
    Bicubic,
    /// Depth Anything V2's `infer_image`: the depth itself with PyTorch's bilinear,
    /// `align_corners=True` (two taps, no antialiasing, also when shrinking), painted after.
    BilinearAligned,
}

impl OutputResize {
    /// The family's rule.
    pub fn of(kind: ModelKind) -> Self {
        match kind {
            ModelKind::DepthAnythingV2(..) => Self::BilinearAligned,
            _ => Self::Bicubic,
        }
    }
}

/// A small map (the network's output) resized to a large one a band of rows at a time, so that
/// what it holds follows the band, not the output: a 1 x 24,000,000 output costs what a
/// 16384-row one does. An output up to 16384 x 65536 is one band, resized in one call. Larger
/// ones are resized band by band and tile by tile, each from the whole source (the filter
/// reaches across band edges); the fixed-point coefficients the resizer derives per call may
/// then differ in their last bit, which moves a few pixels by one or two levels.
pub struct BandResizer {
    source: Vec<u8>,
    from: (usize, usize),
    to: (u32, u32),
    pixel_type: PixelType,
    band_rows: u32,
    tile_columns: u32,
    filter: OutputResize,
}

impl BandResizer {
    /// Resizes `pixels` (row-major, `from` = (width, height)) to `to`.
    pub fn new(
        pixels: Vec<u8>,
        from: (usize, usize),
        to: (u32, u32),
        pixel_type: PixelType,
    ) -> Self {
        Self::with_bands(pixels, from, to, pixel_type, BAND_ROWS, TILE_COLUMNS)
    }

    /// As [`BandResizer::new`], with bands of at most `band_rows` rows and tiles at most
    /// `tile_columns` wide.
    pub fn with_bands(
        pixels: Vec<u8>,
        from: (usize, usize),
        to: (u32, u32),
        pixel_type: PixelType,
        band_rows: u32,
        tile_columns: u32,
    ) -> Self {
        let band_rows = band_rows.clamp(1, to.1.max(1));
        Self {
            source: pixels,
            from,
            to,
            pixel_type,
            band_rows,
            tile_columns: tile_columns.max(1),
            filter: OutputResize::Bicubic,
        }
    }

    /// Resizes a depth map to `to` by `filter`, into floats.
    pub fn depth(depth: &DepthMap, to: (u32, u32), filter: OutputResize) -> Self {
        let bytes = depth.data.iter().flat_map(|v| v.to_ne_bytes()).collect();
        Self {
            filter,
            ..Self::new(bytes, (depth.width, depth.height), to, PixelType::F32)
        }
    }

    /// Rows per band (the last band may have fewer).
    pub fn band_rows(&self) -> u32 {
        self.band_rows
    }

    /// Bytes one band holds at most, for memory accounting.
    pub fn band_bytes(&self) -> usize {
        self.band_rows as usize * self.to.0 as usize * self.pixel_type.size()
    }

    /// Output rows `top..top + rows` of a depth map, row-major.
    pub fn depth_band(&self, top: u32, rows: u32) -> Result<Vec<f32>, ResizeError> {
        assert_eq!(self.pixel_type, PixelType::F32, "a depth map's resizer");
        Ok(match self.filter {
            OutputResize::Bicubic => floats(&self.band(top, rows)?).collect(),
            OutputResize::BilinearAligned => {
                let source = FeatureMap {
                    data: floats(&self.source).collect(),
                    batch: 1,
                    channels: 1,
                    height: self.from.1,
                    width: self.from.0,
                };
                let (width, height) = (self.to.0 as usize, self.to.1 as usize);
                let rows = top as usize..(top + rows) as usize;
                bilinear_rows(&source, (height, width), true, rows).data
            }
        })
    }

    /// Output rows `top..top + rows`, row-major, by Pillow's bicubic.
    pub fn band(&self, top: u32, rows: u32) -> Result<Vec<u8>, ResizeError> {
        let (width, height) = self.to;
        let error = |message: String| ResizeError {
            from: self.from,
            to: self.to,
            message,
        };
        let src = ImageRef::new(
            self.from.0 as u32,
            self.from.1 as u32,
            &self.source,
            self.pixel_type,
        )
        .map_err(|e| error(e.to_string()))?;
        if top == 0 && rows == height && width <= self.tile_columns {
            return resize_image(&src, self.to, None).map_err(error);
        }
        let pixel = self.pixel_type.size();
        let scale_x = self.from.0 as f64 / f64::from(width);
        let scale_y = self.from.1 as f64 / f64::from(height);
        let mut band = vec![0u8; rows as usize * width as usize * pixel];
        let mut left = 0;
        while left < width {
            let columns = self.tile_columns.min(width - left);
            let crop = (
                f64::from(left) * scale_x,
                f64::from(top) * scale_y,
                f64::from(columns) * scale_x,
                f64::from(rows) * scale_y,
            );
            let tile = resize_image(&src, (columns, rows), Some(crop)).map_err(error)?;
            let tile_row = columns as usize * pixel;
            for (row, values) in tile.chunks_exact(tile_row).enumerate() {
                let start = (row * width as usize + left as usize) * pixel;
                band[start..start + tile_row].copy_from_slice(values);
            }
            left += columns;
        }
        Ok(band)
    }
}

/// One Catmull-Rom resize of `src` (or of the `crop` of it: left, top, width, height) to `to`.
fn resize_image(
    src: &ImageRef<'_>,
    to: (u32, u32),
    crop: Option<(f64, f64, f64, f64)>,
) -> Result<Vec<u8>, String> {
    let mut dst = Image::new(to.0, to.1, src.pixel_type());
    let mut options =
        ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom));
    if let Some((left, top, width, height)) = crop {
        options = options.crop(left, top, width, height);
    }
    Resizer::new()
        .resize(src, &mut dst, &options)
        .map_err(|e| e.to_string())?;
    Ok(dst.into_vec())
}

/// Resizes an RGB image the way Pillow's bicubic does (antialiased when shrinking), whole.
pub fn resize_rgb(
    rgb: Vec<u8>,
    from: (usize, usize),
    to: (u32, u32),
) -> Result<Vec<u8>, ResizeError> {
    BandResizer::with_bands(rgb, from, to, PixelType::U8x3, u32::MAX, u32::MAX).band(0, to.1)
}

/// MiDaS's `write_depth(bits=2)` a band at a time: the depth resized to the output's size,
/// then min-max scaled to 0..65535 (truncated); a constant map becomes all zeros. The minimum
/// and maximum are those of the whole resized map (bicubic overshoots the source's), so a first
/// pass over the bands finds them; a map that is one band keeps that band for the second.
pub struct Depth16Bands {
    resizer: BandResizer,
    /// Metres in KITTI's units ([`METRIC_UNITS_PER_METRE`]) rather than min-max scaled.
    metric: bool,
    low: f32,
    high: f32,
    /// The resized values of the only band, when there is one.
    cached: Option<Vec<f32>>,
}

fn floats(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

impl Depth16Bands {
    /// Prepares `depth` for an output of size `to`, resized by `filter`.
    pub fn new(
        depth: &DepthMap,
        to: (u32, u32),
        filter: OutputResize,
    ) -> Result<Self, ResizeError> {
        let resizer = BandResizer::depth(depth, to, filter);
        let (mut low, mut high) = (f32::INFINITY, f32::NEG_INFINITY);
        let mut cached = None;
        let mut top = 0;
        while top < to.1 {
            let rows = resizer.band_rows().min(to.1 - top);
            let band = resizer.depth_band(top, rows)?;
            for &v in &band {
                (low, high) = (low.min(v), high.max(v));
            }
            if rows == to.1 {
                cached = Some(band);
            }
            top += rows;
        }
        Ok(Self {
            resizer,
            metric: false,
            low,
            high,
            cached,
        })
    }

    /// A metric model's map of metres for an output of size `to`, in KITTI's units: no
    /// min-max scaling, so values mean the same distance in every image.
    pub fn metres(depth: &DepthMap, to: (u32, u32), filter: OutputResize) -> Self {
        Self {
            resizer: BandResizer::depth(depth, to, filter),
            metric: true,
            low: 0.0,
            high: 0.0,
            cached: None,
        }
    }

    /// Rows per band.
    pub fn band_rows(&self) -> u32 {
        self.resizer.band_rows()
    }

    /// Output rows `top..top + rows` as big-endian 16-bit values.
    pub fn band(&mut self, top: u32, rows: u32) -> Result<Vec<u8>, ResizeError> {
        let values = match self.cached.take() {
            Some(values) => values,
            None => self.resizer.depth_band(top, rows)?,
        };
        let (low, high) = (f64::from(self.low), f64::from(self.high));
        let range = high - low;
        let metric = self.metric;
        Ok(values
            .into_iter()
            .map(|v| {
                if metric {
                    (v * METRIC_UNITS_PER_METRE).round().clamp(0.0, 65535.0) as u16
                } else if range > f64::EPSILON {
                    (65535.0 * (f64::from(v) - low) / range) as u16
                } else {
                    0
                }
            })
            .flat_map(u16::to_be_bytes)
            .collect())
    }
}

/// [`Depth16Bands`] for the whole output at once, as values.
pub fn depth16(depth: &DepthMap, to: (u32, u32)) -> Result<Vec<u16>, ResizeError> {
    let mut bands = Depth16Bands::new(depth, to, OutputResize::Bicubic)?;
    let mut values = Vec::with_capacity(to.0 as usize * to.1 as usize);
    let mut top = 0;
    while top < to.1 {
        let rows = bands.band_rows().min(to.1 - top);
        let band = bands.band(top, rows)?;
        values.extend(
            band.chunks_exact(2)
                .map(|b| u16::from_be_bytes([b[0], b[1]])),
        );
        top += rows;
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_and_tiles_join_into_the_whole_resize() {
        let (w, h) = (37usize, 23usize);
        let source: Vec<u8> = (0..w * h * 3).map(|i| (i * 7919 % 251) as u8).collect();
        let to = (301u32, 197u32);
        let whole = resize_rgb(source.clone(), (w, h), to).unwrap();
        let banded = BandResizer::with_bands(source, (w, h), to, PixelType::U8x3, 20, 64);
        assert_eq!(banded.band_rows(), 20);
        let mut joined = Vec::new();
        let mut top = 0;
        while top < to.1 {
            let rows = banded.band_rows().min(to.1 - top);
            joined.extend(banded.band(top, rows).unwrap());
            top += rows;
        }
        let differing = whole.iter().zip(&joined).filter(|(a, b)| a != b).count();
        let worst = whole
            .iter()
            .zip(&joined)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert_eq!(joined.len(), whole.len());
        // Fixed-point rounding may move a value by a level or two; a misplaced band or tile
        // would move whole rows by far more.
        assert!(
            worst <= 2 && differing * 100 <= whole.len(),
            "{differing} differ, by up to {worst}"
        );
    }

    #[test]
    fn indices_follow_matplotlib() {
        let depth = [0.0, 1.0, 2.0, 4.0, 3.999];
        let indices: Vec<usize> = colour_indices(&depth).collect();
        assert_eq!(indices, vec![0, 64, 128, 255, 255]);
        assert_eq!(colour_indices(&[0.0, 0.0]).collect::<Vec<_>>(), vec![0, 0]);
    }
}
