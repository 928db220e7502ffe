//! The forward pass: a loaded network on the implementation that runs it fastest where it
//! lives. On a CPU backend that is the network assembled from [`crate::kernels`] with its weights
//! packed once; on a GPU, Burn's operations on the Burn modules. Which one is decided by
//! the [`BackendKind`](crate::backend::BackendKind) the model was loaded for.

mod cpu;

use std::fmt;

use burn::prelude::*;
use burn::tensor::TensorData;

use crate::backend::Backend;
use crate::model::{ModelKind, Network};

/// A normalised `[3, height, width]` float image, ready for the network (sides multiples of the
/// model's [`ModelKind::input_multiple`]).
#[derive(Clone, Debug, PartialEq)]
pub struct NetInput {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Planar RGB, channel-major.
    pub data: Vec<f32>,
}

/// A `[height, width]` depth map as the network produces it: relative inverse depth (larger
/// is nearer), or metres for a metric model ([`ModelKind::is_metric`]).
#[derive(Clone, Debug, PartialEq)]
pub struct DepthMap {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Row-major values.
    pub data: Vec<f32>,
}

/// Why a forward pass failed (a device error, never bad input: sizes come from preprocessing).
#[derive(Debug, thiserror::Error)]
#[error("inference failed: {0}")]
pub struct InferenceError(String);

impl InferenceError {
    /// An error with this message (to hand one failure to every job of a batch).
    pub fn from_message(message: String) -> Self {
        Self(message)
    }
}

/// One implementation of a network's forward pass.
trait Engine: Send + Sync + fmt::Debug {
    /// `[batch, 3, H, W]` to `[batch, H, W]`, flat and row-major.
    fn forward(&self, input: Tensor<4>) -> Result<Vec<f32>, InferenceError>;
}

/// Burn's operations on the Burn modules, on any backend.
impl Engine for Network {
    fn forward(&self, input: Tensor<4>) -> Result<Vec<f32>, InferenceError> {
        Network::forward(self, input)
            .try_into_data()
            .map_err(|e| InferenceError(format!("{e:?}")))?
            .try_into_vec::<f32>()
            .map_err(|e| InferenceError(format!("{e:?}")))
    }
}

/// A loaded network on its device, ready to run.
#[derive(Debug)]
pub struct DepthModel {
    engine: Box<dyn Engine>,
    kind: ModelKind,
    device: Device,
}

impl DepthModel {
    /// Takes a loaded network over for `backend`: on a CPU backend it is packed for the CPU
    /// kernels, which run it several times faster than Burn's CPU operations.
    pub fn new(network: Network, backend: &Backend) -> Self {
        let kind = network.kind();
        let engine = if backend.kind.is_cpu() {
            cpu::pack(network)
        } else {
            Box::new(network)
        };
        Self {
            engine,
            kind,
            device: backend.device.clone(),
        }
    }

    /// Takes a loaded network over to run on Burn's operations alone, whatever the device (to
    /// compare the two implementations).
    pub fn burn_only(network: Network, device: Device) -> Self {
        Self {
            kind: network.kind(),
            engine: Box::new(network),
            device,
        }
    }

    /// Which network runs.
    pub fn kind(&self) -> ModelKind {
        self.kind
    }

    /// Runs a batch of same-sized inputs: `data` is `[batch, 3, height, width]` and the result
    /// `[batch, height, width]`, both flat and row-major.
    pub fn forward(
        &self,
        data: Vec<f32>,
        batch: usize,
        height: usize,
        width: usize,
    ) -> Result<Vec<f32>, InferenceError> {
        let multiple = self.kind.input_multiple();
        if height == 0
            || width == 0
            || !height.is_multiple_of(multiple)
            || !width.is_multiple_of(multiple)
        {
            return Err(InferenceError(format!(
                "{} needs input sides that are positive multiples of {multiple}, got {width}x{height}",
                self.kind
            )));
        }
        if data.len() != batch * 3 * height * width {
            return Err(InferenceError(format!(
                "{} values do not make a [{batch}, 3, {height}, {width}] input",
                data.len()
            )));
        }
        let input = Tensor::<4>::from_data(
            TensorData::new(data, [batch, 3, height, width]),
            &self.device,
        );
        // On one of the pool's threads, the kernels' parallel loops are pushed to its own
        // queue and run there; from any other thread each one is injected into the pool and
        // the caller sleeps on a lock until it is done, a wake-up per loop.
        let (depth, ()) = rayon::join(|| self.engine.forward(input), || ());
        depth
    }

    /// Runs one pre-processed image.
    pub fn depth(&self, input: NetInput) -> Result<DepthMap, InferenceError> {
        let mut depths = self.depths(vec![input])?;
        depths
            .pop()
            .ok_or_else(|| InferenceError("the forward pass returned nothing".to_string()))
    }

    /// Runs pre-processed images of one size through the network together, in one pass.
    pub fn depths(&self, inputs: Vec<NetInput>) -> Result<Vec<DepthMap>, InferenceError> {
        let Some(first) = inputs.first() else {
            return Ok(Vec::new());
        };
        let (width, height) = (first.width, first.height);
        if inputs
            .iter()
            .any(|input| (input.width, input.height) != (width, height))
        {
            return Err(InferenceError(
                "the inputs of one batch must have one size".to_string(),
            ));
        }
        let batch = inputs.len();
        let data = if batch == 1 {
            inputs
                .into_iter()
                .next()
                .map(|input| input.data)
                .unwrap_or_default()
        } else {
            inputs.into_iter().flat_map(|input| input.data).collect()
        };
        let output = self.forward(data, batch, height, width)?;
        if batch == 1 {
            return Ok(vec![DepthMap {
                width,
                height,
                data: output,
            }]);
        }
        Ok(output
            .chunks_exact(width * height)
            .map(|plane| DepthMap {
                width,
                height,
                data: plane.to_vec(),
            })
            .collect())
    }
}
