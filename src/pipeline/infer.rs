//! Step 3: the forward pass, on whichever backend the model lives on.

use burn::prelude::*;
use burn::tensor::TensorData;

use super::{DepthMap, NetInput};
use crate::backend;
use crate::kernels::CpuDecoder;
use crate::model::MidasSmall;

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

/// The network on its device.
#[derive(Debug)]
pub struct DepthModel {
    model: MidasSmall,
    device: Device,
    /// On CPU backends, the decoder packed for [`crate::kernels`], which run it several times
    /// faster than Burn's CPU convolutions; `None` runs Burn's decoder.
    cpu_decoder: Option<CpuDecoder>,
}

impl DepthModel {
    /// Wraps a loaded network, with the CPU kernels for the decoder on a CPU device.
    pub fn new(model: MidasSmall, device: Device) -> Self {
        let cpu_decoder = backend::is_cpu(&device).then(|| CpuDecoder::pack(&model.scratch));
        Self {
            model,
            device,
            cpu_decoder,
        }
    }

    /// Wraps a loaded network that runs on Burn's operations alone, whatever the device (to
    /// compare the two paths).
    pub fn burn_only(model: MidasSmall, device: Device) -> Self {
        Self {
            model,
            device,
            cpu_decoder: None,
        }
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
        let input = Tensor::<4>::from_data(
            TensorData::new(data, [batch, 3, height, width]),
            &self.device,
        );
        let features = self.model.encode(input);
        let output = match &self.cpu_decoder {
            Some(decoder) => decoder.forward(features),
            None => self.model.decode(features),
        };
        output
            .try_into_data()
            .map_err(|e| InferenceError(format!("{e:?}")))?
            .try_into_vec::<f32>()
            .map_err(|e| InferenceError(format!("{e:?}")))
    }

    /// Runs one pre-processed image.
    pub fn predict(&self, input: NetInput) -> Result<DepthMap, InferenceError> {
        let (width, height) = (input.width, input.height);
        let data = self.forward(input.data, 1, height, width)?;
        Ok(DepthMap {
            width,
            height,
            data,
        })
    }
}
