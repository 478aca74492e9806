"""``segd bench``: the original coral-deeplab latency table (ms/iter and FPS per variant at
513x513), measured on whatever backend this machine has."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segd.engine import Segmenter
from segd.errors import SegdError
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


#: The original coral-deeplab README's "Latency" table (github.com/xadrianzetx/coral-deeplab,
#: README.md at e485684): 513x513 input, Raspbian 10 (buster), Edge TPU, ms/iter on
#: (Raspberry Pi 3B+ / Cortex-A53, Raspberry Pi 4 / Cortex-A72). It lists no v3+ rows (None).
#: Not reproduced where segd is developed: no Pi, no Edge TPU, and the files live on Google Drive.
ORIGINAL_TABLE: dict[str, tuple[float, float] | None] = {
    "deeplabv3_mnv2_pascal": (368.6, 147.5),  # "DeepLab v3 (google)", MobileNet v2, 1.0
    "coral_deeplab_v3_dm1": (143.0, 43.7),
    "coral_deeplab_v3_dm05": (129.4, 32.6),
    "coral_deeplab_v3plus_dm1": None,
    "coral_deeplab_v3plus_dm05": None,
}


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
        "runs": seg.variant.name,  # the variant whose file ran (a CPU fallback is another network)
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
        try:
            seg = Segmenter.open(variant, models_dir=models_dir, **open_kwargs)
        except SegdError as exc:
            # A variant whose file is missing (e.g. the original coral-deeplab's, from Google
            # Drive) gets a row saying why; the others are still measured.
            rows.append({"model": name, "runs": "-", "backend": "-", "runtime": "-", "reason": f"not measured: {exc.detail}",
                         "invoke_ms": None, "end_to_end_ms": None, "fps": None})  # fmt: skip
            continue
        try:
            row = bench_segmenter(seg, synthetic_jpeg(seg.input_hw), iterations=iterations, warmup=warmup,
                                  progress=progress)  # fmt: skip
            row["model"] = name  # the requested variant (a CPU fallback is named in the reason)
            rows.append(row)
        finally:
            seg.close()
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | backend | runtime | invoke ms | end-to-end ms/iter | FPS |",
        "|---|---|---|---:|---:|---:|",
    ]
    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    for r in rows:
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['runtime']} | {num(r['invoke_ms'])} | "
            f"{num(r['end_to_end_ms'])} | {num(r['fps'])} |"
        )
    reasons = {r["model"]: r["reason"] for r in rows}
    lines.append("")
    lines.extend(f"{m}: {why}" for m, why in reasons.items())
    return "\n".join(lines)


def format_original_table(rows: list[dict[str, Any]]) -> str:
    """This machine's rows next to the original coral-deeplab README's figures
    (:data:`ORIGINAL_TABLE`). A row that ran another network (the CPU fallback of an
    Edge-TPU-only file) says so in "runs": it does not measure the artifact."""

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    lines = [
        "| model | runs | backend | invoke ms | end-to-end ms/iter | original RPi4 ms/iter | original RPi3B+ ms/iter |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        published = ORIGINAL_TABLE.get(r["model"])
        pi3, pi4 = published if published is not None else (None, None)
        runs = r["runs"] if r["runs"] in ("-", r["model"]) else f"{r['runs']} (fallback, not this file)"
        lines.append(
            f"| {r['model']} | {runs} | {r['backend']} | {num(r['invoke_ms'])} | {num(r['end_to_end_ms'])} "
            f"| {num(pi4)} | {num(pi3)} |"
        )
    lines.append("")
    lines.append("original: github.com/xadrianzetx/coral-deeplab README, 513x513, Raspbian 10, Edge TPU")
    lines.extend(f"{r['model']}: {r['reason']}" for r in rows)
    return "\n".join(lines)
