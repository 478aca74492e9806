"""``segd bench``: the original coral-deeplab latency table (ms/iter and FPS per variant at
513x513), measured on whatever backend this machine has."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segd.engine import Segmenter
from segd.synthetic import synthetic_jpeg
from segd.variants import load_manifest

Progress = Callable[..., None]  # progress(done, total, **notes): segd.progress.Progress


def median_ms(fn: Any, iterations: int, warmup: int, progress: Callable[[int], None] | None = None) -> float:
    """Median wall time of ``fn`` in ms over ``iterations`` runs, after ``warmup`` runs;
    ``progress(runs so far)`` after each run."""
    for i in range(warmup):
        fn()
        if progress:
            progress(i + 1)
    times = []
    for i in range(iterations):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000.0)
        if progress:
            progress(warmup + i + 1)
    return statistics.median(times)


def bench_segmenter(
    seg: Segmenter, image: bytes, *, iterations: int = 50, warmup: int = 5, progress: Progress | None = None
) -> dict[str, Any]:
    prepared = seg.prepare(seg.decode(image))
    runs = 2 * (warmup + iterations)
    name = seg.variant.name

    def step(offset: int, what: str) -> Callable[[int], None] | None:
        return (lambda n: progress(offset + n, runs, model=name, stage=what)) if progress else None

    invoke = median_ms(lambda: seg.infer(prepared.tensor), iterations, warmup, step(0, "invoke"))
    total = median_ms(lambda: seg.segment(image), iterations, warmup, step(warmup + iterations, "end-to-end"))
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
    progress: Progress | None = None,
    **open_kwargs: Any,
) -> list[dict[str, Any]]:
    manifest = load_manifest(models_dir=models_dir)
    rows = []
    for name in names or list(manifest.variants):
        variant = manifest.get(name)
        seg = Segmenter.open(variant, models_dir=models_dir, **open_kwargs)
        try:
            rows.append(bench_segmenter(seg, synthetic_jpeg(variant.input.hw), iterations=iterations, warmup=warmup,
                                        progress=progress))  # fmt: skip
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
