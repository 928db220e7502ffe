//! Which network a deployment runs, and the facts about each that the rest of the service needs.

use std::fmt;

use serde::Serialize;

use super::dinov2::VitSize;

/// What a Depth Anything V2 head predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DepthHead {
    /// Affine-invariant inverse depth, as MiDaS (upstream's `depth_anything_v2_vit*.pth`).
    Relative,
    /// Depth in metres, a sigmoid times the largest depth (upstream's metric fine-tunes).
    Metric,
}

/// The supported networks, named as upstream names their weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ModelKind {
    /// MiDaS v2.1 small: EfficientNet-Lite3 encoder, 256 px, fast.
    MidasV21Small256,
    /// MiDaS v3.0 DPT-Hybrid: ResNet-50 + ViT-B/16 encoder, 384 px, accurate.
    DptHybrid384,
    /// Depth Anything V2: a DINOv2 ViT/14 encoder and a DPT head, 518 px.
    DepthAnythingV2(VitSize, DepthHead),
}

impl ModelKind {
    /// Every kind, in the order they are tried when recognising weights.
    pub const ALL: [ModelKind; 8] = [
        Self::MidasV21Small256,
        Self::DptHybrid384,
        Self::DepthAnythingV2(VitSize::Small, DepthHead::Relative),
        Self::DepthAnythingV2(VitSize::Base, DepthHead::Relative),
        Self::DepthAnythingV2(VitSize::Large, DepthHead::Relative),
        Self::DepthAnythingV2(VitSize::Small, DepthHead::Metric),
        Self::DepthAnythingV2(VitSize::Base, DepthHead::Metric),
        Self::DepthAnythingV2(VitSize::Large, DepthHead::Metric),
    ];

    /// The name `--model` takes: upstream's `model_type` for MiDaS, the weights' file name
    /// without the data set for Depth Anything V2.
    pub fn name(self) -> &'static str {
        use DepthHead::{Metric, Relative};
        use VitSize::{Base, Large, Small};
        match self {
            Self::MidasV21Small256 => "midas_v21_small_256",
            Self::DptHybrid384 => "dpt_hybrid_384",
            Self::DepthAnythingV2(Small, Relative) => "depth_anything_v2_vits",
            Self::DepthAnythingV2(Base, Relative) => "depth_anything_v2_vitb",
            Self::DepthAnythingV2(Large, Relative) => "depth_anything_v2_vitl",
            Self::DepthAnythingV2(Small, Metric) => "depth_anything_v2_metric_vits",
            Self::DepthAnythingV2(Base, Metric) => "depth_anything_v2_metric_vitb",
            Self::DepthAnythingV2(Large, Metric) => "depth_anything_v2_metric_vitl",
        }
    }

    /// The kind `name` names.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// A description for people.
    pub fn description(self) -> &'static str {
        use DepthHead::{Metric, Relative};
        use VitSize::{Base, Large, Small};
        match self {
            Self::MidasV21Small256 => {
                "midas_v21_small_256: MiDaS v2.1 small (EfficientNet-Lite3 encoder, 256 px)"
            }
            Self::DptHybrid384 => {
                "dpt_hybrid_384: MiDaS v3.0 DPT-Hybrid (ResNet-50 + ViT-B/16 encoder, 384 px)"
            }
            Self::DepthAnythingV2(Small, Relative) => {
                "depth_anything_v2_vits: Depth Anything V2 Small (DINOv2 ViT-S/14 encoder, 518 px), relative depth"
            }
            Self::DepthAnythingV2(Base, Relative) => {
                "depth_anything_v2_vitb: Depth Anything V2 Base (DINOv2 ViT-B/14 encoder, 518 px), relative depth"
            }
            Self::DepthAnythingV2(Large, Relative) => {
                "depth_anything_v2_vitl: Depth Anything V2 Large (DINOv2 ViT-L/14 encoder, 518 px), relative depth"
            }
            Self::DepthAnythingV2(Small, Metric) => {
                "depth_anything_v2_metric_vits: Depth Anything V2 Small (DINOv2 ViT-S/14 encoder, 518 px), depth in metres"
            }
            Self::DepthAnythingV2(Base, Metric) => {
                "depth_anything_v2_metric_vitb: Depth Anything V2 Base (DINOv2 ViT-B/14 encoder, 518 px), depth in metres"
            }
            Self::DepthAnythingV2(Large, Metric) => {
                "depth_anything_v2_metric_vitl: Depth Anything V2 Large (DINOv2 ViT-L/14 encoder, 518 px), depth in metres"
            }
        }
    }

    /// Whether the network predicts metres (else relative inverse depth, larger is nearer).
    pub fn is_metric(self) -> bool {
        matches!(self, Self::DepthAnythingV2(_, DepthHead::Metric))
    }

    /// The side the network was trained at: the longer (small), the nearer-to-one-scale (DPT)
    /// or the shorter (Depth Anything V2) side of the input is resized to it.
    pub fn net_size(self) -> u32 {
        match self {
            Self::MidasV21Small256 => 256,
            Self::DptHybrid384 => 384,
            Self::DepthAnythingV2(..) => 518,
        }
    }

    /// Both sides of a network input must be multiples of this.
    pub fn input_multiple(self) -> usize {
        match self {
            Self::MidasV21Small256 => 32,
            Self::DptHybrid384 => 16,
            Self::DepthAnythingV2(..) => 14,
        }
    }

    /// Bytes a forward pass holds beyond the weights, per input pixel (activations and the
    /// kernels' working buffers), measured as peak RSS of `midas-serve forward` over sizes from
    /// 64x64 to the largest input (DPT: 1.24-1.32 KiB per pixel from 384x384 to 1536x384;
    /// MiDaS small: about 80 bytes), rounded up. Depth Anything V2's tokens are 14 px wide
    /// where DPT's are 16 and its attention is quadratic in them: the figure scales DPT's by
    /// the token width and holds for the 518 px inputs the upstream transform makes.
    pub fn forward_bytes_per_pixel(self) -> u64 {
        match self {
            Self::MidasV21Small256 => 128,
            Self::DptHybrid384 => 1400,
            Self::DepthAnythingV2(size, _) => match size {
                VitSize::Small => 1200,
                VitSize::Base => 2000,
                VitSize::Large => 3600,
            },
        }
    }
}

