//! The `forward`, `predict` and `batch` subcommands (`serve` lives in the library's server
//! module, and `batch`'s work in its batch module).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use midas_serve::config::{BatchArgs, Command, ForwardArgs, PredictArgs};
use midas_serve::lifecycle;
use midas_serve::pipeline::Transform;
use npyz::WriterBuilder;

/// How long the process waits, once a subcommand is done, for blocking threads still running.
const BLOCKING_GRACE: Duration = Duration::from_secs(1);

/// Runs a subcommand to completion.
///
/// The runtime is then shut down without waiting on its blocking threads: one stuck in a
/// system call (a read from a stalled network mount) must not keep a finished task or a
/// drained server from exiting. Every such wait has already been answered by a timeout.
pub fn run(command: Command) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = match command {
        Command::Forward(args) => runtime.block_on(forward(args)),
        Command::Predict(args) => runtime.block_on(predict(args)),
        Command::Serve(args) => runtime
            .block_on(midas_serve::server::run(*args))
            .map_err(anyhow::Error::from),
        Command::Batch(args) => runtime.block_on(batch(*args)),
    };
    runtime.shutdown_timeout(BLOCKING_GRACE);
    result
}

/// Runs one batch task; prints its summary as JSON on stdout. Fails (so that a Cloud Run job
/// retries the task) when an input met a transient failure; refused inputs do not fail it.
async fn batch(args: BatchArgs) -> anyhow::Result<()> {
    let summary = midas_serve::batch::run(&args).await?;
    println!("{}", serde_json::to_string(&summary)?);
    ensure!(
        summary.complete(),
        "{} inputs met a transient failure and {} were not started: rerun the task to finish them (done ones are skipped)",
        summary.transient,
        summary.not_started
    );
    Ok(())
}

/// Reads a float32 `.npy` file.
fn read_npy(path: &Path) -> anyhow::Result<(Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let npy = npyz::NpyFile::new(&bytes[..])
        .with_context(|| format!("{} is not a .npy file", path.display()))?;
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let data = npy
        .into_vec::<f32>()
        .with_context(|| format!("{} does not hold float32 values", path.display()))?;
    Ok((shape, data))
}

async fn forward(args: ForwardArgs) -> anyhow::Result<()> {
    let (shape, data) = read_npy(&args.input)?;
    let &[batch, channels, height, width] = shape.as_slice() else {
        bail!(
            "{}: expected shape [N,3,H,W], found {shape:?}",
            args.input.display()
        );
    };
    ensure!(
        batch > 0 && channels == 3,
        "{}: expected shape [N,3,H,W], found {shape:?}",
        args.input.display()
    );
    let loaded = lifecycle::load(&args.model, Transform::Upstream).await?;
    let multiple = loaded.model.kind().input_multiple();
    ensure!(
        height >= multiple
            && width >= multiple
            && height.is_multiple_of(multiple)
            && width.is_multiple_of(multiple),
        "{}: H and W must be positive multiples of {multiple} for {}, found {height}x{width}",
        args.input.display(),
        loaded.model.kind()
    );
    let run = || loaded.model.forward(data.clone(), batch, height, width);

    let output = match args.repeat {
        None => run()?,
        Some(runs) => {
            ensure!(runs > 0, "--repeat must be at least 1");
            let output = run()?;
            let mut times = Vec::with_capacity(runs);
            for _ in 0..runs {
                let start = Instant::now();
                run()?;
                times.push(start.elapsed().as_secs_f64() * 1000.0);
            }
            times.sort_by(f64::total_cmp);
            let median = if runs % 2 == 1 {
                times[runs / 2]
            } else {
                (times[runs / 2 - 1] + times[runs / 2]) / 2.0
            };
            let summary = serde_json::json!({
                "backend": loaded.backend.kind.name(),
                "model": loaded.model.kind().name(),
                "shape": shape,
                "runs": runs,
                "median_ms": median,
                "min_ms": times[0],
            });
            println!("{summary}");
            output
        }
    };

    let mut bytes = Vec::with_capacity(128 + output.len() * 4);
    let mut writer = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&[batch as u64, height as u64, width as u64])
        .writer(&mut bytes)
        .begin_nd()?;
    writer.extend(output)?;
    writer.finish()?;
    std::fs::write(&args.output, bytes)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    Ok(())
}

async fn predict(args: PredictArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("cannot create {}", args.out_dir.display()))?;
    let loaded = lifecycle::load(&args.model, args.image.transform).await?;
    let limits = args.image.limits();
    let options = loaded.render_options(
        args.colormap,
        args.format,
        args.cloud.options().context("--cloud")?,
    );
    let cloud = args.cloud.defaults();
    for file in &args.files {
        let start = Instant::now();
        let bytes =
            std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        let chunks = loaded
            .run_image(&bytes, &limits, options, &cloud)
            .with_context(|| format!("{}", file.display()))?;
        let stem = file
            .file_stem()
            .with_context(|| format!("{} has no file name", file.display()))?;
        let target = args
            .out_dir
            .join(stem)
            .with_extension(options.format.extension());
        let mut encoded = Vec::new();
        for chunk in chunks {
            encoded.extend_from_slice(&chunk?);
        }
        std::fs::write(&target, &encoded)
            .with_context(|| format!("cannot write {}", target.display()))?;
        tracing::info!(
            input = %file.display(),
            output = %target.display(),
            bytes = encoded.len(),
            ms = start.elapsed().as_millis() as u64,
            "predicted"
        );
    }
    Ok(())
}
