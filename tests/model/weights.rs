//! Weight loading: every accepted format and layout, and every refusal with its message.

use crate::support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::prelude::*;
use midas_model::backend::{Backend, BackendKind};
use midas_model::engine::DepthModel;
use midas_model::model::{ModelKind, Network};
use midas_model::weights::{self, WeightsFormat, synthetic};
use midas_serve::fetch::{self, FetchError, FetchOptions, WeightsLocation};
use support::checkpoints::{
    Tensor, Value, as_dict, synthetic_state_dict, write_pt, write_safetensors,
};

const PROBE: (usize, usize) = (256, 128);

fn device() -> Device {
    Device::flex()
}

fn flex() -> Backend {
    Backend::init(BackendKind::Flex).expect("flex starts")
}

fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// The model's output on the probe input.
fn probe(model: Network) -> Vec<f32> {
    let (width, height) = PROBE;
    DepthModel::new(model, &flex())
        .forward(synthetic::network_input(width, height), 1, height, width)
        .unwrap()
}

/// Output of the model built directly from the formula: what every correct load must give.
fn expected_output() -> Vec<f32> {
    probe(weights::untrained(ModelKind::MidasV21Small256, &device()).0)
}

/// Values of upstream's state dict that the forward pass uses: everything but BatchNorm's
/// step counters and refinenet4's never-called first unit.
fn used_upstream_values() -> usize {
    support::checkpoints::upstream_layout()
        .iter()
        .filter(|e| !e.key.ends_with("num_batches_tracked"))
        .filter(|e| !e.key.starts_with("scratch.refinenet4.resConfUnit1."))
        .map(|e| e.shape.iter().product::<usize>())
        .sum()
}

fn assert_loads_correctly(
    path: &Path,
    key_prefix: Option<&str>,
    expected: &[f32],
) -> weights::WeightsReport {
    let (model, report) =
        weights::load_file(path, key_prefix, None, &device()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        probe(model),
        expected,
        "{} gives a different output",
        path.display()
    );
    assert!(!report.untrained);
    assert_eq!(report.parameters, used_upstream_values());
    report
}

#[test]
fn every_format_and_layout_loads() {
    let dir = temp_dir();
    let expected = expected_output();
    let bare = dir.path().join("bare.pt");
    write_pt(&bare, as_dict(synthetic_state_dict("")));
    let report = assert_loads_correctly(&bare, None, &expected);
    assert_eq!(report.format, Some(WeightsFormat::Pytorch));
    assert_eq!(report.prefix_stripped, None);
    // BatchNorm step counters and refinenet4.resConfUnit1's tensors are accepted and unused.
    let layout = support::checkpoints::upstream_layout();
    let counters = layout
        .iter()
        .filter(|e| e.key.ends_with(".num_batches_tracked"))
        .count();
    assert_eq!(
        counters, 72,
        "one counter per BatchNorm of EfficientNet-Lite3"
    );
    assert_eq!(report.unused_upstream_keys, counters + 4);
    assert_eq!(report.tensors + report.unused_upstream_keys, 482);

    for prefix in ["module.", "model."] {
        let path = dir.path().join(format!("{prefix}pt"));
        write_pt(&path, as_dict(synthetic_state_dict(prefix)));
        let report = assert_loads_correctly(&path, None, &expected);
        assert_eq!(report.prefix_stripped.as_deref(), Some(prefix));
    }

    // A training checkpoint: weights under "state_dict" beside other entries, tensors included.
    let checkpoint = dir.path().join("checkpoint.pt");
    let optimizer_state = Tensor {
        key: "exp_avg".into(),
        dtype: "float32".into(),
        shape: vec![2],
        bytes: vec![0; 8],
    };
    write_pt(
        &checkpoint,
        Value::Dict(vec![
            ("epoch".into(), Value::Int(7)),
            (
                "state_dict".into(),
                as_dict(synthetic_state_dict("module.")),
            ),
            (
                "optimizer".into(),
                Value::Dict(vec![
                    ("lr".into(), Value::Float(1e-4)),
                    ("exp_avg".into(), Value::Tensor(optimizer_state)),
                ]),
            ),
        ]),
    );
    let report = assert_loads_correctly(&checkpoint, None, &expected);
    assert_eq!(
        report.prefix_stripped.as_deref(),
        Some("state_dict.module.")
    );
    assert_eq!(report.outside_state_dict, 1);

    // Upstream's own BaseModel.load layout: {"model": state_dict, "optimizer": ...}.
    let upstream_checkpoint = dir.path().join("upstream_checkpoint.pt");
    write_pt(
        &upstream_checkpoint,
        Value::Dict(vec![
            ("model".into(), as_dict(synthetic_state_dict(""))),
            ("optimizer".into(), Value::Dict(vec![])),
        ]),
    );
    assert_eq!(
        assert_loads_correctly(&upstream_checkpoint, None, &expected)
            .prefix_stripped
            .as_deref(),
        Some("model.")
    );

    let safetensors = dir.path().join("weights.safetensors");
    write_safetensors(&safetensors, &synthetic_state_dict("module."));
    let report = assert_loads_correctly(&safetensors, None, &expected);
    assert_eq!(report.format, Some(WeightsFormat::Safetensors));
    assert_eq!(report.prefix_stripped.as_deref(), Some("module."));

    // An explicit prefix overrides detection.
    let custom = dir.path().join("custom.safetensors");
    write_safetensors(&custom, &synthetic_state_dict("net."));
    assert_loads_correctly(&custom, Some("net."), &expected);

    // Burnpack round trip: written from a loaded model, read back with Burn's own names.
    let (model, _) = weights::load_file(&bare, None, None, &device()).unwrap();
    let burnpack = dir.path().join("weights.bpk");
    weights::save_burnpack(&model, &burnpack, &[]).unwrap();
    let report = assert_loads_correctly(&burnpack, None, &expected);
    assert_eq!(report.format, Some(WeightsFormat::Burnpack));
    assert_eq!(
        report.sha256.as_deref(),
        Some(weights::sha256_file(&burnpack).unwrap().as_str())
    );
}

