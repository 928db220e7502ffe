//! Transposed convolutions whose kernel equals their stride (the reassembly's x4 and x2
//! upsamplers in Depth Anything's head): each input pixel owns its own `stride x stride` block
//! of the output, blocks never overlap, so the layer is one GEMM (every kernel position's
//! weights times every input pixel) and a pass that moves its rows into the blocks, adding the
//! bias on the way.

use burn::nn::conv::ConvTranspose2d;
use rayon::prelude::*;

use super::{FeatureMap, SharedOut, WorkBuffer, bias_values, gemm, tensor_values};

/// A transposed convolution with kernel = stride, no padding, its weights packed for the GEMM.
#[derive(Debug)]
pub struct PackedTranspose {
    /// `[out_channels * stride * stride, in_channels]`, row-major: row `(o, i, j)` holds the
    /// weights into output channel `o` at offset `(i, j)` inside each block.
    weights: Vec<f32>,
    /// One per output channel (zeros without bias).
    bias: Vec<f32>,
    in_channels: usize,
    out_channels: usize,
    stride: usize,
}

impl PackedTranspose {
    /// Packs a Burn transposed convolution (groups 1, dilation 1, no padding, square kernel
    /// equal to the stride), taking its parameters over.
    pub fn from_conv(conv: ConvTranspose2d) -> Self {
        let [in_channels, out_channels, kernel, kernel_w] = conv.weight.dims();
        assert!(
            kernel == kernel_w
                && conv.stride == [kernel, kernel]
                && conv.padding == [0, 0]
                && conv.padding_out == [0, 0]
                && conv.dilation == [1, 1]
                && conv.groups == 1,
            "a transposed convolution whose square kernel equals its stride, unpadded"
        );
        // Burn's (and PyTorch's) layout: [in, out, i, j].
        let source = tensor_values(conv.weight.into_value());
        let positions = kernel * kernel;
        let mut weights = vec![0.0; out_channels * positions * in_channels];
        for (row, packed) in weights.chunks_exact_mut(in_channels).enumerate() {
            let (out, position) = (row / positions, row % positions);
            for (input, weight) in packed.iter_mut().enumerate() {
                *weight = source[(input * out_channels + out) * positions + position];
            }
        }
        let bias = bias_values(conv.bias, out_channels);
        Self {
            weights,
            bias,
            in_channels,
            out_channels,
            stride: kernel,
        }
    }
}

/// `conv_transpose(input) + bias`: every side `stride` times the input's.
pub fn conv_transpose(input: &FeatureMap, conv: &PackedTranspose) -> FeatureMap {
    input.assert_shape(conv.in_channels);
    let (height, width, stride) = (input.height, input.width, conv.stride);
    let plane = height * width;
    let rows = conv.out_channels * stride * stride;
    let out_width = width * stride;
    let out_plane = plane * stride * stride;
    let mut products = WorkBuffer::take(rows * plane);
    // SAFETY: for each image, every output channel's task writes each value of its plane once
    // (block (y, x) at offset (i, j) for every y, x, i, j).
    unsafe {
        FeatureMap::filled_by(
            input.batch,
            conv.out_channels,
            height * stride,
            out_width,
            |out| {
                for image in 0..input.batch {
                    let source = &input.data[image * input.image_len()..][..input.image_len()];
                    gemm(
                        rows,
                        plane,
                        conv.in_channels,
                        products.as_mut_ptr(),
                        plane,
                        &conv.weights,
                        source,
                        plane,
                        false,
                        true,
                    );
                    let products = &products[..];
                    let base = SharedOut(out.get().add(image * conv.out_channels * out_plane));
                    (0..conv.out_channels).into_par_iter().for_each(|channel| {
                        let target = base.uninit(channel * out_plane, out_plane);
                        let bias = conv.bias[channel];
                        for i in 0..stride {
                            for j in 0..stride {
                                let row = (channel * stride + i) * stride + j;
                                let values = &products[row * plane..(row + 1) * plane];
                                for (y, line) in values.chunks_exact(width).enumerate() {
                                    let start = (y * stride + i) * out_width + j;
                                    for (x, &value) in line.iter().enumerate() {
                                        target[start + x * stride].write(value + bias);
                                    }
                                }
                            }
                        }
                    });
                }
            },
        )
    }
}
