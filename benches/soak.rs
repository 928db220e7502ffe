//! Soak benchmark: the real server under 8 real HTTP/1.1 clients for 30 minutes, two requests in
//! three good (640x480 JPEG, a PNG) and the rest hostile (truncated, corrupt, oversized,
//! malformed, huge headers, uploads abandoned midway), beside an HTTP/2 mix from `h2load` (a
//! real HTTP/2 load generator, Debian's `nghttp2-client`, which `scripts/test-deps.sh`
//! installs): uploads on two connections, four streams each, and page, health and readiness
//! requests on two more, eight streams each at 100 requests per second a connection (unpaced,
//! they would take the CPU from everything else). Every answer must be the one intended for its
//! request, and the server's RSS after warm-up must not drift by 5 % or more.
//!
//! `cargo bench --bench soak` (30 minutes), or `SOAK_SECONDS=300 SOAK_CLIENTS=8 cargo bench
//! --bench soak`. Prints a Markdown summary; panics when a target is missed.

#[path = "../tests/support/server.rs"]
#[allow(dead_code)]
mod server;

#[path = "support/photo.rs"]
mod photo;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use server::{RawResponse, Server, multipart, post_multipart, request};

/// Sends one request; `None` when the client walks away without an answer.
type Send = Box<dyn Fn(&Server) -> Option<RawResponse> + Sync>;

/// One kind of request and the statuses intended for it.
struct Kind {
    name: &'static str,
    /// Requests of this kind per 100.
    weight: usize,
    expected: &'static [u16],
    send: Send,
}

fn kinds() -> Vec<Kind> {
    let jpeg = photo::jpeg(640, 480);
    let png = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/images/camera_odd.png"
    ))
    .unwrap();
    let truncated = jpeg[..jpeg.len() / 2].to_vec();
    let mut garbage = b"\x89PNG\r\n\x1a\n".to_vec();
    garbage.extend_from_slice(&[0xA5; 4096]);
    let ihdr = [
        b"IHDR".as_slice(),
        &50_000u32.to_be_bytes(),
        &50_000u32.to_be_bytes(),
        &[8, 2, 0, 0, 0],
    ]
    .concat();
    let mut huge = b"\x89PNG\r\n\x1a\n".to_vec();
    huge.extend_from_slice(&13u32.to_be_bytes());
    huge.extend_from_slice(&ihdr);
    huge.extend_from_slice(&crc32fast::hash(&ihdr).to_be_bytes());
    let (good_jpeg, good_png) = (jpeg.clone(), png.clone());
    let abandoned = jpeg.clone();
    vec![
        Kind {
            name: "good 640x480 JPEG",
            weight: 45,
            expected: &[201],
            send: Box::new(move |s| {
                Some(post_multipart(s, "image", Some("photo.jpg"), &good_jpeg))
            }),
        },
        Kind {
            name: "good PNG",
            weight: 20,
            expected: &[201],
            send: Box::new(move |s| Some(post_multipart(s, "file", Some("camera.png"), &good_png))),
        },
        Kind {
            name: "half-sent JPEG",
            weight: 7,
            expected: &[422],
            send: Box::new(move |s| Some(post_multipart(s, "file", Some("cut.jpg"), &truncated))),
        },
        Kind {
            name: "PNG signature then garbage",
            weight: 7,
            expected: &[422],
            send: Box::new(move |s| Some(post_multipart(s, "file", Some("garbage.png"), &garbage))),
        },
        Kind {
            name: "50000x50000 header",
            weight: 5,
            expected: &[413],
            send: Box::new(move |s| Some(post_multipart(s, "file", Some("huge.png"), &huge))),
        },
        Kind {
            name: "not multipart",
            weight: 4,
            expected: &[415],
            send: Box::new(|s| {
                Some(request(
                    s,
                    "POST",
                    "/predict",
                    &[("Content-Type", "application/json")],
                    b"{}",
                ))
            }),
        },
        Kind {
            name: "64 KiB header",
            weight: 4,
            expected: &[431],
            send: Box::new(|s| {
                let big = "x".repeat(64 * 1024);
                Some(request(s, "GET", "/", &[("X-Big", &big)], b""))
            }),
        },
        Kind {
            name: "upload abandoned midway",
            weight: 8,
            expected: &[],
            send: Box::new(move |s| {
                let (content_type, body) = multipart("file", Some("gone.jpg"), &abandoned);
                let mut stream = s.connect();
                let _ = write!(
                    stream,
                    "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(&body[..body.len() / 2]);
                None
            }),
        },
    ]
}

