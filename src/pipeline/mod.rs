//! The image pipeline: decode, resize and normalise, infer, colourise and resize back, encode.
//! One module per step; the CLI runs them in sequence, the server spreads them over its threads.

mod cloud;
mod colormap;
mod decode;
mod encode;
mod format;
mod postprocess;
mod preprocess;
mod probe;

pub use cloud::{
    CloudDefaults, CloudOptionError, CloudOptions, DEFAULT_FOV_DEGREES, Grid, Intrinsics,
    IntrinsicsSource, PointSamples, cloud_bytes,
};
pub use colormap::Colormap;
pub use decode::{
    DEFAULT_MAX_ASPECT_RATIO, DecodeLimits, decode, decode_checked, focal_length_35mm,
};
pub use encode::{EncodeError, OutputFormat, PngChunks, RowBands, npy};
pub use format::{DecodeError, ImageFormat, ImageHeader};
pub use postprocess::{
    BandResizer, METRIC_UNITS_PER_METRE, OutputResize, ResizeError, Scale, colour_indices,
    colourise, depth16, resize_rgb,
};
pub use preprocess::{NET_SIZE, Transform, max_input_pixels, preprocess, target_size};
pub use probe::{HeaderProbe, probe};

use bytes::Bytes;
use fast_image_resize::PixelType;
use image::RgbImage;

use midas_model::backend::Backend;
// The network's input and output, named here too: they are the image steps' as well.
pub use midas_model::engine::{DepthMap, NetInput};
use midas_model::engine::{DepthModel, InferenceError};
use midas_model::model::ModelKind;
use midas_model::weights::WeightsReport;
use postprocess::Depth16Bands;

/// How a prediction is rendered.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RenderOptions {
    /// Colour table for [`OutputFormat::Png`].
    pub colormap: Colormap,
    /// Output encoding.
    pub format: OutputFormat,
    /// The point cloud's parameters, for [`OutputFormat::Ply`].
    pub cloud: CloudOptions,
    /// Set for a metric model, whose output is metres up to this depth: PNGs are coloured on
    /// that fixed scale and 16-bit PNGs carry metres ([`METRIC_UNITS_PER_METRE`] per metre)
    /// instead of min-max scaled values.
    pub max_depth: Option<f32>,
    /// How the output returns to the image's size (the model family's rule).
    pub resize: OutputResize,
}