/// The data sets Depth Anything V2's metric models were fine-tuned on; a weights file's name
/// says which (`depth_anything_v2_metric_hypersim_vits.pth`), and with it the largest depth.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetricDataset {
    /// Hypersim: indoor scenes, up to 20 m.
    Hypersim,
    /// Virtual KITTI 2: street scenes, up to 80 m.
    Vkitti,
}

impl MetricDataset {
    /// Both data sets.
    pub const ALL: [MetricDataset; 2] = [Self::Hypersim, Self::Vkitti];

    /// The name in upstream's file names.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hypersim => "hypersim",
            Self::Vkitti => "vkitti",
        }
    }

    /// Upstream's `max_depth` for the data set, in metres.
    pub fn max_depth(self) -> f32 {
        match self {
            Self::Hypersim => 20.0,
            Self::Vkitti => 80.0,
        }
    }

    /// The data set a weights file's name mentions, if any (case-insensitive).
    pub fn from_file_name(name: &str) -> Option<Self> {
        let name = name.to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|dataset| name.contains(dataset.name()))
    }
}

/// A weights file upstream publishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedWeights {
    /// The file's stem (`dpt_hybrid_384`, `depth_anything_v2_metric_vkitti_vits`), which
    /// `--weights` accepts in place of a URL.
    pub name: String,
    /// The publisher's download root ([`MIDAS_RELEASES`] or [`DEPTH_ANYTHING_RELEASES`]).
    pub root: &'static str,
    /// The file's path under the root.
    pub path: String,
}

/// Every weights file upstream publishes for the supported networks.
pub fn published_weights() -> Vec<PublishedWeights> {
    let file = |name: &str, root, path: String| PublishedWeights {
        name: name.to_string(),
        root,
        path,
    };
    let mut all = vec![
        file(
            "midas_v21_small_256",
            MIDAS_RELEASES,
            "v2_1/midas_v21_small_256.pt".to_string(),
        ),
        file(
            "dpt_hybrid_384",
            MIDAS_RELEASES,
            "v3/dpt_hybrid_384.pt".to_string(),
        ),
    ];
    for size in VitSize::ALL {
        let title = size.title();
        let stem = format!("depth_anything_v2_{}", size.name());
        all.push(file(
            &stem,
            DEPTH_ANYTHING_RELEASES,
            format!("Depth-Anything-V2-{title}/resolve/main/{stem}.pth"),
        ));
        for dataset in MetricDataset::ALL {
            let stem = format!(
                "depth_anything_v2_metric_{}_{}",
                dataset.name(),
                size.name()
            );
            let repository = match dataset {
                MetricDataset::Hypersim => "Hypersim",
                MetricDataset::Vkitti => "VKITTI",
            };
            all.push(file(
                &stem,
                DEPTH_ANYTHING_RELEASES,
                format!("Depth-Anything-V2-Metric-{repository}-{title}/resolve/main/{stem}.pth"),
            ));
        }
    }
    all
}

/// Where isl-org/MiDaS publishes its weights.
pub const MIDAS_RELEASES: &str = "https://github.com/isl-org/MiDaS/releases/download";

/// Where Depth Anything V2's weights are published (Hugging Face).
pub const DEPTH_ANYTHING_RELEASES: &str = "https://huggingface.co/depth-anything";

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for ModelKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl clap::ValueEnum for ModelKind {
    fn value_variants<'a>() -> &'a [Self] {
        &Self::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()).help(self.description()))
    }
}
