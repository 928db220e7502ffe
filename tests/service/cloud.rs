//! Point clouds (`format=ply`): the geometry against the closed-form back-projection, the
//! colours against the photo, the refusals, and a real PLY reader (Python's `plyfile`) on what
//! the server streams, `predict` writes and `batch` stores.

use crate::support;

use std::path::Path;
use std::process::Command;

use midas_model::model::ModelKind;
use midas_serve::pipeline::{
    self, CloudDefaults, CloudOptions, DepthMap, Grid, OutputFormat, PointSamples, RenderOptions,
};
use support::server::{Server, predict};

/// A parsed binary little-endian PLY of `x y z red green blue` vertices.
struct Ply {
    comments: Vec<String>,
    vertices: Vec<([f32; 3], [u8; 3])>,
}

impl Ply {
    fn parse(bytes: &[u8]) -> Self {
        let end = bytes
            .windows(11)
            .position(|w| w == b"end_header\n")
            .expect("a PLY header")
            + 11;
        let header = std::str::from_utf8(&bytes[..end]).unwrap();
        let lines: Vec<&str> = header.lines().collect();
        assert_eq!(&lines[..2], ["ply", "format binary_little_endian 1.0"]);
        let count: usize = lines
            .iter()
            .find_map(|l| l.strip_prefix("element vertex "))
            .unwrap()
            .parse()
            .unwrap();
        let properties: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("property "))
            .collect();
        assert_eq!(
            properties,
            [
                "float x",
                "float y",
                "float z",
                "uchar red",
                "uchar green",
                "uchar blue"
            ]
        );
        let body = &bytes[end..];
        assert_eq!(body.len(), count * 15, "15 bytes a vertex, nothing after");
        let vertices = body
            .chunks_exact(15)
            .map(|v| {
                let f = |i: usize| f32::from_le_bytes(v[i * 4..i * 4 + 4].try_into().unwrap());
                ([f(0), f(1), f(2)], [v[12], v[13], v[14]])
            })
            .collect();
        let comments = lines
            .iter()
            .filter_map(|l| l.strip_prefix("comment "))
            .map(str::to_string)
            .collect();
        Self { comments, vertices }
    }

    /// The numbers after each of `names` in the comment that starts with `prefix`.
    fn comment_numbers(&self, prefix: &str, names: &[&str]) -> Vec<f64> {
        let line = self
            .comments
            .iter()
            .find(|c| c.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} comment in {:?}", self.comments));
        let words: Vec<&str> = line.split_whitespace().collect();
        names
            .iter()
            .map(|name| {
                let at = words.iter().position(|w| w == name).unwrap();
                words[at + 1].parse().unwrap()
            })
            .collect()
    }
}

/// Renders `disparity` (one value per pixel of `image`) as a cloud with `options`.
fn cloud(image: &image::RgbImage, disparity: Vec<f32>, options: CloudOptions) -> (Ply, Grid) {
    let (width, height) = image.dimensions();
    let depth = DepthMap {
        width: width as usize,
        height: height as usize,
        data: disparity,
    };
    let defaults = CloudDefaults::default();
    options.validate(&defaults).unwrap();
    let samples = PointSamples::take(
        image,
        None,
        &options,
        &defaults,
        ModelKind::MidasV21Small256,
    );
    let grid = samples.grid();
    let render = RenderOptions {
        format: OutputFormat::Ply,
        cloud: options,
        ..RenderOptions::default()
    };
    let chunks = pipeline::render(&depth, (width, height), render, Some(samples)).unwrap();
    let bytes: Vec<u8> = chunks.flat_map(|chunk| chunk.unwrap().to_vec()).collect();
    (Ply::parse(&bytes), grid)
}

fn photo(width: u32, height: u32) -> image::RgbImage {
    image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x * 5) as u8, (y * 7) as u8, ((x * y) % 251) as u8])
    })
}

