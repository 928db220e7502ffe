//! The server stays bounded in every dimension: extreme aspect ratios, the worst images the
//! limits allow arriving together, a full queue, clients that never read, clients that vanish.

mod support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use support::fixture;
use support::server::{RawResponse, Server, multipart, predict, request};

/// A PNG of zeros: tiny on the wire, large once decoded.
fn png(width: u32, height: u32, color: png::ColorType, depth: png::BitDepth) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(color);
        encoder.set_depth(depth);
        encoder.set_compression(png::Compression::High);
        let mut header = encoder.write_header().unwrap();
        let mut writer = header.stream_writer().unwrap();
        let bytes_per_pixel = color.samples()
            * if depth == png::BitDepth::Sixteen {
                2
            } else {
                1
            };
        let block = vec![0u8; 1 << 20];
        let mut left = width as usize * height as usize * bytes_per_pixel;
        while left > 0 {
            let n = left.min(block.len());
            writer.write_all(&block[..n]).unwrap();
            left -= n;
        }
        writer.finish().unwrap();
    }
    out
}

fn start(store: &std::path::Path, extra: &[&str]) -> Server {
    let mut args = vec!["--store", store.to_str().unwrap()];
    args.extend_from_slice(extra);
    Server::start(&args, &[])
}

fn metric(server: &Server, name: &str) -> f64 {
    let text = support::get(server.url("/metrics"))
        .unwrap()
        .text()
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[test]
fn extreme_aspect_ratios_are_refused_at_once_or_served_in_bounded_memory() {
    let store = tempfile::tempdir().unwrap();
    let images: Vec<((u32, u32), Vec<u8>)> = [(1, 24_000_000), (24_000_000, 1)]
        .into_iter()
        .map(|(w, h)| {
            (
                (w, h),
                png(w, h, png::ColorType::Grayscale, png::BitDepth::Eight),
            )
        })
        .collect();
    // By default the header is refused before anything is decoded.
    let strict = start(store.path(), &[]);
    for ((width, height), image) in &images {
        let started = Instant::now();
        let response = predict(&strict, "line.png", image, "");
        println!(
            "default limits, {width}x{height} ({} bytes): {} in {:?}",
            image.len(),
            response.status,
            started.elapsed()
        );
        assert_eq!(response.status, 422);
        assert_eq!(response.json()["error"], "extreme_aspect_ratio");
    }
    // Without the ratio limit they are served, in bounded memory.
    let server = start(store.path(), &["--max-aspect-ratio", "0"]);
    let baseline_mib = server.memory_kib("VmRSS") / 1024;
    for ((width, height), image) in &images {
        let started = Instant::now();
        let response = predict(&server, "line.png", image, "");
        let elapsed = started.elapsed();
        println!(
            "no ratio limit, {width}x{height}: status {}, {} bytes out, {elapsed:?}",
            response.status,
            response.body.len()
        );
        assert_eq!(
            response.status,
            201,
            "{}",
            String::from_utf8_lossy(&response.body)
        );
        let answer = image::load_from_memory(&response.body).unwrap();
        assert_eq!((answer.width(), answer.height()), (*width, *height));
        // A hang guard, not a speed target (the figures are printed above).
        assert!(elapsed < Duration::from_secs(60), "{elapsed:?}");
    }
    let peak_mib = server.memory_kib("VmHWM") / 1024;
    println!("baseline {baseline_mib} MiB, peak {peak_mib} MiB");
    // Decoding 24 M grey pixels to RGB and rendering them in bands is ~170 MB; the old
    // pre-processing buffer alone was 9 GB (4.9 GiB touched).
    assert!(peak_mib < baseline_mib + 400, "peak RSS {peak_mib} MiB");
}

#[test]
fn the_worst_images_together_stay_within_the_memory_budget() {
    let store = tempfile::tempdir().unwrap();
    let budget_mib = 300;
    let server = start(
        store.path(),
        &[
            "--memory-budget",
            &budget_mib.to_string(),
            "--memory-wait-secs",
            "60",
            "--request-timeout-secs",
            "120",
        ],
    );
    let baseline_mib = server.memory_kib("VmRSS") / 1024;
    // 24 M pixels of 16-bit RGBA: 192 MB decoded, plus the 72 MB RGB copy. Only one fits.
    let worst = png(6000, 4000, png::ColorType::Rgba, png::BitDepth::Sixteen);
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..3)
            .map(|_| scope.spawn(|| predict(&server, "worst.png", &worst, "?format=npy").status))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(statuses, vec![201; 3]);
    let peak_mib = server.memory_kib("VmHWM") / 1024;
    println!("baseline {baseline_mib} MiB, budget {budget_mib} MiB, peak {peak_mib} MiB");
    // Allocator slack and the uploads' own buffers come on top of the budget.
    assert!(
        peak_mib <= baseline_mib + budget_mib + 64,
        "peak RSS {peak_mib} MiB"
    );
    assert_eq!(metric(&server, "midas_http_requests_in_flight"), 1.0);

    // With a short wait, a request that cannot get its share is refused, not queued forever.
    let impatient = start(
        store.path(),
        &[
            "--memory-budget",
            &budget_mib.to_string(),
            "--memory-wait-secs",
            "0",
        ],
    );
    let answers: Vec<RawResponse> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..3)
            .map(|_| scope.spawn(|| predict(&impatient, "worst.png", &worst, "?format=npy")))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let refused: Vec<&RawResponse> = answers.iter().filter(|a| a.status == 503).collect();
    assert!(answers.iter().any(|a| a.status == 201));
    assert!(!refused.is_empty(), "three worst images, room for one");
    for answer in refused {
        assert_eq!(answer.json()["error"], "memory_busy");
        assert_eq!(answer.header("retry-after"), Some("1"));
    }
}