fn main() {
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1800);
    let clients: usize = std::env::var("SOAK_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let warm_up = Duration::from_secs((seconds / 6).max(10));
    let store = tempfile::tempdir().unwrap();
    let server = Server::start(
        &[
            "--store",
            store.path().to_str().unwrap(),
            "--queue-size",
            "32",
            "--request-timeout-secs",
            "10",
        ],
        &[],
    );
    let http2 = http2_mix(&server, seconds);
    let kinds = kinds();
    let total_weight: usize = kinds.iter().map(|k| k.weight).sum();
    let counts: Mutex<BTreeMap<&str, (usize, usize)>> = Mutex::new(BTreeMap::new());
    let unexpected: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let samples: Mutex<Vec<(f64, u64)>> = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for client in 0..clients {
            let (kinds, counts, unexpected, stop) = (&kinds, &counts, &unexpected, &stop);
            let server = &server;
            scope.spawn(move || {
                let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (client as u64 + 1);
                while !stop.load(Ordering::SeqCst) {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let mut pick = (state % total_weight as u64) as usize;
                    let kind = kinds
                        .iter()
                        .find(|k| {
                            if pick < k.weight {
                                true
                            } else {
                                pick -= k.weight;
                                false
                            }
                        })
                        .unwrap();
                    let answer = (kind.send)(server);
                    let ok = answer
                        .as_ref()
                        .is_none_or(|a| kind.expected.contains(&a.status));
                    let mut counts = counts.lock().unwrap();
                    let entry = counts.entry(kind.name).or_default();
                    entry.0 += 1;
                    if !ok {
                        entry.1 += 1;
                        let a = answer.unwrap();
                        unexpected.lock().unwrap().push(format!(
                            "{}: {} {}",
                            kind.name,
                            a.status,
                            String::from_utf8_lossy(&a.body)
                        ));
                    }
                }
            });
        }
        let deadline = started + Duration::from_secs(seconds);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_secs(5));
            samples
                .lock()
                .unwrap()
                .push((started.elapsed().as_secs_f64(), server.memory_kib("VmRSS")));
        }
        stop.store(true, Ordering::SeqCst);
    });
    let elapsed = started.elapsed().as_secs_f64();
    let samples = samples.into_inner().unwrap();
    let after: Vec<u64> = samples
        .iter()
        .filter(|(t, _)| *t >= warm_up.as_secs_f64())
        .map(|(_, rss)| *rss)
        .collect();
    let window = (after.len() / 6).max(1);
    let median = |values: &[u64]| {
        let mut sorted = values.to_vec();
        sorted.sort_unstable();
        sorted[sorted.len() / 2]
    };
    let first = median(&after[..window]);
    let last = median(&after[after.len() - window..]);
    let peak = after.iter().copied().max().unwrap_or_default();
    let drift = (last as f64 - first as f64) / first as f64 * 100.0;
    let counts = counts.into_inner().unwrap();
    let total: usize = counts.values().map(|c| c.0).sum();
    println!(
        "## Soak: {clients} clients, {elapsed:.0} s, warm-up {} s\n",
        warm_up.as_secs()
    );
    println!("| request | sent | unintended answers |\n|---|---|---|");
    for (name, (sent, wrong)) in &counts {
        println!("| {name} | {sent} | {wrong} |");
    }
    println!(
        "\n{total} requests ({:.1}/s). RSS after warm-up {} MiB, at the end {} MiB, peak {} MiB: drift {drift:+.2} %",
        total as f64 / elapsed,
        first / 1024,
        last / 1024,
        peak / 1024
    );
    let mut unexpected = unexpected.into_inner().unwrap();
    println!(
        "\n| HTTP/2 (h2load) | requests | 2xx | 4xx | 5xx | failed |\n|---|---|---|---|---|---|"
    );
    for (name, child) in http2 {
        let output = child.wait_with_output().unwrap();
        let report = String::from_utf8_lossy(&output.stdout);
        let [total, done, failed, errored] =
            h2load_figures(&report, "requests:", ["total", "done", "failed", "errored"]);
        let [ok, client_errors, server_errors] =
            h2load_figures(&report, "status codes:", ["2xx", "4xx", "5xx"]);
        println!("| {name} | {total} | {ok} | {client_errors} | {server_errors} | {failed} |");
        // A stream cut at the end of the run may count its status without being done, so the
        // 2xx count can exceed `done` by the streams in flight then: what must be 0 are the
        // failures and the error statuses.
        let wrong = client_errors + server_errors + failed + errored;
        if !output.status.success() || done == 0 || wrong > 0 {
            unexpected.push(format!("HTTP/2 {name}: {report}"));
        }
    }
    for line in unexpected.iter().take(20) {
        println!("unintended: {line}");
    }
    assert!(
        unexpected.is_empty(),
        "{} unintended answers",
        unexpected.len()
    );
    assert!(drift.abs() < 5.0, "RSS drifted {drift:+.2} %");
}

/// Starts the HTTP/2 half of the load: `h2load` processes that run for `seconds` over HTTP/2
/// with prior knowledge, each named for the summary.
fn http2_mix(server: &Server, seconds: u64) -> Vec<(&'static str, Child)> {
    let (content_type, body) = multipart("image", Some("photo.jpg"), &photo::jpeg(640, 480));
    let upload = std::env::temp_dir().join(format!("soak-h2-upload-{}", std::process::id()));
    std::fs::write(&upload, body).unwrap();
    let duration = seconds.to_string();
    let h2load = |args: &[&str]| {
        Command::new("h2load")
            .args(["-D", &duration, "-t", "1"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("h2load runs (Debian's nghttp2-client; scripts/test-deps.sh installs it)")
    };
    let content_type = format!("content-type: {content_type}");
    vec![
        (
            "uploads, 2 connections x 4 streams",
            h2load(&[
                "-c",
                "2",
                "-m",
                "4",
                "-d",
                upload.to_str().unwrap(),
                "-H",
                &content_type,
                &server.url("/predict"),
            ]),
        ),
        (
            "page, health, readiness, 2 x 8 streams",
            h2load(&[
                "-c",
                "2",
                "-m",
                "8",
                "--rps",
                "100",
                &server.url("/"),
                &server.url("/healthz"),
                &server.url("/readyz"),
            ]),
        ),
    ]
}

/// The numbers `h2load` reports after `label` for each of `names` (`requests: 10 total, ...`).
fn h2load_figures<const N: usize>(report: &str, label: &str, names: [&str; N]) -> [u64; N] {
    let line = report
        .lines()
        .find_map(|line| line.trim().strip_prefix(label))
        .unwrap_or_else(|| panic!("h2load printed no {label:?} line:\n{report}"));
    names.map(|name| {
        line.split(',')
            .find_map(|part| part.trim().strip_suffix(name))
            .and_then(|number| number.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
    })
}