fn load_error(path: &Path) -> String {
    match weights::load_file(path, None, None, &device()) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(error) => error.to_string(),
    }
}

#[test]
fn mismatched_weights_are_refused_with_the_names() {
    let dir = temp_dir();
    let mut tensors = synthetic_state_dict("");

    // Missing key.
    let missing = tensors
        .iter()
        .position(|t| t.key == "scratch.output_conv.4.weight")
        .unwrap();
    let mut without = tensors.clone();
    without.remove(missing);
    let path = dir.path().join("missing.pt");
    write_pt(&path, as_dict(without));
    let message = load_error(&path);
    assert!(
        message.contains("1 missing: scratch.output_conv.4.weight"),
        "{message}"
    );

    // Wrong shape.
    let index = tensors
        .iter()
        .position(|t| t.key == "scratch.layer1_rn.weight")
        .unwrap();
    tensors[index].shape = vec![64, 32, 9];
    let path = dir.path().join("shape.safetensors");
    write_safetensors(&path, &tensors);
    let message = load_error(&path);
    assert!(
        message.contains("wrong shape or type") && message.contains("layer1_rn"),
        "{message}"
    );
    tensors[index].shape = vec![64, 32, 3, 3];

    // Unexpected key.
    tensors.push(Tensor {
        key: "scratch.extra_head.weight".into(),
        dtype: "float32".into(),
        shape: vec![1],
        bytes: vec![0; 4],
    });
    let path = dir.path().join("unexpected.pt");
    write_pt(&path, as_dict(tensors));
    let message = load_error(&path);
    assert!(
        message.contains("1 unexpected: scratch.extra_head.weight"),
        "{message}"
    );

    // Not MiDaS at all.
    let path = dir.path().join("other.safetensors");
    write_safetensors(
        &path,
        &[Tensor {
            key: "fc.weight".into(),
            dtype: "float32".into(),
            shape: vec![2],
            bytes: vec![0; 8],
        }],
    );
    let message = load_error(&path);
    assert!(
        message.contains("no MiDaS or Depth Anything V2 state dict found")
            && message.contains("fc.weight"),
        "{message}"
    );

    // Unknown format.
    let path = dir.path().join("notes.pt");
    std::fs::write(&path, "these are not weights").unwrap();
    let message = load_error(&path);
    assert!(message.contains("unknown weights format"), "{message}");

    // A truncated PyTorch file.
    let path = dir.path().join("truncated.pt");
    std::fs::write(&path, b"PK\x03\x04 and then nothing").unwrap();
    let message = load_error(&path);
    assert!(message.contains("cannot read PyTorch file"), "{message}");
}

