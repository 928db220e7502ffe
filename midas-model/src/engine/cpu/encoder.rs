//! The EfficientNet-Lite3 encoder on the CPU kernels, with every BatchNorm folded into the
//! convolution before it and every ReLU6 fused into the kernel that produces its input.

use burn::prelude::*;

use crate::kernels::{
    Activation, FeatureMap, PackedConv, PackedDepthwise, conv_same, conv1x1, depthwise,
};
use crate::model::{DepthwiseSeparableConv, EfficientNetLite3, InvertedResidual};

/// `InvertedResidual`: expansion (none in the stem block), depthwise, projection.
#[derive(Debug)]
struct Block {
    expand: Option<PackedConv>,
    depthwise: PackedDepthwise,
    project: PackedConv,
    has_residual: bool,
}

impl Block {
    fn inverted(block: InvertedResidual) -> Self {
        Self {
            expand: Some(PackedConv::from_conv_bn(block.conv_pw, block.bn1)),
            depthwise: PackedDepthwise::from_conv_bn(block.conv_dw, block.bn2),
            project: PackedConv::from_conv_bn(block.conv_pwl, block.bn3),
            has_residual: block.has_residual,
        }
    }

    fn separable(block: DepthwiseSeparableConv) -> Self {
        Self {
            expand: None,
            depthwise: PackedDepthwise::from_conv_bn(block.conv_dw, block.bn1),
            project: PackedConv::from_conv_bn(block.conv_pw, block.bn2),
            has_residual: block.has_residual,
        }
    }

    fn forward(&self, input: FeatureMap) -> FeatureMap {
        let x = match &self.expand {
            Some(expand) => depthwise(
                &conv1x1(&input, expand, Activation::Relu6, &[]),
                &self.depthwise,
                Activation::Relu6,
            ),
            None => depthwise(&input, &self.depthwise, Activation::Relu6),
        };
        let residual: &[&FeatureMap] = if self.has_residual { &[&input] } else { &[] };
        conv1x1(&x, &self.project, Activation::Identity, residual)
    }
}

/// The encoder with its weights packed for the CPU kernels; built once after the weights load.
#[derive(Debug)]
pub struct CpuEncoder {
    stem: PackedConv,
    blocks: Vec<Block>,
    /// How many blocks end each of the stages, to pick out the four features.
    stage_ends: Vec<usize>,
}

impl CpuEncoder {
    /// Packs the weights of a loaded encoder, taking them over.
    pub fn pack(encoder: EfficientNetLite3) -> Self {
        let mut blocks = vec![Block::separable(encoder.stem_block)];
        let mut stage_ends = Vec::new();
        for stage in encoder.stages {
            blocks.extend(stage.into_iter().map(Block::inverted));
            stage_ends.push(blocks.len());
        }
        Self {
            stem: PackedConv::from_conv_bn(encoder.conv_stem, encoder.bn1),
            blocks,
            stage_ends,
        }
    }

    /// The four features MiDaS decodes: the ends of stages 1, 2, 4 and 6.
    pub fn forward(&self, input: Tensor<4>) -> [FeatureMap; 4] {
        let mut x = conv_same(
            &FeatureMap::from_tensor(input),
            &self.stem,
            Activation::Relu6,
        );
        let wanted = [
            self.stage_ends[0],
            self.stage_ends[1],
            self.stage_ends[3],
            self.stage_ends[5],
        ];
        let mut features = Vec::with_capacity(4);
        for (index, block) in self.blocks.iter().enumerate() {
            x = block.forward(x);
            if wanted.contains(&(index + 1)) {
                features.push(x.clone());
            }
        }
        features
            .try_into()
            .expect("EfficientNet-Lite3 has six stages")
    }
}
