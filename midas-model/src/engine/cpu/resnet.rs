//! DPT-Hybrid's ResNet-50 stem and stages on the CPU kernels: 1x1 convolutions as banded
//! GEMMs, stride-1 3x3 ones on Winograd, the strided ones (the 7x7 stem, the first 3x3 and the
//! shortcut of stages 2 and 3) through im2col, each followed by [`group_norm`] with its ReLU
//! and, at the end of a block, the shortcut sum fused in.

use burn::nn::conv::Conv2d;
use burn::prelude::*;
use rayon::prelude::*;

use crate::kernels::{
    Activation, FeatureMap, PackedConv, PackedGroupNorm, SharedOut, WinogradConv, conv_same,
    conv1x1, group_norm, same, winograd3x3,
};
use crate::model::{Bottleneck, ConvNorm, ResNetV2};

/// A convolution packed for the kernel that suits its shape.
#[derive(Debug)]
enum PackedResNetConv {
    /// 1x1, stride 1.
    Pointwise(PackedConv),
    /// 3x3, stride 1.
    Winograd(WinogradConv),
    /// Anything strided, with TensorFlow's SAME padding (what timm's `StdConv2dSame` does).
    Strided(PackedConv),
}

/// A convolution and the GroupNorm after it.
#[derive(Debug)]
struct PackedConvNorm {
    conv: PackedResNetConv,
    norm: PackedGroupNorm,
}

impl PackedConvNorm {
    fn pack(conv: Conv2d, norm: burn::nn::GroupNorm) -> Self {
        let [_, _, kernel, _] = conv.weight.dims();
        let conv = match (kernel, conv.stride) {
            (1, [1, 1]) => PackedResNetConv::Pointwise(PackedConv::from_conv(conv)),
            (3, [1, 1]) => PackedResNetConv::Winograd(WinogradConv::from_conv(conv)),
            _ => PackedResNetConv::Strided(PackedConv::from_conv(conv)),
        };
        Self {
            conv,
            norm: PackedGroupNorm::pack(norm),
        }
    }

    fn from_pair(pair: ConvNorm) -> Self {
        Self::pack(pair.conv, pair.norm)
    }

    /// `relu?(GroupNorm(conv(x)) + residual?)`.
    fn forward(&self, x: &FeatureMap, residual: Option<&FeatureMap>, relu: bool) -> FeatureMap {
        let convolved = match &self.conv {
            PackedResNetConv::Pointwise(conv) => conv1x1(x, conv, Activation::Identity, &[]),
            PackedResNetConv::Winograd(conv) => {
                winograd3x3(x, conv, false, Activation::Identity, &[])
            }
            PackedResNetConv::Strided(conv) => conv_same(x, conv, Activation::Identity),
        };
        group_norm(convolved, &self.norm, residual, relu)
    }
}

/// timm's post-activation `Bottleneck`, packed.
#[derive(Debug)]
struct PackedBottleneck {
    downsample: Option<PackedConvNorm>,
    conv1: PackedConvNorm,
    conv2: PackedConvNorm,
    conv3: PackedConvNorm,
}

impl PackedBottleneck {
    fn pack(block: Bottleneck) -> Self {
        Self {
            downsample: block.downsample.map(PackedConvNorm::from_pair),
            conv1: PackedConvNorm::pack(block.conv1, block.norm1),
            conv2: PackedConvNorm::pack(block.conv2, block.norm2),
            conv3: PackedConvNorm::pack(block.conv3, block.norm3),
        }
    }

    fn forward(&self, x: FeatureMap) -> FeatureMap {
        let shortcut = self
            .downsample
            .as_ref()
            .map(|downsample| downsample.forward(&x, None, false));
        let y = self.conv1.forward(&x, None, true);
        let y = self.conv2.forward(&y, None, true);
        self.conv3
            .forward(&y, Some(shortcut.as_ref().unwrap_or(&x)), true)
    }
}

/// timm's `MaxPool2dSame(3, 2)`: the padding (none before, one after on even sides) reads as
/// -inf, so out-of-range taps are skipped. A NaN in a window is the window's maximum, as in
/// PyTorch (`f32::max` would drop it), so a broken input shows in the output.
fn max_pool(input: &FeatureMap) -> FeatureMap {
    let (height, width) = (input.height, input.width);
    let (out_height, top) = same(height, 3, 2);
    let (out_width, left) = same(width, 3, 2);
    let out_plane = out_height * out_width;
    let planes = input.batch * input.channels;
    // SAFETY: each task writes its own output plane, whole.
    unsafe {
        FeatureMap::filled_by(
            input.batch,
            input.channels,
            out_height,
            out_width,
            |out: SharedOut| {
                (0..planes).into_par_iter().for_each(|index| {
                    let source = &input.data[index * height * width..(index + 1) * height * width];
                    // SAFETY: plane `index` of the output is this task's alone.
                    let target = out.uninit(index * out_plane, out_plane);
                    for (oy, row) in target.chunks_exact_mut(out_width).enumerate() {
                        let rows = (oy * 2).saturating_sub(top)..(oy * 2 + 3 - top).min(height);
                        for (ox, value) in row.iter_mut().enumerate() {
                            let columns =
                                (ox * 2).saturating_sub(left)..(ox * 2 + 3 - left).min(width);
                            let mut max = f32::NEG_INFINITY;
                            for y in rows.clone() {
                                for &v in
                                    &source[y * width + columns.start..y * width + columns.end]
                                {
                                    if v > max || v.is_nan() {
                                        max = v;
                                    }
                                }
                            }
                            value.write(max);
                        }
                    }
                });
            },
        )
    }
}

/// The backbone with its weights packed; built once after the weights load.
#[derive(Debug)]
pub struct CpuResNet {
    stem: PackedConvNorm,
    stages: Vec<Vec<PackedBottleneck>>,
}

impl CpuResNet {
    /// Packs a loaded backbone, taking its parameters over.
    pub fn pack(backbone: ResNetV2) -> Self {
        Self {
            stem: PackedConvNorm::from_pair(backbone.stem),
            stages: backbone
                .stages
                .into_iter()
                .map(|stage| {
                    stage
                        .blocks
                        .into_iter()
                        .map(PackedBottleneck::pack)
                        .collect()
                })
                .collect(),
        }
    }

    /// The three stages' outputs for a `[batch, 3, H, W]` input, as
    /// [`crate::model::ResNetV2::forward`] gives them.
    pub fn forward(&self, input: Tensor<4>) -> [Tensor<4>; 3] {
        let device = input.device();
        let stem = self
            .stem
            .forward(&FeatureMap::from_tensor(input), None, true);
        let mut x = max_pool(&stem);
        drop(stem);
        let mut outputs = Vec::with_capacity(self.stages.len());
        for (index, stage) in self.stages.iter().enumerate() {
            for block in stage {
                x = block.forward(x);
            }
            // Each stage's output is a feature and the next stage's input; the last is only
            // the former.
            if index + 1 < self.stages.len() {
                outputs.push(x.clone());
            }
        }
        outputs.push(x);
        outputs
            .into_iter()
            .map(|map| map.into_tensor(&device))
            .collect::<Vec<_>>()
            .try_into()
            .unwrap_or_else(|_| panic!("the backbone has three stages"))
    }
}
