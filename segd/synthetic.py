"""A deterministic photo-like JPEG: the daemon's Edge TPU self-test and warm-up image, and the
benchmarks' input (no test image ships with the package)."""

from __future__ import annotations

import cv2
import numpy as np


def synthetic_jpeg(hw: tuple[int, int], seed: int = 0) -> bytes:
    """Smooth gradients + six blobs, ``hw`` = (height, width), JPEG quality 90."""
    rng = np.random.default_rng(seed)
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (h + w) * 255], axis=2)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.3) * min(h, w)
        color = rng.uniform(0, 255, 3)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = color
    ok, buf = cv2.imencode(".jpg", img.astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError("OpenCV could not encode the synthetic JPEG")
    return buf.tobytes()