#[test]
fn a_budget_that_cannot_hold_one_image_stops_start_up() {
    let store = tempfile::tempdir().unwrap();
    let logs = Server::try_start(
        &[
            "--store",
            store.path().to_str().unwrap(),
            "--memory-budget",
            "64",
        ],
        &[],
    )
    .err()
    .expect("start-up refused");
    assert!(
        logs.contains("memory budget of 64 MiB cannot hold one image"),
        "{logs}"
    );
}

#[test]
fn a_full_queue_refuses_before_the_body_is_read() {
    let store = tempfile::tempdir().unwrap();
    let server = start(store.path(), &["--queue-size", "1"]);
    let photo = std::fs::read(fixture("images/camera_odd.png")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let refused_early = std::thread::scope(|scope| {
        for _ in 0..6 {
            scope.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    predict(&server, "a.png", &photo, "?format=npy");
                }
            });
        }
        // Announce a 10 MB body, send none of it: only a refusal at the edge answers this.
        let mut refused = None;
        while refused.is_none() && Instant::now() < deadline {
            let mut stream = server.connect();
            stream
                .set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            write!(
                stream,
                "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 10000000\r\n\r\n"
            )
            .unwrap();
            let mut first = [0u8; 1];
            if stream.read_exact(&mut first).is_ok() {
                stream.set_read_timeout(None).unwrap();
                let mut rest = Vec::new();
                let _ = stream.read_to_end(&mut rest);
                let mut whole = first.to_vec();
                whole.extend_from_slice(&rest);
                refused = Some(String::from_utf8_lossy(&whole).to_string());
            }
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        refused
    });
    let answer = refused_early.expect("a refusal before any body byte was sent");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("\"error\":\"overloaded\""), "{answer}");
}

/// A connection whose receive buffer is a few kilobytes, so a response that is not read
/// backs up into the server at once.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn small_window_connection(addr: &str) -> std::net::TcpStream {
    use std::os::fd::FromRawFd;
    let address: std::net::SocketAddrV4 = addr.parse().unwrap();
    // SAFETY: plain socket calls on a descriptor this function owns until it is wrapped.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let size: libc::c_int = 4096;
        let set = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        assert_eq!(set, 0);
        let sockaddr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: address.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*address.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let connected = libc::connect(
            fd,
            (&sockaddr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(connected, 0);
        std::net::TcpStream::from_raw_fd(fd)
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn a_client_that_stops_reading_is_cut_off_and_the_prediction_still_stored() {
    let store = tempfile::tempdir().unwrap();
    let server = start(store.path(), &["--send-timeout-secs", "1"]);
    let image = png(6000, 4000, png::ColorType::Rgb, png::BitDepth::Eight);
    let (content_type, body) = multipart("file", Some("wide.png"), &image);
    let mut stream = small_window_connection(&server.addr);
    write!(
        stream,
        "POST /predict?format=png16 HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(&body).unwrap();
    // Read nothing; the server must give up on us, store the prediction and close.
    let started = Instant::now();
    let stored = loop {
        let found = support::stored_files(&store.path().join("predictions"));
        if let Some(path) = found.first() {
            break path.clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the prediction was never stored"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let stored = std::fs::read(stored).unwrap();
    let decoded = image::load_from_memory(&stored).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (6000, 4000));
    std::thread::sleep(Duration::from_millis(500));
    let logs = server.logs().join("\n");
    assert!(
        logs.contains("the client stopped reading; the prediction is still stored"),
        "{} bytes stored\n{logs}",
        stored.len()
    );
    // The connection was closed by the server: reading what is left ends short of the image.
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut received = Vec::new();
    let _ = stream.read_to_end(&mut received);
    assert!(
        received.len() < stored.len(),
        "{} of {}",
        received.len(),
        stored.len()
    );
    assert_eq!(metric(&server, "midas_http_requests_in_flight"), 1.0);
}

#[test]
fn clients_that_vanish_leave_no_request_counted_in_flight() {
    let store = tempfile::tempdir().unwrap();
    let server = start(store.path(), &[]);
    let photo = std::fs::read(fixture("images/camera_odd.png")).unwrap();
    let (content_type, body) = multipart("file", Some("a.png"), &photo);
    for cut in [body.len() / 2, body.len()] {
        for _ in 0..4 {
            let mut stream = server.connect();
            write!(
                stream,
                "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .unwrap();
            stream.write_all(&body[..cut]).unwrap();
            drop(stream);
        }
    }
    let started = Instant::now();
    while metric(&server, "midas_http_requests_in_flight") != 1.0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "requests stay counted in flight"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // And the server still answers.
    let response = request(&server, "GET", "/healthz", &[], b"");
    assert_eq!(response.status, 200);
}
