//! `model-import`: converts MiDaS (v2.1 small, v3.0 DPT-Hybrid) or Depth Anything V2 weights
//! (PyTorch `.pt`/`.pth`/`.ckpt` or `.safetensors`, in upstream's key layout) to Burn's `.bpk`,
//! which
//! `midas-serve` loads without any remapping or conversion (DPT's weight standardisation is done
//! here, once). The written file is read back and checked against the source on a probe input
//! before the command succeeds.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, ensure};
use clap::Parser;
use midas_model::backend::{Backend, BackendKind};
use midas_model::engine::DepthModel;
use midas_model::model::{ModelKind, Network};
use midas_model::weights::{self, WeightsFormat, WeightsReport, synthetic};

/// Convert MiDaS (v2.1 small, v3.0 DPT-Hybrid) or Depth Anything V2 weights to Burn's burnpack
/// format.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// PyTorch .pt/.pth/.ckpt (state dict, checkpoint dict or Lightning checkpoint) or
    /// .safetensors file.
    input: PathBuf,
    /// The .bpk file to write (must not exist).
    #[arg(short, long)]
    output: PathBuf,
    /// Prefix to strip from every key (detected automatically when absent; "" for none).
    #[arg(long)]
    key_prefix: Option<String>,
    /// The network the weights must be for (recognised from the keys when absent).
    #[arg(long = "model")]
    kind: Option<ModelKind>,
    /// A metric Depth Anything V2 model's largest depth in metres, stored in the burnpack (read
    /// from the input's name when it names the data set: 20 for hypersim, 80 for vkitti).
    #[arg(long)]
    max_depth: Option<f32>,
}

/// Probe input size (width, height) in multiples of the network's input multiple: a 4:3 input
/// (256x192 for MiDaS small).
const PROBE_MULTIPLES: (usize, usize) = (8, 6);

fn step(number: usize, text: &str) {
    eprintln!("[{number}/4] {text}");
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    ensure!(
        !args.output.exists(),
        "{} exists already; remove it or choose another name",
        args.output.display()
    );
    let backend = Backend::init(BackendKind::Flex)?;

    let size = std::fs::metadata(&args.input)
        .with_context(|| format!("cannot read {}", args.input.display()))?
        .len();
    step(
        1,
        &format!(
            "reading {} ({:.1} MB)",
            args.input.display(),
            size as f64 / 1e6
        ),
    );
    let format = WeightsFormat::detect(&args.input)?;
    ensure!(
        format != WeightsFormat::Burnpack,
        "{} is already a burnpack",
        args.input.display()
    );
    let (mut model, mut report) = weights::load_file(
        &args.input,
        args.key_prefix.as_deref(),
        args.kind,
        &backend.device,
    )?;
    if let Some(max_depth) = args.max_depth {
        ensure!(
            max_depth.is_finite() && max_depth > 0.0,
            "--max-depth must be a positive number of metres"
        );
        ensure!(
            model.set_max_depth(max_depth),
            "--max-depth applies to metric models only, and {} predicts relative depth",
            report.model
        );
        report.max_depth = Some(max_depth);
    }
    ensure!(
        !report.model.is_metric() || report.max_depth.is_some(),
        "{} predicts metres up to a largest depth {} does not state: pass --max-depth (20 for the Hypersim fine-tunes, 80 for the VKITTI ones)",
        report.model,
        args.input.display()
    );
    step(
        2,
        &format!(
            "loaded {} {} tensors ({} parameters) from {format}; {} tensors outside the state dict not read",
            report.tensors, report.model, report.parameters, report.outside_state_dict
        ),
    );

    step(3, &format!("writing {}", args.output.display()));
    let source_sha256 = report.sha256.clone().unwrap_or_default();
    weights::save_burnpack(
        &model,
        &args.output,
        &[
            ("source_sha256", &source_sha256),
            ("source_format", &format.to_string()),
        ],
    )?;

    let multiple = report.model.input_multiple();
    let probe = (PROBE_MULTIPLES.0 * multiple, PROBE_MULTIPLES.1 * multiple);
    step(
        4,
        &format!(
            "verifying {} on a {}x{} probe input",
            args.output.display(),
            probe.0,
            probe.1
        ),
    );
    if let Err(error) = verify(&args.output, model, &report, &backend, probe) {
        let _ = std::fs::remove_file(&args.output);
        return Err(error.context("verification failed; the output was removed"));
    }
    let output_sha256 = weights::sha256_file(&args.output)?;

    print_summary(
        &args,
        format,
        &report,
        &source_sha256,
        &output_sha256,
        started,
    );
    Ok(())
}

/// Reloads the written `output` and checks it gives `model`'s output, bit for bit, on a probe
/// input (a NaN anywhere makes the difference NaN, which is not 0).
fn verify(
    output: &std::path::Path,
    model: Network,
    report: &WeightsReport,
    backend: &Backend,
    (width, height): (usize, usize),
) -> anyhow::Result<()> {
    let (reloaded, reloaded_report) = weights::load_file(output, None, None, &backend.device)?;
    ensure!(
        reloaded_report.parameters == report.parameters
            && reloaded_report.model == report.model
            && reloaded_report.max_depth == report.max_depth,
        "model, parameter count or largest depth changed on reload"
    );
    let input = synthetic::network_input(width, height);
    let expected = DepthModel::new(model, backend).forward(input.clone(), 1, height, width)?;
    let actual = DepthModel::new(reloaded, backend).forward(input, 1, height, width)?;
    let diff = expected
        .iter()
        .zip(&actual)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, |worst, d| {
            if worst.is_nan() || d.is_nan() {
                f32::NAN
            } else {
                worst.max(d)
            }
        });
    ensure!(
        diff == 0.0,
        "the written file gives a different output (max |diff| {diff})"
    );
    Ok(())
}

/// The conversion's summary on stdout.
fn print_summary(
    args: &Args,
    format: WeightsFormat,
    report: &WeightsReport,
    source_sha256: &str,
    output_sha256: &str,
    started: Instant,
) {
    println!("input            {}", args.input.display());
    println!("model            {}", report.model);
    println!("format           {format}");
    println!("tensors          {}", report.tensors);
    println!("parameters       {}", report.parameters);
    if let Some(max_depth) = report.max_depth {
        println!("max depth        {max_depth} m");
    }
    println!(
        "prefix stripped  {}",
        report.prefix_stripped.as_deref().unwrap_or("none")
    );
    println!(
        "ignored keys     {} unused upstream, {} outside the state dict",
        report.unused_upstream_keys, report.outside_state_dict
    );
    println!("input sha256     {source_sha256}");
    println!("output           {}", args.output.display());
    println!("output sha256    {output_sha256}");
    println!("verified         identical output on the probe input");
    println!("took             {:.1} s", started.elapsed().as_secs_f64());
}
