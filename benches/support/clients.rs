//! Real HTTP clients driving the real server: `clients` threads post an upload back to back, in
//! the form field `image` as the replaced service's clients send it (so the same clients drive
//! that service too).

use std::time::{Duration, Instant};

use super::server::{Server, post_multipart};

/// The `p` quantile (0..=1) of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Latencies of a run, sorted, and how long it took.
pub struct Run {
    /// Milliseconds per request, sorted.
    pub latencies: Vec<f64>,
    /// Wall time of the run.
    pub seconds: f64,
}

impl Run {
    /// Requests answered per second.
    pub fn per_second(&self) -> f64 {
        self.latencies.len() as f64 / self.seconds
    }
}

/// `clients` threads send the upload back to back for `seconds`.
pub fn run(server: &Server, upload: &[u8], clients: usize, seconds: f64) -> Run {
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let mut latencies: Vec<f64> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                scope.spawn(|| {
                    let mut own = Vec::new();
                    while Instant::now() < deadline {
                        let start = Instant::now();
                        let response = post_multipart(server, "image", Some("photo.jpg"), upload);
                        assert_eq!(
                            response.status,
                            201,
                            "{}",
                            String::from_utf8_lossy(&response.body)
                        );
                        own.push(start.elapsed().as_secs_f64() * 1000.0);
                    }
                    own
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    latencies.sort_by(f64::total_cmp);
    Run {
        latencies,
        seconds: started.elapsed().as_secs_f64(),
    }
}
