//! Which network a deployment runs, and the facts about each that the rest of the service needs.

use std::fmt;

use serde::Serialize;

/// The supported networks, named as upstream's `model_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, Serialize)]
pub enum ModelKind {
    /// MiDaS v2.1 small: EfficientNet-Lite3 encoder, 256 px, fast.
    #[value(name = "midas_v21_small_256")]
    #[serde(rename = "midas_v21_small_256")]
    MidasV21Small256,
    /// MiDaS v3.0 DPT-Hybrid: ResNet-50 + ViT-B/16 encoder, 384 px, accurate.
    #[value(name = "dpt_hybrid_384")]
    #[serde(rename = "dpt_hybrid_384")]
    DptHybrid384,
}

impl ModelKind {
    /// Every kind, in the order they are tried when recognising weights.
    pub const ALL: [ModelKind; 2] = [Self::MidasV21Small256, Self::DptHybrid384];

    /// Upstream's name for the model.
    pub fn name(self) -> &'static str {
        match self {
            Self::MidasV21Small256 => "midas_v21_small_256",
            Self::DptHybrid384 => "dpt_hybrid_384",
        }
    }

    /// Upstream's weights for the model, as a path under isl-org/MiDaS's release downloads.
    pub fn release_file(self) -> &'static str {
        match self {
            Self::MidasV21Small256 => "v2_1/midas_v21_small_256.pt",
            Self::DptHybrid384 => "v3/dpt_hybrid_384.pt",
        }
    }

    /// A description for people.
    pub fn description(self) -> &'static str {
        match self {
            Self::MidasV21Small256 => {
                "midas_v21_small_256: MiDaS v2.1 small (EfficientNet-Lite3 encoder, 256 px)"
            }
            Self::DptHybrid384 => {
                "dpt_hybrid_384: MiDaS v3.0 DPT-Hybrid (ResNet-50 + ViT-B/16 encoder, 384 px)"
            }
        }
    }

    /// The side the network was trained at: the longer (small) or the nearer-to-one-scale
    /// (DPT) side of the input is resized to it.
    pub fn net_size(self) -> u32 {
        match self {
            Self::MidasV21Small256 => 256,
            Self::DptHybrid384 => 384,
        }
    }

    /// Both sides of a network input must be multiples of this.
    pub fn input_multiple(self) -> usize {
        match self {
            Self::MidasV21Small256 => 32,
            Self::DptHybrid384 => 16,
        }
    }

    /// Bytes a forward pass holds beyond the weights, per input pixel (activations and the
    /// kernels' working buffers), measured as peak RSS of `midas-serve forward` over sizes from
    /// 64x64 to the largest input (DPT: 1.24-1.32 KiB per pixel from 384x384 to 1536x384;
    /// MiDaS small: about 80 bytes), rounded up.
    pub fn forward_bytes_per_pixel(self) -> u64 {
        match self {
            Self::MidasV21Small256 => 128,
            Self::DptHybrid384 => 1400,
        }
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
