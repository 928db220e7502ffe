//! Load benchmark of the real server with real HTTP clients over loopback: p50/p99 latency and
//! requests per second at 1 and 8 clients, for 640x480 and 1920x1080 JPEG uploads, per backend,
//! plus the server's peak RSS and its time to ready with `.bpk` weights.
//!
//! `cargo bench --bench load` (flex only), or `LOAD_BACKENDS=flex,ndarray LOAD_SECONDS=20 cargo
//! bench --bench load`. Prints a Markdown table.
//!
//! With `LOAD_REFERENCE=PATH/TO/gunicorn` and `MIDAS_SRC=PATH/TO/isl-org-MiDaS` it also starts the
//! replaced service as `scripts/reference/service.py` rebuilds it (same weights, same uploads,
//! same clients) and prints the ratios of the first backend to it.

#[path = "../tests/support/server.rs"]
#[allow(dead_code)]
mod server;

#[path = "support/photo.rs"]
mod photo;

#[path = "support/clients.rs"]
mod clients;

use std::time::Instant;

use clients::{percentile, run};
use midas_model::backend::{Backend, BackendKind};
use server::Server;

/// Time from spawning the server to its "listening" line, with weights in `.bpk` form.
fn time_to_ready(backend: &str) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let kind = <BackendKind as clap::ValueEnum>::from_str(backend, true)
        .unwrap_or_else(|_| panic!("unknown backend {backend}"));
    let device = Backend::init(kind)
        .unwrap_or_else(|error| panic!("{error}"))
        .device;
    let (model, _) =
        midas_model::weights::untrained(midas_model::model::ModelKind::MidasV21Small256, &device);
    let weights = dir.path().join("midas.bpk");
    midas_model::weights::save_burnpack(&model, &weights, &[]).unwrap();
    let store = dir.path().join("store");
    let mut samples: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            let server = Server::start(
                &[
                    "--backend",
                    backend,
                    "--store",
                    store.to_str().unwrap(),
                    "--weights",
                    weights.to_str().unwrap(),
                ],
                &[],
            );
            let elapsed = start.elapsed().as_secs_f64() * 1000.0;
            drop(server);
            elapsed
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// p50, p99 and requests per second of one upload size at one client count.
struct Cell {
    upload: (u32, u32),
    clients: usize,
    p50: f64,
    per_second: f64,
}

/// Drives `server` with every upload at 1 and 8 clients, printing one table row per cell.
fn measure(
    label: &str,
    server: &Server,
    uploads: &[((u32, u32), Vec<u8>)],
    seconds: f64,
) -> Vec<Cell> {
    let mut cells = Vec::new();
    for ((width, height), upload) in uploads {
        for clients in [1, 8] {
            let result = run(server, upload, clients, seconds);
            let p50 = percentile(&result.latencies, 0.5);
            println!(
                "| {label} | {width}x{height} | {clients} | {} | {p50:.0} | {:.0} | {:.1} |",
                result.latencies.len(),
                percentile(&result.latencies, 0.99),
                result.per_second(),
            );
            cells.push(Cell {
                upload: (*width, *height),
                clients,
                p50,
                per_second: result.per_second(),
            });
        }
    }
    cells
}

/// The replaced service (`scripts/reference/service.py`: Flask, gunicorn with 1 worker and 8
/// threads, PyTorch) started by `gunicorn`, serving the same synthetic weights.
fn start_reference(gunicorn: &str, store: &std::path::Path) -> Server {
    let midas_src = std::env::var("MIDAS_SRC")
        .expect("LOAD_REFERENCE needs MIDAS_SRC, the path of an isl-org/MiDaS checkout");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let child = std::process::Command::new(gunicorn)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/reference"))
        .args([
            "--workers",
            "1",
            "--threads",
            "8",
            "--preload",
            "--timeout",
            "120",
        ])
        .args(["--bind", &addr, "service:app"])
        .env("MIDAS_SRC", midas_src)
        .env("REFERENCE_STORE", store)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("LOAD_REFERENCE names gunicorn");
    Server::adopt(child, addr)
}

/// Peak RSS in MiB of the reference's worker process (the one that runs the model; gunicorn's
/// master forked it after loading the model, so they share those pages).
fn reference_worker_peak(server: &Server) -> f64 {
    let pid = server.pid();
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let worker = children
        .split_whitespace()
        .next()
        .and_then(|pid| pid.parse().ok())
        .expect("gunicorn has a worker");
    server::process_memory_kib(worker, "VmHWM") as f64 / 1024.0
}

fn main() {
    let backends = std::env::var("LOAD_BACKENDS").unwrap_or_else(|_| "flex".to_string());
    let seconds: f64 = std::env::var("LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15.0);
    let uploads: Vec<_> = [(640, 480), (1920, 1080)]
        .into_iter()
        .map(|(width, height)| ((width, height), photo::jpeg(width, height)))
        .collect();
    println!("| server | upload | clients | requests | p50 ms | p99 ms | req/s |");
    println!("|---|---|---|---|---|---|---|");
    let mut summary = Vec::new();
    let mut ours = Vec::new();
    for backend in backends.split(',') {
        let store = tempfile::tempdir().unwrap();
        let server = Server::start(
            &[
                "--backend",
                backend,
                "--store",
                store.path().to_str().unwrap(),
                "--queue-size",
                "32",
            ],
            &[],
        );
        let cells = measure(backend, &server, &uploads, seconds);
        if ours.is_empty() {
            ours = cells;
        }
        let peak = server.memory_kib("VmHWM") as f64 / 1024.0;
        drop(server);
        summary.push(format!("{backend}: peak RSS {peak:.0} MiB, ready {:.0} ms after start with .bpk weights (median of 5)", time_to_ready(backend)));
    }
    if let Ok(gunicorn) = std::env::var("LOAD_REFERENCE") {
        let store = tempfile::tempdir().unwrap();
        let reference = start_reference(&gunicorn, store.path());
        let theirs = measure("reference", &reference, &uploads, seconds);
        summary.push(format!(
            "reference: worker peak RSS {:.0} MiB",
            reference_worker_peak(&reference)
        ));
        let first = backends.split(',').next().unwrap_or_default();
        println!("\n| upload | clients | req/s {first} / reference | p50 {first} / reference |");
        println!("|---|---|---|---|");
        for (a, b) in ours.iter().zip(&theirs) {
            let (width, height) = a.upload;
            println!(
                "| {width}x{height} | {} | {:.2}x | {:.2}x |",
                a.clients,
                a.per_second / b.per_second,
                a.p50 / b.p50
            );
        }
    }
    for line in summary {
        println!("\n{line}");
    }
}