#[test]
fn locations_parse_or_explain() {
    assert_eq!(
        "gs://bucket/dir/w.pt".parse::<WeightsLocation>().unwrap(),
        WeightsLocation::Gcs {
            bucket: "bucket".into(),
            object: "dir/w.pt".into()
        }
    );
    assert_eq!(
        "w.pt".parse::<WeightsLocation>().unwrap(),
        WeightsLocation::Path(PathBuf::from("w.pt"))
    );
    for bad in [
        "gs://bucket",
        "gs:///object",
        "ftp://host/w.pt",
        "https://",
        "",
    ] {
        let error = bad.parse::<WeightsLocation>().unwrap_err().to_string();
        assert!(error.contains("invalid weights location"), "{bad}: {error}");
    }
}

/// Serves one file over HTTP/1.1 on loopback, counting requests; 404 for other paths.
fn serve_file(body: Vec<u8>) -> (String, Arc<AtomicUsize>) {
    serve_file_at("/weights/w.pt", body)
}

/// Serves one file at `path` over HTTP/1.1 on loopback, counting requests; its URL.
fn serve_file_at(path: &'static str, body: Vec<u8>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}{path}", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            counter.fetch_add(1, Ordering::SeqCst);
            let mut request = [0u8; 4096];
            let n = stream.read(&mut request).unwrap_or(0);
            let head = String::from_utf8_lossy(&request[..n]);
            if head.starts_with(&format!("GET {path} "))
                || head.starts_with(&format!("GET {path}?"))
            {
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(&body);
            } else {
                let _ = write!(
                    stream,
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        }
    });
    (url, hits)
}

/// `fetch::load` of `location` with `options` on the flex device, run on `runtime`.
fn load_from(
    runtime: &tokio::runtime::Runtime,
    location: &WeightsLocation,
    options: &FetchOptions,
) -> Result<(Network, weights::WeightsReport), FetchError> {
    runtime.block_on(fetch::load(Some(location), options, None, None, &device()))
}

#[test]
fn urls_download_once_and_honour_the_pin() {
    let dir = temp_dir();
    let source = dir.path().join("source.pt");
    write_pt(&source, as_dict(synthetic_state_dict("")));
    let digest = weights::sha256_file(&source).unwrap();
    let (url, hits) = serve_file(std::fs::read(&source).unwrap());
    let location: WeightsLocation = url.parse().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let cache = dir.path().join("cache");

    let options = FetchOptions {
        cache_dir: cache.clone(),
        sha256: Some(digest.clone()),
    };
    let (model, report) = load_from(&runtime, &location, &options).unwrap();
    assert_eq!(report.source, url);
    assert_eq!(report.sha256.as_deref(), Some(digest.as_str()));
    assert_eq!(probe(model), expected_output());
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    // Cached: no second download, with or without the pin.
    load_from(&runtime, &location, &options).unwrap();
    let unpinned = FetchOptions {
        cache_dir: cache.clone(),
        sha256: None,
    };
    load_from(&runtime, &location, &unpinned).unwrap();
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    // A wrong pin: downloaded again (the cached copy does not match it), then refused.
    let wrong = FetchOptions {
        cache_dir: dir.path().join("cache2"),
        sha256: Some("0".repeat(64)),
    };
    let error = load_from(&runtime, &location, &wrong).unwrap_err();
    assert!(matches!(error, FetchError::Checksum { .. }), "{error}");
    assert!(error.to_string().contains(&digest));
    assert_eq!(
        std::fs::read_dir(dir.path().join("cache2"))
            .unwrap()
            .count(),
        0,
        "a rejected download is not cached"
    );

    // A pin on a local file is checked too, before the file is parsed: a file that is not
    // weights at all is refused for its checksum, never read as a checkpoint.
    let garbage = dir.path().join("garbage.pt");
    std::fs::write(&garbage, b"not a checkpoint").unwrap();
    for path in [source, garbage] {
        let error = load_from(&runtime, &WeightsLocation::Path(path), &wrong).unwrap_err();
        assert!(matches!(error, FetchError::Checksum { .. }), "{error}");
    }

    // 404 and connection refused are download errors naming the location.
    let missing: WeightsLocation = url.replace("w.pt", "nope.pt").parse().unwrap();
    let error = load_from(&runtime, &missing, &unpinned)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("cannot download weights") && error.contains("404"),
        "{error}"
    );
    let refused: WeightsLocation = "http://127.0.0.1:9/w.pt".parse().unwrap();
    let error = load_from(&runtime, &refused, &unpinned)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("cannot download weights from http://127.0.0.1:9/w.pt"),
        "{error}"
    );

    let absent = WeightsLocation::Path(dir.path().join("absent.pt"));
    let error = load_from(&runtime, &absent, &unpinned)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("absent.pt") && error.contains("no such file"),
        "{error}"
    );
}

