//! The fusion decoder (`scratch`, every model's) on the CPU kernels, with its weights packed
//! from the Burn module.
//!
//! Same mathematics as [`crate::model::Scratch`], in a cheaper order where it is exact: the
//! fusion blocks' 1x1 projection runs before their x2 upsampling instead of after (both are
//! linear and bilinear weights sum to one, so the two commute, bias included), which makes the
//! projection four times cheaper and, with `expand`, upsamples half the channels.

use crate::kernels::{
    Activation, FeatureMap, PackedConv, WinogradConv, bilinear_rows, conv1x1, upsample, winograd3x3,
};

/// What one band of the output head's upsampled map holds at most (a few bands' worth of
/// rows stay in the caches while the band's three layers run over them).
const HEAD_BAND_BYTES: usize = 8 << 20;
use crate::model::{FeatureFusionBlock, OutputHead, ResidualConvUnit, Scratch};

/// `ResidualConvUnit_custom`'s two convolutions.
#[derive(Debug)]
struct Unit {
    conv1: WinogradConv,
    conv2: WinogradConv,
}

impl Unit {
    /// `fine`: the unit runs on a fine map (see [`WinogradConv::on_fine_map`]).
    fn pack(unit: ResidualConvUnit, fine: bool) -> Self {
        let pack = if fine {
            WinogradConv::on_fine_map
        } else {
            WinogradConv::from_conv
        };
        Self {
            conv1: pack(unit.conv1),
            conv2: pack(unit.conv2),
        }
    }

    /// `x + conv2(relu(conv1(relu(x)))) + extra`, the additions fused into `conv2`.
    fn forward(&self, x: &FeatureMap, extra: Option<&FeatureMap>) -> FeatureMap {
        let hidden = winograd3x3(x, &self.conv1, true, Activation::Relu, &[]);
        match extra {
            Some(extra) => winograd3x3(
                &hidden,
                &self.conv2,
                false,
                Activation::Identity,
                &[x, extra],
            ),
            None => winograd3x3(&hidden, &self.conv2, false, Activation::Identity, &[x]),
        }
    }
}

/// `FeatureFusionBlock_custom`.
#[derive(Debug)]
struct Fusion {
    unit1: Option<Unit>,
    unit2: Unit,
    out_conv: PackedConv,
}

impl Fusion {
    /// `fine`: the block runs on a fine map (see [`WinogradConv::on_fine_map`]).
    fn pack(block: FeatureFusionBlock, fine: bool) -> Self {
        Self {
            unit1: block.res_conf_unit1.map(|unit| Unit::pack(unit, fine)),
            unit2: Unit::pack(block.res_conf_unit2, fine),
            out_conv: PackedConv::from_conv(block.out_conv),
        }
    }

    /// `size` is the next level's `(height, width)`.
    fn forward(
        &self,
        input: FeatureMap,
        skip: Option<&FeatureMap>,
        size: (usize, usize),
    ) -> FeatureMap {
        let x = match (&self.unit1, skip) {
            (Some(unit), Some(skip)) => unit.forward(skip, Some(&input)),
            _ => input,
        };
        let x = self.unit2.forward(&x, None);
        upsample(
            &conv1x1(&x, &self.out_conv, Activation::Identity, &[]),
            size,
            true,
        )
    }
}

/// The output head.
#[derive(Debug)]
struct Head {
    conv1: WinogradConv,
    conv2: WinogradConv,
    conv3: PackedConv,
    align_corners: bool,
    max_depth: Option<f32>,
}

impl Head {
    fn pack(head: OutputHead) -> Self {
        Self {
            conv1: WinogradConv::on_fine_map(head.conv1),
            conv2: WinogradConv::on_fine_map(head.conv2),
            conv3: PackedConv::from_conv(head.conv3),
            align_corners: head.align_corners,
            max_depth: head.max_depth,
        }
    }

