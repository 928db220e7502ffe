//! The colour tables depth is painted with: matplotlib's own 256-entry tables, exported by
//! `scripts/reference/make_fixtures.py` (`cmap(np.arange(256), bytes=True)`), not approximations.

use serde::{Deserialize, Serialize};

/// A colour map for the depth image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Colormap {
    /// matplotlib's inferno (MiDaS's own choice).
    #[default]
    Inferno,
    /// matplotlib's viridis (the original service's choice).
    Viridis,
    /// matplotlib's gray.
    Gray,
}

impl Colormap {
    /// Every colour map, in the order the welcome page lists them.
    pub const ALL: [Colormap; 3] = [Self::Inferno, Self::Viridis, Self::Gray];

    /// 256 RGB triplets, index 0 for the farthest depth.
    pub fn table(self) -> &'static [u8; 768] {
        match self {
            Self::Inferno => include_bytes!("colormaps/inferno.rgb"),
            Self::Viridis => include_bytes!("colormaps/viridis.rgb"),
            Self::Gray => include_bytes!("colormaps/gray.rgb"),
        }
    }

    /// The name used in query strings and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Inferno => "inferno",
            Self::Viridis => "viridis",
            Self::Gray => "gray",
        }
    }

    /// Parses a query-string value.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_have_the_expected_ends() {
        // matplotlib's documented end points.
        assert_eq!(&Colormap::Inferno.table()[..3], &[0, 0, 3]);
        assert_eq!(&Colormap::Viridis.table()[..3], &[68, 1, 84]);
        assert_eq!(&Colormap::Gray.table()[765..], &[255, 255, 255]);
        assert_eq!(Colormap::from_name("viridis"), Some(Colormap::Viridis));
        assert_eq!(Colormap::from_name("jet"), None);
    }
}
