//! Step 3: the forward pass, on whichever backend the model lives on.

use burn::prelude::*;
use burn::tensor::TensorData;

use super::{DepthMap, NetInput};
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
}

impl DepthModel {
    /// Wraps a loaded network.
    pub fn new(model: MidasSmall, device: Device) -> Self {
        Self { model, device }
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
        let output = self.model.forward(input);
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
