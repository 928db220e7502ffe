//! The real server over loopback with real HTTP clients: golden outputs, streaming, the store,
//! concurrency, overload, observability and graceful shutdown.

use crate::support;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::fixture;
use support::server::{Server, multipart, predict, read_response};

const IMAGES: [&str; 3] = ["rocket.jpg", "camera_odd.png", "chelsea.webp"];

fn image(name: &str) -> Vec<u8> {
    std::fs::read(fixture(&format!("images/{name}"))).unwrap()
}

/// What `midas-serve predict` writes for `name`, in `format`.
fn cli_prediction(name: &str, format: &str, colormap: &str) -> Vec<u8> {
    cli_prediction_with(name, format, colormap, &[])
}

/// What `midas-serve predict EXTRA` writes for `name`, in `format`.
fn cli_prediction_with(name: &str, format: &str, colormap: &str, extra: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_midas-serve"))
        .args([
            "predict",
            "--out-dir",
            dir.path().to_str().unwrap(),
            "--format",
            format,
            "--colormap",
            colormap,
        ])
        .args(extra)
        .arg(fixture(&format!("images/{name}")))
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let stem = name.split('.').next().unwrap();
    let extension = if format == "npy" { "npy" } else { "png" };
    std::fs::read(dir.path().join(format!("{stem}.{extension}"))).unwrap()
}

fn start(store: &Path, extra: &[&str]) -> Server {
    let mut args = vec!["--store", store.to_str().unwrap()];
    args.extend_from_slice(extra);
    Server::start(&args, &[])
}

#[test]
fn predictions_equal_the_cli_and_are_stored_byte_for_byte() {
    let store = tempfile::tempdir().unwrap();
    let server = start(store.path(), &[]);
    for name in IMAGES {
        let upload = image(name);
        for (format, colormap) in [
            ("png", "inferno"),
            ("png", "viridis"),
            ("png16", "inferno"),
            ("npy", "inferno"),
        ] {
            let response = predict(
                &server,
                name,
                &upload,
                &format!("?format={format}&colormap={colormap}"),
            );
            assert_eq!(
                response.status,
                201,
                "{name} {format}: {}",
                String::from_utf8_lossy(&response.body)
            );
            assert_eq!(
                response.body,
                cli_prediction(name, format, colormap),
                "{name} {format} {colormap} differs from `predict`"
            );
            let content_type = if format == "npy" {
                "application/x-npy"
            } else {
                "image/png"
            };
            assert_eq!(response.header("content-type"), Some(content_type));

            let input = response.header("x-input-object").unwrap();
            let output = response.header("x-output-object").unwrap();
            let id = response.header("x-request-id").unwrap();
            assert!(
                input.starts_with("uploads/") && input.contains(id) && input.ends_with(name),
                "{input}"
            );
            assert!(
                output.starts_with("predictions/") && output.contains(id),
                "{output}"
            );
            assert_eq!(
                std::fs::read(store.path().join(input)).unwrap(),
                upload,
                "stored upload differs"
            );
            // The output object is committed before the last chunk is sent.
            assert_eq!(
                std::fs::read(store.path().join(output)).unwrap(),
                response.body,
                "stored prediction differs"
            );

            let timing = response.header("server-timing").unwrap();
            for stage in [
                "upload;dur=",
                "decode;dur=",
                "queue;dur=",
                "forward;dur=",
                "postprocess;dur=",
            ] {
                assert!(timing.contains(stage), "{timing}");
            }
            assert!(
                response
                    .header("x-model-warning")
                    .unwrap()
                    .contains("untrained")
            );
        }
    }
    // No temporary files are left beside the objects.
    let mut files = Vec::new();
    let mut stack = vec![store.path().to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path)
            } else {
                files.push(path)
            }
        }
    }
    assert_eq!(files.len(), IMAGES.len() * 4 * 2, "{files:?}");
}

