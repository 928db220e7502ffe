//! Load benchmark of the real server with real HTTP clients over loopback: p50/p99 latency and
//! requests per second at 1 and 8 clients, for 640x480 and 1920x1080 JPEG uploads, per backend,
//! plus the server's peak RSS and its time to ready with `.bpk` weights.
//!
//! `cargo bench --bench load` (flex only), or `LOAD_BACKENDS=flex,ndarray LOAD_SECONDS=20 cargo
//! bench --bench load`. Prints a Markdown table.

#[path = "../tests/support/server.rs"]
#[allow(dead_code)]
mod server;

#[path = "support/photo.rs"]
mod photo;

#[path = "support/clients.rs"]
mod clients;

use std::time::Instant;

use clients::{percentile, run};
use server::Server;

/// Time from spawning the server to its "listening" line, with weights in `.bpk` form.
fn time_to_ready(backend: &str) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let device = match backend {
        "ndarray" =>
        {
            #[allow(deprecated)]
            burn::prelude::Device::ndarray()
        }
        _ => burn::prelude::Device::flex(),
    };
    let (model, _) =
        midas_serve::weights::untrained(midas_serve::model::ModelKind::MidasV21Small256, &device);
    let weights = dir.path().join("midas.bpk");
    midas_serve::weights::save_burnpack(&model, &weights, &[]).unwrap();
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

fn main() {
    let backends = std::env::var("LOAD_BACKENDS").unwrap_or_else(|_| "flex".to_string());
    let seconds: f64 = std::env::var("LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15.0);
    println!("| backend | upload | clients | requests | p50 ms | p99 ms | req/s |");
    println!("|---|---|---|---|---|---|---|");
    let mut summary = Vec::new();
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
        for (width, height) in [(640, 480), (1920, 1080)] {
            let upload = photo::jpeg(width, height);
            for clients in [1, 8] {
                let result = run(&server, &upload, clients, seconds);
                let count = result.latencies.len();
                println!(
                    "| {backend} | {width}x{height} | {clients} | {count} | {:.0} | {:.0} | {:.1} |",
                    percentile(&result.latencies, 0.5),
                    percentile(&result.latencies, 0.99),
                    result.per_second(),
                );
            }
        }
        let peak = server.memory_kib("VmHWM") as f64 / 1024.0;
        drop(server);
        summary.push(format!("{backend}: peak RSS {peak:.0} MiB, ready {:.0} ms after start with .bpk weights (median of 5)", time_to_ready(backend)));
    }
    for line in summary {
        println!("\n{line}");
    }
}
