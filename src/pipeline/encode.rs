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
    /// A point cloud, binary little-endian PLY: `float x, y, z`, `uchar red, green, blue` per
    /// vertex (see `pipeline::cloud`).
    Ply,
}

impl OutputFormat {
    /// File extension of the encoded output.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Png | Self::Png16 => "png",
            Self::Npy => "npy",
            Self::Ply => "ply",
        }
    }

    /// HTTP content type of the encoded output.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Png | Self::Png16 => "image/png",
            Self::Npy => "application/x-npy",
            Self::Ply => "application/x-ply",
        }
    }

    /// The name used in query strings and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Png16 => "png16",
            Self::Npy => "npy",
            Self::Ply => "ply",
        }
    }

    /// Every format.
    pub const ALL: [Self; 4] = [Self::Png, Self::Png16, Self::Npy, Self::Ply];

    /// Parses a query-string value.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
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

impl EncodeError {
    /// An error with this message (a failure of whoever supplies the rows).
    pub fn from_message(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// Bytes of rows handed to the PNG writer per call.
const WRITE_BYTES: usize = 16 * 1024;

/// Where a PNG's rows come from: called with the first row and the number of rows of each band
/// in turn, it returns their bytes (row-major, each row `width x bytes per pixel` long).
pub type RowBands = Box<dyn FnMut(u32, u32) -> Result<Vec<u8>, EncodeError> + Send>;

/// A PNG being encoded, yielded as chunks of bytes. Its rows are asked for a band at a time,
/// so only one band is held however large the image.
pub struct PngChunks {
    writer: Option<png::StreamWriter<'static, SharedBuffer>>,
    out: SharedBuffer,
    bands: RowBands,
    band: Vec<u8>,
    written: usize,
    row_bytes: usize,
    band_rows: u32,
    next_row: u32,
    height: u32,
}

impl PngChunks {
    /// A PNG whose rows come from `bands`, `band_rows` at a time.
    pub fn from_bands(
        width: u32,
        height: u32,
        color: png::ColorType,
        depth: png::BitDepth,
        band_rows: u32,
        bands: RowBands,
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
        let bits = color.samples()
            * if depth == png::BitDepth::Sixteen {
                16
            } else {
                8
            };
        Ok(Self {
            writer: Some(writer),
            out,
            bands,
            band: Vec::new(),
            written: 0,
            row_bytes: (width as usize * bits).div_ceil(8),
            band_rows: band_rows.max(1),
            next_row: 0,
            height,
        })
    }

    /// An 8-bit RGB PNG of row-major pixels.
    pub fn rgb8(pixels: Vec<u8>, width: u32, height: u32) -> Result<Self, EncodeError> {
        let mut whole = Some(pixels);
        Self::from_bands(
            width,
            height,
            png::ColorType::Rgb,
            png::BitDepth::Eight,
            height,
            Box::new(move |_, _| Ok(whole.take().unwrap_or_default())),
        )
    }

    /// A 16-bit greyscale PNG of row-major values.
    pub fn gray16(values: &[u16], width: u32, height: u32) -> Result<Self, EncodeError> {
        let mut whole = Some(values.iter().flat_map(|v| v.to_be_bytes()).collect());
        Self::from_bands(
            width,
            height,
            png::ColorType::Grayscale,
            png::BitDepth::Sixteen,
            height,
            Box::new(move |_, _| Ok(whole.take().unwrap_or_default())),
        )
    }

    fn advance(&mut self) -> Result<Option<Bytes>, EncodeError> {
        if self.writer.is_none() {
            return Ok(None);
        }
        // Several narrow rows per call: a 1-pixel-wide image must not cost a call per pixel.
        let step = (WRITE_BYTES / self.row_bytes.max(1)).max(1) * self.row_bytes;
        while self.out.len() < CHUNK_BYTES {
            if self.written == self.band.len() {
                if self.next_row >= self.height {
                    if let Some(writer) = self.writer.take() {
                        writer.finish().map_err(|e| EncodeError(e.to_string()))?;
                    }
                    break;
                }
                let rows = self.band_rows.min(self.height - self.next_row);
                self.band = (self.bands)(self.next_row, rows)?;
                if self.band.len() != rows as usize * self.row_bytes {
                    return Err(EncodeError(format!(
                        "a band of {rows} rows came with {} bytes",
                        self.band.len()
                    )));
                }
                self.written = 0;
                self.next_row += rows;
            }
            let end = (self.written + step).min(self.band.len());
            if let Some(writer) = self.writer.as_mut() {
                writer
                    .write_all(&self.band[self.written..end])
                    .map_err(|e| EncodeError(e.to_string()))?;
            }
            self.written = end;
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
