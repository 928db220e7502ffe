#!/usr/bin/env python3
"""Write the size-rule fixture for DPT-Hybrid's official MiDaS transform (`dpt_hybrid_384` in upstream's
`midas/model_loader.py`): `Resize(384, 384, keep_aspect_ratio=True, ensure_multiple_of=32,
resize_method="minimal", image_interpolation_method=cv2.INTER_CUBIC)`, `NormalizeImage(0.5, 0.5)`,
`PrepareForNet`. The resize and normalisation code is the one MiDaS small's fixtures already
check (`make_fixtures.py`); what is DPT's own is the size rule. Needs only numpy and opencv:

    /tmp/midas-ref/bin/python scripts/reference/dpt_transform.py --midas-src /tmp/MiDaS

It writes tests/fixtures/dpt_size_rule.tsv: upstream's network input size for many image sizes.
"""

import argparse
import pathlib
import sys

import cv2
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--midas-src", required=True, type=pathlib.Path, help="isl-org/MiDaS checkout")
    args = parser.parse_args()
    sys.path.insert(0, str(args.midas_src))
    # midas/transforms.py imports only numpy, cv2 and math.
    from midas.transforms import Resize

    resize = Resize(384, 384, resize_target=None, keep_aspect_ratio=True, ensure_multiple_of=32,
                    resize_method="minimal", image_interpolation_method=cv2.INTER_CUBIC)
    sizes = {(1920, 1080), (640, 480), (333, 517), (1080, 1920), (384, 384), (31, 33), (100, 100),
             (4000, 3000), (3000, 4000), (512, 288), (720, 1280), (1536, 384), (400, 100)}
    rng = np.random.default_rng(11)
    sizes |= {(int(w), int(h)) for w, h in rng.integers(16, 5000, size=(300, 2))}
    lines = []
    for width, height in sorted(sizes):
        target_w, target_h = resize.get_size(width, height)
        lines.append(f"{width}\t{height}\t{int(target_w)}\t{int(target_h)}\n")
    (FIXTURES / "dpt_size_rule.tsv").write_text("".join(lines))


if __name__ == "__main__":
    main()