/// Every vertex against the closed form, its colour against its pixel, and its re-projection
/// with the header's intrinsics against its pixel's centre.
fn assert_exact(
    ply: &Ply,
    grid: &Grid,
    image: &image::RgbImage,
    depth_at: impl Fn(u32, u32) -> f64,
) {
    let [fx, fy, cx, cy] = ply.comment_numbers("intrinsics", &["fx", "fy", "cx", "cy"])[..] else {
        unreachable!()
    };
    assert_eq!(ply.vertices.len(), grid.len(), "no point dropped");
    let mut index = 0;
    for row in 0..grid.rows() {
        for column in 0..grid.columns() {
            let (u, v) = grid.pixel(column, row);
            let (point, colour) = ply.vertices[index];
            index += 1;
            let z = depth_at(u, v);
            let expected = [
                (f64::from(u) - cx) * z / fx,
                (f64::from(v) - cy) * z / fy,
                z,
            ];
            let norm = expected.iter().map(|e| e * e).sum::<f64>().sqrt();
            for (got, want) in point.iter().zip(expected) {
                let error = (f64::from(*got) - want).abs();
                assert!(
                    error <= 1e-5 * norm,
                    "pixel ({u}, {v}): {point:?} against {expected:?}"
                );
            }
            assert_eq!(colour, image.get_pixel(u, v).0, "pixel ({u}, {v})");
            let (x, y, z) = (
                f64::from(point[0]),
                f64::from(point[1]),
                f64::from(point[2]),
            );
            assert!((fx * x / z + cx - f64::from(u)).abs() < 1e-3, "({u}, {v})");
            assert!((fy * y / z + cy - f64::from(v)).abs() < 1e-3, "({u}, {v})");
        }
    }
}

#[test]
fn a_plane_and_a_sphere_are_back_projected_exactly() {
    let (width, height) = (64u32, 48u32);
    let image = photo(width, height);
    let options = CloudOptions {
        fx: Some(50.0),
        fy: Some(55.0),
        cx: Some(31.2),
        cy: Some(22.7),
        scale: Some(1.0),
        edges: Some(0.0),
        points: Some(u64::from(width * height)),
        ..CloudOptions::default()
    };
    // A plane: its inverse depth is affine in the pixel coordinates.
    let plane = |u: u32, v: u32| 0.2 + 0.001 * f64::from(u) + 0.002 * f64::from(v);
    let disparity: Vec<f32> = (0..height)
        .flat_map(|v| (0..width).map(move |u| plane(u, v) as f32))
        .collect();
    let stored = disparity.clone();
    let at = |u: u32, v: u32| 1.0 / f64::from(stored[(v * width + u) as usize]);
    let (ply, grid) = cloud(&image, disparity.clone(), options);
    assert_eq!(grid.stride, 1);
    assert_exact(&ply, &grid, &image, at);
    // The same plane on a coarser grid: every kept point is still one of the image's pixels.
    let coarse = CloudOptions {
        points: Some(300),
        ..options
    };
    let (ply, grid) = cloud(&image, disparity, coarse);
    assert!(grid.stride > 1 && grid.len() <= 300);
    assert_exact(&ply, &grid, &image, at);

    // A sphere of radius 2 centred 5 in front of the camera, on a background at 20.
    let sphere = |u: u32, v: u32| -> f64 {
        let ray = [
            (f64::from(u) - 31.2) / 50.0,
            (f64::from(v) - 22.7) / 55.0,
            1.0,
        ];
        let (a, b, c) = (
            ray.iter().map(|r| r * r).sum::<f64>(),
            -2.0 * 5.0 * ray[2],
            25.0 - 4.0,
        );
        let discriminant = b * b - 4.0 * a * c;
        if discriminant < 0.0 {
            20.0
        } else {
            (-b - discriminant.sqrt()) / (2.0 * a)
        }
    };
    let disparity: Vec<f32> = (0..height)
        .flat_map(|v| (0..width).map(move |u| (1.0 / sphere(u, v)) as f32))
        .collect();
    assert!(
        disparity.iter().any(|d| (*d - 0.05).abs() > 1e-6),
        "the sphere is in view"
    );
    let stored = disparity.clone();
    let (ply, grid) = cloud(&image, disparity, options);
    assert_exact(&ply, &grid, &image, |u, v| {
        1.0 / f64::from(stored[(v * width + u) as usize])
    });
}

