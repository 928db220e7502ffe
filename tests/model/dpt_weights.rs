//! DPT-Hybrid weights: every accepted format (a Lightning checkpoint among them), a checkpoint
//! really written by PyTorch Lightning, and `--model` against what the keys say.

use crate::support;

use std::collections::HashMap;
use std::path::Path;

use burn::prelude::*;
use midas_model::backend::{Backend, BackendKind};
use midas_model::engine::DepthModel;
use midas_model::model::{ModelKind, Network};
use midas_model::weights::{self, WeightsError, WeightsFormat, layout, synthetic};
use support::checkpoints::{
    Tensor, Value, as_dict, synthetic_dpt_state_dict, synthetic_state_dict, write_pt,
    write_safetensors,
};
use support::fixture;

const DPT: ModelKind = ModelKind::DptHybrid384;

/// Parameters DPT-Hybrid's forward uses: 123,146,985 less the 8 unused keys' 1,950,696.
const USED_PARAMETERS: usize = 121_196_289;

fn device() -> Device {
    Device::flex()
}

fn flex() -> Backend {
    Backend::init(BackendKind::Flex).expect("flex starts")
}

/// The network's output on a 64x64 probe input.
fn probe(network: Network) -> Vec<f32> {
    DepthModel::new(network, &flex())
        .forward(synthetic::network_input(64, 64), 1, 64, 64)
        .unwrap()
}

fn load(path: &Path, kind: Option<ModelKind>) -> Result<weights::WeightsReport, WeightsError> {
    weights::load_file(path, None, kind, &device()).map(|(_, report)| report)
}

fn assert_loads(path: &Path, expected: &[f32]) -> weights::WeightsReport {
    let (network, report) =
        weights::load_file(path, None, None, &device()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.model, DPT, "{}", path.display());
    assert_eq!(report.parameters, USED_PARAMETERS);
    assert_eq!(
        probe(network),
        expected,
        "{} gives a different output",
        path.display()
    );
    report
}

/// A small stand-in for Adam's state: the loader must skip it, whatever its size.
fn adam_state() -> Value {
    let moment = |key: &str| Tensor {
        key: key.into(),
        dtype: "float32".into(),
        shape: vec![4],
        bytes: vec![0; 16],
    };
    Value::Dict(vec![(
        "0".into(),
        Value::Dict(vec![(
            "state".into(),
            Value::Dict(vec![(
                "0".into(),
                Value::Dict(vec![
                    ("exp_avg".into(), Value::Tensor(moment("exp_avg"))),
                    ("exp_avg_sq".into(), Value::Tensor(moment("exp_avg_sq"))),
                ]),
            )]),
        )]),
    )])
}

#[test]
fn every_format_loads_the_same_network() {
    let dir = tempfile::tempdir().unwrap();
    let expected = probe(weights::untrained(DPT, &device()).0);

    let bare = dir.path().join("dpt.pt");
    write_pt(&bare, as_dict(synthetic_dpt_state_dict("")));
    let report = assert_loads(&bare, &expected);
    assert_eq!(report.format, Some(WeightsFormat::Pytorch));
    assert_eq!(report.prefix_stripped, None);
    // The final LayerNorm, the classifier and refinenet4's first unit: 8 keys, accepted.
    assert_eq!(report.unused_upstream_keys, 8);
    assert_eq!(report.tensors, 360);

    // A Lightning checkpoint's layout: `model.` keys under `state_dict`, optimizer state after.
    let lightning = dir.path().join("dpt.ckpt");
    write_pt(
        &lightning,
        Value::Dict(vec![
            ("epoch".into(), Value::Int(0)),
            ("global_step".into(), Value::Int(1)),
            (
                "state_dict".into(),
                as_dict(synthetic_dpt_state_dict("model.")),
            ),
            ("optimizer_states".into(), adam_state()),
            ("lr_schedulers".into(), Value::Dict(vec![])),
        ]),
    );
    let report = assert_loads(&lightning, &expected);
    assert_eq!(report.prefix_stripped.as_deref(), Some("state_dict.model."));
    assert_eq!(report.outside_state_dict, 2);

    let safetensors = dir.path().join("dpt.safetensors");
    write_safetensors(&safetensors, &synthetic_dpt_state_dict(""));
    assert_eq!(
        assert_loads(&safetensors, &expected).format,
        Some(WeightsFormat::Safetensors)
    );

    // Burnpack: written from a loaded network (backbone already standardised), read back.
    let (network, _) = weights::load_file(&lightning, None, None, &device()).unwrap();
    let burnpack = dir.path().join("dpt.bpk");
    weights::save_burnpack(&network, &burnpack, &[]).unwrap();
    drop(network);
    assert_eq!(
        assert_loads(&burnpack, &expected).format,
        Some(WeightsFormat::Burnpack)
    );

    // --model must agree with the keys, whatever the format.
    for path in [&bare, &burnpack] {
        let error = load(path, Some(ModelKind::MidasV21Small256)).unwrap_err();
        assert!(
            matches!(error, WeightsError::WrongModel { .. }),
            "{}: {error}",
            path.display()
        );
        let message = error.to_string();
        assert!(
            message.contains("--model midas_v21_small_256") && message.contains("dpt_hybrid_384"),
            "{message}"
        );
        assert_eq!(load(path, Some(DPT)).unwrap().model, DPT);
    }
}

