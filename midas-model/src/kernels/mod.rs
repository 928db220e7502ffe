//! CPU kernels, the operations the CPU engine ([`crate::engine`]) assembles networks from: dense
//! 3x3 (Winograd), 1x1 and strided convolutions, depthwise convolutions, transposed
//! convolutions, GroupNorm and bilinear resizing, over Burn's tensor data.
//!
//! Burn's CPU convolution re-lays out its input to NHWC, re-packs the weights and builds im2col
//! tiles on every call; BatchNorm and activations are separate passes; its bilinear resize is
//! not separable. Here the weights are packed once at load ([`PackedConv`], [`WinogradConv`],
//! [`PackedDepthwise`]) with BatchNorm folded in, activations stay in Burn's NCHW layout, bias,
//! residual additions and activations are fused into the kernel that produces them, outputs are
//! written without a zeroing pass, working buffers are reused, and the products run as
//! cache-sized bands. The convolutions' products run on our own microkernel over weights packed
//! at load (`panels.rs`); the transformer's and the transposed convolutions' on the `gemm`
//! crate (the same GEMM Burn's `flex` backend uses).

mod buffers;
mod conv;
mod depthwise;
mod group_norm;
mod panels;
pub mod simd;
mod transpose;
mod upsample;
mod winograd;

pub(crate) use buffers::WorkBuffer;
pub use conv::{PackedConv, conv_padded, conv_same, conv1x1, conv1x1_tokens};
pub(crate) use conv::{gemm, strided_gemm};
pub use depthwise::{PackedDepthwise, depthwise};
pub use group_norm::{PackedGroupNorm, group_norm};
pub use transpose::{PackedTranspose, conv_transpose};
pub use upsample::{bilinear_rows, upsample, upsample2x};
pub use winograd::{WinogradConv, WinogradTile, winograd3x3};

use std::mem::MaybeUninit;

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::TensorData;

