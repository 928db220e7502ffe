//! Point clouds: the depth map back-projected through a pinhole camera into a binary
//! little-endian PLY, one vertex per kept pixel of a grid over the upright input, coloured by
//! that pixel.
//!
//! - **Pixels.** A grid of every `stride`-th pixel in both directions, the smallest stride
//!   whose grid holds at most `points` pixels (so the aspect is kept). Each grid pixel is a
//!   real pixel of the upright image: its colour is that pixel's, and its depth the network's
//!   output sampled bilinearly at that pixel's centre.
//! - **Camera.** OpenCV's pinhole convention: pixel `(u, v)` has its centre at `(u, v)`, the
//!   point is `x = (u - cx) z / fx`, `y = (v - cy) z / fy`, `z` (x right, y down, z forward).
//!   The intrinsics, first found first used: `fx, fy, cx, cy` given by the client; the EXIF
//!   `FocalLengthIn35mmFilm` by the 35 mm diagonal rule; a horizontal field of view `fov`; the
//!   server's `--default-fov`. `cx, cy` default to the image's centre, `(W - 1) / 2`.
//! - **Depth.** MiDaS predicts relative inverse depth `d` (larger is nearer, up to an unknown
//!   scale and shift). Given `scale` (and `shift`, default 0), `1/z = scale * d + shift`, for
//!   users who calibrated. Otherwise the robust default: `1/z` is taken linear in `d`, with the
//!   2nd percentile of `d` at `far` and the 98th at `near`. A metric model (Depth Anything V2's
//!   metric fine-tunes) predicts `z` in metres: it is used as it is, with no guess.
//! - **Dropped points.** No finite positive depth; beyond `far`; on a depth discontinuity
//!   ("flying pixels" smeared between a foreground edge and the background): a point is dropped
//!   when one of the network cells it is sampled from differs from a 4-neighbour by more than
//!   `edges` relative to the nearer of the two (`edges=0` keeps them).

use std::fmt::Write as _;

use bytes::{BufMut, Bytes, BytesMut};
use image::RgbImage;
use midas_model::engine::DepthMap;
use midas_model::model::ModelKind;

use super::encode::EncodeError;

/// The default horizontal field of view, degrees: between a phone's main camera (about 69°, a
/// 26 mm equivalent) and a dash camera such as the Cityscapes one (48.7°), so that neither
/// kind of photo is badly stretched when it carries no focal length.
pub const DEFAULT_FOV_DEGREES: f64 = 60.0;

/// The default `near`: depths in the cloud's unit (arbitrary for a relative model).
pub const DEFAULT_NEAR: f64 = 1.0;

/// The default `far`: ten times `near`, the depth range of a room or a street scene's first
/// tens of metres.
pub const DEFAULT_FAR: f64 = 10.0;

/// The default discontinuity threshold: a 10 % jump in depth between neighbouring network cells
/// is an object's edge, not a surface (a surface at 45° changes by about 1 % a cell).
pub const DEFAULT_EDGES: f64 = 0.1;

/// The percentiles of the disparity that are mapped onto `far` and `near`.
const PERCENTILES: (f64, f64) = (0.02, 0.98);

/// Bytes of one vertex: three `f32` and three `u8`.
const VERTEX_BYTES: usize = 15;

/// Encoded bytes are handed out in chunks of about this size.
const CHUNK_BYTES: usize = 64 * 1024;

/// A client's point-cloud parameters; each `None` takes the server's default.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CloudOptions {
    /// Focal length in pixels, horizontal.
    pub fx: Option<f64>,
    /// Focal length in pixels, vertical (`fx` when only that is given).
    pub fy: Option<f64>,
    /// Principal point, horizontal, pixels of the upright input.
    pub cx: Option<f64>,
    /// Principal point, vertical.
    pub cy: Option<f64>,
    /// Horizontal field of view, degrees.
    pub fov: Option<f64>,
    /// Depth mapped from the 98th disparity percentile.
    pub near: Option<f64>,
    /// Depth mapped from the 2nd percentile; points beyond it are dropped.
    pub far: Option<f64>,
    /// Calibrated `1/z = scale * d + shift`.
    pub scale: Option<f64>,
    /// See `scale`.
    pub shift: Option<f64>,
    /// The most vertices.
    pub points: Option<u64>,
    /// Discontinuity threshold (0: off).
    pub edges: Option<f64>,
}

