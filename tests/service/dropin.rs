//! The replaced service's clients work unchanged, and a prediction can be fetched again by the
//! id its `Location` names.

use crate::support;

use std::path::PathBuf;
use std::process::Command;

use support::fixture;
use support::server::{Server, multipart, request};

/// The Python the test script installs (`requests` in a virtual environment).
fn python() -> PathBuf {
    if let Some(path) = std::env::var_os("MIDAS_TEST_PYTHON") {
        return PathBuf::from(path);
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-tools/bin/python");
    assert!(
        path.exists(),
        "the test Python is not installed: run scripts/test-deps.sh (scripts/test.sh does)"
    );
    path
}

fn png_size(data: &[u8]) -> (u32, u32) {
    let image = image::load_from_memory(data).expect("a decodable image");
    (image.width(), image.height())
}

#[test]
fn the_replaced_services_suite_and_streamlit_client_pass() {
    let store = tempfile::tempdir().unwrap();
    let server = Server::start(&["--store", store.path().to_str().unwrap()], &[]);
    let image = fixture("images/camera_odd.png");
    let upload_size = png_size(&std::fs::read(&image).unwrap());
    let output = Command::new(python())
        .arg(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("scripts/clients/replaced_service_clients.py"),
        )
        .arg(server.url(""))
        .arg(&image)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert_eq!(lines[0]["status"], 200);
    for answer in &lines[1..] {
        assert_eq!(answer["status"], 201, "{answer}");
        assert_eq!(answer["content_type"], "image/png");
        let size = (
            answer["size"][0].as_u64().unwrap() as u32,
            answer["size"][1].as_u64().unwrap() as u32,
        );
        assert_eq!(size, upload_size, "the depth map has the upload's size");
        // The directory in the client's file name does not reach the store.
        let input = answer["input_object"].as_str().unwrap();
        assert!(
            input.starts_with("uploads/")
                && input.ends_with("-berlin_000000_000019_left_image.png"),
            "{input}"
        );
        assert!(!input.contains("src"), "{input}");
        assert!(store.path().join(input).is_file());
        let location = answer["location"].as_str().unwrap();
        let fetched = support::get(server.url(location)).unwrap();
        assert_eq!(fetched.status(), 200);
        let stored =
            std::fs::read(store.path().join(answer["output_object"].as_str().unwrap())).unwrap();
        assert_eq!(fetched.bytes().unwrap().to_vec(), stored);
    }
}

#[test]
fn predictions_are_fetched_again_by_id() {
    let store = tempfile::tempdir().unwrap();
    let server = Server::start(&["--store", store.path().to_str().unwrap()], &[]);
    let photo = std::fs::read(fixture("images/rocket.jpg")).unwrap();
    let client = support::client();
    for (query, content_type) in [("", "image/png"), ("?format=npy", "application/x-npy")] {
        let (form_type, body) = multipart("file", Some("rocket.jpg"), &photo);
        let answer = request(
            &server,
            "POST",
            &format!("/predict{query}"),
            &[("Content-Type", &form_type)],
            &body,
        );
        assert_eq!(answer.status, 201);
        let id = answer.header("x-request-id").unwrap().to_string();
        assert_eq!(
            answer.header("location"),
            Some(format!("/predictions/{id}").as_str())
        );
        let fetched = client
            .get(server.url(&format!("/predictions/{id}")))
            .send()
            .unwrap();
        assert_eq!(fetched.status(), 200);
        let headers = fetched.headers().clone();
        assert_eq!(headers["content-type"], content_type);
        assert_eq!(headers["etag"], format!("\"{id}\"").as_str());
        assert!(
            headers["cache-control"]
                .to_str()
                .unwrap()
                .contains("immutable")
        );
        assert_eq!(fetched.bytes().unwrap().to_vec(), answer.body);
        let again = client
            .get(server.url(&format!("/predictions/{id}")))
            .header("If-None-Match", format!("\"{id}\""))
            .send()
            .unwrap();
        assert_eq!(again.status(), 304);
        assert!(again.bytes().unwrap().is_empty());
    }
    let unknown_id = format!("20200101-{}", "0".repeat(32));
    for path in [
        format!("/predictions/{unknown_id}"),
        "/predictions/..%2F..%2Fetc%2Fpasswd".to_string(),
        "/predictions/".to_string(),
        "/predictions/20200101-zz".to_string(),
    ] {
        let answer = request(&server, "GET", &path, &[], b"");
        assert_eq!(answer.status, 404, "{path}");
        assert_eq!(answer.json()["error"], "not_found", "{path}");
    }
}

#[test]
fn form_fields_set_the_options_like_the_query() {
    let store = tempfile::tempdir().unwrap();
    let server = Server::start(&["--store", store.path().to_str().unwrap()], &[]);
    let photo = std::fs::read(fixture("images/rocket.jpg")).unwrap();
    let (form_type, plain) = multipart("file", Some("rocket.jpg"), &photo);
    let default = request(
        &server,
        "POST",
        "/predict",
        &[("Content-Type", &form_type)],
        &plain,
    );
    assert_eq!(default.status, 201);
    let boundary = "optionsBoundary42";
    let content_type = format!("multipart/form-data; boundary={boundary}");
    for (name, value) in [("colormap", "viridis"), ("format", "npy")] {
        // The option before the file, as an HTML form orders its inputs.
        let mut body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"rocket.jpg\"\r\n\
             Content-Type: image/jpeg\r\n\r\n"
        )
        .into_bytes();
        body.extend_from_slice(&photo);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let by_form = request(
            &server,
            "POST",
            "/predict",
            &[("Content-Type", &content_type)],
            &body,
        );
        assert_eq!(by_form.status, 201, "{name}");
        let by_query = request(
            &server,
            "POST",
            &format!("/predict?{name}={value}"),
            &[("Content-Type", &form_type)],
            &plain,
        );
        assert_eq!(by_query.status, 201, "{name}");
        assert_eq!(by_form.body, by_query.body, "{name}");
        assert_ne!(by_form.body, default.body, "{name} changed nothing");
    }
}
