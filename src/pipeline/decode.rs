//! Step 1: bytes to RGB pixels. JPEG, PNG and WebP through the `image` crate; alpha is dropped
//! and grey expanded, as upstream's `cv2.imread(path)` does.
//!
//! [`super::probe`] reads only the header, so a caller holding the first bytes of an upload can
//! refuse an image whose declared size exceeds its pixel budget before a single pixel is decoded.

use std::io::{Cursor, ErrorKind};

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};
use serde::Serialize;

use super::probe::{jpeg_is_complete, probe};

/// The image formats the service accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// JPEG / JFIF.
    Jpeg,
    /// PNG (8 or 16 bits, any colour type).
    Png,
    /// WebP, lossy or lossless.
    Webp,
}

impl ImageFormat {
    /// The format with this file extension (case-insensitive), if accepted.
    pub fn from_extension(extension: &str) -> Option<Self> {
        match extension.to_ascii_lowercase().as_str() {
            "jpg" | "jpeg" | "jpe" | "jfif" => Some(Self::Jpeg),
            "png" => Some(Self::Png),
            "webp" => Some(Self::Webp),
            _ => None,
        }
    }

    /// The format a file's first bytes announce, if accepted.
    pub fn sniff(bytes: &[u8]) -> Option<Self> {
        match image::guess_format(bytes).ok()? {
            image::ImageFormat::Jpeg => Some(Self::Jpeg),
            image::ImageFormat::Png => Some(Self::Png),
            image::ImageFormat::WebP => Some(Self::Webp),
            _ => None,
        }
    }

    fn as_image(self) -> image::ImageFormat {
        match self {
            Self::Jpeg => image::ImageFormat::Jpeg,
            Self::Png => image::ImageFormat::Png,
            Self::Webp => image::ImageFormat::WebP,
        }
    }
}

/// What an image's header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageHeader {
    /// The container format.
    pub format: ImageFormat,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// Why an image could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not JPEG, PNG or WebP.
    #[error("not a JPEG, PNG or WebP image")]
    UnsupportedFormat,
    /// The file ends before the image does.
    #[error("the {0:?} image is truncated")]
    Truncated(ImageFormat),
    /// The header declares more pixels than allowed.
    #[error("the image is {width}x{height} ({pixels} pixels), above the limit of {limit} pixels")]
    TooManyPixels {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// width x height.
        pixels: u64,
        /// The limit.
        limit: u64,
    },
    /// One side is more than the limit times the other.
    #[error("the image is {width}x{height}, its sides further apart than {limit}:1")]
    ExtremeAspectRatio {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// The limit.
        limit: u32,
    },
    /// A zero width or height.
    #[error("the image has no pixels ({width}x{height})")]
    Empty {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
    },
    /// The decoder rejected the data.
    #[error("the {format:?} image is corrupt: {message}")]
    Corrupt {
        /// The format the bytes claimed.
        format: ImageFormat,
        /// The decoder's message.
        message: String,
    },
}

impl DecodeError {
    /// The machine-readable name of the failure, as the API's error bodies and the batch
    /// manifests give it.
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnsupportedFormat => "unsupported_image",
            Self::Truncated(_) => "truncated_image",
            Self::TooManyPixels { .. } => "too_many_pixels",
            Self::Empty { .. } => "empty_image",
            Self::ExtremeAspectRatio { .. } => "extreme_aspect_ratio",
            Self::Corrupt { .. } => "corrupt_image",
        }
    }
}

fn classify(format: ImageFormat, error: image::ImageError) -> DecodeError {
    let message = error.to_string();
    match &error {
        image::ImageError::IoError(io) if io.kind() == ErrorKind::UnexpectedEof => {
            DecodeError::Truncated(format)
        }
        // zune-jpeg reports running out of data as a format error.
        image::ImageError::Decoding(_) if message.contains("Not enough bytes") => {
            DecodeError::Truncated(format)
        }
        image::ImageError::Limits(_) => DecodeError::Corrupt {
            format,
            message: format!("exceeds the decoder's memory limit ({error})"),
        },
        _ => DecodeError::Corrupt {
            format,
            message: message.trim().to_string(),
        },
    }
}

