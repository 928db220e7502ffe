#!/usr/bin/env python3
"""Write reference images for the replaced service's own prediction path ("squash"), using upstream
MiDaS v2.1 small with the synthetic weights in place of the fine-tuned DPT-Hybrid.

The replaced Flask service (`POST /predict`) did, for DPT-Hybrid at 384x384:

    img = Image.open(upload)                                     # no mode conversion
    x = Compose([v2.Resize((384, 384)), v2.ToTensor()])(img)     # PIL bilinear, antialiased, uint8; /255
    depth = model(x[None]).squeeze().numpy()
    depth *= 1.0 / depth.max()                                   # reciprocal, then multiply
    out = Image.fromarray(np.uint8(cm.viridis(depth) * 255))     # RGBA, alpha 255
    out.resize(img.size).save(path, "PNG")                       # PIL's default BICUBIC; an RGBA PNG

Here the network is MiDaS v2.1 small, so the square is 256x256, and every image is first converted
with `.convert("RGB")` (the replaced service failed on grey, palette and RGBA uploads; converting drops
alpha without premultiplying). The PNGs hold exactly what that service returned: RGBA, alpha 255.

    /tmp/midas-ref/bin/python scripts/reference/squash.py --midas-src /tmp/MiDaS

writes tests/fixtures/squash/STEM.png for every image in tests/fixtures/images.
"""

import argparse
import pathlib

import numpy as np
import torch
from matplotlib import cm
from PIL import Image

import synthetic
import upstream

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
IMAGES = FIXTURES / "images"
SQUARE = 256


def read_layout():
    layout = []
    for line in (FIXTURES / "upstream_layout.tsv").read_text().splitlines():
        key, dtype, dims = line.split("\t")
        layout.append((key, dtype, tuple(int(d) for d in dims.split(",")) if dims else ()))
    return layout


def to_tensor(image):
    """v2.Resize((S, S)) then v2.ToTensor() on a PIL image, done with Pillow and numpy."""
    squashed = image.resize((SQUARE, SQUARE), Image.BILINEAR)
    pixels = np.asarray(squashed, dtype=np.uint8)
    x = torch.from_numpy(pixels.transpose(2, 0, 1).copy()).float().div(255.0)
    try:
        import torchvision.transforms.v2 as transforms
    except ImportError:
        return x
    with torch.no_grad():
        reference = transforms.Compose([transforms.Resize((SQUARE, SQUARE)), transforms.ToTensor()])(image)
    assert torch.equal(x, reference), "Pillow path differs from torchvision's v2 transforms"
    return x


def colourise(depth):
    scaled = depth.copy()
    scaled *= 1.0 / scaled.max()
    return Image.fromarray(np.uint8(cm.viridis(scaled) * 255))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--midas-src", required=True, type=pathlib.Path, help="isl-org/MiDaS checkout")
    args = parser.parse_args()
    torch.set_num_threads(2)

    MidasNet_small, _, _ = upstream.load_upstream(args.midas_src)
    model = upstream.build_small(MidasNet_small)
    model.load_state_dict(synthetic.state_dict(read_layout()), strict=True)

    out_dir = FIXTURES / "squash"
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(IMAGES.iterdir()):
        image = Image.open(path)
        mode = image.mode
        image = image.convert("RGB")
        x = to_tensor(image)
        with torch.no_grad():
            depth = model(x[None]).squeeze().numpy()
        assert depth.dtype == np.float32 and depth.shape == (SQUARE, SQUARE)
        square = colourise(depth)
        out = square.resize(image.size)
        assert out.mode == "RGBA" and np.all(np.asarray(out)[..., 3] == 255)
        target = out_dir / f"{path.stem}.png"
        out.save(target, "PNG", optimize=True)

        # How much the details matter: dividing instead of multiplying by the reciprocal, and
        # resizing the RGB channels alone instead of the RGBA image.
        divided = Image.fromarray(np.uint8(cm.viridis(depth / depth.max()) * 255))
        index_changes = int(np.sum(np.any(np.asarray(divided) != np.asarray(square), axis=-1)))
        rgb_only = np.asarray(square.convert("RGB").resize(image.size))
        rgb_changes = int(np.sum(rgb_only != np.asarray(out)[..., :3]))
        print(f"squash {path.name} ({mode}, {image.size[0]}x{image.size[1]}): depth "
              f"{depth.min():.4f}..{depth.max():.4f} -> {target.relative_to(ROOT)} "
              f"{target.stat().st_size} bytes; x/max vs x*(1/max): {index_changes} colour changes; "
              f"RGB-only resize: {rgb_changes} channel changes")


if __name__ == "__main__":
    main()
