//! HTTP/2 clients as an attacker would write them, through a real HTTP/2 client library (`h2`)
//! and raw frames: stalled streams, connections that never send a request, and uploads of
//! unknown length. Each must leave the server within its memory budget and open to others.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::server::{Server, predict, request};

/// The client's connection preface and an empty SETTINGS frame.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

fn png(width: u32, height: u32) -> Vec<u8> {
    let pixels = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x % 251) as u8, (y % 241) as u8, ((x * y) % 239) as u8])
    });
    let mut out = Vec::new();
    pixels
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// `(total, available)` bytes of the memory budget, from `/readyz`.
fn budget(server: &Server) -> (u64, u64) {
    // Plain std sockets: the async tests call this from inside their runtime.
    let ready = request(server, "GET", "/readyz", &[], b"").json();
    (
        ready["memory_budget_bytes"].as_u64().unwrap(),
        ready["memory_available_bytes"].as_u64().unwrap(),
    )
}

/// Waits up to `within` for the whole budget to be available again; fails with `failure`.
async fn until_at_rest(server: &Server, within: Duration, failure: &str) {
    let deadline = Instant::now() + within;
    loop {
        let (total, available) = budget(server);
        if available == total {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{failure}: {} bytes still charged",
            total - available
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An HTTP/2 connection with a stream window of `window`; the second value changes that
/// window later (a SETTINGS frame), the connection being driven in its own task.
async fn h2_connection(
    addr: &str,
    window: u32,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::sync::mpsc::Sender<u32>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, mut connection) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    let (resize, mut sizes) = tokio::sync::mpsc::channel::<u32>(1);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut connection => return,
                Some(size) = sizes.recv() => {
                    let _ = connection.set_initial_window_size(size);
                }
            }
        }
    });
    (send.ready().await.unwrap(), resize)
}

fn get(path: &str) -> http::Request<()> {
    http::Request::get(format!("http://localhost{path}"))
        .body(())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_streams_are_charged_to_the_budget_and_released_at_the_send_timeout() {
    const STREAMS: usize = 8;
    let store = tempfile::tempdir().unwrap();
    let server = Server::start(
        &[
            "--store",
            store.path().to_str().unwrap(),
            "--send-timeout-secs",
            "3",
            "--max-streams-per-connection",
            &STREAMS.to_string(),
        ],
        &[],
    );
    // A prediction of 3.8 MB (float32 per pixel) to fetch many times.
    let upload = png(1200, 800);
    // Blocking calls in these tests hold only the test's own thread; the HTTP/2 connections
    // are driven by the runtime's workers.
    let stored = predict(&server, "big.png", &upload, "?format=npy");
    assert_eq!(
        stored.status,
        201,
        "{:?}",
        String::from_utf8_lossy(&stored.body)
    );
    let location = stored.header("location").unwrap().to_string();
    // The response's share is returned just after its last byte leaves, so it may still be
    // charged for a moment when the client has the whole body.
    let (total, _) = budget(&server);
    until_at_rest(
        &server,
        Duration::from_secs(5),
        "the prediction's share was never returned",
    )
    .await;
    let rss_before = server.memory_kib("VmRSS");

    // Two connections, each with every stream it may open, a window of 0, never reading.
    let mut bodies = Vec::new();
    let mut resizers = Vec::new();
    for _ in 0..2 {
        let (mut send, resize) = h2_connection(&server.addr, 0).await;
        for _ in 0..STREAMS {
            send = send.ready().await.unwrap();
            let (response, _) = send.send_request(get(&location), true).unwrap();
            bodies.push(response);
        }
        resizers.push(resize);
    }
    let mut responses = Vec::new();
    for response in bodies {
        let response = response.await.unwrap();
        assert_eq!(response.status(), 200);
        responses.push(response.into_body());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, stalled) = budget(&server);
    let charged = total - stalled;
    let streams = 2 * STREAMS as u64;
    assert!(
        charged >= streams * 64 * 1024 && charged <= streams * 512 * 1024,
        "each stalled stream is charged a few chunks: {charged} bytes for {streams}"
    );
    let grown = (server.memory_kib("VmRSS").saturating_sub(rss_before)) * 1024;
    assert!(
        grown <= charged + (16 << 20),
        "memory held by stalled streams ({grown} bytes) stays near what they are charged ({charged})"
    );

    // At the send timeout the pipes are emptied and their shares returned, streams still open.
    until_at_rest(
        &server,
        Duration::from_secs(8),
        "the stalled streams' memory was not released at the send timeout",
    )
    .await;
    // Opening the window now gets each stream reset, never a body that looks complete.
    for resize in &resizers {
        resize.send(65_535).await.unwrap();
    }
    for mut body in responses {
        let mut received = 0usize;
        let ended = loop {
            match tokio::time::timeout(Duration::from_secs(10), body.data()).await {
                Ok(Some(Ok(chunk))) => {
                    received += chunk.len();
                    let _ = body.flow_control().release_capacity(chunk.len());
                }
                Ok(Some(Err(error))) => break Err(error.to_string()),
                Ok(None) => break Ok(()),
                Err(_) => break Err("no end within 10 s".to_string()),
            }
        };
        assert!(
            ended.is_err(),
            "a stream given up on ends in an error, not as a complete body ({received} bytes)"
        );
    }
    assert_eq!(budget(&server).1, total);
}

/// Reads until the server closes the connection; how long that took.
fn time_to_close(mut stream: TcpStream, opened: Instant) -> Duration {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return opened.elapsed(),
            Ok(_) => {}
        }
    }
}

