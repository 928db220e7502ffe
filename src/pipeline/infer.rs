//! Step 3: the forward pass, on whichever backend the model lives on.

use burn::prelude::*;
use burn::tensor::TensorData;

use super::{DepthMap, NetInput};
use crate::backend;
use crate::kernels::{CpuDecoder, CpuEncoder, CpuResNet, CpuTransformer, FeatureMap};
use crate::model::{DptEncoder, ModelKind, Network};

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

/// Which implementation runs the network.
#[derive(Debug)]
enum Engine {
    /// Burn's operations, on any backend.
    Burn(Box<Network>),
    /// MiDaS small on [`crate::kernels`], with the weights packed for them: CPU backends only.
    SmallKernels(Box<(CpuEncoder, CpuDecoder)>),
    /// DPT-Hybrid on [`crate::kernels`]: its ResNet ([`CpuResNet`]), transformer blocks
    /// ([`CpuTransformer`], 40 % of the work) and decoder (45 %, nearly all 3x3 convolutions);
    /// the token embedding and reassembly between them on Burn's CPU operations.
    DptKernels(Box<DptKernels>),
}

/// DPT-Hybrid packed for the CPU kernels.
#[derive(Debug)]
struct DptKernels {
    backbone: CpuResNet,
    blocks: CpuTransformer,
    /// The encoder without its ResNet stages and blocks: embedding and reassembly.
    rest: DptEncoder,
    decoder: CpuDecoder,
}

/// The network on its device.
#[derive(Debug)]
pub struct DepthModel {
    engine: Engine,
    kind: ModelKind,
    device: Device,
}

impl DepthModel {
    /// Wraps a loaded network; on a CPU device it moves to the CPU kernels, which run it
    /// several times faster than Burn's CPU operations.
    pub fn new(network: Network, device: Device) -> Self {
        let kind = network.kind();
        let engine = if !backend::is_cpu(&device) {
            Engine::Burn(Box::new(network))
        } else {
            match network {
                Network::MidasSmall(model) => {
                    let (encoder, decoder) = model.into_parts();
                    Engine::SmallKernels(Box::new((
                        CpuEncoder::pack(encoder),
                        CpuDecoder::pack(decoder),
                    )))
                }
                Network::DptHybrid(model) => {
                    let (mut encoder, decoder) = model.into_parts();
                    let (backbone, blocks) = encoder.take_heavy_parts();
                    Engine::DptKernels(Box::new(DptKernels {
                        backbone: CpuResNet::pack(backbone),
                        blocks: CpuTransformer::pack(blocks),
                        rest: encoder,
                        decoder: CpuDecoder::pack(decoder),
                    }))
                }
            }
        };
        Self {
            engine,
            kind,
            device,
        }
    }

    /// Wraps a loaded network that runs on Burn's operations alone, whatever the device (to
    /// compare the two paths).
    pub fn burn_only(network: Network, device: Device) -> Self {
        Self {
            kind: network.kind(),
            engine: Engine::Burn(Box::new(network)),
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
        match &self.engine {
            Engine::Burn(model) => model
                .forward(input)
                .try_into_data()
                .map_err(|e| InferenceError(format!("{e:?}")))?
                .try_into_vec::<f32>()
                .map_err(|e| InferenceError(format!("{e:?}"))),
            Engine::SmallKernels(kernels) => {
                let (encoder, decoder) = kernels.as_ref();
                Ok(decoder.forward(encoder.forward(input)).data)
            }
            Engine::DptKernels(parts) => {
                let features = parts
                    .rest
                    .forward_with(
                        input,
                        |x| parts.backbone.forward(x),
                        |tokens| parts.blocks.forward(tokens),
                    )
                    .map(FeatureMap::from_tensor);
                Ok(parts.decoder.forward(features).data)
            }
        }
    }

    /// Runs one pre-processed image.
    pub fn predict(&self, input: NetInput) -> Result<DepthMap, InferenceError> {
        let mut depths = self.predict_batch(vec![input])?;
        depths
            .pop()
            .ok_or_else(|| InferenceError("the forward pass returned nothing".to_string()))
    }

    /// Runs pre-processed images of one size through the network together, in one pass.
    pub fn predict_batch(&self, inputs: Vec<NetInput>) -> Result<Vec<DepthMap>, InferenceError> {
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