/// The server's (or command's) point-cloud defaults and bounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CloudDefaults {
    /// Horizontal field of view when nothing else says, degrees.
    pub fov: f64,
    /// Vertices when the client does not say.
    pub points: u64,
    /// The most vertices a client may ask for.
    pub max_points: u64,
}

impl Default for CloudDefaults {
    fn default() -> Self {
        Self {
            fov: DEFAULT_FOV_DEGREES,
            points: 250_000,
            max_points: 2_000_000,
        }
    }
}

/// A point-cloud parameter a client got wrong.
#[derive(Debug, thiserror::Error)]
#[error("{parameter}: {message}")]
pub struct CloudOptionError {
    /// The parameter's name.
    pub parameter: &'static str,
    /// What is wrong with it.
    pub message: String,
}

impl CloudOptions {
    /// The parameter names a query or form may set.
    pub const NAMES: [&'static str; 11] = [
        "fx", "fy", "cx", "cy", "fov", "near", "far", "scale", "shift", "points", "edges",
    ];

    /// Sets parameter `name` from its text; `false` when `name` is not one of [`Self::NAMES`].
    pub fn set(&mut self, name: &str, value: &str) -> Result<bool, CloudOptionError> {
        let number = || -> Result<f64, CloudOptionError> {
            value
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| CloudOptionError {
                    parameter: Self::NAMES.into_iter().find(|n| *n == name).unwrap_or("?"),
                    message: format!("expected a finite number, got {value:?}"),
                })
        };
        let slot = match name {
            "fx" => &mut self.fx,
            "fy" => &mut self.fy,
            "cx" => &mut self.cx,
            "cy" => &mut self.cy,
            "fov" => &mut self.fov,
            "near" => &mut self.near,
            "far" => &mut self.far,
            "scale" => &mut self.scale,
            "shift" => &mut self.shift,
            "edges" => &mut self.edges,
            "points" => {
                self.points = Some(value.parse::<u64>().map_err(|_| CloudOptionError {
                    parameter: "points",
                    message: format!("expected a whole number of points, got {value:?}"),
                })?);
                return Ok(true);
            }
            _ => return Ok(false),
        };
        *slot = Some(number()?);
        Ok(true)
    }

    /// Checks the values against each other and `defaults`' bounds.
    pub fn validate(&self, defaults: &CloudDefaults) -> Result<(), CloudOptionError> {
        let fail = |parameter, message: &str| {
            Err(CloudOptionError {
                parameter,
                message: message.to_string(),
            })
        };
        for (parameter, value) in [("fx", self.fx), ("fy", self.fy), ("scale", self.scale)] {
            if value.is_some_and(|v| v <= 0.0) {
                return fail(parameter, "must be positive");
            }
        }
        if self.fov.is_some_and(|fov| fov <= 0.0 || fov >= 180.0) {
            return fail("fov", "must be between 0 and 180 degrees, both excluded");
        }
        if self.near.is_some_and(|near| near <= 0.0) {
            return fail("near", "must be positive");
        }
        if self.far.is_some_and(|far| far <= 0.0) {
            return fail("far", "must be positive");
        }
        let (near, far) = (
            self.near.unwrap_or(DEFAULT_NEAR),
            self.far.unwrap_or(DEFAULT_FAR),
        );
        if self.scale.is_none() && near >= far {
            return fail(
                "near",
                &format!("near ({near}) must be less than far ({far})"),
            );
        }
        if self.edges.is_some_and(|edges| edges < 0.0) {
            return fail("edges", "must be 0 (off) or positive");
        }
        if self.shift.is_some() && self.scale.is_none() {
            return fail("shift", "is only used with scale");
        }
        match self.points {
            Some(0) => fail("points", "must be at least 1"),
            Some(points) if points > defaults.max_points => fail(
                "points",
                &format!(
                    "at most {} points (the server's --max-points)",
                    defaults.max_points
                ),
            ),
            _ => Ok(()),
        }
    }
}

/// Where the focal length came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntrinsicsSource {
    /// `fx`/`fy` given by the client.
    Explicit,
    /// The image's EXIF `FocalLengthIn35mmFilm`.
    Exif35mm,
    /// The client's `fov`.
    Fov,
    /// The server's `--default-fov`.
    DefaultFov,
}

