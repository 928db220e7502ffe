//! A real Cloud Storage emulator (fake-gcs-server, installed by `scripts/test-deps.sh`) for the
//! GCS store's tests.
//!
//! The official client sends `Host` without a port and the emulator builds resumable-upload
//! URLs from it, so each emulator listens on port 80 of its own loopback address.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

static NEXT_ADDRESS: AtomicU8 = AtomicU8::new(20);

/// A loopback address no other emulator of this process uses.
fn next_host() -> String {
    format!("127.0.0.{}", NEXT_ADDRESS.fetch_add(1, Ordering::SeqCst))
}

/// Where the emulator binary is: `FAKE_GCS_SERVER`, or where the test script installs it.
fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("FAKE_GCS_SERVER") {
        return PathBuf::from(path);
    }
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = manifest.join("target/test-tools/bin/fake-gcs-server");
    assert!(
        path.exists(),
        "fake-gcs-server is not installed: run scripts/test-deps.sh (scripts/test.sh does)"
    );
    path
}

/// A running emulator.
pub struct FakeGcs {
    child: Child,
    /// `127.0.0.N`: the value for `STORAGE_EMULATOR_HOST`.
    pub host: String,
}

impl FakeGcs {
    /// Starts an emulator on a fresh loopback address, port 80, in-memory.
    pub fn start() -> Self {
        Self::spawn(&next_host(), &["-backend", "memory"])
    }

    /// Starts an emulator that keeps its objects under `root`, so that they outlive it.
    pub fn start_on_disk(root: &Path) -> Self {
        Self::restart(&next_host(), root)
    }

    /// Starts an emulator again on `host` over the objects a stopped one left under `root`.
    pub fn restart(host: &str, root: &Path) -> Self {
        let root = root.to_str().unwrap();
        Self::spawn(host, &["-backend", "filesystem", "-filesystem-root", root])
    }

    fn spawn(host: &str, backend: &[&str]) -> Self {
        let host = host.to_string();
        let child = Command::new(binary())
            .args(["-scheme", "http", "-host", &host, "-port", "80"])
            .args(backend)
            .args(["-log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("fake-gcs-server starts");
        let started = Instant::now();
        while TcpStream::connect((host.as_str(), 80)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "fake-gcs-server did not listen on {host}:80"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, host }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.host)
    }

    /// Creates a bucket through the emulator's JSON API.
    pub fn create_bucket(&self, name: &str) {
        let response = super::client()
            .post(self.url("/storage/v1/b"))
            .json(&serde_json::json!({ "name": name }))
            .send()
            .unwrap();
        assert!(response.status().is_success(), "{:?}", response.text());
    }

    /// Uploads an object (simple media upload).
    pub fn put(&self, bucket: &str, name: &str, data: Vec<u8>) {
        let response = super::client()
            .post(self.url(&format!("/upload/storage/v1/b/{bucket}/o")))
            .query(&[("uploadType", "media"), ("name", name)])
            .body(data)
            .send()
            .unwrap();
        assert!(response.status().is_success(), "{:?}", response.text());
    }

    /// Names of the objects in a bucket.
    pub fn list(&self, bucket: &str) -> Vec<String> {
        let listing: serde_json::Value = super::get(self.url(&format!("/storage/v1/b/{bucket}/o")))
            .unwrap()
            .json()
            .unwrap();
        let mut names: Vec<String> = listing["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|o| o["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    }

    /// An object's bytes.
    pub fn get(&self, bucket: &str, name: &str) -> Vec<u8> {
        let url = self.url(&format!(
            "/storage/v1/b/{bucket}/o/{}",
            name.replace('/', "%2F")
        ));
        let response = super::client()
            .get(url)
            .query(&[("alt", "media")])
            .send()
            .unwrap();
        assert!(
            response.status().is_success(),
            "{name}: {}",
            response.status()
        );
        response.bytes().unwrap().to_vec()
    }

    /// Kills the emulator (its in-memory objects go with it).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for FakeGcs {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP proxy in front of an emulator that can stop forwarding on every connection, open or
/// new, while keeping them all open: a stalled store, not a dead one. It listens on port 80
/// of its own loopback address, for the same reason the emulator does.
pub struct StallingProxy {
    /// `127.0.0.N`: the value for `STORAGE_EMULATOR_HOST`.
    pub host: String,
    stalled: Arc<AtomicBool>,
}

impl StallingProxy {
    /// Starts forwarding to `target` (port 80).
    pub fn start(target: &str) -> Self {
        let host = next_host();
        let listener = TcpListener::bind((host.as_str(), 80)).expect("the proxy binds");
        let stalled = Arc::new(AtomicBool::new(false));
        let (flag, target) = (stalled.clone(), target.to_string());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(upstream) = TcpStream::connect((target.as_str(), 80)) else {
                    continue;
                };
                for (from, to) in [
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap()),
                    (upstream, client),
                ] {
                    let flag = flag.clone();
                    std::thread::spawn(move || pump(from, to, &flag));
                }
            }
        });
        Self { host, stalled }
    }

    /// Stops forwarding (bytes already read are held back too).
    pub fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }

    /// Forwards again.
    pub fn resume(&self) {
        self.stalled.store(false, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until either closes, holding everything while `stalled`.
fn pump(mut from: TcpStream, mut to: TcpStream, stalled: &AtomicBool) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        while stalled.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let n = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while stalled.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if to.write_all(&buffer[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}
