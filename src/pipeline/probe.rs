//! Reading an image's size from its first bytes, by walking the container's structure: a PNG's
//! first chunk must be a well-formed IHDR (length 13, valid fields, matching CRC), a JPEG's
//! segments are followed by their lengths to the frame header, a WebP's RIFF header must hold a
//! VP8, VP8L or VP8X chunk with its own signature. Nothing is read at a fixed offset on trust,
//! so bytes that only start like an image are refused as corrupt, not taken for a size.
//!
//! [`HeaderProbe`] keeps its position between calls, so an upload probed each time a chunk
//! arrives costs time linear in the bytes seen, however long the metadata before the size.

use super::format::{DecodeError, ImageFormat, ImageHeader};

/// PNG's eight-byte signature.
const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// The longest prefix [`ImageFormat::sniff`] needs to recognise every accepted format.
const SNIFF_BYTES: usize = 16;

/// Where a probe stands in an upload's bytes.
#[derive(Clone, Debug, Default)]
pub struct HeaderProbe {
    format: Option<ImageFormat>,
    /// For JPEG, the offset of the next marker to read (segments before it were skipped).
    offset: usize,
}

/// One step of a walk: done, or more bytes are needed.
type Step<T> = Result<Option<T>, DecodeError>;

impl HeaderProbe {
    /// A probe at the start of an upload.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads the header from `bytes`, the upload's first bytes (each call passes everything
    /// received so far; the probe resumes where it stopped). `Ok(None)` means more bytes are
    /// needed; once `complete` is true (the whole file is here) the answer is final.
    pub fn advance(
        &mut self,
        bytes: &[u8],
        complete: bool,
    ) -> Result<Option<ImageHeader>, DecodeError> {
        let format = match self.format {
            Some(format) => format,
            None => match ImageFormat::sniff(bytes) {
                Some(format) => *self.format.insert(format),
                None if bytes.len() < SNIFF_BYTES && !complete => return Ok(None),
                None => return Err(DecodeError::UnsupportedFormat),
            },
        };
        let found = match format {
            ImageFormat::Png => png(bytes),
            ImageFormat::Jpeg => jpeg_frame(bytes, &mut self.offset),
            ImageFormat::Webp => webp(bytes),
        }?;
        match found {
            Some((width, height)) => Ok(Some(ImageHeader {
                format,
                width,
                height,
            })),
            None if complete => Err(DecodeError::Truncated(format)),
            None => Ok(None),
        }
    }
}

/// Reads the header of a whole file (see [`HeaderProbe::advance`]).
pub fn probe(bytes: &[u8], complete: bool) -> Result<Option<ImageHeader>, DecodeError> {
    HeaderProbe::new().advance(bytes, complete)
}

fn corrupt(format: ImageFormat, message: &str) -> DecodeError {
    DecodeError::Corrupt {
        format,
        message: message.to_string(),
    }
}

fn be32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// The IHDR chunk, which the PNG specification requires first.
fn png(bytes: &[u8]) -> Step<(u32, u32)> {
    const IHDR_END: usize = 8 + 4 + 4 + 13 + 4;
    if bytes.len() < IHDR_END {
        return Ok(None);
    }
    let bad = |message| Err(corrupt(ImageFormat::Png, message));
    if &bytes[..8] != PNG_SIGNATURE {
        return bad("no PNG signature");
    }
    if be32(bytes, 8) != 13 || &bytes[12..16] != b"IHDR" {
        return bad("the first chunk is not a 13-byte IHDR");
    }
    if crc32fast::hash(&bytes[12..29]) != be32(bytes, 29) {
        return bad("the IHDR chunk's CRC does not match");
    }
    let (width, height) = (be32(bytes, 16), be32(bytes, 20));
    let (depth, colour) = (bytes[24], bytes[25]);
    let depth_allowed: &[u8] = match colour {
        0 => &[1, 2, 4, 8, 16],
        3 => &[1, 2, 4, 8],
        2 | 4 | 6 => &[8, 16],
        _ => return bad("unknown colour type in IHDR"),
    };
    if !depth_allowed.contains(&depth) {
        return bad("bit depth not allowed for the colour type in IHDR");
    }
    if bytes[26] != 0 || bytes[27] != 0 || bytes[28] > 1 {
        return bad("unknown compression, filter or interlace method in IHDR");
    }
    // The specification caps both sides at 2^31 - 1.
    if width > i32::MAX as u32 || height > i32::MAX as u32 {
        return bad("a side in IHDR is above 2^31 - 1");
    }
    Ok(Some((width, height)))
}

