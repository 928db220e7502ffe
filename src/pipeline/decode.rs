//! Step 1: bytes to RGB pixels. JPEG, PNG and WebP through the `image` crate; alpha is dropped
//! and grey expanded, as upstream's `cv2.imread(path)` does.
//!
//! [`super::probe`] reads only the header, so a caller holding the first bytes of an upload can
//! refuse an image whose declared size exceeds its pixel budget before a single pixel is decoded.

use std::io::{Cursor, ErrorKind};

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};

use super::format::{DecodeError, ImageFormat, ImageHeader};
use super::probe::{jpeg_is_complete, probe};

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

/// The EXIF `FocalLengthIn35mmFilm` of an encoded image (JPEG, PNG `eXIf`, WebP), in
/// millimetres; `None` where there is none or the metadata does not parse.
pub fn focal_length_35mm(bytes: &[u8]) -> Option<f64> {
    let mut decoder = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .ok()?
        .into_decoder()
        .ok()?;
    let chunk = decoder.exif_metadata().ok()??;
    let exif = exif::Reader::new().read_raw(chunk).ok()?;
    let field = exif.get_field(exif::Tag::FocalLengthIn35mmFilm, exif::In::PRIMARY)?;
    let millimetres = field.value.get_uint(0)?;
    (millimetres > 0).then_some(f64::from(millimetres))
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
