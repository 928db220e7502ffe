//! The Cloud Storage store and `gs://` weights against a real emulator.

mod support;

use std::io::Write;
use std::time::Duration;

use support::checkpoints::{as_dict, synthetic_state_dict, write_pt};
use support::fixture;
use support::gcs::{FakeGcs, StallingProxy};
use support::server::{Server, multipart, predict, read_response};

fn image(name: &str) -> Vec<u8> {
    std::fs::read(fixture(&format!("images/{name}"))).unwrap()
}

#[test]
fn uploads_and_predictions_land_in_the_bucket_byte_for_byte() {
    let gcs = FakeGcs::start();
    gcs.create_bucket("depth");
    let server = Server::start(
        &["--store", "gs://depth/service"],
        &[("STORAGE_EMULATOR_HOST", &gcs.host)],
    );
    let ready: serde_json::Value = support::get(server.url("/readyz")).unwrap().json().unwrap();
    assert_eq!(ready["ready"], true);
    for name in ["rocket.jpg", "chelsea.webp"] {
        let upload = image(name);
        let response = predict(&server, name, &upload, "");
        assert_eq!(
            response.status,
            201,
            "{}",
            String::from_utf8_lossy(&response.body)
        );
        let input = response.header("x-input-object").unwrap();
        let output = response.header("x-output-object").unwrap();
        assert!(
            input.starts_with("service/uploads/") && output.starts_with("service/predictions/"),
            "{input} {output}"
        );
        assert_eq!(gcs.get("depth", input), upload);
        assert_eq!(gcs.get("depth", output), response.body);
        // The prediction streams back from the bucket by its id.
        let location = response.header("location").unwrap();
        let fetched = support::get(server.url(location)).unwrap();
        assert_eq!(fetched.status(), 200);
        assert_eq!(fetched.bytes().unwrap().to_vec(), response.body);
    }
    assert_eq!(gcs.list("depth").len(), 4);

    // A refused upload leaves nothing in the bucket.
    let response = predict(&server, "a.png", b"not an image, just text", "");
    assert_eq!(response.status, 415);
    let mut truncated = image("camera_odd.png");
    truncated.truncate(5000);
    assert_eq!(predict(&server, "b.png", &truncated, "").status, 422);
    assert_eq!(gcs.list("depth").len(), 4, "{:?}", gcs.list("depth"));
}

#[test]
fn an_emulator_killed_mid_upload_gives_a_5xx_and_no_object() {
    let mut gcs = FakeGcs::start();
    gcs.create_bucket("depth");
    let server = Server::start(
        &["--store", "gs://depth", "--store-timeout-secs", "5"],
        &[("STORAGE_EMULATOR_HOST", &gcs.host)],
    );
    let (content_type, body) = multipart("file", Some("rocket.jpg"), &image("rocket.jpg"));
    let mut stream = server.connect();
    write!(stream, "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n", body.len()).unwrap();
    let half = body.len() / 2;
    stream.write_all(&body[..half]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    gcs.kill();
    stream.write_all(&body[half..]).unwrap();
    let response = read_response(&mut stream);
    assert!(
        (500..600).contains(&response.status),
        "got {}",
        response.status
    );
    assert_eq!(response.json()["error"], "store_unavailable");
    let metrics = support::get(server.url("/metrics"))
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.contains("midas_store_errors_total{kind=\"input\"} 1"),
        "{metrics}"
    );
    // The server itself is still healthy.
    assert_eq!(support::get(server.url("/healthz")).unwrap().status(), 200);
}

#[test]
fn an_unreachable_store_stops_start_up_with_a_clear_error() {
    let gcs = FakeGcs::start();
    let host = gcs.host.clone();
    drop(gcs);
    let logs = match Server::try_start(
        &["--store", "gs://depth", "--store-timeout-secs", "3"],
        &[("STORAGE_EMULATOR_HOST", &host)],
    ) {
        Ok(_) => panic!("the server started without its store"),
        Err(logs) => logs,
    };
    assert!(logs.contains("cannot open the store"), "{logs}");
    assert!(
        logs.contains(&format!("http://{host}")) && logs.contains("depth"),
        "{logs}"
    );
}