/// What follows a layer's sum, fused into the kernel that computes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Nothing.
    Identity,
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, 0), 6)`, EfficientNet-Lite's activation.
    Relu6,
}

impl Activation {
    /// The activation of one value.
    #[inline(always)]
    fn of(self, value: f32) -> f32 {
        match self {
            Self::Identity => value,
            Self::Relu => value.max(0.0),
            Self::Relu6 => value.clamp(0.0, 6.0),
        }
    }
}

/// `weight * value + sum`, by one fused multiply-add where `FMA` (the AVX2 and AVX-512 paths
/// have the instruction; on the baseline path `mul_add` would be a library call).
#[inline(always)]
fn multiply_add<const FMA: bool>(weight: f32, value: f32, sum: f32) -> f32 {
    if FMA {
        weight.mul_add(value, sum)
    } else {
        weight * value + sum
    }
}

/// A batch of feature maps, `[batch, channels, height, width]`, row-major like Burn's NCHW.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureMap {
    /// The values, `batch * channels * height * width` of them.
    pub data: Vec<f32>,
    /// Images in the batch.
    pub batch: usize,
    /// Channels per image.
    pub channels: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

impl FeatureMap {
    /// Panics unless the map holds exactly `batch * channels * height * width` values and has
    /// `channels` channels. The kernels index raw pointers by these dimensions, so their public
    /// entry points check them in every build, not only in debug ones.
    pub fn assert_shape(&self, channels: usize) {
        assert_eq!(
            self.channels, channels,
            "the map has the wrong channel count"
        );
        assert_eq!(
            self.data.len(),
            self.batch * self.channels * self.height * self.width,
            "the map's data does not match its dimensions"
        );
    }

    /// Panics unless each residual has this output's shape (see [`FeatureMap::assert_shape`]).
    pub fn assert_residuals(
        residuals: &[&FeatureMap],
        batch: usize,
        channels: usize,
        height: usize,
        width: usize,
    ) {
        for residual in residuals {
            residual.assert_shape(channels);
            assert_eq!(
                (residual.batch, residual.height, residual.width),
                (batch, height, width),
                "a residual's shape differs from the output's"
            );
        }
    }

    /// A map whose values `fill` writes, with no zeroing pass before it: the kernels write
    /// every output value anyway, and on large maps a zeroing pass costs as much as a layer.
    ///
    /// # Safety
    /// `fill` must write all `batch * channels * height * width` values behind the pointer
    /// before it returns, and read none it has not written.
    pub(crate) unsafe fn filled_by(
        batch: usize,
        channels: usize,
        height: usize,
        width: usize,
        fill: impl FnOnce(SharedOut),
    ) -> Self {
        let len = batch * channels * height * width;
        let mut data = Vec::with_capacity(len);
        fill(SharedOut(data.as_mut_ptr()));
        // SAFETY: `fill` wrote every value (the contract).
        unsafe { data.set_len(len) };
        Self {
            data,
            batch,
            channels,
            height,
            width,
        }
    }

    /// Takes a Burn tensor's values (a move, not a copy, where the backend allows it).
    pub fn from_tensor(tensor: Tensor<4>) -> Self {
        let [batch, channels, height, width] = tensor.dims();
        let data = tensor
            .into_data()
            .try_into_vec::<f32>()
            .expect("the network's activations are float32");
        Self {
            data,
            batch,
            channels,
            height,
            width,
        }
    }

    /// Hands the values back to Burn on `device`.
    pub fn into_tensor(self, device: &Device) -> Tensor<4> {
        let shape = [self.batch, self.channels, self.height, self.width];
        Tensor::from_data(TensorData::new(self.data, shape), device)
    }

    /// Values per channel plane.
    pub fn plane(&self) -> usize {
        self.height * self.width
    }

    /// Values per image.
    pub fn image_len(&self) -> usize {
        self.channels * self.plane()
    }
}

/// A raw output pointer shared by tasks that write disjoint parts of the same buffer.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: every task writes a disjoint set of indices (its own rows, planes or columns), and the
// buffer outlives the parallel loop that uses it.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }

    /// `len` values from `offset` on.
    ///
    /// # Safety
    /// They must be inside the buffer, initialised, and this caller's alone while it holds them.
    pub(crate) unsafe fn slice<'a>(self, offset: usize, len: usize) -> &'a mut [f32] {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(offset), len) }
    }

    /// `len` values from `offset` on, not yet written.
    ///
    /// # Safety
    /// They must be inside the buffer and this caller's alone while it holds them.
    pub(crate) unsafe fn uninit<'a>(self, offset: usize, len: usize) -> &'a mut [MaybeUninit<f32>] {
        // SAFETY: the caller's contract; MaybeUninit<f32> has f32's layout.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(offset).cast(), len) }
    }
}

/// A raw input pointer read by several tasks at once.
#[derive(Clone, Copy)]
pub(crate) struct SharedIn(*const f32);
// SAFETY: only read, from a buffer that outlives the parallel loop reading it.
unsafe impl Send for SharedIn {}
unsafe impl Sync for SharedIn {}

impl SharedIn {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    pub(crate) fn get(self) -> *const f32 {
        self.0
    }
}

/// How a kernel splits each image's `units` (pixels, tile rows) into cache-sized bands.
struct Bands {
    /// Units per band.
    size: usize,
    /// Bands per image.
    count: usize,
    /// True when there are too few bands to keep every thread busy: then each image is one
    /// band and the work inside it runs in parallel instead.
    parallel_inside: bool,
}

impl Bands {
    /// Bands of `size` units (`size` ≥ 1) over `units` per image, for `batch` images.
    fn split(batch: usize, units: usize, size: usize) -> Self {
        let count = units.div_ceil(size);
        if batch * count < 2 * rayon::current_num_threads() {
            Self {
                size: units,
                count: 1,
                parallel_inside: true,
            }
        } else {
            Self {
                size,
                count,
                parallel_inside: false,
            }
        }
    }
}

/// TensorFlow's SAME rule for one axis: output length and padding before the first input.
pub(crate) fn same(length: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let out = length.div_ceil(stride);
    let total = ((out - 1) * stride + kernel).saturating_sub(length);
    (out, total / 2)
}

/// A layer's optional bias (or LayerNorm's shift) as `len` values, zeros when it has none.
pub(crate) fn bias_values(bias: Option<Param<Tensor<1>>>, len: usize) -> Vec<f32> {
    match bias {
        Some(bias) => tensor_values(bias.into_value()),
        None => vec![0.0; len],
    }
}

/// The float32 values of a Burn tensor, flattened.
pub(crate) fn tensor_values<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor
        .into_data()
        .try_into_vec::<f32>()
        .expect("the network's parameters are float32")
}