impl IntrinsicsSource {
    fn name(self) -> &'static str {
        match self {
            Self::Explicit => "explicit",
            Self::Exif35mm => "exif-35mm",
            Self::Fov => "fov",
            Self::DefaultFov => "default-fov",
        }
    }
}

/// A pinhole camera in pixels of the upright input.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Intrinsics {
    /// Focal lengths.
    pub fx: f64,
    /// See `fx`.
    pub fy: f64,
    /// Principal point.
    pub cx: f64,
    /// See `cx`.
    pub cy: f64,
    /// Where the focal length came from.
    pub source: IntrinsicsSource,
}

impl Intrinsics {
    /// The camera for a `width x height` upright image, by the rules in this module's notes.
    pub fn resolve(
        options: &CloudOptions,
        defaults: &CloudDefaults,
        focal_35mm: Option<f64>,
        (width, height): (u32, u32),
    ) -> Self {
        let (w, h) = (f64::from(width), f64::from(height));
        let from_fov = |degrees: f64| (w / 2.0) / (degrees.to_radians() / 2.0).tan();
        let (fx, fy, source) = match (options.fx, options.fy) {
            (Some(fx), fy) => (fx, fy.unwrap_or(fx), IntrinsicsSource::Explicit),
            (None, Some(fy)) => (fy, fy, IntrinsicsSource::Explicit),
            (None, None) => {
                let (f, source) = match (focal_35mm.filter(|f| *f > 0.0), options.fov) {
                    (Some(f35), _) => (
                        f35 * (w * w + h * h).sqrt() / (36.0f64 * 36.0 + 24.0 * 24.0).sqrt(),
                        IntrinsicsSource::Exif35mm,
                    ),
                    (None, Some(fov)) => (from_fov(fov), IntrinsicsSource::Fov),
                    (None, None) => (from_fov(defaults.fov), IntrinsicsSource::DefaultFov),
                };
                (f, f, source)
            }
        };
        Self {
            fx,
            fy,
            cx: options.cx.unwrap_or((w - 1.0) / 2.0),
            cy: options.cy.unwrap_or((h - 1.0) / 2.0),
            source,
        }
    }
}

/// Which pixels of the upright image become vertices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    /// The upright image's size.
    pub width: u32,
    /// See `width`.
    pub height: u32,
    /// Every `stride`-th pixel in both directions.
    pub stride: u32,
}

impl Grid {
    /// The densest grid over `width x height` with at most `points` pixels.
    pub fn new(width: u32, height: u32, points: u64) -> Self {
        let pixels = u64::from(width) * u64::from(height);
        let mut stride = ((pixels as f64 / points.max(1) as f64).sqrt().floor() as u32).max(1);
        let mut grid = Self {
            width,
            height,
            stride,
        };
        while grid.len() as u64 > points.max(1) {
            stride += 1;
            grid.stride = stride;
        }
        grid
    }

    /// Grid columns.
    pub fn columns(&self) -> usize {
        self.width.div_ceil(self.stride) as usize
    }

    /// Grid rows.
    pub fn rows(&self) -> usize {
        self.height.div_ceil(self.stride) as usize
    }

    /// Grid pixels.
    pub fn len(&self) -> usize {
        self.columns() * self.rows()
    }

    /// Whether the grid has no pixel (an empty image).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The image pixel of grid cell `index` (the middle of its `stride x stride` block, kept
    /// inside the image).
    pub fn pixel(&self, column: usize, row: usize) -> (u32, u32) {
        let place =
            |index: usize, side: u32| (index as u32 * self.stride + self.stride / 2).min(side - 1);
        (place(column, self.width), place(row, self.height))
    }
}

/// What a point cloud takes from the decoded image: the grid's colours, the camera, and what
/// the header says. Small (4 bytes a grid pixel) next to the image it replaces.
#[derive(Clone, Debug)]
pub struct PointSamples {
    grid: Grid,
    colours: Vec<u8>,
    intrinsics: Intrinsics,
    options: CloudOptions,
    model: ModelKind,
}

