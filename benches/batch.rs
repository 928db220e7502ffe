//! A batch task against the server on the same machine and images: images per second of one
//! `midas-serve batch` task over a directory of JPEGs, next to the server's requests per second
//! under 8 real HTTP clients over loopback, plus the task's peak RSS.
//!
//! `cargo bench --bench batch`; `BATCH_IMAGES=64 LOAD_SECONDS=15 BATCH_RUNS=1x1,2x1,2x2` to
//! change the run (each run is WORKERSxMAX_BATCH; 0 workers is the default, one per CPU
//! thread). Prints a Markdown table.

#[path = "../tests/support/server.rs"]
#[allow(dead_code)]
mod server;

#[path = "support/photo.rs"]
mod photo;

#[path = "support/clients.rs"]
#[allow(dead_code)]
mod clients;

use std::process::{Command, Stdio};

use server::Server;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What one batch task reported, and its peak RSS in MiB.
struct Task {
    summary: serde_json::Value,
    wall_s: f64,
    peak_mib: f64,
}

/// Runs `midas-serve batch` over `input` into a fresh directory with `workers` forward passes
/// at once, each of up to `max_batch` images.
fn batch(input: &std::path::Path, workers: usize, max_batch: usize) -> Task {
    let output = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    // Reaped by wait4 below, which also reports the child's own peak RSS.
    #[allow(clippy::zombie_processes)]
    let child = Command::new(env!("CARGO_BIN_EXE_midas-serve"))
        .args(["batch", "--progress", "log"])
        .args(["--workers", &workers.to_string()])
        .args(["--max-batch", &max_batch.to_string()])
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output.path())
        .env("MIDAS_LOG_FORMAT", "json")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut stdout = child.stdout.unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut text).unwrap();
    // wait4 gives this child's own peak RSS (getrusage would give the largest of all children).
    let mut status = 0;
    // SAFETY: plain system call on our own child, with valid out-pointers.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid);
    assert_eq!(status, 0, "the batch task failed");
    Task {
        summary: serde_json::from_str(text.trim()).expect("a JSON summary"),
        wall_s: started.elapsed().as_secs_f64(),
        peak_mib: usage.ru_maxrss as f64 / 1024.0,
    }
}

fn main() {
    let images: usize = env_or("BATCH_IMAGES", 64);
    let seconds: f64 = env_or("LOAD_SECONDS", 15.0);
    let runs: Vec<(usize, usize)> = std::env::var("BATCH_RUNS")
        .unwrap_or_else(|_| "0x1,1x1".to_string())
        .split(',')
        .filter_map(|run| {
            let (workers, batch) = run.split_once('x')?;
            Some((workers.parse().ok()?, batch.parse().ok()?))
        })
        .collect();
    println!(
        "| upload | server, 8 clients: req/s | batch workers x max batch | batch images/s | batch / server | task wall s (load included) | task peak RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (width, height) in [(640, 480), (1920, 1080)] {
        let upload = photo::jpeg(width, height);
        let server_rate = {
            let store = tempfile::tempdir().unwrap();
            let server = Server::start(
                &[
                    "--store",
                    store.path().to_str().unwrap(),
                    "--queue-size",
                    "32",
                ],
                &[],
            );
            clients::run(&server, &upload, 8, seconds).per_second()
        };
        let input = tempfile::tempdir().unwrap();
        for i in 0..images {
            std::fs::write(input.path().join(format!("photo{i:04}.jpg")), &upload).unwrap();
        }
        for &(workers, max_batch) in &runs {
            let task = batch(input.path(), workers, max_batch);
            assert_eq!(task.summary["done"], images, "{}", task.summary);
            let rate = task.summary["images_per_s"].as_f64().unwrap();
            println!(
                "| {width}x{height} | {server_rate:.1} | {workers}x{max_batch} | {rate:.1} | {:.2} | {:.1} | {:.0} |",
                rate / server_rate,
                task.wall_s,
                task.peak_mib,
            );
        }
    }
}