#[test]
fn the_body_streams_in_chunks() {
    let store = tempfile::tempdir().unwrap();
    let server = start(store.path(), &[]);
    let response = predict(&server, "camera_odd.png", &image("camera_odd.png"), "");
    assert_eq!(response.status, 201);
    assert_eq!(response.header("transfer-encoding"), Some("chunked"));
    assert!(response.header("content-length").is_none());
    assert!(
        response.chunks.len() > 1,
        "a {}-byte PNG came in {} chunk(s)",
        response.body.len(),
        response.chunks.len()
    );
    assert!(image::load_from_memory(&response.body).is_ok());
}

#[test]
fn concurrent_clients_all_get_their_own_answer() {
    let store = tempfile::tempdir().unwrap();
    let server = start(store.path(), &["--queue-size", "32"]);
    let expected: Vec<Vec<u8>> = IMAGES
        .iter()
        .map(|name| cli_prediction(name, "png", "inferno"))
        .collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|client| {
                let (server, expected) = (&server, &expected);
                scope.spawn(move || {
                    for round in 0..3 {
                        let index = (client + round) % IMAGES.len();
                        let response = predict(server, IMAGES[index], &image(IMAGES[index]), "");
                        assert_eq!(response.status, 201);
                        assert_eq!(
                            response.body, expected[index],
                            "client {client} round {round}"
                        );
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.join().unwrap();
        }
    });
    let metrics = support::get(server.url("/metrics"))
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.contains("midas_http_requests_total{route=\"/predict\",status=\"201\"} 24"),
        "{metrics}"
    );
}