impl PointSamples {
    /// Takes the grid's colours from the upright `image`, and resolves the camera.
    pub fn take(
        image: &RgbImage,
        focal_35mm: Option<f64>,
        options: &CloudOptions,
        defaults: &CloudDefaults,
        model: ModelKind,
    ) -> Self {
        let (width, height) = image.dimensions();
        let grid = Grid::new(width, height, options.points.unwrap_or(defaults.points));
        let mut colours = Vec::with_capacity(grid.len() * 3);
        for row in 0..grid.rows() {
            for column in 0..grid.columns() {
                let (x, y) = grid.pixel(column, row);
                colours.extend_from_slice(&image.get_pixel(x, y).0);
            }
        }
        Self {
            grid,
            colours,
            intrinsics: Intrinsics::resolve(options, defaults, focal_35mm, (width, height)),
            options: *options,
            model,
        }
    }

    /// The grid.
    pub fn grid(&self) -> Grid {
        self.grid
    }

    /// The camera.
    pub fn intrinsics(&self) -> Intrinsics {
        self.intrinsics
    }
}

/// Bytes rendering a cloud of `points` holds at most: the samples (3), the kept mask (1), the
/// network-sized depth planes, and a chunk.
pub fn cloud_bytes(points: u64, depth_values: u64) -> u64 {
    points * 4 + depth_values * 9 + 2 * CHUNK_BYTES as u64
}

/// How disparity becomes depth.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mapping {
    /// `1/z = a d + b`, from the percentiles `low` and `high` of `d`.
    Percentiles { low: f32, high: f32, a: f64, b: f64 },
    /// `1/z = scale d + shift`.
    Affine { scale: f64, shift: f64 },
    /// `z = d`: a metric model's output, in metres.
    Metres,
}

