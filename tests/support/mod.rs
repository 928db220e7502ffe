//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

pub mod checkpoints;
pub mod counting;
pub mod gcs;
pub mod server;

/// A blocking HTTP client for the tests' own requests. reqwest refuses to build one before the
/// process has a TLS provider, so this installs the one the crate uses (`midas_serve::tls`).
pub fn client() -> reqwest::blocking::Client {
    midas_serve::tls::install_crypto_provider();
    reqwest::blocking::Client::new()
}

/// `GET url` with [`client`].
pub fn get(url: impl reqwest::IntoUrl) -> reqwest::Result<reqwest::blocking::Response> {
    client().get(url).send()
}

/// `tests/fixtures/<relative>` of the workspace (also from `model-import`'s tests).
pub fn fixture(relative: &str) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = if manifest.join("tests/fixtures").is_dir() {
        manifest
    } else {
        manifest.parent().unwrap()
    };
    root.join("tests/fixtures").join(relative)
}

/// A float32 `.npy` file's shape and values.
pub fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let npy = npyz::NpyFile::new(&bytes[..]).expect("valid npy");
    let shape = npy.shape().iter().map(|&d| d as usize).collect();
    (shape, npy.into_vec::<f32>().expect("float32 data"))
}

/// Largest absolute difference between two equally long slices; NaN when either holds a NaN
/// (or both an infinity at one place), so that a check `diff <= tolerance` fails on it.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, |worst: f32, d| {
            if worst.is_nan() || d.is_nan() {
                f32::NAN
            } else {
                worst.max(d)
            }
        })
}

/// `max - min` of a slice.
pub fn value_range(values: &[f32]) -> f32 {
    let (lo, hi) = values
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    hi - lo
}

/// Every finished file below `dir` (temporary `.partial-*` files of the local store left out).
pub fn stored_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).into_iter().flatten() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if !path
                .file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with(".partial-"))
            {
                files.push(path);
            }
        }
    }
    files
}

/// The network of `model` with the synthetic weights on `backend` against the PyTorch outputs
/// in `tests/fixtures/forward/{prefix}WxH.npy` at each `(width, height)`: max |diff| at most
/// `relative_tolerance` times the reference's range (a NaN fails).
pub fn assert_parity(
    backend: midas_model::backend::BackendKind,
    model: midas_model::model::ModelKind,
    prefix: &str,
    sizes: &[(usize, usize)],
    relative_tolerance: f32,
) {
    let paths: Vec<PathBuf> = sizes
        .iter()
        .map(|(width, height)| fixture(&format!("forward/{prefix}{width}x{height}.npy")))
        .collect();
    assert_network_parity(
        backend,
        |device| midas_model::weights::untrained(model, device).0,
        &paths,
        relative_tolerance,
    );
}

/// [`assert_parity`] for the network `build` makes, against the reference outputs in `paths`
/// (each `..._WxH.npy`, its size read from the name).
pub fn assert_network_parity(
    backend: midas_model::backend::BackendKind,
    build: impl FnOnce(&midas_model::backend::Device) -> midas_model::model::Network,
    paths: &[PathBuf],
    relative_tolerance: f32,
) {
    use midas_model::weights::synthetic;
    let started = midas_model::backend::Backend::init(backend).expect("backend starts");
    let network = build(&started.device);
    let model = network.kind();
    let network = midas_model::engine::DepthModel::new(network, &started);
    for path in paths {
        let size = path
            .file_stem()
            .and_then(|stem| stem.to_str())
            .and_then(|stem| stem.rsplit('_').next())
            .and_then(|size| size.split_once('x'))
            .and_then(|(w, h)| Some((w.parse::<usize>().ok()?, h.parse::<usize>().ok()?)));
        let Some((width, height)) = size else {
            panic!("{} does not end in _WxH.npy", path.display());
        };
        let (shape, expected) = read_npy(path);
        assert_eq!(shape, vec![1, height, width]);
        let timer = std::time::Instant::now();
        let output = network
            .forward(synthetic::network_input(width, height), 1, height, width)
            .unwrap();
        let range = value_range(&expected);
        let diff = max_abs_diff(&output, &expected);
        println!(
            "{backend} {model} {width}x{height}: max |diff| {diff:.3e}, range {range:.3}, ratio {:.3e}, {:.0} ms",
            diff / range,
            timer.elapsed().as_secs_f64() * 1000.0
        );
        assert!(range > 0.5, "reference output is degenerate");
        assert!(
            diff <= relative_tolerance * range,
            "{backend} {model} {width}x{height}: max |diff| {diff} > {relative_tolerance} x {range}"
        );
    }
}

/// The Python with the test tools (plyfile, schemathesis, …), as `scripts/test.sh` provides it.
pub fn python() -> String {
    std::env::var("MIDAS_TEST_PYTHON").unwrap_or_else(|_| "python3".to_string())
}