#[test]
fn weights_load_from_a_gs_url() {
    let gcs = FakeGcs::start();
    gcs.create_bucket("models");
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("midas.pt");
    write_pt(&weights, as_dict(synthetic_state_dict("module.")));
    gcs.put("models", "midas/v1.pt", std::fs::read(&weights).unwrap());
    let cache = dir.path().join("cache");
    let store = dir.path().join("store");
    let server = Server::start(
        &[
            "--store",
            store.to_str().unwrap(),
            "--weights",
            "gs://models/midas/v1.pt",
            "--cache-dir",
            cache.to_str().unwrap(),
        ],
        &[("STORAGE_EMULATOR_HOST", &gcs.host)],
    );
    let ready: serde_json::Value = support::get(server.url("/readyz")).unwrap().json().unwrap();
    assert_eq!(ready["untrained"], false);
    assert_eq!(ready["weights"], "gs://models/midas/v1.pt");
    let response = predict(&server, "rocket.jpg", &image("rocket.jpg"), "");
    assert_eq!(response.status, 201);
    assert!(response.header("x-model-warning").is_none());
    let page = support::get(server.url("/")).unwrap().text().unwrap();
    assert!(page.contains("gs://models/midas/v1.pt") && !page.contains("id=\"untrained\""));
    assert!(page.contains(&midas_model::weights::sha256_file(&weights).unwrap()));
    assert_eq!(
        std::fs::read_dir(&cache).unwrap().count(),
        1,
        "downloaded once into the cache"
    );

    // A missing object is a clear start-up error.
    let logs = match Server::try_start(
        &[
            "--store",
            store.to_str().unwrap(),
            "--weights",
            "gs://models/absent.pt",
            "--cache-dir",
            cache.to_str().unwrap(),
        ],
        &[("STORAGE_EMULATOR_HOST", &gcs.host)],
    ) {
        Ok(_) => panic!("started without weights"),
        Err(logs) => logs,
    };
    assert!(
        logs.contains("gs://models/absent.pt") && logs.contains("not found"),
        "{logs}"
    );
}

/// A PNG of pseudo-random pixels: incompressible, so its size on the wire is its pixel count.
fn noise_png(width: u32, height: u32) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let pixels: Vec<u8> = (0..width as usize * height as usize * 3)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let mut out = Vec::new();
    image::RgbImage::from_raw(width, height, pixels)
        .unwrap()
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

#[test]
fn a_store_that_stalls_mid_upload_answers_504_within_the_store_timeout() {
    let gcs = FakeGcs::start();
    gcs.create_bucket("depth");
    let proxy = StallingProxy::start(&gcs.host);
    let server = Server::start(
        &["--store", "gs://depth", "--store-timeout-secs", "2"],
        &[("STORAGE_EMULATOR_HOST", &proxy.host)],
    );
    let photo = image("rocket.jpg");
    assert_eq!(predict(&server, "rocket.jpg", &photo, "").status, 201);
    assert_eq!(gcs.list("depth").len(), 2);

    proxy.stall();
    let big = noise_png(2500, 1600);
    assert!(big.len() > 10 << 20, "{} bytes", big.len());
    let started = std::time::Instant::now();
    let response = predict(&server, "big.png", &big, "");
    let elapsed = started.elapsed();
    println!("stalled store: {} after {elapsed:?}", response.status);
    assert_eq!(
        response.status,
        504,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    assert_eq!(response.json()["error"], "store_timeout");
    // The store timeout (2 s), not the request timeout (60 s), decides.
    assert!(elapsed < Duration::from_secs(15), "{elapsed:?}");

    proxy.resume();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(gcs.list("depth").len(), 2, "{:?}", gcs.list("depth"));
    assert_eq!(predict(&server, "rocket.jpg", &photo, "").status, 201);
    assert_eq!(gcs.list("depth").len(), 4);
}
