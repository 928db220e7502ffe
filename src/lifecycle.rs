//! A model's way from flags to a ready [`LoadedModel`]: the backend is started, the weights are
//! fetched (cached, sha256-pinned), their format detected and their network recognised, then
//! the parameters are handed to the engine that runs them (packed for the CPU kernels on a CPU
//! backend). Image handling stays in [`crate::pipeline`]; this module only assembles.

use std::time::Instant;

use crate::config::ModelArgs;
use crate::fetch::{self, FetchError, FetchOptions};
use crate::pipeline::{LoadedModel, Transform};
use midas_model::backend::{Backend, BackendError};
use midas_model::engine::DepthModel;
use midas_model::kernels::simd::Isa;
use midas_model::model::Network;
use midas_model::weights::WeightsReport;

/// Why a model could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The backend did not start.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The weights could not be fetched or loaded.
    #[error(transparent)]
    Weights(#[from] FetchError),
    /// A metric model's largest depth is unknown, or one was given for a relative model.
    #[error("{0}")]
    MaxDepth(String),
}

/// A metric model's largest depth: `--max-depth`, else what the weights say (their file name's
/// data set, a `.bpk`'s metadata). Refused for a relative model, and required for a metric one.
fn settle_max_depth(
    network: &mut Network,
    report: &mut WeightsReport,
    requested: Option<f32>,
) -> Result<(), LoadError> {
    let kind = network.kind();
    match (requested, kind.is_metric()) {
        (Some(max_depth), true) => {
            network.set_max_depth(max_depth);
            report.max_depth = Some(max_depth);
            Ok(())
        }
        (Some(_), false) => Err(LoadError::MaxDepth(format!(
            "--max-depth applies to metric models only, and {kind} predicts relative depth (name a metric one with --model depth_anything_v2_metric_vits, _vitb or _vitl)"
        ))),
        (None, true) if report.max_depth.is_none() => Err(LoadError::MaxDepth(format!(
            "{kind} predicts metres up to a largest depth the weights do not state: pass --max-depth (upstream's max_depth: 20 for the Hypersim fine-tunes, 80 for the VKITTI ones)"
        ))),
        (None, _) => Ok(()),
    }
}

/// Starts the backend and loads the weights `args` names (or the untrained model, loudly), to
/// run with `transform`.
pub async fn load(args: &ModelArgs, transform: Transform) -> Result<LoadedModel, LoadError> {
    let started = Instant::now();
    let backend = Backend::init(args.backend)?;
    match &backend.adapter {
        Some(adapter) => {
            tracing::info!(backend = %backend.kind, adapter = ?adapter, "backend ready")
        }
        None => tracing::info!(backend = %backend.kind, "backend ready"),
    }
    let options = FetchOptions {
        cache_dir: args.cache_dir(),
        sha256: args.sha256_pin(),
    };
    let (mut network, mut report) = fetch::load(
        args.location().as_ref(),
        &options,
        args.key_prefix.as_deref(),
        args.requested_model(),
        &backend.device,
    )
    .await?;
    settle_max_depth(&mut network, &mut report, args.max_depth)?;
    if report.untrained {
        tracing::warn!(
            model = %report.model,
            "NO WEIGHTS GIVEN: running the UNTRAINED deterministic {} model; its depth maps are meaningless. Pass --weights (or MIDAS_WEIGHTS) with a MiDaS or Depth Anything V2 checkpoint",
            report.model
        );
    } else {
        tracing::info!(
            model = %report.model,
            source = %report.source,
            format = ?report.format,
            sha256 = report.sha256.as_deref().unwrap_or(""),
            tensors = report.tensors,
            parameters = report.parameters,
            prefix_stripped = report.prefix_stripped.as_deref().unwrap_or(""),
            outside_state_dict = report.outside_state_dict,
            max_depth = report.max_depth,
            "weights loaded"
        );
    }
    let packing = Instant::now();
    let model = DepthModel::new(network, &backend);
    tracing::info!(
        model = %model.kind(),
        transform = transform.name(),
        cpu_path = Isa::detected().name(),
        packing_ms = packing.elapsed().as_millis() as u64,
        total_ms = started.elapsed().as_millis() as u64,
        "model ready (on CPU: BatchNorm folded, filters packed for the kernels)"
    );
    Ok(LoadedModel {
        model,
        backend,
        weights: report,
        transform,
    })
}
