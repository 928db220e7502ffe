//! Requests meant to hurt: each gets the right status and a JSON refusal, and the server stays
//! healthy and bounded in memory afterwards.

mod support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use support::fixture;
use support::server::{
    RawResponse, Server, multipart, post_multipart, predict, read_response, request,
};

const MAX_BODY: usize = 2 * 1024 * 1024;

fn start(store: &std::path::Path) -> Server {
    Server::start(
        &[
            "--store",
            store.to_str().unwrap(),
            "--max-body-bytes",
            &MAX_BODY.to_string(),
            "--request-timeout-secs",
            "2",
            "--header-timeout-secs",
            "1",
        ],
        &[],
    )
}

fn png(width: u32, height: u32) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_compression(png::Compression::Fast);
        let mut header = encoder.write_header().unwrap();
        let mut writer = header.stream_writer().unwrap();
        let row = vec![0u8; width as usize];
        for _ in 0..height {
            writer.write_all(&row).unwrap();
        }
        writer.finish().unwrap();
    }
    out
}

/// A PNG whose header declares `width` x `height` but that holds only the header.
fn png_header_only(width: u32, height: u32) -> Vec<u8> {
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    bytes.extend_from_slice(&13u32.to_be_bytes());
    bytes.extend_from_slice(&ihdr);
    bytes.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    bytes
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn assert_refusal(case: &str, response: &RawResponse, status: u16, code: &str) {
    assert_eq!(
        response.status,
        status,
        "{case}: {}",
        String::from_utf8_lossy(&response.body)
    );
    assert_eq!(
        response.header("content-type"),
        Some("application/json"),
        "{case}"
    );
    let json = response.json();
    assert_eq!(json["error"], code, "{case}: {json}");
    assert!(!json["message"].as_str().unwrap().is_empty(), "{case}");
    assert_eq!(
        json["request_id"].as_str(),
        response.header("x-request-id"),
        "{case}"
    );
}

#[test]
fn hostile_requests_are_refused_cleanly() {
    let store = tempfile::tempdir().unwrap();
    let server = start(store.path());
    let photo = std::fs::read(fixture("images/camera_odd.png")).unwrap();
    let jpeg = std::fs::read(fixture("images/rocket.jpg")).unwrap();
    let boundary_type = "multipart/form-data; boundary=XyZ";
    let mut cases = 0;
    let mut check = |case: &str, response: RawResponse, status: u16, code: &str| {
        assert_refusal(case, &response, status, code);
        cases += 1;
    };

    check(
        "unknown path",
        request(&server, "GET", "/admin", &[], b""),
        404,
        "not_found",
    );
    let response = request(&server, "DELETE", "/predict", &[], b"");
    assert_eq!(response.header("allow"), Some("POST"));
    check("DELETE /predict", response, 405, "method_not_allowed");
    check(
        "GET /predict",
        request(&server, "GET", "/predict", &[], b""),
        405,
        "method_not_allowed",
    );
    check(
        "POST /",
        request(&server, "POST", "/", &[], b"x"),
        405,
        "method_not_allowed",
    );
    check(
        "JSON body",
        request(
            &server,
            "POST",
            "/predict",
            &[("Content-Type", "application/json")],
            b"{}",
        ),
        415,
        "not_multipart",
    );
    check(
        "no content type",
        request(&server, "POST", "/predict", &[], &photo),
        415,
        "not_multipart",
    );
    check(
        "no boundary",
        request(
            &server,
            "POST",
            "/predict",
            &[("Content-Type", "multipart/form-data")],
            b"--x--",
        ),
        415,
        "not_multipart",
    );
    check(
        "empty form",
        request(
            &server,
            "POST",
            "/predict",
            &[("Content-Type", boundary_type)],
            b"--XyZ--\r\n",
        ),
        400,
        "missing_file",
    );
    check(
        "garbage multipart",
        request(
            &server,
            "POST",
            "/predict",
            &[("Content-Type", boundary_type)],
            b"not a multipart body at all",
        ),
        400,
        "bad_multipart",
    );
    check(
        "a text part that is not an option",
        post_multipart(&server, "notes", None, b"hello"),
        400,
        "unexpected_field",
    );
    check(
        "the image without a filename",
        post_multipart(&server, "file", None, &photo),
        400,
        "unexpected_field",
    );
    check(
        "an unknown colormap as a form field",
        post_multipart(&server, "colormap", None, b"jet"),
        400,
        "bad_query",
    );
    check(
        "empty file",
        post_multipart(&server, "file", Some("a.png"), b""),
        400,
        "empty_file",
    );
    check(
        "gif extension",
        post_multipart(&server, "file", Some("a.gif"), b"GIF89a"),
        415,
        "unsupported_extension",
    );
    check(
        "no extension",
        post_multipart(&server, "file", Some("photo"), &photo),
        415,
        "unsupported_extension",
    );
    check(
        "PNG named .jpg",
        post_multipart(&server, "file", Some("a.jpg"), &photo),
        415,
        "type_mismatch",
    );
    check(
        "text named .png",
        post_multipart(
            &server,
            "file",
            Some("a.png"),
            b"hello, this is not an image at all",
        ),
        415,
        "unsupported_image",
    );
    check(
        "one byte",
        post_multipart(&server, "file", Some("a.png"), b"\x89"),
        415,
        "unsupported_image",
    );
    check(
        "truncated PNG",
        post_multipart(&server, "file", Some("a.png"), &photo[..photo.len() / 3]),
        422,
        "truncated_image",
    );
    let mut corrupt = photo.clone();
    let middle = corrupt.len() / 2;
    corrupt[middle..middle + 64].fill(0xA5);
    check(
        "corrupt PNG data",
        post_multipart(&server, "file", Some("a.png"), &corrupt),
        422,
        "corrupt_image",
    );
    let mut signature_then_garbage = b"\x89PNG\r\n\x1a\n".to_vec();
    signature_then_garbage.extend_from_slice(&[0xFF; 64]);
    check(
        "PNG signature then garbage",
        post_multipart(&server, "file", Some("a.png"), &signature_then_garbage),
        422,
        "corrupt_image",
    );
    check(
        "half-sent JPEG",
        post_multipart(&server, "file", Some("a.jpg"), &jpeg[..jpeg.len() / 2]),
        422,
        "truncated_image",
    );
    for size in [20 * 1024, 200 * 1024] {
        let big_header = "x".repeat(size);
        check(
            &format!("a {size}-byte header"),
            request(&server, "GET", "/healthz", &[("X-Big", &big_header)], b""),
            431,
            "headers_too_large",
        );
    }
    // A polyglot: a JPEG start with an HTML document where the image data should be.
    let mut polyglot = jpeg[..20].to_vec();
    polyglot.extend_from_slice(b"<html><script>alert(1)</script></html>");
    check(
        "JPEG/HTML polyglot",
        post_multipart(&server, "file", Some("a.jpg"), &polyglot),
        422,
        "corrupt_image",
    );
    check(
        "50000x50000 header",
        post_multipart(
            &server,
            "file",
            Some("big.png"),
            &png_header_only(50000, 50000),
        ),
        413,
        "too_many_pixels",
    );
    let bomb = png(10_000, 10_000);
    assert!(
        bomb.len() < 1_000_000,
        "the bomb is small on the wire ({} bytes)",
        bomb.len()
    );
    check(
        "decompression bomb",
        post_multipart(&server, "file", Some("bomb.png"), &bomb),
        413,
        "too_many_pixels",
    );
    check(
        "zero-sized PNG",
        post_multipart(&server, "file", Some("zero.png"), &png_header_only(0, 10)),
        422,
        "empty_image",
    );
    let big = vec![0u8; MAX_BODY + 1000];
    check(
        "body over the limit",
        post_multipart(&server, "file", Some("a.png"), &big),
        413,
        "body_too_large",
    );

    // The same, chunked, so no Content-Length warns the server.
    let mut stream = server.connect();
    write!(stream, "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {boundary_type}\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
    let preamble = vec![b'-'; 64 * 1024];
    for _ in 0..(MAX_BODY / preamble.len() + 4) {
        if write!(stream, "{:x}\r\n", preamble.len())
            .and_then(|_| stream.write_all(&preamble))
            .and_then(|_| stream.write_all(b"\r\n"))
            .is_err()
        {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n");
    check(
        "huge multipart preamble, chunked",
        read_response(&mut stream),
        413,
        "body_too_large",
    );

    // Thousands of parts.
    let mut body = Vec::new();
    for i in 0..5000 {
        write!(
            body,
            "--XyZ\r\nContent-Disposition: form-data; name=\"f{i}\"\r\n\r\nx\r\n"
        )
        .unwrap();
    }
    body.extend_from_slice(b"--XyZ--\r\n");
    check(
        "thousands of parts",
        request(
            &server,
            "POST",
            "/predict",
            &[("Content-Type", boundary_type)],
            &body,
        ),
        400,
        "unexpected_field",
    );

    // Two files.
    let (content_type, mut two) = multipart("file", Some("a.png"), &photo);
    let closing = two.len() - "--midasTestBoundary7MA4YWxkTrZu0gW--\r\n".len();
    two.truncate(closing);
    write!(two, "--midasTestBoundary7MA4YWxkTrZu0gW\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b.png\"\r\n\r\nxx\r\n--midasTestBoundary7MA4YWxkTrZu0gW--\r\n").unwrap();
    check(
        "two files",
        request(
            &server,
            "POST",
            "/predict",
            &[("Content-Type", &content_type)],
            &two,
        ),
        400,
        "unexpected_field",
    );

    for query in ["?colormap=jet", "?format=gif", "?debug=1"] {
        check(
            query,
            predict(&server, "a.png", &photo, query),
            400,
            "bad_query",
        );
    }

    // A slow drip: one byte every 200 ms runs into the request timeout (2 s).
    let (content_type, body) = multipart("file", Some("a.png"), &photo);
    let mut stream = server.connect();
    write!(stream, "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n", body.len()).unwrap();
    let started = Instant::now();
    let mut dripper = stream.try_clone().unwrap();
    let drip = std::thread::spawn(move || {
        for byte in body.iter().take(40) {
            if dripper.write_all(&[*byte]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let response = read_response(&mut stream);
    assert!(started.elapsed() < Duration::from_secs(5));
    check("slow drip", response, 408, "request_timeout");
    drop(stream);
    drip.join().unwrap();

    assert!(cases >= 25, "{cases} cases");

    // Slowloris: headers never finish; the connection is closed after the header timeout.
    let mut stream = server.connect();
    stream
        .write_all(b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    assert!(
        started.elapsed() >= Duration::from_millis(900)
            && started.elapsed() < Duration::from_secs(5),
        "closed after {:?}, expected at the 1 s header timeout",
        started.elapsed()
    );

    // A client file name cannot escape the store.
    let response = post_multipart(&server, "file", Some("../../../etc/passwd.png"), &photo);
    assert_eq!(response.status, 201);
    let input = response.header("x-input-object").unwrap();
    assert!(
        !input.contains("..") && input.ends_with("-passwd.png"),
        "{input}"
    );
    assert!(store.path().join(input).is_file());

    // Nothing refused left an object behind: only the one accepted upload and its prediction.
    let uploads = support::stored_files(&store.path().join("uploads"));
    assert_eq!(uploads.len(), 1, "{uploads:?}");

    // Still healthy, and memory stayed bounded through all of it.
    assert_eq!(request(&server, "GET", "/healthz", &[], b"").status, 200);
    assert_eq!(predict(&server, "rocket.jpg", &jpeg, "").status, 201);
    let peak_mib = server.memory_kib("VmHWM") / 1024;
    println!("peak RSS {peak_mib} MiB");
    assert!(peak_mib < 400, "peak RSS {peak_mib} MiB");
}

/// Sends `raw` as it is (ignoring a write cut short by the server's answer) and reads the reply.
fn send_raw(server: &Server, raw: &[u8]) -> RawResponse {
    let mut stream = server.connect();
    let _ = stream.write_all(raw);
    read_response(&mut stream)
}

#[test]
fn requests_hyper_refuses_itself_still_get_json() {
    let store = tempfile::tempdir().unwrap();
    let server = start(store.path());
    let many_headers: String = (0..120).map(|i| format!("X-H{i}: v\r\n")).collect();
    let long_url = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(1 << 20));
    let long_header = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(1 << 20)
    );
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "Content-Length with Transfer-Encoding",
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
        ),
        (
            "malformed Content-Length",
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\n".to_vec(),
        ),
        (
            "folded header",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-A: b\r\n c\r\n\r\n".to_vec(),
        ),
        (
            "NUL in a header",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-A: b\0c\r\n\r\n".to_vec(),
        ),
        ("HTTP/2.0 request line", b"GET / HTTP/2.0\r\nHost: x\r\n\r\n".to_vec()),
        (
            "more than 100 headers",
            format!("GET / HTTP/1.1\r\nHost: x\r\n{many_headers}\r\n").into_bytes(),
        ),
        ("1 MiB URL", long_url.into_bytes()),
        ("1 MiB header", long_header.into_bytes()),
    ];
    for (case, raw) in cases {
        let response = send_raw(&server, &raw);
        assert!(
            (400..600).contains(&response.status),
            "{case}: status {}",
            response.status
        );
        assert_eq!(
            response.header("content-type"),
            Some("application/json"),
            "{case}: {response:?}"
        );
        let json = response.json();
        assert!(
            json["error"].as_str().is_some_and(|code| !code.is_empty()),
            "{case}: {json}"
        );
        assert!(
            json["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{case}"
        );
        assert_eq!(
            json["request_id"].as_str(),
            response.header("x-request-id"),
            "{case}"
        );
    }
    assert_eq!(request(&server, "GET", "/healthz", &[], b"").status, 200);
}

#[test]
fn file_names_etags_and_special_files_in_the_store() {
    let store = tempfile::tempdir().unwrap();
    let server = start(store.path());
    let photo = std::fs::read(fixture("images/camera_odd.png")).unwrap();

    // Names that are only an extension keep it.
    for name in [".png", "a/..png"] {
        let response = post_multipart(&server, "file", Some(name), &photo);
        assert_eq!(response.status, 201, "{name}");
        let input = response.header("x-input-object").unwrap();
        assert!(input.ends_with("-upload.png"), "{name}: {input}");
    }
    // A file part named only by RFC 5987's filename*.
    let boundary = "Rfc5987Boundary";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename*=UTF-8''caf%C3%A9%20photo.png\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(&photo);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let content_type = format!("multipart/form-data; boundary={boundary}");
    let response = request(
        &server,
        "POST",
        "/predict",
        &[("Content-Type", &content_type)],
        &body,
    );
    assert_eq!(
        response.status,
        201,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    let input = response.header("x-input-object").unwrap();
    assert!(input.ends_with("-caf__photo.png"), "{input}");

    // If-None-Match compares weakly, and takes `*` and lists.
    let location = response.header("location").unwrap().to_string();
    let id = location.rsplit('/').next().unwrap();
    let etag = format!("\"{id}\"");
    for (value, status) in [
        (etag.clone(), 304),
        (format!("W/{etag}"), 304),
        ("*".to_string(), 304),
        (format!("\"other\", W/{etag}"), 304),
        ("\"other\"".to_string(), 200),
    ] {
        let response = request(&server, "GET", &location, &[("If-None-Match", &value)], b"");
        assert_eq!(response.status, status, "If-None-Match: {value}");
    }

    // A stored object that is a FIFO is refused at once, and does not hold up shutdown.
    let fifo_id = "20251125-0123456789abcdef0123456789abcdef";
    let directory = store.path().join("predictions/2025/11/25");
    std::fs::create_dir_all(&directory).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(directory.join(format!("{fifo_id}.png")))
        .status()
        .unwrap();
    assert!(made.success());
    let started = Instant::now();
    let response = request(&server, "GET", &format!("/predictions/{fifo_id}"), &[], b"");
    assert_refusal("FIFO", &response, 500, "store_unreadable");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let mut server = server;
    server.signal("TERM");
    let status = server.wait(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit after SIGTERM: {status:?}"
    );
}
