"""Compare the masks the arm64 target made (scripts/target/suite.py) with this host's.

The same reference images are segmented here, by this checkout's segd on x86-64, and each pair
of class-id masks must agree on at least ``--min-equal`` of the pixels (ARM and x86 TFLite
kernels round a few logits differently; what the issue measured was ~0.08 % of pixels).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import REFERENCE


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--arm", type=Path, required=True, help="the target suite's --out directory")
    ap.add_argument("--min-equal", type=float, default=0.995)
    args = ap.parse_args()
    from segd.engine import Segmenter
    from segd.variants import load_manifest, resolve_file

    worst = 1.0
    with tempfile.TemporaryDirectory() as tmp:
        mdir = Path(tmp)
        manifest = load_manifest(models_dir=mdir)
        lines = []
        for image, variant_name in REFERENCE.items():
            variant = manifest.get(variant_name)
            resolve_file(variant.cpu, mdir, mirror=str(args.data), download=False)
            x86 = Segmenter.open(variant, models_dir=mdir, accelerator="cpu").segment(
                (args.data / image).read_bytes()
            ).mask
            arm = np.asarray(Image.open(args.arm / f"{Path(image).stem}.png"))
            assert arm.shape == x86.shape, (image, arm.shape, x86.shape)
            equal = float((arm == x86).mean())
            worst = min(worst, equal)
            lines.append(f"{Path(image).stem} {100 * equal:.3f} %")
            print(f"{image}: {variant_name}: {100 * equal:.4f} % of {x86.size} pixels equal")
    print(f"equal pixels: {', '.join(lines)} (need >= {100 * args.min_equal:.1f} %)")
    return 0 if worst >= args.min_equal else 1


if __name__ == "__main__":
    sys.exit(main())