/// Bounds on what [`decode`] accepts, checked on the header before any pixel is decoded.
#[derive(Clone, Copy, Debug)]
pub struct DecodeLimits {
    /// Largest width x height.
    pub max_pixels: u64,
    /// Largest ratio of the longer side to the shorter (0: any). The network sees at most
    /// 8:1 (256 by 32), so an image far beyond is refused before it costs a decode and a
    /// render of millions of one-pixel rows.
    pub max_aspect_ratio: u32,
}

/// The default of `--max-aspect-ratio`: wider than any panorama.
pub const DEFAULT_MAX_ASPECT_RATIO: u32 = 100;

impl DecodeLimits {
    /// Refuses a header whose pixel count is zero or above the limit, or whose sides are
    /// further apart than the aspect-ratio limit.
    pub fn check(&self, header: &ImageHeader) -> Result<(), DecodeError> {
        let (width, height) = (header.width, header.height);
        let pixels = u64::from(width) * u64::from(height);
        if pixels == 0 {
            return Err(DecodeError::Empty { width, height });
        }
        let (long, short) = (width.max(height), width.min(height));
        if self.max_aspect_ratio > 0
            && u64::from(long) > u64::from(short) * u64::from(self.max_aspect_ratio)
        {
            return Err(DecodeError::ExtremeAspectRatio {
                width,
                height,
                limit: self.max_aspect_ratio,
            });
        }
        if pixels > self.max_pixels {
            return Err(DecodeError::TooManyPixels {
                width,
                height,
                pixels,
                limit: self.max_pixels,
            });
        }
        Ok(())
    }
}

/// Decodes a whole image to 8-bit RGB.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, DecodeError> {
    let header = probe(bytes, true)?.ok_or(DecodeError::UnsupportedFormat)?;
    limits.check(&header)?;
    decode_checked(bytes, &header, limits)
}

/// Decodes a whole image whose `header` has already been read and passed `limits.check`,
/// turned upright by its EXIF orientation (JPEG, PNG `eXIf`, WebP): a portrait phone photo
/// stored sideways comes out as every viewer shows it, so its depth map does too. The upright
/// image's sides are the header's, swapped for the orientations that turn it by 90 degrees.
pub fn decode_checked(
    bytes: &[u8],
    header: &ImageHeader,
    limits: &DecodeLimits,
) -> Result<RgbImage, DecodeError> {
    if header.format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        return Err(DecodeError::Truncated(ImageFormat::Jpeg));
    }
    let classify = |e| classify(header.format, e);
    let mut reader = ImageReader::with_format(Cursor::new(bytes), header.format.as_image());
    let mut decoder_limits = Limits::default();
    // Room for the decoded image at up to 16 bits and 4 channels, plus decoder scratch.
    decoder_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(decoder_limits);
    let mut decoder = reader.into_decoder().map_err(classify)?;
    // Metadata that does not parse leaves the image as stored, as viewers do.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let image = DynamicImage::from_decoder(decoder).map_err(classify)?;
    // Turned after the conversion to 8-bit RGB, so the copy a rotation makes is the small one.
    let mut upright = DynamicImage::ImageRgb8(image.into_rgb8());
    upright.apply_orientation(orientation);
    Ok(upright.into_rgb8())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extension_and_signature() {
        assert_eq!(ImageFormat::from_extension("JPG"), Some(ImageFormat::Jpeg));
        assert_eq!(ImageFormat::from_extension("gif"), None);
        assert_eq!(
            ImageFormat::sniff(b"\x89PNG\r\n\x1a\n...."),
            Some(ImageFormat::Png)
        );
        assert_eq!(ImageFormat::sniff(b"GIF89a......"), None);
    }
}