/// A JPEG segment the walk has reached.
enum Segment {
    /// A frame header (SOFn) with its height and width.
    Frame { height: u32, width: u32 },
    /// The first scan (SOS) begins at this offset.
    Scan(usize),
    /// Any other segment, skipped.
    Other,
}

/// Reads the marker at `*offset` and moves past its segment; `Ok(None)` when the bytes end
/// first (the offset is then left at that marker, to resume from).
fn jpeg_segment(bytes: &[u8], offset: &mut usize) -> Step<Segment> {
    let bad = |message| Err(corrupt(ImageFormat::Jpeg, message));
    if *offset == 0 {
        if bytes.len() < 2 {
            return Ok(None);
        }
        if bytes[..2] != [0xFF, 0xD8] {
            return bad("no start-of-image marker");
        }
        *offset = 2;
    }
    let mut at = *offset;
    // A marker is 0xFF, optional 0xFF fill bytes, then the marker code.
    if at >= bytes.len() {
        return Ok(None);
    }
    if bytes[at] != 0xFF {
        return bad("a segment does not start with a marker");
    }
    while at < bytes.len() && bytes[at] == 0xFF {
        at += 1;
    }
    let Some(&code) = bytes.get(at) else {
        // Resume at the run's last fill byte: a run arriving in small pieces is read once,
        // not again from its start with every piece.
        *offset = at - 1;
        return Ok(None);
    };
    at += 1;
    match code {
        0x00 => return bad("a stuffed byte where a marker belongs"),
        // Standalone markers carry no length.
        0x01 | 0xD0..=0xD7 => {
            *offset = at;
            return Ok(Some(Segment::Other));
        }
        0xD8 => return bad("a second start-of-image marker before the frame header"),
        0xD9 => return bad("the image ends before its frame header"),
        _ => {}
    }
    if at + 2 > bytes.len() {
        return Ok(None);
    }
    let length = usize::from(u16::from_be_bytes([bytes[at], bytes[at + 1]]));
    if length < 2 {
        return bad("a segment length below 2");
    }
    let end = at + length;
    let segment = match code {
        // Start of frame, every coding process (C4 is DHT, C8 reserved, CC is DAC).
        0xC0..=0xCF if !matches!(code, 0xC4 | 0xC8 | 0xCC) => {
            if length < 8 {
                return bad("a frame header shorter than its fields");
            }
            if at + 7 > bytes.len() {
                return Ok(None);
            }
            let height = u32::from(u16::from_be_bytes([bytes[at + 3], bytes[at + 4]]));
            let width = u32::from(u16::from_be_bytes([bytes[at + 5], bytes[at + 6]]));
            Segment::Frame { height, width }
        }
        0xDA => Segment::Scan(end),
        _ => Segment::Other,
    };
    *offset = end;
    Ok(Some(segment))
}

/// Walks the segments from `*offset` to the frame header.
fn jpeg_frame(bytes: &[u8], offset: &mut usize) -> Step<(u32, u32)> {
    loop {
        match jpeg_segment(bytes, offset)? {
            None => return Ok(None),
            Some(Segment::Frame { height, width }) => return Ok(Some((width, height))),
            Some(Segment::Scan(_)) => {
                return Err(corrupt(
                    ImageFormat::Jpeg,
                    "a scan starts before the frame header",
                ));
            }
            Some(Segment::Other) => {}
        }
    }
}

