//! The image pipeline: decode, resize and normalise, infer, colourise and resize back, encode.
//! One module per step; the CLI runs them in sequence, the server spreads them over its threads.

mod colormap;
mod decode;
mod encode;
mod infer;
mod postprocess;
mod preprocess;

pub use colormap::Colormap;
pub use decode::{DecodeError, DecodeLimits, ImageFormat, ImageHeader, decode, probe};
pub use encode::{EncodeError, OutputFormat, PngChunks, npy};
pub use infer::{DepthModel, InferenceError};
pub use postprocess::{DepthMap, ResizeError, colour_indices, colourise, depth16, resize_rgb};
pub use preprocess::{NET_SIZE, NetInput, preprocess, target_size};

use bytes::Bytes;

/// How a prediction is rendered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenderOptions {
    /// Colour table for [`OutputFormat::Png`].
    pub colormap: Colormap,
    /// Output encoding.
    pub format: OutputFormat,
}

/// Why rendering a depth map failed.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// Resizing back to the input's size failed.
    #[error(transparent)]
    Resize(#[from] ResizeError),
    /// Encoding failed.
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// The encoded output as a sequence of chunks (a PNG streams row by row; `.npy` is one chunk).
pub type EncodedChunks = Box<dyn Iterator<Item = Result<Bytes, EncodeError>> + Send>;

/// Post-processes and encodes a depth map for an input of `original` size `(width, height)`.
pub fn render(depth: &DepthMap, original: (u32, u32), options: RenderOptions) -> Result<EncodedChunks, RenderError> {
    Ok(match options.format {
        OutputFormat::Png => {
            let rgb = colourise(depth, options.colormap);
            let resized = resize_rgb(rgb, (depth.width, depth.height), original)?;
            Box::new(PngChunks::rgb8(resized, original.0, original.1)?)
        }
        OutputFormat::Png16 => {
            let values = depth16(depth, original)?;
            Box::new(PngChunks::gray16(&values, original.0, original.1)?)
        }
        OutputFormat::Npy => Box::new(std::iter::once(npy(&depth.data, depth.width, depth.height))),
    })
}