#[test]
fn a_full_queue_answers_503_at_once() {
    let store = tempfile::tempdir().unwrap();
    let server = start(store.path(), &["--queue-size", "1"]);
    let upload = image("camera_odd.png");
    let statuses: Vec<(u16, Option<String>, serde_json::Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..12)
            .map(|_| {
                scope.spawn(|| {
                    let response = predict(&server, "camera_odd.png", &upload, "?format=npy");
                    let json = if response.status == 201 {
                        serde_json::Value::Null
                    } else {
                        response.json()
                    };
                    (
                        response.status,
                        response.header("retry-after").map(str::to_string),
                        json,
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = statuses.iter().filter(|(s, _, _)| *s == 201).count();
    let refused: Vec<_> = statuses.iter().filter(|(s, _, _)| *s == 503).collect();
    assert!(ok >= 1, "{statuses:?}");
    assert!(
        !refused.is_empty(),
        "12 simultaneous requests with a queue of 1: {statuses:?}"
    );
    assert_eq!(ok + refused.len(), 12, "{statuses:?}");
    for (_, retry_after, json) in refused {
        assert_eq!(retry_after.as_deref(), Some("1"));
        assert_eq!(json["error"], "overloaded");
    }
    // And the server is fine afterwards.
    assert_eq!(
        predict(&server, "camera_odd.png", &upload, "?format=npy").status,
        201
    );
}

#[test]
fn pages_health_readiness_and_metrics() {
    let store = tempfile::tempdir().unwrap();
    let server = start(store.path(), &[]);
    let page = support::get(server.url("/")).unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = page.text().unwrap();
    assert!(
        html.contains("id=\"untrained\"") && html.contains("untrained"),
        "the page must warn about the untrained model"
    );
    assert!(html.contains("<form") && html.contains("/predict"));
    assert!(html.contains(&store.path().display().to_string()));

    let health = support::get(server.url("/healthz")).unwrap();
    assert_eq!(health.status(), 200);
    let ready: serde_json::Value = support::get(server.url("/readyz")).unwrap().json().unwrap();
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["backend"], "flex");
    assert_eq!(ready["untrained"], true);

    assert_eq!(
        predict(&server, "rocket.jpg", &image("rocket.jpg"), "").status,
        201
    );
    let metrics = support::get(server.url("/metrics"))
        .unwrap()
        .text()
        .unwrap();
    for series in [
        "midas_http_requests_total{route=\"/predict\",status=\"201\"} 1",
        "midas_predict_stage_duration_seconds_count{stage=\"forward\"} 1",
        "midas_predict_stage_duration_seconds_count{stage=\"encode\"} 1",
        "midas_inference_queue_depth 0",
        "midas_http_requests_in_flight",
        "midas_store_bytes_total{kind=\"input\"} 112525",
    ] {
        assert!(metrics.contains(series), "missing {series} in\n{metrics}");
    }
    // One JSON log line per request, with the id and the stage timings.
    std::thread::sleep(Duration::from_millis(200));
    let line = server
        .logs()
        .into_iter()
        .find(|l| l.contains("\"path\":\"/predict\""))
        .expect("a request log line");
    let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(entry["status"], 201);
    assert_eq!(entry["input_bytes"], 112525);
    assert!(
        entry["server_timing"]
            .as_str()
            .unwrap()
            .contains("forward;dur=")
    );
    assert_eq!(entry["request_id"].as_str().unwrap().len(), 41);
}

/// DPT-Hybrid served as the replaced service served it: its own transform, viridis by default.
/// The model shows on the page, in `/readyz` and in `/metrics`; a request naming no colour map
/// gets the deployment's default, byte for byte what `predict` writes with the same flags.
#[test]
fn dpt_hybrid_with_the_replaced_service_defaults() {
    let store = tempfile::tempdir().unwrap();
    let model = ["--model", "dpt_hybrid_384", "--transform", "squash"];
    let mut flags = model.to_vec();
    flags.extend(["--default-colormap", "viridis"]);
    let server = start(store.path(), &flags);
    let html = support::get(server.url("/")).unwrap().text().unwrap();
    assert!(
        html.contains("dpt_hybrid_384: MiDaS v3.0 DPT-Hybrid"),
        "{html}"
    );
    assert!(html.contains("<option selected>viridis</option>"), "{html}");
    let ready: serde_json::Value = support::get(server.url("/readyz")).unwrap().json().unwrap();
    assert_eq!(ready["model"], "dpt_hybrid_384");
    assert_eq!(ready["transform"], "squash");
    let metrics = support::get(server.url("/metrics"))
        .unwrap()
        .text()
        .unwrap();
    let info = "midas_model_info{model=\"dpt_hybrid_384\",backend=\"flex\",transform=\"squash\",untrained=\"true\"} 1";
    assert!(metrics.contains(info), "missing {info} in\n{metrics}");

    let name = "chelsea_small.png";
    let response = predict(&server, name, &image(name), "");
    assert_eq!(
        response.status,
        201,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    assert_eq!(
        response.body,
        cli_prediction_with(name, "png", "viridis", &model),
        "the server's default colour map must be viridis"
    );
    let inferno = cli_prediction_with(name, "png", "inferno", &model);
    assert_ne!(response.body, inferno);
}

#[test]
fn sigterm_lets_the_request_in_flight_finish_then_exits_zero() {
    let store = tempfile::tempdir().unwrap();
    let mut server = start(store.path(), &["--grace-period-secs", "8"]);
    let upload = image("rocket.jpg");
    let (content_type, body) = multipart("file", Some("rocket.jpg"), &upload);
    let mut stream = server.connect();
    write!(stream, "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n", body.len()).unwrap();
    let half = body.len() / 2;
    stream.write_all(&body[..half]).unwrap();
    stream.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let signalled = Instant::now();
    server.signal("TERM");
    std::thread::sleep(Duration::from_millis(300));
    // No new connections are accepted once draining.
    assert!(
        std::net::TcpStream::connect(&server.addr).is_err(),
        "the listener should be closed"
    );

    stream.write_all(&body[half..]).unwrap();
    let response = read_response(&mut stream);
    assert_eq!(response.status, 201);
    assert!(image::load_from_memory(&response.body).is_ok());
    let status = server
        .wait(Duration::from_secs(8))
        .expect("exits within the grace period");
    assert!(status.success(), "{status:?}");
    assert!(signalled.elapsed() < Duration::from_secs(8));
    let logs = server.logs().join("\n");
    assert!(
        logs.contains("SIGTERM received") && logs.contains("draining"),
        "{logs}"
    );
}

/// A PNG of `image` carrying EXIF orientation `tag` (1 to 8) in an `eXIf` chunk.
fn png_with_orientation(image: &image::RgbImage, tag: u16) -> Vec<u8> {
    use image::ImageEncoder;
    // A big-endian TIFF header and one IFD entry: Orientation (0x0112), SHORT, 1 value.
    let mut exif = b"MM\x00\x2a\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01".to_vec();
    exif.extend_from_slice(&tag.to_be_bytes());
    exif.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let mut out = Vec::new();
    let mut encoder = image::codecs::png::PngEncoder::new(&mut out);
    encoder.set_exif_metadata(exif).unwrap();
    encoder
        .write_image(
            image.as_raw(),
            image.width(),
            image.height(),
            image::ExtendedColorType::Rgb8,
        )
        .unwrap();
    out
}

#[test]
fn every_exif_orientation_gives_the_same_upright_depth_map_and_point_cloud() {
    use image::DynamicImage;
    use image::metadata::Orientation;
    // An upright photo that looks different turned or mirrored, 96 wide and 64 high.
    let upright = image::RgbImage::from_fn(96, 64, |x, y| {
        image::Rgb([
            (x * 2) as u8,
            (y * 3) as u8,
            if x < 20 && y < 10 { 255 } else { 30 },
        ])
    });
    let turns: [fn(&DynamicImage) -> DynamicImage; 8] = [
        |i| i.clone(),
        |i| i.fliph(),
        |i| i.flipv(),
        |i| i.rotate90(),
        |i| i.rotate180(),
        |i| i.rotate270(),
        |i| i.rotate90().fliph(),
        |i| i.rotate270().fliph(),
    ];
    let store = tempfile::tempdir().unwrap();
    let server = start(store.path(), &[]);
    let dir = tempfile::tempdir().unwrap();
    let mut answers = Vec::new();
    let mut clouds = Vec::new();
    for tag in 1..=8u16 {
        // The stored pixels are whichever turn of the upright photo the tag turns back.
        let orientation = Orientation::from_exif(tag as u8).unwrap();
        let stored = turns
            .iter()
            .map(|turn| turn(&DynamicImage::ImageRgb8(upright.clone())))
            .find(|candidate| {
                let mut shown = candidate.clone();
                shown.apply_orientation(orientation);
                shown.to_rgb8() == upright
            })
            .unwrap()
            .to_rgb8();
        assert_eq!(tag == 1, stored == upright, "tag {tag}");
        let file = png_with_orientation(&stored, tag);
        let response = predict(&server, &format!("o{tag}.png"), &file, "");
        assert_eq!(response.status, 201, "tag {tag}");
        let depth = image::load_from_memory(&response.body).unwrap();
        assert_eq!((depth.width(), depth.height()), (96, 64), "tag {tag}");
        // The point cloud too: every vertex where the upright photo puts it, in its colour.
        let cloud = predict(&server, &format!("o{tag}.png"), &file, "?format=ply");
        assert_eq!(cloud.status, 201, "tag {tag}");
        clouds.push(cloud.body);
        // `predict` reads the tag too.
        let path = dir.path().join(format!("o{tag}.png"));
        std::fs::write(&path, &file).unwrap();
        let out = dir.path().join(format!("out{tag}"));
        let status = Command::new(env!("CARGO_BIN_EXE_midas-serve"))
            .args(["predict", "--out-dir", out.to_str().unwrap()])
            .arg(&path)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let cli = std::fs::read(out.join(format!("o{tag}.png"))).unwrap();
        assert_eq!(
            cli, response.body,
            "tag {tag}: predict and the server agree"
        );
        answers.push(response.body);
    }
    for (index, answer) in answers.iter().enumerate() {
        assert_eq!(answer, &answers[0], "orientation {} differs", index + 1);
    }
    for (index, cloud) in clouds.iter().enumerate() {
        assert_eq!(
            cloud,
            &clouds[0],
            "orientation {}'s cloud differs",
            index + 1
        );
    }
    let header = String::from_utf8_lossy(&clouds[0][..clouds[0].len().min(600)]).to_string();
    assert!(header.contains("grid 96x64 image"), "{header}");
}