#[test]
fn a_signed_weights_url_is_never_shown() {
    let dir = temp_dir();
    let source = dir.path().join("source.pt");
    write_pt(&source, as_dict(synthetic_state_dict("")));
    let (url, hits) = serve_file(std::fs::read(&source).unwrap());
    let secret = "X-Goog-Signature=SECRET0123456789";
    let signed = format!(
        "{}?{secret}&X-Goog-Credential=CREDENTIAL42",
        url.replacen("http://", "http://reader7:PASSWORD7@", 1)
    );
    let store = dir.path().join("store");
    let server = support::server::Server::start(
        &[
            "--store",
            store.to_str().unwrap(),
            "--weights",
            &signed,
            "--cache-dir",
            dir.path().join("cache").to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let page = support::get(server.url("/")).unwrap().text().unwrap();
    let ready = support::get(server.url("/readyz")).unwrap().text().unwrap();
    let logs = server.logs().join("\n");
    assert!(ready.contains("/weights/w.pt?<redacted>"), "{ready}");
    for (what, text) in [("/", &page), ("/readyz", &ready), ("logs", &logs)] {
        for hidden in ["SECRET0123456789", "CREDENTIAL42", "PASSWORD7", "reader7"] {
            assert!(!text.contains(hidden), "{what} shows {hidden}:\n{text}");
        }
    }
}

#[test]
fn a_model_name_fetches_upstreams_release_once() {
    let dir = temp_dir();
    let source = dir.path().join("source.pt");
    write_pt(&source, as_dict(synthetic_state_dict("")));
    let (url, hits) = serve_file_at(
        "/releases/v2_1/midas_v21_small_256.pt",
        std::fs::read(&source).unwrap(),
    );
    let mirror = url
        .trim_end_matches("/v2_1/midas_v21_small_256.pt")
        .to_string();
    let image = dir.path().join("photo.png");
    image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8, y as u8, 7]))
        .save(&image)
        .unwrap();
    let run = |out: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_midas-serve"))
            .args(["predict", "--weights", "midas_v21_small_256"])
            .args(["--weights-mirror", &mirror, "--out-dir"])
            .arg(dir.path().join(out))
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .arg(&image)
            .current_dir(dir.path())
            .env("MIDAS_LOG_FORMAT", "json")
            .output()
            .unwrap()
    };
    for out in ["first", "second"] {
        let output = run(out);
        let logs = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{logs}");
        assert!(
            logs.contains(&url),
            "the weights' source is the release URL: {logs}"
        );
        assert!(!logs.contains("UNTRAINED"), "{logs}");
        assert!(dir.path().join(out).join("photo.png").is_file());
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "downloaded once, then cached"
    );
    // A file of that name is still the file.
    std::fs::write(dir.path().join("midas_v21_small_256"), b"not weights").unwrap();
    let output = run("third");
    assert!(!output.status.success());
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}
