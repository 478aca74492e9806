"""Compare the masks the arm64 target made (scripts/target/suite.py) with this host's.

The same reference images are segmented here, by this checkout's segd on x86-64. ARM and x86
XNNPACK int8 kernels round some logits differently, which moves class boundaries by a few
pixels (measured on bookworm/Cortex-A72: 0.15 % of the bird's pixels, 0.68 % of the cat's,
0.79 % of the Cityscapes street's). So each pair of masks must (1) agree on at least
``--min-equal`` of the pixels and (2) differ only within ``--boundary`` pixels of a class
boundary of the x86 mask (half the output stride of 16): a wrong class inside a region fails.
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
    ap.add_argument("--min-equal", type=float, default=0.985)
    ap.add_argument("--boundary", type=int, default=8, help="pixels from a class boundary")
    args = ap.parse_args()
    from segd.engine import Segmenter
    from segd.variants import load_manifest, resolve_file

    worst, inside = 1.0, 0
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
            away = int(((arm != x86) & ~near_boundary(x86, args.boundary)).sum())
            worst = min(worst, equal)
            inside += away
            lines.append(f"{Path(image).stem} {100 * equal:.2f} %")
            print(f"{image}: {variant_name}: {100 * equal:.4f} % of {x86.size} pixels equal; "
                  f"{away} differing pixels farther than {args.boundary} px from a class boundary")  # fmt: skip
    print(f"equal pixels: {', '.join(lines)} (need >= {100 * args.min_equal:.1f} %); "
          f"{inside} differ away from boundaries (need 0)")  # fmt: skip
    return 0 if worst >= args.min_equal and inside == 0 else 1


def near_boundary(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within ``radius`` (Chebyshev distance) of a change of class in ``mask``."""
    import cv2

    edge = np.zeros(mask.shape, bool)
    horizontal = mask[:, :-1] != mask[:, 1:]
    vertical = mask[:-1] != mask[1:]
    edge[:, :-1] |= horizontal
    edge[:, 1:] |= horizontal
    edge[:-1] |= vertical
    edge[1:] |= vertical
    kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    return cv2.dilate(edge.astype(np.uint8), kernel).astype(bool)


if __name__ == "__main__":
    sys.exit(main())
