//! Fuzzing on the stable toolchain: three targets fed with mutations of real inputs, each for
//! a time budget, after replaying the corpus kept in `tests/fuzz-corpus/<target>/`.
//!
//! - `header_probe`: [`HeaderProbe`] fed in random slices must agree with one whole-file probe,
//!   never panic, and take time linear in the bytes;
//! - `decode`: [`decode`] on mutated JPEG, PNG and WebP files must return an image or an
//!   error, never panic, and stay within its allocation limit;
//! - `multipart`: mutated `/predict` requests sent to the real server over loopback must each
//!   get a well-formed answer (201 with a PNG, or a JSON refusal), and the server must live on
//!   within its memory bound.
//!
//! `MIDAS_FUZZ_SECONDS` sets each target's budget (default 20, as CI runs it);
//! `MIDAS_FUZZ_SEED` the first seed (default: the clock); `MIDAS_FUZZ_SAVE=1` adds each input
//! that produced an outcome not seen before to the corpus. A failure prints the seed and the
//! case's number, and writes the input to `target/fuzz-failures/`.

mod support;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use midas_serve::pipeline::{DecodeError, DecodeLimits, HeaderProbe, decode, probe};
use support::fixture;
use support::server::{Server, multipart, read_response};

/// A small, fast, seedable generator (xorshift64*): the cases must be reproducible from a
/// printed seed, which is all a fuzzer's generator needs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Applies one to four random mutations: bit flips, byte runs overwritten with interesting
/// values, insertions, deletions, duplicated slices, truncation.
fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut data = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = data.len().max(1);
        let at = rng.below(len);
        match rng.below(7) {
            0 => {
                if let Some(byte) = data.get_mut(at) {
                    *byte ^= 1 << rng.below(8);
                }
            }
            1 => {
                let value = [0x00, 0xFF, 0x7F, 0x80, 0x01][rng.below(5)];
                let end = (at + 1 + rng.below(8)).min(data.len());
                if let Some(run) = data.get_mut(at..end) {
                    run.fill(value);
                }
            }
            2 => {
                let bytes: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.next() as u8).collect();
                data.splice(at.min(data.len())..at.min(data.len()), bytes);
            }
            3 => {
                let end = (at + 1 + rng.below(64)).min(data.len());
                if at < end {
                    data.drain(at..end);
                }
            }
            4 => {
                let end = (at + 1 + rng.below(256)).min(data.len());
                if at < end {
                    let copy = data[at..end].to_vec();
                    let to = rng.below(data.len());
                    data.splice(to..to, copy);
                }
            }
            5 => data.truncate(at),
            _ => {
                // A big-endian u32 where a length or size field may sit.
                let value = [0u32, 1, 0xFFFF, 0x7FFF_FFFF, 0xFFFF_FFFF][rng.below(5)];
                if at + 4 <= data.len() {
                    data[at..at + 4].copy_from_slice(&value.to_be_bytes());
                }
            }
        }
    }
    data
}

/// The seed inputs: the test images, whole and cut.
fn image_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for name in [
        "camera_odd.png",
        "rocket.jpg",
        "chelsea.webp",
        "horse_rgba.png",
    ] {
        let bytes = std::fs::read(fixture(&format!("images/{name}"))).unwrap();
        seeds.push(bytes[..bytes.len() / 3].to_vec());
        seeds.push(bytes);
    }
    seeds
}

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-corpus")
        .join(target)
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir(target))
        .into_iter()
        .flatten()
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    files
        .iter()
        .map(|path| std::fs::read(path).unwrap())
        .collect()
}