#[test]
fn the_default_mapping_puts_the_percentiles_at_near_and_far_and_drops_edges() {
    let (width, height) = (80u32, 60u32);
    let image = photo(width, height);
    // A square in front (disparity 1.0) on a background sloping from 0.1 to 0.3.
    let disparity: Vec<f32> = (0..height)
        .flat_map(|v| {
            (0..width).map(move |u| {
                if (30..50).contains(&u) && (20..40).contains(&v) {
                    1.0
                } else {
                    0.1 + 0.2 * u as f32 / width as f32
                }
            })
        })
        .collect();
    let all = CloudOptions {
        points: Some(u64::from(width * height)),
        ..CloudOptions::default()
    };
    let (ply, _) = cloud(&image, disparity.clone(), all);
    let depths: Vec<f32> = ply.vertices.iter().map(|(p, _)| p[2]).collect();
    let (nearest, farthest) = depths
        .iter()
        .fold((f32::MAX, 0.0f32), |(lo, hi), z| (lo.min(*z), hi.max(*z)));
    // The square (8 % of the pixels) holds the 98th percentile: it is at `near`; nothing is
    // beyond `far`, and the background spreads between them.
    assert!((nearest - 1.0).abs() < 1e-4, "{nearest}");
    assert!(farthest <= 10.0 && farthest > 5.0, "{farthest}");
    assert!(depths.iter().all(|z| z.is_finite() && *z > 0.0));
    let mapping = ply
        .comments
        .iter()
        .find(|c| c.starts_with("mapping"))
        .unwrap();
    assert!(
        mapping.contains("p2") && mapping.contains("p98"),
        "{mapping}"
    );
    // The square's border is an edge: points there are dropped, and kept with edges=0.
    let kept = ply.vertices.len();
    let (unfiltered, _) = cloud(
        &image,
        disparity,
        CloudOptions {
            edges: Some(0.0),
            ..all
        },
    );
    let lost = unfiltered.vertices.len() - kept;
    // The 2 % farthest are beyond `far` either way; the square's outline (about 80 network
    // cells each side of it) only with the filter.
    assert!(lost >= 80, "{lost} points dropped at the square's edges");
    assert!(kept > (width * height / 2) as usize, "{kept}");
}

