#!/usr/bin/env python3
"""Write the Depth Anything V2 reference fixtures the Rust tests compare against, using upstream's code.

Needs torch, numpy and opencv (scripts/reference/requirements.txt), which CI never installs: run it
by hand after changing anything it covers, and commit what it writes. Steps:

    python3 -m venv /tmp/midas-ref && /tmp/midas-ref/bin/pip install -r scripts/reference/requirements.txt
    git clone https://github.com/DepthAnything/Depth-Anything-V2 /tmp/Depth-Anything-V2   # at a561b84
    /tmp/midas-ref/bin/python scripts/reference/depth_anything.py --src /tmp/Depth-Anything-V2

Upstream's `DepthAnythingV2` (and, for the metric head, `metric_depth/`'s) is built with the
configuration of upstream's `model_configs`; no weights are downloaded: every parameter is overwritten
with `synthetic.depth_anything_state_dict`. By default it writes what CI compares against:
  tests/fixtures/depth_anything_vits_layout.tsv     every key of the vits state dict, dtype and shape
  tests/fixtures/forward/depth_anything_v2_vits_WxH.npy           relative output [1, H, W]
  tests/fixtures/forward/depth_anything_v2_metric_vits_WxH.npy    metric output (max_depth 20)
  tests/fixtures/forward/depth_anything_v2_vits_126x98_to_WxH.npy that output resized back to an
      image of WxH as `infer_image` does it (bilinear, align_corners=True), enlarged and shrunk
With `--all DIR` it writes, into DIR, every encoder (vits, vitb) x head x size the parity is claimed
for, for `MIDAS_DEPTH_ANYTHING_FIXTURES=DIR cargo test ... -- --ignored depth_anything`.
"""

import argparse
import importlib
import pathlib
import sys
import time

import numpy as np
import torch

import synthetic

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
CONFIGS = {
    "vits": {"encoder": "vits", "features": 64, "out_channels": [48, 96, 192, 384]},
    "vitb": {"encoder": "vitb", "features": 128, "out_channels": [96, 192, 384, 768]},
    "vitl": {"encoder": "vitl", "features": 256, "out_channels": [256, 512, 1024, 1024]},
}
EXPECTED_PARAMETERS = {"vits": 24_785_089}
METRIC_MAX_DEPTH = 20.0
# (width, height): CI's sizes (the trained 518x518, and a small one with a non-square grid so
# the position embedding is interpolated), then the rest checked with --all.
CI_SIZES = [(518, 518), (126, 98)]
ALL_SIZES = [(518, 518), (714, 518), (518, 364), (126, 98)]
# Image sizes (width, height) the 126x98 output is resized back to: larger, and smaller in both sides.
RESIZED = [(171, 133), (100, 75)]


def model_class(src, metric):
    """Upstream's DepthAnythingV2 class: the relative one, or metric_depth's."""
    root = src / "metric_depth" if metric else src
    for name in [n for n in sys.modules if n == "depth_anything_v2" or n.startswith("depth_anything_v2.")]:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module("depth_anything_v2.dpt").DepthAnythingV2
    finally:
        sys.path.remove(str(root))


def build(src, encoder, metric):
    cls = model_class(src, metric)
    kwargs = dict(CONFIGS[encoder])
    if metric:
        kwargs["max_depth"] = METRIC_MAX_DEPTH
    model = cls(**kwargs).eval()
    state = model.state_dict()
    layout = [(key, str(v.dtype).removeprefix("torch."), tuple(v.shape)) for key, v in state.items()]
    expected = EXPECTED_PARAMETERS.get(encoder)
    parameters = sum(int(np.prod(shape)) for _, _, shape in layout)
    if expected is not None:
        # With or without the mask token (training only, as wide as the tokens).
        dim = CONFIGS[encoder]["out_channels"][-1]
        assert parameters in (expected, expected + dim), f"{parameters} values, expected {expected}"
    model.load_state_dict(synthetic.depth_anything_state_dict(layout), strict=True)
    return model, layout


def write_layout(layout, path):
    path.write_text("".join(f"{key}\t{dtype}\t{','.join(map(str, shape))}\n" for key, dtype, shape in layout))


def forward(model, width, height):
    x = torch.from_numpy(synthetic.network_input(width, height))
    start = time.perf_counter()
    with torch.no_grad():
        y = model(x).numpy().astype(np.float32)
    seconds = time.perf_counter() - start
    if y.ndim == 4:
        y = y[:, 0]
    assert y.shape == (1, height, width), y.shape
    assert np.isfinite(y).all(), f"non-finite output at {width}x{height}"
    return y, seconds


def write(model, name, sizes, out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    for width, height in sizes:
        y, seconds = forward(model, width, height)
        low, high = float(y.min()), float(y.max())
        print(f"forward {name} {width}x{height}: min {low:.4f} max {high:.4f} mean {y.mean():.4f} "
              f"std {y.std():.4f} zero {np.mean(y == 0):.3f} ({seconds:.1f} s)", flush=True)
        assert high - low > 0.5, f"degenerate range {low}..{high} at {width}x{height}"
        np.save(out_dir / f"{name}_{width}x{height}.npy", y)


def write_resized(out_dir):
    """`infer_image`'s resize back to the image's size, of the small relative output."""
    depth = torch.from_numpy(np.load(out_dir / "depth_anything_v2_vits_126x98.npy"))
    for width, height in RESIZED:
        resized = torch.nn.functional.interpolate(depth[:, None], (height, width), mode="bilinear", align_corners=True)
        np.save(out_dir / f"depth_anything_v2_vits_126x98_to_{width}x{height}.npy", resized[0, 0].numpy())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, type=pathlib.Path, help="DepthAnything/Depth-Anything-V2 checkout")
    parser.add_argument("--all", type=pathlib.Path, metavar="DIR", help="write every fixture into DIR instead")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.all:
        for encoder in ("vits", "vitb"):
            for metric in (False, True):
                model, _ = build(args.src, encoder, metric)
                name = f"depth_anything_v2_{'metric_' if metric else ''}{encoder}"
                write(model, name, ALL_SIZES, args.all)
        return
    relative, layout = build(args.src, "vits", metric=False)
    write_layout(layout, FIXTURES / "depth_anything_vits_layout.tsv")
    print(f"layout: {len(layout)} keys, {sum(int(np.prod(s)) for _, _, s in layout)} values")
    write(relative, "depth_anything_v2_vits", CI_SIZES, FIXTURES / "forward")
    write_resized(FIXTURES / "forward")
    metric, _ = build(args.src, "vits", metric=True)
    write(metric, "depth_anything_v2_metric_vits", CI_SIZES[1:], FIXTURES / "forward")


if __name__ == "__main__":
    main()