/// Runs `case` on the corpus, then on mutations of `seeds` for the time budget. `case`
/// returns the outcome's name (new names are saved to the corpus when asked) or panics.
fn fuzz(target: &str, seeds: &[Vec<u8>], mut case: impl FnMut(&[u8]) -> String) {
    let budget = Duration::from_secs(
        std::env::var("MIDAS_FUZZ_SECONDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20),
    );
    let seed = std::env::var("MIDAS_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
        | 1;
    // Straight to the process's stderr, past the test harness's capture: a run that hangs or
    // is killed still leaves the seed that replays it.
    let _ = writeln!(
        std::io::stderr(),
        "{target}: seed {seed} (MIDAS_FUZZ_SEED={seed} replays this run)"
    );
    let save = std::env::var_os("MIDAS_FUZZ_SAVE").is_some();
    let mut seen = HashSet::new();
    let mut run =
        |number: usize, input: &[u8], seen: &mut HashSet<String>| match std::panic::catch_unwind(
            AssertUnwindSafe(|| case(input)),
        ) {
            Ok(outcome) => {
                if seen.insert(outcome.clone()) && save {
                    let dir = corpus_dir(target);
                    std::fs::create_dir_all(&dir).unwrap();
                    let name = outcome.replace(|c: char| !c.is_ascii_alphanumeric(), "_");
                    std::fs::write(dir.join(format!("{name}.bin")), input).unwrap();
                }
            }
            Err(panic) => {
                let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
                std::fs::create_dir_all(&dir).unwrap();
                let path = dir.join(format!("{target}-{seed}-{number}.bin"));
                std::fs::write(&path, input).unwrap();
                std::panic::resume_unwind(Box::new(format!(
                    "{target}: case {number} of seed {seed} failed (input in {}): {:?}",
                    path.display(),
                    panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                )));
            }
        };
    let replayed = corpus(target);
    for (number, input) in replayed.iter().enumerate() {
        run(number, input, &mut seen);
    }
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut cases = 0;
    while started.elapsed() < budget {
        let seed_input = &seeds[rng.below(seeds.len())];
        let input = mutate(&mut rng, seed_input);
        run(replayed.len() + cases, &input, &mut seen);
        cases += 1;
    }
    println!(
        "{target}: {} corpus inputs, {cases} mutations in {:?} (seed {seed}), {} distinct outcomes",
        replayed.len(),
        started.elapsed(),
        seen.len()
    );
    assert!(cases > 0 || budget.is_zero());
}

fn outcome(result: &Result<Option<midas_serve::pipeline::ImageHeader>, DecodeError>) -> String {
    match result {
        Ok(Some(header)) => format!("header {:?}", header.format),
        Ok(None) => "needs more".to_string(),
        Err(error) => error.code().to_string(),
    }
}

#[test]
fn header_probe() {
    let mut rng = Rng(7);
    fuzz("header_probe", &image_seeds(), |input| {
        let whole = probe(input, true);
        // The same bytes in random slices: the same answer, or "needs more" before it.
        let mut incremental = HeaderProbe::new();
        let mut end = 0;
        let mut answer = Ok(None);
        while end < input.len() {
            end = (end + 1 + rng.below(512)).min(input.len());
            answer = incremental.advance(&input[..end], end == input.len());
            if !matches!(answer, Ok(None)) {
                break;
            }
        }
        if input.is_empty() {
            answer = incremental.advance(input, true);
        }
        match (&answer, &whole) {
            (Ok(Some(a)), Ok(Some(b))) => assert_eq!(a, b),
            (Err(a), Err(b)) => assert_eq!(a.code(), b.code()),
            _ => panic!(
                "incremental {} but whole {}",
                outcome(&answer),
                outcome(&whole)
            ),
        }
        outcome(&whole)
    });
}

/// Probes `jpeg` as if it arrived a byte at a time; its header, and checks the whole walk took
/// well under what re-walking from the start with each byte would (minutes, where linear is
/// milliseconds).
fn probe_byte_by_byte(jpeg: &[u8]) -> (u32, u32) {
    let mut probe = HeaderProbe::new();
    let started = Instant::now();
    let found = (1..=jpeg.len()).find_map(|end| probe.advance(&jpeg[..end], false).unwrap());
    let header = found.expect("the frame header is found");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    (header.width, header.height)
}

#[test]
fn header_probe_is_linear_in_the_bytes_seen() {
    let frame = [0xFF, 0xC0, 0, 11, 8, 0, 10, 0, 20, 1, 1, 0x11, 0];
    // Thousands of short segments before the frame header (10^10 steps if re-walked).
    let mut jpeg = vec![0xFF, 0xD8];
    for _ in 0..20_000 {
        jpeg.extend_from_slice(&[0xFF, 0xFE, 0x00, 0x03, b'x']);
    }
    jpeg.extend_from_slice(&frame);
    assert_eq!(probe_byte_by_byte(&jpeg), (20, 10));
    // 200,000 fill bytes (0xFF) before the frame's marker code (2 x 10^10 steps if re-walked).
    let mut jpeg = vec![0xFF, 0xD8];
    jpeg.extend(std::iter::repeat_n(0xFF, 200_000));
    jpeg.extend_from_slice(&frame);
    assert_eq!(probe_byte_by_byte(&jpeg), (20, 10));
}

#[test]
fn decode_path() {
    let limits = DecodeLimits {
        max_pixels: 4_000_000,
        max_aspect_ratio: 100,
    };
    fuzz("decode", &image_seeds(), |input| {
        let outcome = match decode(input, &limits) {
            Ok(image) => {
                assert!(u64::from(image.width()) * u64::from(image.height()) <= limits.max_pixels);
                "decoded".to_string()
            }
            Err(error) => error.code().to_string(),
        };
        let resident = midas_serve::server::resident_bytes();
        assert!(resident < 1 << 30, "resident {resident} bytes");
        outcome
    });
}

/// A request built from a seed form: the multipart body with its boundary in the header.
fn requests_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for (field, name, image) in [
        ("file", "a.png", "camera_odd.png"),
        ("image", "src/b.jpg", "rocket.jpg"),
        ("upload", "c.webp", "chelsea.webp"),
    ] {
        let bytes = std::fs::read(fixture(&format!("images/{image}"))).unwrap();
        let (content_type, body) = multipart(field, Some(name), &bytes);
        let mut request = format!(
            "POST /predict?format=npy HTTP/1.1\r\nHost: fuzz\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(&body);
        seeds.push(request);
    }
    seeds
}

#[test]
fn multipart_front_end() {
    let store = tempfile::tempdir().unwrap();
    let server = Server::start(
        &[
            "--store",
            store.path().to_str().unwrap(),
            "--request-timeout-secs",
            "2",
            "--header-timeout-secs",
            "1",
            "--max-body-bytes",
            "4000000",
        ],
        &[],
    );
    fuzz("multipart", &requests_seeds(), |input| {
        let mut stream = server.connect();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // The server may answer and close before reading it all.
        let _ = stream.write_all(input);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut peek = [0u8; 1];
        match stream.peek(&mut peek) {
            // Closed without a word: only for bytes that are not an HTTP request at all.
            Ok(0) | Err(_) => return "closed".to_string(),
            Ok(_) => {}
        }
        let response = read_response(&mut stream);
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        match response.status {
            201 => {
                assert!(
                    response.body.starts_with(b"\x93NUMPY")
                        || response.body.starts_with(b"\x89PNG"),
                    "a 201 without its image"
                );
                "201".to_string()
            }
            status @ 400..=599 => {
                let code = if response.header("content-type") == Some("application/json") {
                    response.json()["error"].as_str().unwrap().to_string()
                } else {
                    // hyper's own answers to unparsable requests carry no body.
                    assert!(
                        response.body.is_empty(),
                        "status {status} with a non-JSON body"
                    );
                    "bare".to_string()
                };
                format!("{status} {code}")
            }
            other => panic!("unexpected status {other}"),
        }
    });
    let health = support::get(server.url("/healthz")).unwrap();
    assert_eq!(health.status(), 200);
    let peak_mib = server.memory_kib("VmHWM") / 1024;
    println!("server peak RSS {peak_mib} MiB");
    assert!(peak_mib < 600, "peak RSS {peak_mib} MiB");
}
