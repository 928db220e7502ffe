#!/usr/bin/env python3
"""Write the reference fixtures the Rust tests compare against, using upstream MiDaS code.

Needs torch, which CI never installs: run it by hand after changing anything it covers, and commit
what it writes. Steps:

    python3 -m venv /tmp/midas-ref && /tmp/midas-ref/bin/pip install -r scripts/reference/requirements.txt
    git clone https://github.com/isl-org/MiDaS /tmp/MiDaS   # fixtures were made at commit 4545977
    /tmp/midas-ref/bin/python scripts/reference/make_fixtures.py --midas-src /tmp/MiDaS

It writes:
  tests/fixtures/upstream_layout.tsv      every key of upstream's state dict, with dtype and shape
  tests/fixtures/forward/WxH.npy          network output for the synthetic weights and input
  tests/fixtures/size_rule.tsv            upstream's target size for many input sizes
  tests/fixtures/pipeline/...             pre-processed tensors, raw depth and final images per test image
  src/pipeline/colormaps/NAME.rgb         matplotlib's 256-entry colour tables: 768 bytes, R G B per entry
"""

import argparse
import pathlib

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

import synthetic
import upstream

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
IMAGES = FIXTURES / "images"
COLORMAP_DIR = ROOT / "src" / "pipeline" / "colormaps"
FORWARD_SIZES = [(256, 256), (256, 192), (256, 128)]
COLORMAPS = ["inferno", "viridis", "gray"]
# Test images whose pre-processed tensor and 16-bit depth are also stored (one down-scale, one
# up-scale), and the one rendered in every colour map; the others get the default map only, which
# keeps the fixtures small.
PREPROCESSED = ["camera_odd.png", "chelsea_small.png"]
EVERY_COLORMAP = "chelsea_small.png"


def write_layout(state):
    lines = []
    for key, value in state.items():
        dims = ",".join(str(d) for d in value.shape)
        lines.append(f"{key}\t{str(value.dtype).removeprefix('torch.')}\t{dims}\n")
    (FIXTURES / "upstream_layout.tsv").write_text("".join(lines))
    return [
        (key, str(value.dtype).removeprefix("torch."), tuple(value.shape)) for key, value in state.items()
    ]


def write_forward(model):
    out_dir = FIXTURES / "forward"
    out_dir.mkdir(parents=True, exist_ok=True)
    for width, height in FORWARD_SIZES:
        x = torch.from_numpy(synthetic.network_input(width, height))
        with torch.no_grad():
            y = model(x).numpy().astype(np.float32)
        np.save(out_dir / f"{width}x{height}.npy", y)
        print(f"forward {width}x{height}: min {y.min():.4f} max {y.max():.4f} mean {y.mean():.4f}")


def write_size_rule(transforms):
    resize = transforms.Resize(
        256, 256, resize_target=None, keep_aspect_ratio=True, ensure_multiple_of=32,
        resize_method="upper_bound",
    )
    sizes = {(1920, 1080), (640, 480), (333, 517), (1080, 1920), (256, 256), (1, 1), (31, 33),
             (4000, 3000), (3000, 4000), (100, 100), (512, 288), (720, 1280), (40000, 12)}
    rng = np.random.default_rng(7)
    sizes |= {(int(w), int(h)) for w, h in rng.integers(1, 5000, size=(300, 2))}
    lines = []
    for width, height in sorted(sizes):
        target_w, target_h = resize.get_size(width, height)
        lines.append(f"{width}\t{height}\t{int(target_w)}\t{int(target_h)}\n")
    (FIXTURES / "size_rule.tsv").write_text("".join(lines))


def write_colormaps():
    COLORMAP_DIR.mkdir(parents=True, exist_ok=True)
    for name in COLORMAPS:
        table = colormaps[name](np.arange(256), bytes=True)[:, :3]
        (COLORMAP_DIR / f"{name}.rgb").write_bytes(table.astype(np.uint8).tobytes())


def colourise(depth, name):
    """The original app's post-processing: scale by 1/max, index matplotlib's table."""
    table = colormaps[name](np.arange(256), bytes=True)[:, :3]
    peak = depth.max()
    scaled = depth / peak if peak > 0 else np.zeros_like(depth)
    index = np.clip((scaled * np.float32(256.0)).astype(np.int64), 0, 255)
    return table[index]


def write_pipeline(model, transforms, utils):
    transform = upstream_transform(transforms)
    out_dir = FIXTURES / "pipeline"
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(IMAGES.iterdir()):
        image = utils.read_image(str(path))
        height, width = image.shape[:2]
        tensor = transform({"image": image})["image"]
        if path.name in PREPROCESSED:
            np.save(out_dir / f"{path.stem}.pre.npy", tensor)
        with torch.no_grad():
            depth = model(torch.from_numpy(tensor)[None])[0].numpy().astype(np.float32)
        np.save(out_dir / f"{path.stem}.depth.npy", depth)
        for name in COLORMAPS if path.name == EVERY_COLORMAP else COLORMAPS[:1]:
            rgb = Image.fromarray(colourise(depth, name)).resize((width, height), Image.BICUBIC)
            rgb.save(out_dir / f"{path.stem}.{name}.png", optimize=True)
        if path.name in PREPROCESSED:
            write_depth16(depth, width, height, out_dir / f"{path.stem}.png16.png")
        print(f"pipeline {path.name}: {width}x{height} -> {tensor.shape[2]}x{tensor.shape[1]}")


def write_depth16(depth, width, height, path):
    """MiDaS's write_depth(bits=2) on the prediction resized to the input's size."""
    resized = np.asarray(Image.fromarray(depth, mode="F").resize((width, height), Image.BICUBIC))
    low, high = resized.min(), resized.max()
    if high - low > np.finfo("float").eps:
        out = 65535.0 * (resized - low) / (high - low)
    else:
        out = np.zeros(resized.shape)
    Image.fromarray(out.astype(np.uint16)).save(path)


def upstream_transform(transforms):
    """upstream model_loader's transform for midas_v21_small_256 (its torchvision Compose, unrolled)."""
    import cv2

    steps = [
        transforms.Resize(256, 256, resize_target=None, keep_aspect_ratio=True,
                          ensure_multiple_of=32, resize_method="upper_bound",
                          image_interpolation_method=cv2.INTER_CUBIC),
        transforms.NormalizeImage(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        transforms.PrepareForNet(),
    ]

    def apply(sample):
        for step in steps:
            sample = step(sample)
        return sample

    return apply


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--midas-src", required=True, type=pathlib.Path, help="isl-org/MiDaS checkout")
    args = parser.parse_args()
    torch.set_num_threads(2)

    MidasNet_small, transforms, utils = upstream.load_upstream(args.midas_src)
    model = upstream.build_small(MidasNet_small)
    layout = write_layout(model.state_dict())
    model.load_state_dict(synthetic.state_dict(layout), strict=True)
    print(f"layout: {len(layout)} keys")

    write_forward(model)
    write_size_rule(transforms)
    write_colormaps()
    write_pipeline(model, transforms, utils)


if __name__ == "__main__":
    main()
