"""The long soak run (tests/test_soak.py is its bounded CI version, with the same request mix
and checks): a real daemon on 127.0.0.1, mixed formats, sizes, models and answer formats with
about one bad input in eight, from concurrent clients; every answer checked (status; mask equal
to the in-process engine's), RSS / open fds / threads of the daemon sampled from /proc.

    python bench/soak.py [--requests 10000] [--clients 4] [--cityscapes] [--write]

Models from SEGD_MODELS_DIR (filled from SEGD_TEST_DATA, Coral's files, when missing). Exit
status 0 only with zero lost, zero wrong answers, zero 5xx and RSS growth under 5 %.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for extra in (REPO, REPO / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from daemon import start_daemon  # tests/daemon.py starts the real server
from test_soak import DM05, DM1, build_items, proc_stats, run_soak, summary

from segd.engine import Segmenter
from segd.variants import default_models_dir, load_manifest, resolve_file

DOC = REPO / "docs" / "RELIABILITY.md"
CITY = "deeplab_edgetpu_slim_cityscapes"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--cityscapes", action="store_true", help="serve the Cityscapes model too (a third variant)")
    p.add_argument("--write", action="store_true", help="update docs/RELIABILITY.md")
    args = p.parse_args(argv)

    data_dir = Path(os.environ.get("SEGD_TEST_DATA", REPO.parent / "shared" / "coral-test-data"))
    models_dir = Path(os.environ.get("SEGD_MODELS_DIR") or default_models_dir())
    manifest = load_manifest(models_dir=models_dir)
    names = [DM05, DM1] + ([CITY] if args.cityscapes else [])
    for n in names:
        resolve_file(manifest.get(n).cpu, models_dir, mirror=str(data_dir) if data_dir.is_dir() else None)
    engines = {n: Segmenter.open(manifest.get(n), models_dir=models_dir, accelerator="cpu") for n in (DM05, DM1)}
    items = build_items(data_dir, engines)
    for e in engines.values():
        e.close()

    samples: list[tuple[int, dict[str, int]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_args = [a for n in names for a in ("--model", n)]
        d = start_daemon(Path(tmp), models_dir, *model_args, "--accelerator", "cpu", env={"SEGD_QUEUE_SIZE": "64"})
        try:
            pid = d.proc.pid
            start = proc_stats(pid)
            w = run_soak(d.url, items, args.warmup, args.clients)
            time.sleep(1)
            before = proc_stats(pid)
            step = max(1, args.requests // 10)

            def progress(done: int) -> None:
                if done % step == 0:
                    samples.append((done, proc_stats(pid)))

            r = run_soak(d.url, items, args.requests, args.clients, progress=progress)
            time.sleep(1)
            after = proc_stats(pid)
            traceback_in_log = "Traceback" in d.output()
        finally:
            d.stop()

    s = summary(before, after, r)
    g = s["growth"]
    lines = [
        f"Daemon serving {', '.join(f'`{n}`' for n in names)} on the CPU, {args.clients} concurrent keep-alive "
        f"clients, {len(items)} distinct requests (JPEG/PNG/WebP/BMP/TIFF/GIF from 96x72 to 1024x686, raw and "
        f"multipart, mask PNG / JSON / overlay, letterboxed or stretched; {sum(i.status != 200 for i in items)} "
        "kinds of bad input) in a fixed shuffled order.",
        "",
        "| | value |",
        "|---|---:|",
        f"| requests (after {args.warmup} warm-up) | {s['requests']} |",
        f"| answered | {s['answered']} |",
        f"| lost (no answer) | {s['lost']} |",
        f"| wrong status | {s['wrong_status']} |",
        f"| wrong mask / class areas (vs the in-process engine) | {s['wrong_masks']} |",
        f"| 5xx | {s['5xx']} |",
        f"| statuses | {', '.join(f'{k}: {v}' for k, v in s['statuses'].items())} |",
        f"| wall time, throughput | {s['seconds']:.0f} s, {s['requests'] / s['seconds']:.1f} req/s |",
        f"| latency p50 / p99 | {s['p50_ms']:.0f} / {s['p99_ms']:.0f} ms |",
        f"| RSS at start / after warm-up / at end | {start['rss_kb'] / 1024:.1f} / {before['rss_kb'] / 1024:.1f} / "
        f"{after['rss_kb'] / 1024:.1f} MB ({g['rss_pct']:+.2f} % over the run) |",
        f"| open fds after warm-up / at end | {before['fds']} / {after['fds']} |",
        f"| threads after warm-up / at end | {before['threads']} / {after['threads']} |",
        f"| traceback in the daemon log | {'yes' if traceback_in_log else 'no'} |",
        "",
        "RSS during the run (MB): "
        + ", ".join(f"{n}: {st['rss_kb'] / 1024:.1f}" for n, st in samples),
    ]
    ok = (s["lost"] == 0 and s["wrong_status"] == 0 and s["wrong_masks"] == 0 and s["5xx"] == 0
          and g["rss_pct"] < 5 and not traceback_in_log and not (w.lost or w.wrong_status or w.wrong_body))  # fmt: skip
    cmd = f"`.venv/bin/python bench/soak.py --requests {args.requests} --clients {args.clients}" \
          + (" --cityscapes" if args.cityscapes else "") + "`"  # fmt: skip
    lines += ["", f"Result: {'PASS' if ok else 'FAIL'}. Reproduce: {cmd}"]
    text = "\n".join(lines)
    from bench.report import publish

    publish("soak", text, args.write, doc=DOC)
    if not ok:
        for problem in (r.lost + r.wrong_status + r.wrong_body)[:10]:
            print(problem, file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