#[test]
fn connections_without_a_request_are_closed_at_the_header_timeout_and_cannot_hold_the_cap() {
    let store = tempfile::tempdir().unwrap();
    let server = Server::start(
        &[
            "--store",
            store.path().to_str().unwrap(),
            "--header-timeout-secs",
            "2",
            "--max-connections",
            "4",
        ],
        &[],
    );
    // HEADERS for stream 1 (`:method GET`, indexed) without END_HEADERS: the block never ends.
    let half_headers: &[u8] = &[0, 0, 1, 1, 0x01, 0, 0, 0, 1, 0x82];
    for (case, extra) in [("preface only", &[][..]), ("half headers", half_headers)] {
        let opened = Instant::now();
        let mut stream = server.connect();
        stream.write_all(PREFACE).unwrap();
        stream.write_all(extra).unwrap();
        let closed = time_to_close(stream, opened);
        assert!(
            closed >= Duration::from_millis(1800) && closed <= Duration::from_secs(5),
            "{case}: closed after {closed:?}, expected at the 2 s header timeout"
        );
    }
    // Four silent HTTP/2 connections take every slot; a new client is still served at once,
    // as the idle ones are asked to make room.
    let squatters: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut stream = server.connect();
            stream.write_all(PREFACE).unwrap();
            stream
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let health = support::get(server.url("/healthz")).unwrap();
    assert_eq!(health.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "served after {:?} with the cap held by idle connections",
        started.elapsed()
    );
    drop(squatters);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_without_a_length_on_one_connection_leave_the_budget_to_others() {
    const UPLOADS: usize = 40;
    let store = tempfile::tempdir().unwrap();
    let server = Server::start(
        &[
            "--store",
            store.path().to_str().unwrap(),
            "--memory-budget",
            "64",
            "--max-pixels",
            "2000000",
            "--max-streams-per-connection",
            "64",
            "--request-timeout-secs",
            "30",
        ],
        &[],
    );
    let (total, _) = budget(&server);
    let image = png(64, 48);
    let boundary = "h2UploadBoundary";
    let mut head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n"
    )
    .into_bytes();
    head.extend_from_slice(&image[..40]);
    let head = Bytes::from(head);

    let (mut send, _resize) = h2_connection(&server.addr, 65_535).await;
    let mut pending = Vec::new();
    let mut streams = Vec::new();
    for _ in 0..UPLOADS {
        send = send.ready().await.unwrap();
        let request = http::Request::post("http://localhost/predict")
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(())
            .unwrap();
        let (response, mut stream) = send.send_request(request, false).unwrap();
        stream.send_data(head.clone(), false).unwrap();
        pending.push(response);
        streams.push(stream);
    }
    // All but the connection's share of uploads are refused at once with a JSON 429.
    let outcomes = futures_util::future::join_all(
        pending
            .into_iter()
            .map(|response| tokio::time::timeout(Duration::from_secs(3), response)),
    )
    .await;
    let mut refused = 0;
    let mut waiting = Vec::new();
    for outcome in outcomes {
        match outcome {
            Ok(Ok(response)) => {
                assert_eq!(response.status(), 429);
                let mut body = response.into_body();
                let mut bytes = Vec::new();
                while let Some(chunk) = body.data().await {
                    bytes.extend_from_slice(&chunk.unwrap());
                }
                let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                assert_eq!(json["error"], "too_many_uploads");
                refused += 1;
            }
            Ok(Err(error)) => panic!("stream failed: {error}"),
            Err(_) => waiting.push(()),
        }
    }
    assert_eq!(waiting.len(), 4, "the connection keeps its 4 uploads");
    assert_eq!(refused, UPLOADS - 4);
    // The four that wait are charged for what they sent, a step each, not the body limit.
    let (_, available) = budget(&server);
    assert_eq!(total - available, 4 << 20);

    // A normal upload on another connection is served within 2 s.
    let normal = png(320, 240);
    let started = Instant::now();
    let answer = predict(&server, "normal.png", &normal, "");
    assert_eq!(
        answer.status,
        201,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a normal upload waited {:?}",
        started.elapsed()
    );
    drop(streams);
}