impl Mapping {
    fn new(depth: &DepthMap, options: &CloudOptions, model: ModelKind) -> Self {
        if model.is_metric() {
            return Self::Metres;
        }
        if let Some(scale) = options.scale {
            return Self::Affine {
                scale,
                shift: options.shift.unwrap_or(0.0),
            };
        }
        let near = options.near.unwrap_or(DEFAULT_NEAR);
        let far = options.far.unwrap_or(DEFAULT_FAR);
        let mut sorted = depth.data.clone();
        sorted.sort_unstable_by(f32::total_cmp);
        let at = |fraction: f64| {
            sorted
                .get(((sorted.len().saturating_sub(1)) as f64 * fraction).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        let (low, high) = (at(PERCENTILES.0), at(PERCENTILES.1));
        let a = if high > low {
            (1.0 / near - 1.0 / far) / f64::from(high - low)
        } else {
            // A flat map has no shape to scale: every point at the middle of the range.
            0.0
        };
        let b = if high > low {
            1.0 / far - a * f64::from(low)
        } else {
            2.0 / (near + far)
        };
        Self::Percentiles { low, high, a, b }
    }

    fn depth(&self, disparity: f64) -> f64 {
        let inverse = match *self {
            Self::Percentiles { a, b, .. } => a * disparity + b,
            Self::Affine { scale, shift } => scale * disparity + shift,
            Self::Metres => return disparity,
        };
        1.0 / inverse
    }

    fn describe(&self, options: &CloudOptions) -> String {
        match *self {
            Self::Percentiles { low, high, .. } => format!(
                "percentiles: 1/z linear in disparity, p2 {low} -> far {}, p98 {high} -> near {}",
                options.far.unwrap_or(DEFAULT_FAR),
                options.near.unwrap_or(DEFAULT_NEAR)
            ),
            Self::Affine { scale, shift } => {
                format!("affine: 1/z = {scale} * disparity + {shift}")
            }
            Self::Metres => "metres: z is the model's output".to_string(),
        }
    }
}

/// The depth map, mapped and with its edge cells marked, sampled at image pixels.
struct DepthField {
    depth: DepthMap,
    mapping: Mapping,
    /// Per network cell: on a discontinuity.
    edge: Vec<bool>,
    /// The image's size.
    image: (u32, u32),
    far: Option<f64>,
}

impl DepthField {
    fn new(depth: DepthMap, samples: &PointSamples) -> Self {
        let options = &samples.options;
        let mapping = Mapping::new(&depth, options, samples.model);
        let threshold = options.edges.unwrap_or(DEFAULT_EDGES);
        let (w, h) = (depth.width, depth.height);
        let z: Vec<f64> = depth
            .data
            .iter()
            .map(|d| mapping.depth(f64::from(*d)))
            .collect();
        let jump = |a: f64, b: f64| (a - b).abs() > threshold * a.min(b);
        let mut edge = vec![false; w * h];
        if threshold > 0.0 {
            for y in 0..h {
                for x in 0..w {
                    let here = z[y * w + x];
                    if x + 1 < w && jump(here, z[y * w + x + 1]) {
                        edge[y * w + x] = true;
                        edge[y * w + x + 1] = true;
                    }
                    if y + 1 < h && jump(here, z[(y + 1) * w + x]) {
                        edge[y * w + x] = true;
                        edge[(y + 1) * w + x] = true;
                    }
                }
            }
        }
        let far = match mapping {
            Mapping::Percentiles { .. } => Some(options.far.unwrap_or(DEFAULT_FAR)),
            Mapping::Affine { .. } | Mapping::Metres => options.far,
        };
        Self {
            depth,
            mapping,
            edge,
            image: (samples.grid.width, samples.grid.height),
            far,
        }
    }

    /// The depth at image pixel `(x, y)`, or `None` where the point is dropped.
    fn at(&self, x: u32, y: u32) -> Option<f64> {
        let (w, h) = (self.depth.width, self.depth.height);
        // Pixel centres onto the network's grid (corners not aligned), clamped at the borders.
        let source = |pixel: u32, from: u32, to: usize| {
            ((f64::from(pixel) + 0.5) * to as f64 / f64::from(from) - 0.5)
                .clamp(0.0, (to - 1) as f64)
        };
        let (sx, sy) = (source(x, self.image.0, w), source(y, self.image.1, h));
        let (x0, y0) = (sx.floor() as usize, sy.floor() as usize);
        let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
        let (fx, fy) = (sx - x0 as f64, sy - y0 as f64);
        let cells = [(x0, y0), (x1, y0), (x0, y1), (x1, y1)];
        if cells.iter().any(|&(cx, cy)| self.edge[cy * w + cx]) {
            return None;
        }
        let d = |(cx, cy): (usize, usize)| f64::from(self.depth.data[cy * w + cx]);
        let top = d(cells[0]) * (1.0 - fx) + d(cells[1]) * fx;
        let bottom = d(cells[2]) * (1.0 - fx) + d(cells[3]) * fx;
        let z = self.mapping.depth(top * (1.0 - fy) + bottom * fy);
        let kept = z.is_finite() && z > 0.0 && self.far.is_none_or(|far| z <= far);
        kept.then_some(z)
    }
}

/// Encodes the cloud: the header first, then the vertices a band of grid rows at a time.
pub fn ply(
    depth: &DepthMap,
    samples: PointSamples,
) -> Result<impl Iterator<Item = Result<Bytes, EncodeError>> + Send + 'static, EncodeError> {
    if depth.width == 0 || depth.height == 0 || samples.grid.is_empty() {
        return Err(EncodeError::from_message(
            "an empty depth map or image has no points".to_string(),
        ));
    }
    let field = DepthField::new(depth.clone(), &samples);
    let grid = samples.grid;
    let mut kept = vec![false; grid.len()];
    for row in 0..grid.rows() {
        for column in 0..grid.columns() {
            let (x, y) = grid.pixel(column, row);
            kept[row * grid.columns() + column] = field.at(x, y).is_some();
        }
    }
    let count = kept.iter().filter(|k| **k).count();
    let header = header(&samples, &field.mapping, count);
    let mut next_row = 0;
    let mut header = Some(header);
    Ok(std::iter::from_fn(move || {
        if let Some(header) = header.take() {
            return Some(Ok(header));
        }
        if next_row >= grid.rows() {
            return None;
        }
        let camera = samples.intrinsics;
        let mut out = BytesMut::with_capacity(CHUNK_BYTES + grid.columns() * VERTEX_BYTES);
        while next_row < grid.rows() && out.len() < CHUNK_BYTES {
            for column in 0..grid.columns() {
                let index = next_row * grid.columns() + column;
                if !kept[index] {
                    continue;
                }
                let (x, y) = grid.pixel(column, next_row);
                let z = field.at(x, y).unwrap_or(f64::NAN);
                out.put_f32_le(((f64::from(x) - camera.cx) * z / camera.fx) as f32);
                out.put_f32_le(((f64::from(y) - camera.cy) * z / camera.fy) as f32);
                out.put_f32_le(z as f32);
                out.put_slice(&samples.colours[index * 3..index * 3 + 3]);
            }
            next_row += 1;
        }
        Some(Ok(out.freeze()))
    }))
}

/// The PLY header, its comments saying how every number was made.
fn header(samples: &PointSamples, mapping: &Mapping, count: usize) -> Bytes {
    let camera = samples.intrinsics;
    let grid = samples.grid;
    let edges = samples.options.edges.unwrap_or(DEFAULT_EDGES);
    let mut text = String::from("ply\nformat binary_little_endian 1.0\n");
    let lines = [
        format!("model {}", samples.model),
        if samples.model.is_metric() {
            "depth metric: z in metres, as the model predicts it".to_string()
        } else {
            "depth relative (inverse depth up to an unknown scale and shift; see mapping)"
                .to_string()
        },
        format!(
            "intrinsics fx {} fy {} cx {} cy {} source {}",
            camera.fx,
            camera.fy,
            camera.cx,
            camera.cy,
            camera.source.name()
        ),
        format!("mapping {}", mapping.describe(&samples.options)),
        "frame opencv: x right, y down, z forward; pixel (u, v) centre at (u, v)".to_string(),
        format!(
            "grid {}x{} image, every {} pixels, {}x{} samples",
            grid.width,
            grid.height,
            grid.stride,
            grid.columns(),
            grid.rows()
        ),
        if edges > 0.0 {
            format!("edges {edges}: points on a depth jump above this fraction dropped")
        } else {
            "edges 0: no points dropped at depth jumps".to_string()
        },
    ];
    for line in lines {
        let _ = writeln!(text, "comment {line}");
    }
    let _ = write!(
        text,
        "element vertex {count}\nproperty float x\nproperty float y\nproperty float z\n\
         property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n"
    );
    Bytes::from(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grid_is_the_densest_within_the_cap() {
        for (width, height, points) in [(1920, 1080, 250_000), (7, 5, 3), (100, 1, 10), (3, 3, 9)] {
            let grid = Grid::new(width, height, points);
            assert!(grid.len() as u64 <= points, "{grid:?}");
            if grid.stride > 1 {
                let denser = Grid {
                    stride: grid.stride - 1,
                    ..grid
                };
                assert!(denser.len() as u64 > points, "{grid:?}");
            }
        }
    }

    #[test]
    fn the_35mm_rule_and_the_field_of_view() {
        let defaults = CloudDefaults::default();
        let options = CloudOptions::default();
        let exif = Intrinsics::resolve(&options, &defaults, Some(26.0), (4000, 3000));
        assert_eq!(exif.source, IntrinsicsSource::Exif35mm);
        let expected = 26.0 * 5000.0 / (36.0f64 * 36.0 + 24.0 * 24.0).sqrt();
        assert!((exif.fx - expected).abs() < 1e-9 && exif.fy == exif.fx);
        assert_eq!((exif.cx, exif.cy), (1999.5, 1499.5));
        let fov = CloudOptions {
            fov: Some(90.0),
            ..options
        };
        let camera = Intrinsics::resolve(&fov, &defaults, None, (640, 480));
        assert!((camera.fx - 320.0).abs() < 1e-9, "{camera:?}");
        assert_eq!(camera.source, IntrinsicsSource::Fov);
        let fallback = Intrinsics::resolve(&options, &defaults, None, (640, 480));
        assert_eq!(fallback.source, IntrinsicsSource::DefaultFov);
    }

    #[test]
    fn bad_parameters_name_themselves() {
        let defaults = CloudDefaults::default();
        let mut options = CloudOptions::default();
        assert!(options.set("fov", "nan").is_err());
        assert!(!options.set("colour", "1").unwrap());
        for (name, value, parameter) in [
            ("fx", "-1", "fx"),
            ("fov", "180", "fov"),
            ("near", "20", "near"),
            ("points", "0", "points"),
            ("points", "2000001", "points"),
            ("edges", "-0.5", "edges"),
        ] {
            let mut options = CloudOptions::default();
            options.set(name, value).unwrap();
            let error = options.validate(&defaults).unwrap_err();
            assert_eq!(error.parameter, parameter, "{name}={value}: {error}");
        }
    }
}
