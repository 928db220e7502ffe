//! Depth Anything's reassembly on the kernels: the four hooked token sequences into the
//! decoder's feature maps at 4, 2, 1 and 1/2 pixels per token, straight from the transformer's
//! token-major buffers (the projections read them transposed) with no layout pass between.

use crate::kernels::{
    Activation, FeatureMap, PackedConv, PackedTranspose, conv_padded, conv_transpose,
    conv1x1_tokens,
};
use crate::model::Reassembly;

/// The reassembly with its weights packed; built once after the weights load.
#[derive(Debug)]
pub struct CpuReassembly {
    projects: [PackedConv; 4],
    upsample4: PackedTranspose,
    upsample2: PackedTranspose,
    downsample2: PackedConv,
}

impl CpuReassembly {
    /// Packs a loaded reassembly, taking its parameters over.
    pub fn pack(reassembly: Reassembly) -> Self {
        let projects: Vec<_> = reassembly
            .projects
            .into_iter()
            .map(PackedConv::from_conv)
            .collect();
        Self {
            projects: projects
                .try_into()
                .unwrap_or_else(|_| panic!("the reassembly has four projections")),
            upsample4: PackedTranspose::from_conv(reassembly.upsample4),
            upsample2: PackedTranspose::from_conv(reassembly.upsample2),
            downsample2: PackedConv::from_conv(reassembly.downsample2),
        }
    }

    /// The normed tokens of the four hooked blocks (`[images, per_image, dim]` row-major each,
    /// class token first) on a `grid` of patches, as the decoder's four features.
    pub fn forward(
        &self,
        hooked: [Vec<f32>; 4],
        per_image: usize,
        grid: (usize, usize),
    ) -> [FeatureMap; 4] {
        let [a, b, c, d] = hooked;
        let project = |level: usize, tokens: Vec<f32>| {
            conv1x1_tokens(&tokens, per_image, grid, &self.projects[level])
        };
        [
            conv_transpose(&project(0, a), &self.upsample4),
            conv_transpose(&project(1, b), &self.upsample2),
            project(2, c),
            conv_padded(&project(3, d), &self.downsample2, 1, Activation::Identity),
        ]
    }
}