/// Whether a whole JPEG file holds its end-of-image marker after its first scan begins.
///
/// A JPEG cut short still decodes (the decoder paints the missing blocks grey), so the end has
/// to be checked. Inside entropy-coded data a 0xFF is always followed by 0x00 or a restart
/// code, so 0xFF 0xD9 there is the real end; a complete file is never refused.
pub fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let mut offset = 0;
    loop {
        match jpeg_segment(bytes, &mut offset) {
            Ok(Some(Segment::Scan(start))) => {
                let data = bytes.get(start..).unwrap_or_default();
                return data.windows(2).any(|pair| pair == [0xFF, 0xD9]);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return false,
        }
    }
}

/// The size in a WebP's first chunk (`RIFF....WEBP` then VP8, VP8L or VP8X).
fn webp(bytes: &[u8]) -> Step<(u32, u32)> {
    const CHUNK: usize = 12;
    let bad = |message| Err(corrupt(ImageFormat::Webp, message));
    if bytes.len() < CHUNK + 8 {
        return Ok(None);
    }
    if &bytes[..4] != b"RIFF" || &bytes[8..12] != b"WEBP" {
        return bad("not a RIFF WEBP container");
    }
    let payload = CHUNK + 8;
    let le24 = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], 0]);
    match &bytes[CHUNK..CHUNK + 4] {
        b"VP8 " => {
            if bytes.len() < payload + 10 {
                return Ok(None);
            }
            if bytes[payload + 3..payload + 6] != [0x9D, 0x01, 0x2A] {
                return bad("the VP8 frame's start code is missing");
            }
            let side =
                |at: usize| u32::from(u16::from_le_bytes([bytes[at], bytes[at + 1]]) & 0x3FFF);
            Ok(Some((side(payload + 6), side(payload + 8))))
        }
        b"VP8L" => {
            if bytes.len() < payload + 5 {
                return Ok(None);
            }
            if bytes[payload] != 0x2F {
                return bad("the VP8L signature byte is missing");
            }
            let bits = u32::from_le_bytes([
                bytes[payload + 1],
                bytes[payload + 2],
                bytes[payload + 3],
                bytes[payload + 4],
            ]);
            Ok(Some(((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)))
        }
        b"VP8X" => {
            if bytes.len() < payload + 10 {
                return Ok(None);
            }
            Ok(Some((le24(payload + 4) + 1, le24(payload + 7) + 1)))
        }
        _ => bad("the first chunk is not VP8, VP8L or VP8X"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_with_ihdr(width: u32, height: u32, depth: u8, colour: u8) -> Vec<u8> {
        let mut bytes = PNG_SIGNATURE.to_vec();
        let mut chunk = b"IHDR".to_vec();
        chunk.extend_from_slice(&width.to_be_bytes());
        chunk.extend_from_slice(&height.to_be_bytes());
        chunk.extend_from_slice(&[depth, colour, 0, 0, 0]);
        bytes.extend_from_slice(&13u32.to_be_bytes());
        bytes.extend_from_slice(&chunk);
        bytes.extend_from_slice(&crc32fast::hash(&chunk).to_be_bytes());
        bytes
    }

    #[test]
    fn png_needs_a_valid_ihdr() {
        let good = png_with_ihdr(640, 480, 8, 2);
        let header = probe(&good, false).unwrap().unwrap();
        assert_eq!((header.width, header.height), (640, 480));
        assert!(matches!(probe(&good[..20], false), Ok(None)));
        assert!(matches!(
            probe(&good[..20], true),
            Err(DecodeError::Truncated(ImageFormat::Png))
        ));
        // The signature followed by garbage is corrupt, whatever the bytes at 16..24 say.
        let mut garbage = PNG_SIGNATURE.to_vec();
        garbage.extend_from_slice(&[0xFF; 40]);
        assert!(matches!(
            probe(&garbage, false),
            Err(DecodeError::Corrupt { .. })
        ));
        let mut bad_crc = good.clone();
        bad_crc[20] ^= 1;
        assert!(matches!(
            probe(&bad_crc, false),
            Err(DecodeError::Corrupt { .. })
        ));
        assert!(matches!(
            probe(&png_with_ihdr(1, 1, 16, 3), false),
            Err(DecodeError::Corrupt { .. })
        ));
    }

    #[test]
    fn jpeg_walks_segments_incrementally() {
        let mut jpeg = vec![0xFF, 0xD8];
        // A long APP1 segment, then a baseline frame header of 300 x 200.
        jpeg.extend_from_slice(&[0xFF, 0xE1, 0xFF, 0xF0]);
        jpeg.extend(std::iter::repeat_n(0xD9, 0xFFF0 - 2));
        jpeg.extend_from_slice(&[0xFF, 0xC0, 0, 11, 8, 0, 200, 1, 44, 1, 1, 0x11, 0]);
        let mut probe_state = HeaderProbe::new();
        let mut answer = None;
        for end in (1..=jpeg.len()).step_by(997).chain([jpeg.len()]) {
            answer = probe_state.advance(&jpeg[..end], false).unwrap();
            if answer.is_some() {
                break;
            }
        }
        let header = answer.unwrap();
        assert_eq!((header.width, header.height), (300, 200));
        // A scan before any frame header is refused.
        let scan_first = [0xFF, 0xD8, 0xFF, 0xDA, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(
            probe(&scan_first, false),
            Err(DecodeError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_run_of_fill_bytes_is_read_once() {
        // A start marker then 0xFF fill arriving in small pieces: each call resumes at the end
        // of what it has seen (the last fill byte), so the whole walk costs the run's length.
        let mut jpeg = vec![0xFF, 0xD8];
        jpeg.extend(std::iter::repeat_n(0xFF, 1 << 16));
        let mut probe_state = HeaderProbe::new();
        for end in (3..=jpeg.len()).step_by(7) {
            assert_eq!(probe_state.advance(&jpeg[..end], false).unwrap(), None);
            assert_eq!(probe_state.offset, end - 1, "resumed behind the bytes seen");
        }
        // The run may still end in a real marker: the frame header is found after it.
        jpeg.extend_from_slice(&[0xC0, 0, 11, 8, 0, 20, 0, 30, 1, 1, 0x11, 0]);
        let header = probe_state.advance(&jpeg, false).unwrap().unwrap();
        assert_eq!((header.width, header.height), (30, 20));
    }

    #[test]
    fn jpeg_completeness_looks_after_the_first_scan() {
        let mut jpeg = vec![0xFF, 0xD8, 0xFF, 0xE0, 0, 4, 0xFF, 0xD9];
        jpeg.extend_from_slice(&[0xFF, 0xC0, 0, 11, 8, 0, 1, 0, 1, 1, 1, 0x11, 0]);
        jpeg.extend_from_slice(&[0xFF, 0xDA, 0, 2, 0x12, 0xFF, 0x00, 0x34]);
        assert!(
            !jpeg_is_complete(&jpeg),
            "an EOI inside APP0 does not count"
        );
        jpeg.extend_from_slice(&[0xFF, 0xD9]);
        assert!(jpeg_is_complete(&jpeg));
    }

    #[test]
    fn webp_chunks_carry_their_signatures() {
        let mut lossless = b"RIFF\0\0\0\0WEBPVP8L\0\0\0\0".to_vec();
        let bits: u32 = (99) | (49 << 14);
        lossless.push(0x2F);
        lossless.extend_from_slice(&bits.to_le_bytes());
        let header = probe(&lossless, false).unwrap().unwrap();
        assert_eq!((header.width, header.height), (100, 50));
        lossless[20] = 0;
        assert!(matches!(
            probe(&lossless, false),
            Err(DecodeError::Corrupt { .. })
        ));
    }
}
