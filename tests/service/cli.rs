//! The command-line contract: `forward`, `predict` and the help text, run as a user would.

use crate::support;

use std::path::Path;
use std::process::{Command, Output};

use midas_model::weights::synthetic;
use npyz::WriterBuilder;
use support::{fixture, max_abs_diff, read_npy, value_range};

fn midas(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_midas-serve"))
        .args(args)
        .env("MIDAS_LOG_FORMAT", "text")
        .env(
            "MIDAS_CACHE_DIR",
            std::env::temp_dir().join("midas-serve-test-cache"),
        )
        .output()
        .expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `midas-serve` with `args`, expecting it to fail with `needle` in its error output.
fn assert_refused(args: &[&str], needle: &str) {
    let output = midas(args);
    assert!(!output.status.success(), "{args:?} succeeded");
    let stderr = text(&output.stderr);
    assert!(stderr.contains(needle), "{stderr}");
}

fn write_npy(path: &Path, shape: &[u64], values: &[f32]) {
    let mut bytes = Vec::new();
    let mut writer = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .writer(&mut bytes)
        .begin_nd()
        .unwrap();
    writer.extend(values.iter().copied()).unwrap();
    writer.finish().unwrap();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn help_lists_the_subcommands() {
    let output = midas(&["--help"]);
    assert!(output.status.success());
    let help = text(&output.stdout);
    for command in ["forward", "predict", "serve"] {
        assert!(help.contains(command), "{help}");
    }
}

#[test]
fn forward_writes_the_raw_output_and_times_it() {
    let dir = tempfile::tempdir().unwrap();
    let (width, height) = (256, 192);
    let input = dir.path().join("in.npy");
    write_npy(
        &input,
        &[1, 3, height, width],
        &synthetic::network_input(width as usize, height as usize),
    );
    let (_, expected) = read_npy(&fixture("forward/256x192.npy"));
    let mut backends = vec![];
    if cfg!(feature = "flex") {
        backends.push("flex");
    }
    if cfg!(feature = "ndarray") {
        backends.push("ndarray");
    }
    for backend in backends {
        let output_path = dir.path().join(format!("out-{backend}.npy"));
        let output = midas(&[
            "forward",
            "--backend",
            backend,
            "--input",
            input.to_str().unwrap(),
            "--output",
            output_path.to_str().unwrap(),
            "--repeat",
            "3",
        ]);
        assert!(output.status.success(), "{}", text(&output.stderr));
        assert!(
            text(&output.stderr).contains("UNTRAINED"),
            "the untrained model must be announced"
        );
        let summary: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("one JSON object on stdout");
        assert_eq!(summary["backend"], backend);
        assert_eq!(summary["model"], "midas_v21_small_256");
        assert_eq!(summary["shape"], serde_json::json!([1, 3, 192, 256]));
        assert_eq!(summary["runs"], 3);
        let (median, min) = (
            summary["median_ms"].as_f64().unwrap(),
            summary["min_ms"].as_f64().unwrap(),
        );
        assert!(min > 0.0 && min <= median, "{summary}");

        let (shape, actual) = read_npy(&output_path);
        assert_eq!(shape, vec![1, 192, 256]);
        assert!(
            max_abs_diff(&actual, &expected) <= 1e-4 * value_range(&expected),
            "{backend}"
        );
    }
}

#[test]
fn forward_refuses_bad_input_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("odd.npy");
    write_npy(&input, &[1, 3, 100, 100], &vec![0.0; 30_000]);
    let forward = |extra: &[&str], input: &str, needle: &str| {
        let mut args = vec!["forward"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--input", input, "--output", "/dev/null"]);
        assert_refused(&args, needle);
    };
    forward(&[], input.to_str().unwrap(), "multiples of 32");
    forward(&[], "/nonexistent.npy", "cannot read /nonexistent.npy");
    if !cfg!(feature = "wgpu") {
        write_npy(&input, &[1, 3, 32, 32], &vec![0.0; 3 * 32 * 32]);
        forward(
            &["--backend", "wgpu"],
            input.to_str().unwrap(),
            "not compiled into this binary",
        );
    }
}

#[test]
fn predict_writes_one_file_per_image_in_each_format() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let images = [
        fixture("images/rocket.jpg"),
        fixture("images/camera_odd.png"),
    ];
    for (format, extension) in [("png", "png"), ("png16", "png"), ("npy", "npy")] {
        let target = out.join(format);
        let mut args = vec![
            "predict",
            "--out-dir",
            target.to_str().unwrap(),
            "--format",
            format,
            "--colormap",
            "viridis",
        ];
        args.extend(images.iter().map(|p| p.to_str().unwrap()));
        let output = midas(&args);
        assert!(output.status.success(), "{}", text(&output.stderr));
        for (stem, size) in [("rocket", (640, 427)), ("camera_odd", (331, 509))] {
            let path = target.join(format!("{stem}.{extension}"));
            match format {
                "npy" => {
                    let (shape, _) = read_npy(&path);
                    let expected = midas_serve::pipeline::target_size(
                        midas_model::model::ModelKind::MidasV21Small256,
                        size.0,
                        size.1,
                    );
                    assert_eq!(shape, vec![expected.1, expected.0]);
                }
                _ => {
                    let image = image::open(&path).unwrap();
                    assert_eq!((image.width(), image.height()), size);
                    let color = image.color();
                    assert_eq!(
                        color,
                        if format == "png" {
                            image::ColorType::Rgb8
                        } else {
                            image::ColorType::L16
                        }
                    );
                }
            }
        }
    }
}

#[test]
fn predict_refuses_a_corrupt_image() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.png");
    let mut bytes = std::fs::read(fixture("images/camera_odd.png")).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&broken, bytes).unwrap();
    let args = [
        "predict",
        "--out-dir",
        dir.path().to_str().unwrap(),
        broken.to_str().unwrap(),
    ];
    assert_refused(&args, "broken.png");
    assert_refused(&args, "truncated");
}
