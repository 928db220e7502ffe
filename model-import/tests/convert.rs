//! `model-import` converts upstream-layout weights to a burnpack that loads and predicts the same.

#[path = "../../tests/support/checkpoints.rs"]
#[allow(dead_code)] // shared with the root crate's tests, which use all of it
mod checkpoints;

use std::process::Command;

use burn::prelude::*;
use checkpoints::{
    Value, as_dict, synthetic_dpt_state_dict, synthetic_state_dict, write_pt, write_safetensors,
};
use midas_model::backend::{Backend, BackendKind};
use midas_model::weights::{self, WeightsFormat};

fn flex() -> Backend {
    Backend::init(BackendKind::Flex).expect("flex starts")
}

fn import(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_model-import"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn converts_pt_and_safetensors_to_a_verified_burnpack() {
    let dir = tempfile::tempdir().unwrap();
    let pt = dir.path().join("midas.pt");
    write_pt(&pt, as_dict(synthetic_state_dict("module.")));
    let safetensors = dir.path().join("midas.safetensors");
    write_safetensors(&safetensors, &synthetic_state_dict(""));

    for (input, prefix) in [(&pt, "module."), (&safetensors, "none")] {
        let output = dir.path().join(format!(
            "{}.bpk",
            input.extension().unwrap().to_str().unwrap()
        ));
        let result = import(&[input.to_str().unwrap(), "-o", output.to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&result.stdout);
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(result.status.success(), "{stderr}");
        for step in ["[1/4]", "[2/4]", "[3/4]", "[4/4]"] {
            assert!(
                stderr.contains(step),
                "progress step {step} missing: {stderr}"
            );
        }
        let input_sha = weights::sha256_file(input).unwrap();
        let output_sha = weights::sha256_file(&output).unwrap();
        assert!(
            stdout.contains(&format!("input sha256     {input_sha}")),
            "{stdout}"
        );
        assert!(
            stdout.contains(&format!("output sha256    {output_sha}")),
            "{stdout}"
        );
        assert!(
            stdout.contains(&format!("prefix stripped  {prefix}")),
            "{stdout}"
        );
        assert!(stdout.contains("verified"), "{stdout}");

        let (model, report) = weights::load_file(&output, None, None, &Device::flex()).unwrap();
        assert_eq!(report.format, Some(WeightsFormat::Burnpack));
        let (untrained, _) = weights::untrained(
            midas_model::model::ModelKind::MidasV21Small256,
            &Device::flex(),
        );
        let probe = |m| {
            midas_model::engine::DepthModel::new(m, &flex())
                .forward(weights::synthetic::network_input(256, 128), 1, 128, 256)
                .unwrap()
        };
        assert_eq!(probe(model), probe(untrained));

        // Never overwrites.
        let again = import(&[input.to_str().unwrap(), "-o", output.to_str().unwrap()]);
        assert!(!again.status.success());
        assert!(String::from_utf8_lossy(&again.stderr).contains("exists already"));
    }
}

/// A DPT-Hybrid checkpoint in PyTorch Lightning's layout becomes a burnpack of the used weights
/// only, standardised, that predicts what the checkpoint predicts; `--model` must agree.
#[test]
fn converts_a_dpt_lightning_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("dpt.ckpt");
    write_pt(
        &checkpoint,
        Value::Dict(vec![
            ("epoch".into(), Value::Int(0)),
            (
                "state_dict".into(),
                as_dict(synthetic_dpt_state_dict("model.")),
            ),
            ("lr_schedulers".into(), Value::Dict(vec![])),
        ]),
    );
    let output = dir.path().join("dpt.bpk");
    let refused = import(&[
        checkpoint.to_str().unwrap(),
        "-o",
        output.to_str().unwrap(),
        "--model",
        "midas_v21_small_256",
    ]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("dpt_hybrid_384"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(!output.exists());

    let result = import(&[checkpoint.to_str().unwrap(), "-o", output.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    for line in [
        "model            dpt_hybrid_384",
        "prefix stripped  state_dict.model.",
        "ignored keys     8 unused upstream",
        "verified",
    ] {
        assert!(stdout.contains(line), "{line} missing: {stdout}");
    }
    // The burnpack holds the 121.2 M used weights, not the checkpoint's 123.1 M.
    let size = std::fs::metadata(&output).unwrap().len();
    assert!((484_000_000..487_000_000).contains(&size), "{size} bytes");
    let (model, report) = weights::load_file(&output, None, None, &Device::flex()).unwrap();
    assert_eq!(report.model, midas_model::model::ModelKind::DptHybrid384);
    let (untrained, _) =
        weights::untrained(midas_model::model::ModelKind::DptHybrid384, &Device::flex());
    let probe = |m| {
        midas_model::engine::DepthModel::new(m, &flex())
            .forward(weights::synthetic::network_input(64, 64), 1, 64, 64)
            .unwrap()
    };
    assert_eq!(probe(model), probe(untrained));
}

#[test]
fn refuses_weights_that_do_not_fit_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = synthetic_state_dict("");
    tensors.retain(|t| !t.key.starts_with("scratch.refinenet1."));
    let input = dir.path().join("partial.pt");
    write_pt(&input, as_dict(tensors));
    let output = dir.path().join("partial.bpk");
    let result = import(&[input.to_str().unwrap(), "-o", output.to_str().unwrap()]);
    assert!(!result.status.success());
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        stderr.contains("missing") && stderr.contains("scratch.refinenet1.out_conv.weight"),
        "{stderr}"
    );
    assert!(!output.exists());
}
