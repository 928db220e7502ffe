//! The reassembly of hooked transformer tokens into the decoder's feature maps on the kernels,
//! straight from the transformer's token-major buffers (the projections read them transposed)
//! with no layout pass between: Depth Anything's four levels at 4, 2, 1 and 1/2 pixels per
//! token, and DPT-Hybrid's two at 1 and 1/2 behind MiDaS's "project" readout.

use super::transformer::{PackedLinear, for_row_chunks};
use crate::kernels::{
    Activation, FeatureMap, PackedConv, PackedTranspose, conv_padded, conv_transpose,
    conv1x1_tokens, simd,
};
use crate::model::{EMBED_DIM, Reassemble, Reassembly};

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

/// DPT-Hybrid's reassembly with its weights packed; built once after the weights load.
#[derive(Debug)]
pub struct CpuReadoutReassembly {
    levels: [ReadoutLevel; 2],
}

impl CpuReadoutReassembly {
    /// Packs the loaded levels (1/16, then 1/32), taking their parameters over.
    pub fn pack(levels: [Reassemble; 2]) -> Self {
        Self {
            levels: levels.map(ReadoutLevel::pack),
        }
    }

    /// The tokens of the two hooked blocks (`[images, per_image, 768]` row-major each, class
    /// token first) on a `grid` of patches, as the decoder's 1/16 and 1/32 features.
    pub fn forward(
        &self,
        hooked: [Vec<f32>; 2],
        per_image: usize,
        grid: (usize, usize),
    ) -> [FeatureMap; 2] {
        let [level3, level4] = &self.levels;
        let [tokens3, tokens4] = hooked;
        [
            level3.forward(&tokens3, per_image, grid),
            level4.forward(&tokens4, per_image, grid),
        ]
    }
}

/// One level: `[patch, class] @ readout` with GELU, the 1x1 projection, the optional stride-2
/// 3x3 convolution.
#[derive(Debug)]
struct ReadoutLevel {
    /// The readout's rows for a patch token's values, with its bias.
    patch: PackedLinear,
    /// Its rows for the class token's values. Every patch of an image is concatenated with the
    /// same class token, so this half of the product is one row per image, added as a bias:
    /// half the readout's multiplications, where upstream multiplies the class token again
    /// for every patch.
    class: PackedLinear,
    project: PackedConv,
    resample: Option<PackedConv>,
}

impl ReadoutLevel {
    fn pack(level: Reassemble) -> Self {
        let (patch, class) = PackedLinear::pack(level.readout).split_inputs(EMBED_DIM);
        Self {
            patch,
            class,
            project: PackedConv::from_conv(level.project),
            resample: level.resample.map(PackedConv::from_conv),
        }
    }

    fn forward(&self, tokens: &[f32], per_image: usize, grid: (usize, usize)) -> FeatureMap {
        let patches = per_image - 1;
        assert_eq!(
            patches,
            grid.0 * grid.1,
            "one token per patch and the class token"
        );
        let mut read = vec![0.0; tokens.len() / per_image * patches];
        let images = tokens
            .chunks_exact(per_image * EMBED_DIM)
            .zip(read.chunks_exact_mut(patches * EMBED_DIM));
        for (tokens, read) in images {
            let (class, patch_tokens) = tokens.split_at(EMBED_DIM);
            let mut bias = self.patch.bias().to_vec();
            self.class.product(class, 1, &mut bias, true);
            self.patch.product(patch_tokens, patches, read, false);
            for_row_chunks(read, EMBED_DIM, |rows| simd::bias_gelu(rows, &bias));
        }
        let map = conv1x1_tokens(&read, patches, grid, &self.project);
        match &self.resample {
            Some(conv) => conv_padded(&map, conv, 1, Activation::Identity),
            None => map,
        }
    }
}
