"""``segd bench``: the original coral-deeplab latency table (ms/iter and FPS per variant at
513x513), measured on whatever backend this machine has."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from segd.engine import Segmenter
from segd.synthetic import synthetic_jpeg
from segd.variants import load_manifest


def median_ms(fn: Any, iterations: int, warmup: int) -> float:
    """Median wall time of ``fn`` in ms over ``iterations`` runs, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iterations):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000.0)
    return statistics.median(times)


def bench_segmenter(seg: Segmenter, image: bytes, *, iterations: int = 50, warmup: int = 5) -> dict[str, Any]:
    prepared = seg.prepare(seg.decode(image))
    invoke = median_ms(lambda: seg.infer(prepared.tensor), iterations, warmup)
    total = median_ms(lambda: seg.segment(image), iterations, warmup)
    return {
        "model": seg.variant.name,
        "backend": seg.backend,
        "runtime": seg.runner.runtime,
        "reason": seg.selection.reason if seg.selection else "",
        "invoke_ms": invoke,
        "end_to_end_ms": total,
        "fps": 1000.0 / total,
    }


def bench_variants(
    names: list[str] | None,
    *,
    iterations: int = 50,
    warmup: int = 5,
    models_dir: Path | None = None,
    **open_kwargs: Any,
) -> list[dict[str, Any]]:
    manifest = load_manifest(models_dir=models_dir)
    rows = []
    for name in names or list(manifest.variants):
        variant = manifest.get(name)
        seg = Segmenter.open(variant, models_dir=models_dir, **open_kwargs)
        try:
            rows.append(bench_segmenter(seg, synthetic_jpeg(variant.input.hw), iterations=iterations, warmup=warmup))
        finally:
            seg.close()
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | backend | runtime | invoke ms | end-to-end ms/iter | FPS |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['runtime']} | {r['invoke_ms']:.1f} | "
            f"{r['end_to_end_ms']:.1f} | {r['fps']:.1f} |"
        )
    reasons = {r["model"]: r["reason"] for r in rows}
    lines.append("")
    lines.extend(f"{m}: {why}" for m, why in reasons.items())
    return "\n".join(lines)
