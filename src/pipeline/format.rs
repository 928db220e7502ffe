//! What an upload is before it is decoded: the accepted image formats, an image's header (its
//! format and size, read by [`super::probe`] from the first bytes), and why an image could not
//! be read, for the probe and the decoder alike.

use serde::Serialize;

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

    pub(super) fn as_image(self) -> image::ImageFormat {
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
