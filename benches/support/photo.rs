//! The benchmarks' uploads: the rocket photo from the test fixtures, resized and re-encoded.

use std::io::Cursor;

use image::imageops::FilterType;

/// A `width x height` JPEG (quality 90) of a real photo, as a client would upload it.
pub fn jpeg(width: u32, height: u32) -> Vec<u8> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/images/rocket.jpg"
    );
    let photo = image::open(path)
        .unwrap()
        .resize_exact(width, height, FilterType::Triangle)
        .into_rgb8();
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(Cursor::new(&mut out), 90)
        .encode_image(&photo)
        .unwrap();
    out
}
