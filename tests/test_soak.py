"""Soak: a real daemon on loopback answers a long stream of mixed requests — several formats and
sizes, two models, mask PNG / JSON / overlay answers, about one bad input in eight — from
concurrent clients. Nothing is lost (every request gets an answer), nothing is wrong (every
answer has the expected status; every mask equals the in-process engine's mask for that image
and model), and the process does not grow: RSS, open file descriptors and threads measured
from /proc after a warm-up and at the end.

CI: ``SEGD_SOAK_REQUESTS`` requests (default 2000). ``bench/soak.py`` runs 10,000+ and writes
the figures into docs/RELIABILITY.md.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from conftest import read_mask_png
from daemon import Daemon, start_daemon

from segd.engine import Segmenter
from segd.variants import Manifest

DM1 = "deeplabv3_mnv2_pascal"
DM05 = "deeplabv3_mnv2_dm05_pascal"
REQUESTS = int(os.environ.get("SEGD_SOAK_REQUESTS", "2000"))
CLIENTS = 4


@dataclass(frozen=True)
class Item:
    """One kind of request of the mix and the answer it must get."""

    name: str
    body: bytes
    content_type: str
    params: dict[str, str]
    status: int
    mask: np.ndarray | None = None  # expected mask (format png) or class pixel counts (json)
    counts: dict[int, int] | None = None
    multipart: bool = False


def _encode(rgb: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return bytes(buf.tobytes())


def build_items(data_dir: Path, engines: dict[str, Segmenter]) -> list[Item]:
    """The request mix; expected masks come from the in-process engines (the oracle)."""
    photos = {}
    for name in ("bird.bmp", "cat.bmp"):
        photos[name.split(".")[0]] = cv2.cvtColor(cv2.imread(str(data_dir / name)), cv2.COLOR_BGR2RGB)
    good: list[tuple[str, bytes, str]] = []
    for photo, rgb in photos.items():
        for (w, h), ext, ctype in [((160, 107), ".jpg", "image/jpeg"), ((240, 180), ".png", "image/png"),
                                   ((200, 150), ".webp", "image/webp"), ((120, 90), ".bmp", "image/bmp"),
                                   ((96, 72), ".tiff", "image/tiff"), ((128, 96), ".gif", "image/gif"),
                                   ((1024, 686), ".jpg", "image/jpeg")]:  # fmt: skip
            small = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
            good.append((f"{photo}-{w}x{h}{ext}", _encode(small, ext), ctype))
    items: list[Item] = []
    for i, (name, body, ctype) in enumerate(good):
        model = DM1 if i % 3 == 0 else DM05
        keep = "true" if i % 4 == 1 else "false"
        result = engines[model].segment(body, keep_aspect=keep == "true", reduce=True)
        params = {"model": model, "keep_aspect": keep}
        items.append(Item(f"{name} {model} png", body, ctype, params, 200, mask=result.mask, multipart=i % 2 == 0))
        counts = {int(c): int(n) for c, n in enumerate(result.counts) if n}
        items.append(Item(f"{name} {model} json", body, ctype, {**params, "format": "json"}, 200, counts=counts))
    overlay_src = good[0]
    items.append(Item("overlay", overlay_src[1], overlay_src[2], {"model": DM05, "format": "overlay"}, 200))
    jpeg = good[0][1]
    bomb = bytearray(jpeg)
    sof = bomb.find(b"\xff\xc0")
    bomb[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") * 2
    bad = [
        Item("truncated jpeg", jpeg[: len(jpeg) // 2], "image/jpeg", {}, 400),
        Item("not an image", b"hello world" * 10, "image/png", {}, 415),
        Item("text/plain", jpeg, "text/plain", {}, 415),
        Item("bomb header", bytes(bomb), "image/jpeg", {}, 413),
        Item("unknown model", jpeg, "image/jpeg", {"model": "nope"}, 404),
        Item("bad format", jpeg, "image/jpeg", {"format": "gif"}, 422),
        Item("empty", b"", "image/jpeg", {}, 400),
    ]
    # about one request in eight is bad: repeat the good ones
    reps = max(1, round(len(bad) * 7 / len(items)))
    return items * reps + bad


@dataclass
class SoakResult:
    sent: int = 0
    answered: int = 0
    lost: list[str] = field(default_factory=list)  # no answer (connection error, timeout)
    wrong_status: list[str] = field(default_factory=list)
    wrong_body: list[str] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0


def check_answer(item: Item, r: httpx.Response) -> str | None:
    """None when the answer is right, else what is wrong."""
    if r.status_code != item.status:
        return f"status {r.status_code} != {item.status}: {r.text[:200]}"
    if item.status != 200:
        body = r.json()
        return None if set(body) == {"error", "detail"} else f"error body {body}"
    if item.mask is not None:
        got = read_mask_png(r.content)
        if got.shape != item.mask.shape or not np.array_equal(got, item.mask):
            return f"mask differs from the engine's ({int((got != item.mask).sum()) if got.shape == item.mask.shape else got.shape} pixels)"
    if item.counts is not None:
        got_counts = {c["id"]: c["pixels"] for c in r.json()["classes"]}
        if got_counts != item.counts:
            return f"class areas {got_counts} != {item.counts}"
    if item.params.get("format") == "overlay" and not r.content.startswith(b"\xff\xd8"):
        return "overlay is not a JPEG"
    return None


def run_soak(url: str, items: list[Item], total: int, clients: int = CLIENTS,
             headers: dict[str, str] | None = None, progress: Callable[[int], None] | None = None) -> SoakResult:  # fmt: skip
    """Send ``total`` requests (items in a fixed shuffled order) from ``clients`` threads, each
    with its own keep-alive connection; check every answer."""
    order = np.random.default_rng(1234).permutation(np.resize(np.arange(len(items)), total))
    result = SoakResult(sent=total)
    lock = threading.Lock()
    counter = iter(range(total))

    def client(_: int) -> None:
        with httpx.Client(base_url=url, timeout=120, headers=headers or {}) as c:
            while True:
                with lock:
                    k = next(counter, None)
                if k is None:
                    return
                item = items[int(order[k])]
                t = time.perf_counter()
                try:
                    if item.multipart:
                        r = c.post("/segment", params=item.params, files={"image": ("img", item.body, item.content_type)})
                    else:
                        r = c.post("/segment", params=item.params, content=item.body,
                                   headers={"content-type": item.content_type})  # fmt: skip
                except httpx.HTTPError as exc:
                    with lock:
                        result.lost.append(f"{item.name}: {type(exc).__name__}: {exc}")
                    continue
                dt = (time.perf_counter() - t) * 1000
                problem = check_answer(item, r)
                with lock:
                    result.answered += 1
                    result.statuses[r.status_code] += 1
                    result.latencies_ms.append(dt)
                    if problem and r.status_code != item.status:
                        result.wrong_status.append(f"{item.name}: {problem}")
                    elif problem:
                        result.wrong_body.append(f"{item.name}: {problem}")
                    done = result.answered
                if progress is not None:
                    progress(done)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    result.seconds = time.perf_counter() - t0
    return result


def proc_stats(pid: int) -> dict[str, int]:
    """RSS (kB) and threads from /proc/<pid>/status, open descriptors from /proc/<pid>/fd;
    summed over the process and its children (an Edge TPU worker)."""
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    rss = threads = fds = 0
    for p in pids:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{p}/status").read_text().splitlines() if ":" in line)
        rss += int(fields["VmRSS"].split()[0])
        threads += int(fields["Threads"])
        fds += len(os.listdir(f"/proc/{p}/fd"))
    return {"rss_kb": rss, "threads": threads, "fds": fds}


def growth(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    return {
        "rss_pct": 100.0 * (after["rss_kb"] - before["rss_kb"]) / before["rss_kb"],
        "threads": after["threads"] - before["threads"],
        "fds": after["fds"] - before["fds"],
    }


# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("soak"), models_dir, "--model", DM05, "--model", DM1,
                     "--accelerator", "cpu", env={"SEGD_QUEUE_SIZE": "32"})  # fmt: skip
    yield d
    d.stop()


@pytest.fixture(scope="module")
def items(manifest: Manifest, models_dir: Path, test_data: Path) -> list[Item]:
    engines = {n: Segmenter.open(manifest.get(n), models_dir=models_dir, accelerator="cpu") for n in (DM1, DM05)}
    out = build_items(test_data, engines)
    for e in engines.values():
        e.close()
    return out


def test_soak_loses_nothing_answers_right_and_does_not_grow(daemon: Daemon, items: list[Item]) -> None:
    warmup = max(200, REQUESTS // 10)  # thread pools, allocator arenas and caches fill up first
    w = run_soak(daemon.url, items, warmup)
    assert not (w.lost or w.wrong_status or w.wrong_body), (w.lost + w.wrong_status + w.wrong_body)[:5]
    time.sleep(1)
    before = proc_stats(daemon.proc.pid)
    r = run_soak(daemon.url, items, REQUESTS)
    time.sleep(1)
    after = proc_stats(daemon.proc.pid)
    g = growth(before, after)
    print(f"\nsoak: {r.answered}/{r.sent} answered in {r.seconds:.1f} s, statuses {dict(r.statuses)}, "
          f"p50 {np.percentile(r.latencies_ms, 50):.0f} ms, p99 {np.percentile(r.latencies_ms, 99):.0f} ms; "
          f"RSS {before['rss_kb']} -> {after['rss_kb']} kB ({g['rss_pct']:+.2f}%), "
          f"fds {before['fds']} -> {after['fds']}, threads {before['threads']} -> {after['threads']}")  # fmt: skip
    assert r.lost == [] and r.answered == REQUESTS
    assert r.wrong_status == [], r.wrong_status[:5]
    assert r.wrong_body == [], r.wrong_body[:5]
    assert not any(s >= 500 for s in r.statuses)
    assert {200, 400, 404, 413, 415, 422} <= set(r.statuses)
    assert g["fds"] <= 2 and g["threads"] <= 2, (before, after)
    assert g["rss_pct"] < 10, (before, after)
    assert "Traceback" not in daemon.output()


def test_the_mix_has_every_format_both_models_and_bad_inputs(items: list[Item]) -> None:
    names = " ".join(i.name for i in items)
    for ext in (".jpg", ".png", ".webp", ".bmp", ".tiff", ".gif"):
        assert ext in names
    assert DM1 in names and DM05 in names
    bad = sum(i.status != 200 for i in items)
    assert 0.08 < bad / len(items) < 0.2
    assert any(i.multipart for i in items) and any(not i.multipart for i in items)


def summary(before: dict[str, int], after: dict[str, int], r: SoakResult) -> dict[str, Any]:
    """The figures bench/soak.py reports."""
    return {
        "requests": r.sent, "answered": r.answered, "lost": len(r.lost), "wrong_status": len(r.wrong_status),
        "wrong_masks": len(r.wrong_body), "5xx": sum(n for s, n in r.statuses.items() if s >= 500),
        "statuses": dict(sorted(r.statuses.items())), "seconds": r.seconds,
        "p50_ms": float(np.percentile(r.latencies_ms, 50)), "p99_ms": float(np.percentile(r.latencies_ms, 99)),
        "before": before, "after": after, "growth": growth(before, after),
    }  # fmt: skip
