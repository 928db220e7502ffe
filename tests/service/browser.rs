//! The welcome page in real headless Chromium (driven through chromedriver's WebDriver API):
//! choose a photo in the form, submit, and the depth map appears beside the photo, with the
//! point cloud drawn in WebGL (coloured points, and a drag turns them).

use crate::support;

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

/// What the point-cloud canvas shows: `[points, lit pixels, distinct colours (4 bits a
/// channel), a hash of the pixels]`.
const CANVAS_PICTURE: &str = "const c = document.getElementById('cloud');
if (!c.dataset.points || !c.width) return [0, 0, 0, 0];
const t = document.createElement('canvas'); t.width = c.width; t.height = c.height;
const x = t.getContext('2d'); x.drawImage(c, 0, 0);
const d = x.getImageData(0, 0, t.width, t.height).data;
let lit = 0, hash = 0; const colours = new Set();
for (let i = 0; i < d.length; i += 4) {
  if (d[i] + d[i + 1] + d[i + 2] > 80) { lit++; colours.add(((d[i] >> 4) << 8) | ((d[i + 1] >> 4) << 4) | (d[i + 2] >> 4)); }
  hash = (hash * 31 + d[i] + 7 * d[i + 1] + 13 * d[i + 2]) % 1000000007;
}
return [Number(c.dataset.points), lit, colours.size, hash];";

/// Files under `dir`, at any depth.
fn walk_count(dir: &std::path::Path) -> usize {
    if dir.is_file() {
        return 1;
    }
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|entry| walk_count(&entry.path()))
        .sum()
}

#[test]
fn the_page_shows_the_depth_map_and_the_point_cloud_of_an_uploaded_photo() {
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
            "args": ["--headless=new", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--disable-dev-shm-usage", "--disable-quic",
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

    // The point cloud: drawn with the photo's colours, and turned by a drag.
    let started = Instant::now();
    let before = loop {
        let picture = post(
            "/execute/sync",
            json!({ "script": CANVAS_PICTURE, "args": [] }),
        );
        if picture[0].as_u64().unwrap_or(0) > 0 && picture[1].as_u64().unwrap_or(0) > 0 {
            break picture;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no point cloud was drawn: {picture}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let points = before[0].as_u64().unwrap();
    assert!(points > 10_000 && points <= 80_000, "{points} points");
    assert!(before[1].as_u64().unwrap() > 2_000, "lit pixels: {before}");
    assert!(
        before[2].as_u64().unwrap() > 20,
        "distinct colours: {before}"
    );
    let canvas = find("#cloud");
    let element = json!({ "element-6066-11e4-a52e-4f735466cecf": canvas });
    post(
        "/actions",
        json!({ "actions": [{ "type": "pointer", "id": "mouse", "parameters": { "pointerType": "mouse" }, "actions": [
            { "type": "pointerMove", "origin": element, "x": 0, "y": 0 },
            { "type": "pointerDown", "button": 0 },
            { "type": "pointerMove", "duration": 300, "origin": "pointer", "x": 150, "y": 40 },
            { "type": "pointerUp", "button": 0 }
        ]}]}),
    );
    std::thread::sleep(Duration::from_millis(300));
    let after = post(
        "/execute/sync",
        json!({ "script": CANVAS_PICTURE, "args": [] }),
    );
    assert!(
        after[1].as_u64().unwrap() > 2_000,
        "lit pixels after the drag: {after}"
    );
    assert_ne!(before[3], after[3], "the drag changed the picture");
    let links = post(
        "/execute/sync",
        json!({ "script": "return [document.getElementById('png-link').download, document.getElementById('ply-link').download, document.getElementById('ply-link').href.startsWith('blob:')]", "args": [] }),
    );
    assert_eq!(links, json!(["rocket-depth.png", "rocket.ply", true]));

    // Keep a screenshot for people to look at.
    let screenshot = driver.call(reqwest::Method::GET, &path("/screenshot"), None);
    let png = base64::engine::general_purpose::STANDARD
        .decode(screenshot.as_str().unwrap())
        .unwrap();
    assert!(image::load_from_memory(&png).is_ok());
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("welcome-page.png");
    std::fs::write(&out, png).unwrap();
    driver.call(reqwest::Method::DELETE, &path(""), None);
    // Both uploads (the depth map's and the cloud's) went through the real pipeline and store.
    let stored: usize = std::fs::read_dir(store.path().join("predictions"))
        .unwrap()
        .flatten()
        .map(|year| walk_count(&year.path()))
        .sum();
    assert_eq!(stored, 2);
}
