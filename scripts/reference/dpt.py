#!/usr/bin/env python3
"""Write the DPT-Hybrid reference fixtures the Rust tests compare against, using upstream MiDaS code.

Needs torch and timm 0.6.13 (MiDaS pins 0.6.12, which does not import on Python 3.11; 0.6.13 is the
same code with that fix), which CI never installs: run it by hand after changing anything it covers,
and commit what it writes. Steps:

    python3 -m venv /tmp/midas-ref && /tmp/midas-ref/bin/pip install -r scripts/reference/requirements.txt
    git clone https://github.com/isl-org/MiDaS /tmp/MiDaS   # fixtures were made at commit 4545977
    /tmp/midas-ref/bin/python scripts/reference/dpt.py --midas-src /tmp/MiDaS

The model is upstream's `DPT_Hybrid(pretrained=False)`: no ImageNet or MiDaS weights are downloaded,
every parameter is overwritten with `synthetic.dpt_state_dict`. It writes:
  tests/fixtures/dpt_layout.tsv                  every key of the state dict, with dtype and shape
  tests/fixtures/forward/dpt_hybrid_WxH.npy      network output [1, H, W] for the synthetic weights
                                                 and `synthetic.network_input(W, H)`
and prints, for 384x384, how far the float32 forward is from the same forward in float64.
"""

import argparse
import pathlib
import time

import numpy as np
import torch

import synthetic
import upstream

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
FORWARD_SIZES = [(64, 64), (80, 48), (384, 384), (576, 384), (384, 256)]
EXPECTED_KEYS = 368
EXPECTED_PARAMETERS = 123_146_985


def write_layout(state):
    lines = []
    for key, value in state.items():
        dims = ",".join(str(d) for d in value.shape)
        lines.append(f"{key}\t{str(value.dtype).removeprefix('torch.')}\t{dims}\n")
    (FIXTURES / "dpt_layout.tsv").write_text("".join(lines))
    layout = [
        (key, str(value.dtype).removeprefix("torch."), tuple(value.shape)) for key, value in state.items()
    ]
    parameters = sum(int(np.prod(shape)) for _, _, shape in layout)
    assert len(layout) == EXPECTED_KEYS, f"{len(layout)} keys, expected {EXPECTED_KEYS}"
    assert parameters == EXPECTED_PARAMETERS, f"{parameters} parameters, expected {EXPECTED_PARAMETERS}"
    return layout


def build(midas_src):
    """Upstream DPT-Hybrid with the synthetic weights loaded, and its layout."""
    DPTDepthModel = upstream.load_dpt(midas_src)
    model = upstream.build_dpt_hybrid(DPTDepthModel)
    layout = write_layout(model.state_dict())
    model.load_state_dict(synthetic.dpt_state_dict(layout), strict=True)
    return model, layout


def write_forward(model):
    out_dir = FIXTURES / "forward"
    out_dir.mkdir(parents=True, exist_ok=True)
    for width, height in FORWARD_SIZES:
        x = torch.from_numpy(synthetic.network_input(width, height))
        start = time.perf_counter()
        with torch.no_grad():
            y = model(x).numpy().astype(np.float32)
        seconds = time.perf_counter() - start
        assert y.shape == (1, height, width), y.shape
        assert np.isfinite(y).all(), f"non-finite output at {width}x{height}"
        low, high = float(y.min()), float(y.max())
        print(f"forward dpt_hybrid {width}x{height}: min {low:.4f} max {high:.4f} mean {y.mean():.4f} "
              f"std {y.std():.4f} zero {np.mean(y == 0):.3f} ({seconds:.1f} s)", flush=True)
        assert high - low > 0.5, f"degenerate range {low}..{high} at {width}x{height}"
        np.save(out_dir / f"dpt_hybrid_{width}x{height}.npy", y)


def float64_gap(model, width=384, height=384):
    """max |fp32 - fp64| over the fp32 output's range, for the fixed input: the fp32 noise floor."""
    x = torch.from_numpy(synthetic.network_input(width, height))
    with torch.no_grad():
        y32 = model(x).numpy().astype(np.float64)
        model.double()
        try:
            y64 = model(x.double()).numpy()
        finally:
            model.float()
    gap = np.abs(y32 - y64)
    span = y32.max() - y32.min()
    print(f"float64 {width}x{height}: max |fp32 - fp64| {gap.max():.3e} (mean {gap.mean():.3e}), "
          f"range {span:.4f}, max |y| {np.abs(y64).max():.4f}: "
          f"{gap.max() / span:.3e} of the range, {gap.max() / np.abs(y64).max():.3e} of max |y|")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--midas-src", required=True, type=pathlib.Path, help="isl-org/MiDaS checkout")
    parser.add_argument("--no-float64", action="store_true", help="skip the float64 comparison")
    args = parser.parse_args()
    torch.set_num_threads(2)

    model, layout = build(args.midas_src)
    print(f"layout: {len(layout)} keys, {sum(int(np.prod(s)) for _, _, s in layout)} parameters")
    write_forward(model)
    if not args.no_float64:
        float64_gap(model)


if __name__ == "__main__":
    main()