/// What `plyfile` reads from `path`: vertex count, then each property's name and type.
fn read_with_plyfile(path: &Path) -> String {
    let script = "import sys\nfrom plyfile import PlyData\nd = PlyData.read(sys.argv[1])\nv = d['vertex']\nprint(v.count, ' '.join(f'{p.name}:{p.val_dtype}' for p in v.properties), d.text, d.byte_order)\nimport numpy\nassert numpy.isfinite(v['z']).all() and (v['z'] > 0).all()\n";
    let output = Command::new(support::python())
        .args(["-c", script])
        .arg(path)
        .output()
        .expect("python runs (scripts/test.sh installs plyfile)");
    assert!(
        output.status.success(),
        "plyfile could not read {}: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

const PLYFILE_PROPERTIES: &str = "x:f4 y:f4 z:f4 red:u1 green:u1 blue:u1 False <";

fn jpeg(width: u32, height: u32) -> Vec<u8> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(photo(width, height))
        .write_to(&mut bytes, image::ImageFormat::Jpeg)
        .unwrap();
    bytes.into_inner()
}

#[test]
fn a_real_reader_opens_what_the_server_streams_and_the_commands_write() {
    let store = tempfile::tempdir().unwrap();
    let server = Server::start(&["--store", store.path().to_str().unwrap()], &[]);
    let dir = tempfile::tempdir().unwrap();
    let photo = jpeg(320, 240);

    let response = predict(
        &server,
        "room.jpg",
        &photo,
        "?format=ply&points=5000&fov=70",
    );
    assert_eq!(
        response.status,
        201,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    assert_eq!(response.header("content-type"), Some("application/x-ply"));
    let ply = Ply::parse(&response.body);
    // The grid has at most 5000 samples; the untrained model's noisy depth loses some at edges.
    assert!(
        ply.vertices.len() <= 5000 && ply.vertices.len() > 1000,
        "{}",
        ply.vertices.len()
    );
    assert!(
        ply.comments.iter().any(|c| c.contains("source fov")),
        "{:?}",
        ply.comments
    );
    assert!(
        ply.comments
            .iter()
            .any(|c| c == "model midas_v21_small_256")
    );
    let served = dir.path().join("served.ply");
    std::fs::write(&served, &response.body).unwrap();
    let read = read_with_plyfile(&served);
    assert!(
        read.starts_with(&format!("{} {PLYFILE_PROPERTIES}", ply.vertices.len())),
        "{read}"
    );
    // Stored next to the upload and served again by id.
    let location = response.header("location").unwrap().to_string();
    let again = support::get(format!("http://{}{location}", server.addr)).unwrap();
    assert_eq!(again.headers()["content-type"], "application/x-ply");
    assert_eq!(again.bytes().unwrap().to_vec(), response.body);

    // `predict --format ply` and `batch --format ply` write what the server answers.
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    std::fs::write(input.join("room.jpg"), &photo).unwrap();
    // The same cloud parameters on the command line as in the query.
    let run = |command: &str, rest: &[&str]| {
        let status = Command::new(env!("CARGO_BIN_EXE_midas-serve"))
            .args([command, "--format", "ply", "--cloud", "points=5000"])
            .args(["--cloud", "fov=70"])
            .args(rest)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "{command}");
    };
    let out = dir.path().join("out");
    let image = input.join("room.jpg");
    run(
        "predict",
        &["--out-dir", out.to_str().unwrap(), image.to_str().unwrap()],
    );
    assert_eq!(std::fs::read(out.join("room.ply")).unwrap(), response.body);
    let batched = dir.path().join("batched");
    run(
        "batch",
        &[
            "--input",
            input.to_str().unwrap(),
            "--output",
            batched.to_str().unwrap(),
            "--progress",
            "log",
        ],
    );
    let written = batched.join("room.ply");
    assert_eq!(std::fs::read(&written).unwrap(), response.body);
    assert!(read_with_plyfile(&written).starts_with(&ply.vertices.len().to_string()));
}

#[test]
fn bad_cloud_parameters_are_refused_naming_the_parameter() {
    let store = tempfile::tempdir().unwrap();
    let server = Server::start(&["--store", store.path().to_str().unwrap()], &[]);
    let photo = jpeg(64, 48);
    for (query, parameter) in [
        ("format=ply&fx=-3", "fx"),
        ("format=ply&fy=0", "fy"),
        ("format=ply&fx=inf", "fx"),
        ("format=ply&cx=nan", "cx"),
        ("format=ply&fov=0", "fov"),
        ("format=ply&fov=180", "fov"),
        ("format=ply&near=5&far=2", "near"),
        ("format=ply&points=0", "points"),
        ("format=ply&points=2000001", "points"),
        ("format=ply&colormap=viridis", "colormap"),
        ("colormap=gray&format=ply", "colormap"),
        ("format=ply&edges=-1", "edges"),
        ("format=ply&depth=3", "depth"),
    ] {
        let response = predict(&server, "a.jpg", &photo, &format!("?{query}"));
        assert_eq!(response.status, 400, "{query}");
        let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(body["error"], "bad_query", "{query}");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains(parameter), "{query}: {message}");
    }
    assert_eq!(
        support::stored_files(store.path()),
        Vec::<std::path::PathBuf>::new()
    );
    // The same parameters as form text parts are checked alike.
    let response = support::server::post_form(
        &server,
        &[("format", "ply"), ("fov", "200")],
        ("a.jpg", &photo),
    );
    assert_eq!(response.status, 400);
    assert!(String::from_utf8_lossy(&response.body).contains("fov"));
}