/// Why rendering a depth map failed.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The network's output holds values that are not depths (NaN or infinite): a broken
    /// model or weights. Refused rather than painted, so that no output looks like a result.
    #[error("the model's output holds {count} non-finite values (NaN or infinity) of {total}")]
    NonFinite {
        /// How many.
        count: usize,
        /// Values in the output.
        total: usize,
    },
    /// Resizing back to the input's size failed.
    #[error(transparent)]
    Resize(#[from] ResizeError),
    /// Encoding failed.
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// The encoded output as a sequence of chunks (a PNG streams row by row; `.npy` is one chunk).
pub type EncodedChunks = Box<dyn Iterator<Item = Result<Bytes, EncodeError>> + Send>;

/// Post-processes and encodes a depth map for an input of `original` size `(width, height)`;
/// a point cloud takes its colours and camera from `samples`, taken from the decoded image.
///
/// The output is resized and encoded a band of rows at a time as the chunks are taken, so
/// what rendering holds is bounded by [`render_bytes`] (or [`cloud_bytes`]), not by the
/// output's size.
pub fn render(
    depth: &DepthMap,
    original: (u32, u32),
    options: RenderOptions,
    samples: Option<PointSamples>,
) -> Result<EncodedChunks, RenderError> {
    let count = depth.data.iter().filter(|d| !d.is_finite()).count();
    if count > 0 {
        return Err(RenderError::NonFinite {
            count,
            total: depth.data.len(),
        });
    }
    let (width, height) = original;
    let from = (depth.width, depth.height);
    Ok(match options.format {
        OutputFormat::Png => {
            let shape = (width, height, png::ColorType::Rgb, png::BitDepth::Eight);
            let scale = Scale::of(depth, options.max_depth);
            let colormap = options.colormap;
            match options.resize {
                OutputResize::Bicubic => {
                    let rgb = scale.paint(&depth.data, colormap);
                    let resizer = BandResizer::new(rgb, from, original, PixelType::U8x3);
                    let band_rows = resizer.band_rows();
                    Box::new(banded_png(shape, band_rows, move |top, rows| {
                        resizer.band(top, rows)
                    })?)
                }
                OutputResize::BilinearAligned => {
                    let resizer = BandResizer::depth(depth, original, options.resize);
                    let band_rows = resizer.band_rows();
                    Box::new(banded_png(shape, band_rows, move |top, rows| {
                        Ok(scale.paint(&resizer.depth_band(top, rows)?, colormap))
                    })?)
                }
            }
        }
        OutputFormat::Png16 => {
            let mut resizer = match options.max_depth {
                Some(_) => Depth16Bands::metres(depth, original, options.resize),
                None => Depth16Bands::new(depth, original, options.resize)?,
            };
            let band_rows = resizer.band_rows();
            Box::new(banded_png(
                (
                    width,
                    height,
                    png::ColorType::Grayscale,
                    png::BitDepth::Sixteen,
                ),
                band_rows,
                move |top, rows| resizer.band(top, rows),
            )?)
        }
        OutputFormat::Npy => Box::new(std::iter::once(npy(&depth.data, depth.width, depth.height))),
        OutputFormat::Ply => {
            let samples = samples.ok_or_else(|| {
                EncodeError::from_message("a point cloud needs the image's samples".to_string())
            })?;
            Box::new(cloud::ply(depth, samples)?)
        }
    })
}

/// What a point cloud takes from the decoded `image` (read from `bytes`, for its EXIF focal
/// length), when `options` ask for one: the one place `serve`, `predict` and `batch` take it.
pub fn point_samples(
    image: &RgbImage,
    bytes: &[u8],
    options: &RenderOptions,
    defaults: &CloudDefaults,
    model: ModelKind,
) -> Option<PointSamples> {
    (options.format == OutputFormat::Ply).then(|| {
        PointSamples::take(
            image,
            focal_length_35mm(bytes),
            &options.cloud,
            defaults,
            model,
        )
    })
}

/// A PNG of `(width, height, colour, depth)` whose rows `band` resizes `band_rows` at a time.
fn banded_png(
    (width, height, color, bit_depth): (u32, u32, png::ColorType, png::BitDepth),
    band_rows: u32,
    mut band: impl FnMut(u32, u32) -> Result<Vec<u8>, ResizeError> + Send + 'static,
) -> Result<PngChunks, EncodeError> {
    let bands: RowBands = Box::new(move |top, rows| {
        band(top, rows).map_err(|e| EncodeError::from_message(e.to_string()))
    });
    PngChunks::from_bands(width, height, color, bit_depth, band_rows, bands)
}

/// Bytes [`render`] holds at most for an output of `width x height`, beyond the depth map:
/// one band of rows in each of its buffers (resized values, encoded rows, compressed output).
pub fn render_bytes(width: u32, height: u32) -> u64 {
    let resizer = BandResizer::new(Vec::new(), (1, 1), (width, height), PixelType::F32);
    // The 16-bit path's band: resized floats (4), 16-bit values (2), their bytes (2); plus the
    // PNG writer's buffers.
    resizer.band_bytes() as u64 * 2 + (4 << 20)
}

/// Why one image could not be turned into a depth map.
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    /// The image could not be decoded.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The forward pass failed.
    #[error(transparent)]
    Inference(#[from] InferenceError),
    /// Post-processing or encoding failed.
    #[error(transparent)]
    Render(#[from] RenderError),
}

/// A model ready to run, with what it is, where its weights came from and how images are
/// prepared for it. [`crate::lifecycle`] makes one.
#[derive(Debug)]
pub struct LoadedModel {
    /// The network on its device.
    pub model: DepthModel,
    /// The backend running it.
    pub backend: Backend,
    /// The weights' provenance.
    pub weights: WeightsReport,
    /// How images become the network's input.
    pub transform: Transform,
}

impl LoadedModel {
    /// How to render this model's outputs: `colormap`, `format` and `cloud` as asked, with
    /// the model's metric scale and its family's resize back.
    pub fn render_options(
        &self,
        colormap: Colormap,
        format: OutputFormat,
        cloud: CloudOptions,
    ) -> RenderOptions {
        RenderOptions {
            colormap,
            format,
            cloud,
            max_depth: self.weights.max_depth,
            resize: OutputResize::of(self.model.kind()),
        }
    }

    /// The network input for a decoded image.
    pub fn preprocess(&self, image: &RgbImage) -> NetInput {
        preprocess(image, self.model.kind(), self.transform)
    }

    /// The whole pipeline for one encoded image, as `midas-serve predict` runs it.
    /// `cloud` bounds a point cloud's parameters (`options.cloud`).
    pub fn run_image(
        &self,
        bytes: &[u8],
        limits: &DecodeLimits,
        options: RenderOptions,
        cloud: &CloudDefaults,
    ) -> Result<EncodedChunks, PredictError> {
        let image = decode(bytes, limits)?;
        let original = image.dimensions();
        let samples = point_samples(&image, bytes, &options, cloud, self.model.kind());
        let depth = self.model.depth(self.preprocess(&image))?;
        Ok(render(&depth, original, options, samples)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_with_a_nan_is_refused_in_every_format() {
        let mut data: Vec<f32> = (0..64).map(|i| i as f32).collect();
        data[17] = f32::NAN;
        data[40] = f32::INFINITY;
        let depth = DepthMap {
            width: 8,
            height: 8,
            data,
        };
        for format in OutputFormat::ALL {
            let options = RenderOptions {
                format,
                ..RenderOptions::default()
            };
            assert!(matches!(
                render(&depth, (16, 16), options, None),
                Err(RenderError::NonFinite {
                    count: 2,
                    total: 64
                })
            ));
        }
    }
}
