//! Step 5: pixels to file bytes, produced as a sequence of chunks so that a server can send (and
//! store) the first rows of a PNG while the last ones are still being compressed.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use npyz::WriterBuilder;
use serde::{Deserialize, Serialize};

/// What a prediction is returned as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// The colourised depth map, 8-bit RGB PNG at the input's size.
    #[default]
    Png,
    /// The depth map min-max scaled to 16-bit grey PNG at the input's size (MiDaS's `write_depth`).
    Png16,
    /// The raw network output, float32 `[height, width]` NumPy array at the network's resolution.
    Npy,
}

impl OutputFormat {
    /// File extension of the encoded output.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Png | Self::Png16 => "png",
            Self::Npy => "npy",
        }
    }

    /// HTTP content type of the encoded output.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Png | Self::Png16 => "image/png",
            Self::Npy => "application/x-npy",
        }
    }

    /// The name used in query strings and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Png16 => "png16",
            Self::Npy => "npy",
        }
    }

    /// Parses a query-string value.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Png, Self::Png16, Self::Npy]
            .into_iter()
            .find(|f| f.name() == name)
    }
}

/// Encoded bytes are handed out once at least this many have accumulated.
const CHUNK_BYTES: usize = 64 * 1024;

/// The PNG's zlib level: `Fast` (fdeflate) encodes a depth map several times faster than the
/// default for a few percent more bytes (see the README's table).
const COMPRESSION: png::Compression = png::Compression::Fast;

/// A `Write` sink whose contents the iterator drains between rows.
#[derive(Clone, Default)]
struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl SharedBuffer {
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

impl Write for SharedBuffer {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Why encoding failed.
#[derive(Debug, thiserror::Error)]
#[error("encoding failed: {0}")]
pub struct EncodeError(String);

/// A PNG being encoded, yielded as chunks of bytes.
pub struct PngChunks {
    writer: Option<png::StreamWriter<'static, SharedBuffer>>,
    out: SharedBuffer,
    rows: Vec<u8>,
    row_bytes: usize,
    next_row: usize,
}

impl PngChunks {
    fn new(
        rows: Vec<u8>,
        width: u32,
        height: u32,
        color: png::ColorType,
        depth: png::BitDepth,
    ) -> Result<Self, EncodeError> {
        let out = SharedBuffer::default();
        let mut encoder = png::Encoder::new(out.clone(), width, height);
        encoder.set_color(color);
        encoder.set_depth(depth);
        encoder.set_compression(COMPRESSION);
        let error = |e: png::EncodingError| EncodeError(e.to_string());
        let writer = encoder
            .write_header()
            .map_err(error)?
            .into_stream_writer()
            .map_err(error)?;
        let row_bytes = rows.len() / height.max(1) as usize;
        Ok(Self {
            writer: Some(writer),
            out,
            rows,
            row_bytes,
            next_row: 0,
        })
    }

    /// An 8-bit RGB PNG of row-major pixels.
    pub fn rgb8(pixels: Vec<u8>, width: u32, height: u32) -> Result<Self, EncodeError> {
        Self::new(
            pixels,
            width,
            height,
            png::ColorType::Rgb,
            png::BitDepth::Eight,
        )
    }

    /// A 16-bit greyscale PNG of row-major values.
    pub fn gray16(values: &[u16], width: u32, height: u32) -> Result<Self, EncodeError> {
        let bytes = values.iter().flat_map(|v| v.to_be_bytes()).collect();
        Self::new(
            bytes,
            width,
            height,
            png::ColorType::Grayscale,
            png::BitDepth::Sixteen,
        )
    }

    fn advance(&mut self) -> Result<Option<Bytes>, EncodeError> {
        let Some(writer) = self.writer.as_mut() else {
            return Ok(None);
        };
        let total_rows = self.rows.len() / self.row_bytes.max(1);
        while self.next_row < total_rows && self.out.len() < CHUNK_BYTES {
            let start = self.next_row * self.row_bytes;
            writer
                .write_all(&self.rows[start..start + self.row_bytes])
                .map_err(|e| EncodeError(e.to_string()))?;
            self.next_row += 1;
        }
        if self.next_row == total_rows
            && let Some(writer) = self.writer.take()
        {
            writer.finish().map_err(|e| EncodeError(e.to_string()))?;
        }
        Ok(Some(Bytes::from(self.out.take())))
    }
}

impl Iterator for PngChunks {
    type Item = Result<Bytes, EncodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.advance() {
                Ok(Some(chunk)) if chunk.is_empty() => continue,
                Ok(Some(chunk)) => return Some(Ok(chunk)),
                Ok(None) => return None,
                Err(error) => {
                    self.writer = None;
                    return Some(Err(error));
                }
            }
        }
    }
}

/// A float32 `.npy` file of `[height, width]` values.
pub fn npy(values: &[f32], width: usize, height: usize) -> Result<Bytes, EncodeError> {
    let mut out = Vec::with_capacity(128 + 4 * values.len());
    let error = |e: io::Error| EncodeError(e.to_string());
    let mut writer = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&[height as u64, width as u64])
        .writer(&mut out)
        .begin_nd()
        .map_err(error)?;
    writer.extend(values.iter().copied()).map_err(error)?;
    writer.finish().map_err(error)?;
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_comes_out_in_chunks_that_decode() {
        let (width, height) = (300u32, 400u32);
        let pixels: Vec<u8> = (0..width * height * 3)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let chunks: Vec<Bytes> = PngChunks::rgb8(pixels.clone(), width, height)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(
            chunks.len() > 1,
            "expected several chunks, got {}",
            chunks.len()
        );
        let whole: Vec<u8> = chunks.concat();
        let decoded = image::load_from_memory(&whole).unwrap().into_rgb8();
        assert_eq!(decoded.dimensions(), (width, height));
        assert_eq!(decoded.into_raw(), pixels);
    }
}