#[test]
fn small_weights_are_not_taken_for_dpt() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small.pt");
    write_pt(&small, as_dict(synthetic_state_dict("module.")));
    let error = load(&small, Some(DPT)).unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(error, WeightsError::WrongModel { .. })
            && message.contains("--model dpt_hybrid_384")
            && message.contains("midas_v21_small_256"),
        "{message}"
    );
    assert_eq!(
        load(&small, None).unwrap().model,
        ModelKind::MidasV21Small256
    );

    // Keys of neither network: the error names both anchors and what was found.
    let other = dir.path().join("other.pt");
    write_pt(
        &other,
        as_dict(vec![Tensor {
            key: "encoder.conv.weight".into(),
            dtype: "float32".into(),
            shape: vec![1],
            bytes: vec![0; 4],
        }]),
    );
    let message = load(&other, None).unwrap_err().to_string();
    assert!(
        message.contains("dpt_hybrid_384")
            && message.contains("midas_v21_small_256")
            && message.contains("encoder.conv.weight"),
        "{message}"
    );
    let message = load(&other, Some(DPT)).unwrap_err().to_string();
    assert!(
        message.contains("none of the supported models"),
        "{message}"
    );
}

/// `tests/fixtures/checkpoints/dpt_tiny.ckpt` was written by a real pytorch_lightning 2.6.6
/// Trainer and ModelCheckpoint (`scripts/reference/lightning_checkpoint.py`): a module holding
/// eight of DPT-Hybrid's keys, one of them without a gradient, with every entry Lightning
/// writes (Adam's state, loops, callbacks). Its weights are the synthetic formula's values.
#[test]
fn a_checkpoint_written_by_lightning_is_read_as_written() {
    let path = fixture("checkpoints/dpt_tiny.ckpt");
    // Too few keys to be recognised: the error lists what it found.
    let message = weights::read_state_dict(&path, None, None)
        .err()
        .expect("no anchor key")
        .to_string();
    assert!(message.contains("state_dict.model."), "{message}");

    let state_dict = weights::read_state_dict(&path, Some("state_dict.model."), Some(DPT))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(state_dict.format, WeightsFormat::Pytorch);
    assert_eq!(state_dict.unused_upstream_keys, 1, "refinenet4's unit");
    // Adam's exp_avg, exp_avg_sq and step for the 7 parameters that had a gradient, at least.
    assert!(
        state_dict.outside_state_dict >= 21,
        "{} tensors outside the state dict",
        state_dict.outside_state_dict
    );
    let expected: HashMap<String, Vec<u8>> = synthetic_dpt_state_dict("")
        .into_iter()
        .map(|t| (layout::to_burn(&t.key), t.bytes))
        .collect();
    let mut names: Vec<&str> = state_dict.tensors.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "pretrained.model.blocks.0.norm1.bias",
            "pretrained.model.blocks.0.norm1.weight",
            "pretrained.model.cls_token",
            "scratch.output_conv.conv2.bias",
            "scratch.output_conv.conv3.bias",
            "scratch.output_conv.conv3.weight",
            "scratch.refinenet1.out_conv.bias",
        ]
    );
    for tensor in &state_dict.tensors {
        let bytes = tensor.to_bytes().unwrap();
        assert_eq!(
            &bytes[..],
            &expected[&tensor.name][..],
            "{} differs from the formula",
            tensor.name
        );
    }
}
