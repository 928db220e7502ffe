//! The welcome page in real headless Chromium (driven through chromedriver's WebDriver API):
//! choose a photo in the form, submit, and the depth map appears.

mod support;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};
use support::fixture;
use support::server::Server;

struct Driver {
    child: Child,
    base: String,
    client: reqwest::blocking::Client,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Driver {
    fn start() -> Self {
        let binary =
            std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".to_string());
        assert!(
            std::path::Path::new(&binary).exists(),
            "{binary} missing: run scripts/test-deps.sh (scripts/test.sh does)"
        );
        let port = free_port();
        let child = Command::new(binary)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let driver = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            client: support::client(),
        };
        let started = Instant::now();
        while driver
            .client
            .get(format!("{}/status", driver.base))
            .send()
            .is_err()
        {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "chromedriver did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        driver
    }

    fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .timeout(Duration::from_secs(60));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response: Value = request.send().unwrap().json().unwrap();
        if let Some(error) = response["value"].get("error") {
            panic!("WebDriver {path}: {error} {}", response["value"]["message"]);
        }
        response["value"].clone()
    }
}

#[test]
fn the_page_turns_an_uploaded_photo_into_a_depth_map() {
    let store = tempfile::tempdir().unwrap();
    let server = Server::start(&["--store", store.path().to_str().unwrap()], &[]);
    let driver = Driver::start();
    let profile = tempfile::tempdir().unwrap();
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_string());
    let session = driver.call(
        reqwest::Method::POST,
        "/session",
        Some(json!({ "capabilities": { "alwaysMatch": { "browserName": "chrome", "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     format!("--user-data-dir={}", profile.path().display())]
        }}}})),
    );
    let id = session["sessionId"].as_str().unwrap().to_string();
    let path = |suffix: &str| format!("/session/{id}{suffix}");
    let post =
        |suffix: &str, body: Value| driver.call(reqwest::Method::POST, &path(suffix), Some(body));

    post("/window/rect", json!({ "width": 1280, "height": 1400 }));
    post("/url", json!({ "url": server.url("/") }));
    let warning = post(
        "/execute/sync",
        json!({ "script": "return document.getElementById('untrained').textContent", "args": [] }),
    );
    assert!(warning.as_str().unwrap().contains("untrained"));

    let find = |css: &str| {
        let element = post("/element", json!({ "using": "css selector", "value": css }));
        element
            .as_object()
            .unwrap()
            .values()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    };
    let photo = fixture("images/rocket.jpg");
    let input = find("#file");
    post(
        &format!("/element/{input}/value"),
        json!({ "text": photo.to_str().unwrap() }),
    );
    let button = find("#submit");
    post(&format!("/element/{button}/click"), json!({}));

    let started = Instant::now();
    let size = loop {
        let state = post(
            "/execute/sync",
            json!({ "script": "const r = document.getElementById('result'); return [r.dataset.loaded || '', r.naturalWidth, r.naturalHeight, document.getElementById('status').textContent];", "args": [] }),
        );
        if state[0] == "true" {
            break (
                state[1].as_u64().unwrap(),
                state[2].as_u64().unwrap(),
                state[3].as_str().unwrap().to_string(),
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no depth map appeared: {state}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        (size.0, size.1),
        (640, 427),
        "the depth map has the photo's size"
    );
    assert!(size.2.starts_with("Done in"), "{}", size.2);

    // Keep a screenshot for people to look at.
    let screenshot = driver.call(reqwest::Method::GET, &path("/screenshot"), None);
    let png = base64::engine::general_purpose::STANDARD
        .decode(screenshot.as_str().unwrap())
        .unwrap();
    assert!(image::load_from_memory(&png).is_ok());
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("welcome-page.png");
    std::fs::write(&out, png).unwrap();
    driver.call(reqwest::Method::DELETE, &path(""), None);
    // The upload went through the real pipeline and store.
    assert_eq!(
        std::fs::read_dir(store.path().join("uploads"))
            .unwrap()
            .count(),
        1
    );
}