    /// `size` is the network input's `(height, width)`.
    ///
    /// After `conv1`, the layers run on bands of output rows: each band upsamples only the rows
    /// its 3x3 window reads (one more on each side inside the map), so the full-resolution
    /// maps of `conv1`'s channels (61 MB each for Depth Anything at 924x518) are never held.
    /// A band's halo rows are convolved against zero padding and their outputs dropped; the
    /// rows kept saw only real neighbours (or the map's own zero padding at its edges), so the
    /// result is the whole map's, value for value.
    fn forward(&self, input: FeatureMap, size: (usize, usize)) -> FeatureMap {
        let x = winograd3x3(&input, &self.conv1, false, Activation::Identity, &[]);
        drop(input);
        let (height, width) = size;
        let batch = x.batch;
        let row_bytes = batch * x.channels * width * size_of::<f32>();
        let band_rows = (HEAD_BAND_BYTES / row_bytes).max(8).next_multiple_of(2);
        let activation = match self.max_depth {
            None => Activation::Relu,
            Some(_) => Activation::Identity,
        };
        let mut depth = vec![0.0; batch * height * width];
        for top in (0..height).step_by(band_rows) {
            let bottom = (top + band_rows).min(height);
            let (first, last) = (top.saturating_sub(1), (bottom + 1).min(height));
            let band = bilinear_rows(&x, size, self.align_corners, first..last);
            let band = winograd3x3(&band, &self.conv2, false, Activation::Relu, &[]);
            let band = conv1x1(&band, &self.conv3, activation, &[]);
            band.assert_shape(1);
            let kept = (bottom - top) * width;
            for image in 0..batch {
                let from = (image * (last - first) + top - first) * width;
                let to = (image * height + top) * width;
                depth[to..to + kept].copy_from_slice(&band.data[from..from + kept]);
            }
        }
        if let Some(max_depth) = self.max_depth {
            // One value per output pixel: libm's exp is a small share of the head.
            for value in &mut depth {
                *value = max_depth / (1.0 + (-*value).exp());
            }
        }
        FeatureMap {
            data: depth,
            batch,
            channels: 1,
            height,
            width,
        }
    }
}

/// The decoder with its weights packed for the CPU kernels; built once after the weights load.
#[derive(Debug)]
pub struct CpuDecoder {
    projections: [WinogradConv; 4],
    fusions: [Fusion; 4],
    head: Head,
}

impl CpuDecoder {
    /// Packs the weights of a loaded decoder, taking them over. The two finest levels (1/4 and
    /// 1/8 of the input's side) and the head run on fine maps.
    pub fn pack(scratch: Scratch) -> Self {
        Self {
            projections: [
                WinogradConv::on_fine_map(scratch.layer1_rn),
                WinogradConv::on_fine_map(scratch.layer2_rn),
                WinogradConv::from_conv(scratch.layer3_rn),
                WinogradConv::from_conv(scratch.layer4_rn),
            ],
            fusions: [
                Fusion::pack(scratch.refinenet1, true),
                Fusion::pack(scratch.refinenet2, true),
                Fusion::pack(scratch.refinenet3, false),
                Fusion::pack(scratch.refinenet4, false),
            ],
            head: Head::pack(scratch.output_conv),
        }
    }

    /// The encoder's four features (finest first) to the `[batch, 1, H, W]` output, `size`
    /// being the network input's `(H, W)`.
    pub fn forward(&self, features: [FeatureMap; 4], output: (usize, usize)) -> FeatureMap {
        let [layer1, layer2, layer3, layer4] = features;
        let project = |level: usize, feature: &FeatureMap| {
            winograd3x3(
                feature,
                &self.projections[level],
                false,
                Activation::Identity,
                &[],
            )
        };
        let [f1, f2, f3, f4] = &self.fusions;
        let size = |map: &FeatureMap| (map.height, map.width);
        let (layer1, layer2, layer3) = (
            project(0, &layer1),
            project(1, &layer2),
            project(2, &layer3),
        );
        let path = f4.forward(project(3, &layer4), None, size(&layer3));
        let path = f3.forward(path, Some(&layer3), size(&layer2));
        let path = f2.forward(path, Some(&layer2), size(&layer1));
        let path = f1.forward(path, Some(&layer1), (2 * layer1.height, 2 * layer1.width));
        self.head.forward(path, output)
    }
}
