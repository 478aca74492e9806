"""The long fuzzing campaign of the decode + preprocess path (the bounded version runs in CI as
tests/test_fuzz.py; both use the same seed corpus, mutations and property).

    python bench/fuzz.py [--cases 10000] [--random-cases 2000] [--atheris-runs 100000] [--seed N] [--write]
    python bench/fuzz.py --per-format SECONDS [--formats jpeg,png,bmp,gif,webp,tiff] [--seed N] [--write]

Two engines:

- Hypothesis, randomised (CI's run is derandomised): ``--cases`` structure-aware mutations of
  real files plus ``--random-cases`` random bytes behind each format's magic. Every case runs
  to the end (failures are counted and saved, not shrunk), so the figures are totals.
- atheris (libFuzzer), coverage-guided: segd's Python code (the header probes) is
  instrumented, so inputs that reach new branches are kept and mutated further; OpenCV's C
  decoders are exercised but not instrumented. Crashes (a non-segd exception, a signal, a
  >20 s case or >3 GB RSS) stop it with the input saved.

``--per-format`` runs atheris once per format, seeded with that format's files only (APNG
and multi-page TIFF included), each bounded in time; a crash is saved and the run continues
from the grown corpus. It calls the decode entry point in-process (the function the daemon's
decode workers run), so a native crash is seen as one instead of being absorbed by a worker.

Exit status 0 only with zero failures. ``--write`` puts the table into docs/RELIABILITY.md.
Test data (Coral's photos) from SEGD_TEST_DATA (default ../shared/coral-test-data).
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for extra in (REPO, REPO / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

DOC = REPO / "docs" / "RELIABILITY.md"
FAILURES = Path(tempfile.gettempdir()) / "segd-fuzz-failures"


def data_dir() -> Path:
    return Path(os.environ.get("SEGD_TEST_DATA", REPO.parent / "shared" / "coral-test-data"))


def run_hypothesis(cases: int, random_cases: int, seed: int) -> dict[str, Any]:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from test_fuzz import check_decode, magic_then_random, mutated_images, seed_corpus

    corpus = seed_corpus(data_dir())
    outcomes: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    slowest = [0.0]
    FAILURES.mkdir(parents=True, exist_ok=True)

    def one(blob: bytes) -> None:
        faulthandler.dump_traceback_later(60, exit=True)  # a hang becomes a visible crash
        t = time.perf_counter()
        try:
            outcomes[check_decode(blob)] += 1
        except Exception as exc:  # every failure counted and kept, the campaign goes on
            outcomes["FAILURE"] += 1
            path = FAILURES / f"case-{len(failures):04d}.bin"
            path.write_bytes(blob)
            failures.append(f"{path}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}")
        finally:
            faulthandler.cancel_dump_traceback_later()
            slowest[0] = max(slowest[0], time.perf_counter() - t)

    common = dict(deadline=None, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    t0 = time.perf_counter()

    @hypothesis_seed(seed)
    @settings(max_examples=cases, **common)  # type: ignore[arg-type]
    @given(blob=mutated_images(corpus))
    def mutated(blob: bytes) -> None:
        one(blob)

    @hypothesis_seed(seed + 1)
    @settings(max_examples=random_cases, **common)  # type: ignore[arg-type]
    @given(blob=magic_then_random())
    def random_bytes(blob: bytes) -> None:
        one(blob)

    mutated()
    n_mutated = sum(outcomes.values())
    random_bytes()
    return {
        "engine": "Hypothesis (structure-aware mutations + magic + random bytes)",
        "cases": sum(outcomes.values()),
        "mutated": n_mutated,
        "random": sum(outcomes.values()) - n_mutated,
        "outcomes": dict(outcomes),
        "failures": failures,
        "seconds": time.perf_counter() - t0,
        "slowest_ms": slowest[0] * 1000,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seed": seed,
    }


FORMATS = ("jpeg", "png", "bmp", "gif", "webp", "tiff")


def atheris_child(runs: int, seed: int, workdir: Path, formats: str = "", seconds: int = 0) -> None:
    """Runs inside a fresh interpreter: libFuzzer owns the process and exits at the end.
    ``formats``: seed only with those formats' files (comma-separated); ``seconds``: stop then."""
    import atheris

    with atheris.instrument_imports(include=["segd"]):
        import segd.preprocess  # noqa: F401
    from test_fuzz import check_decode, seed_corpus

    corpus_dir = workdir / "corpus"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    wanted = tuple(f for f in formats.split(",") if f)
    for name, blob in seed_corpus(data_dir()).items():
        if not wanted or name.split("-")[0] in wanted:
            (corpus_dir / name).write_bytes(blob)

    def test_one_input(blob: bytes) -> None:
        check_decode(blob)

    args = [sys.argv[0], str(corpus_dir), f"-runs={runs}", f"-seed={seed}", "-max_len=65536", "-timeout=20",
            "-rss_limit_mb=3072", "-print_final_stats=1", f"-artifact_prefix={workdir}/"]  # fmt: skip
    if seconds:
        args.append(f"-max_total_time={seconds}")
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()


def run_atheris(runs: int, seed: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--atheris-child", "--atheris-runs", str(runs), "--seed", str(seed), "--workdir", tmp],
            capture_output=True, text=True,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        log = proc.stderr
        artifacts = [p.name for p in Path(tmp).iterdir() if p.name.startswith(("crash-", "timeout-", "oom-", "leak-"))]
        if artifacts:
            FAILURES.mkdir(parents=True, exist_ok=True)
            for name in artifacts:
                (FAILURES / name).write_bytes((Path(tmp) / name).read_bytes())

    def stat(name: str) -> int | None:
        m = re.search(rf"stat::{name}:\s+(\d+)", log)
        return int(m.group(1)) if m else None

    cov = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", log)
    failed = proc.returncode != 0 or bool(artifacts)
    return {
        "engine": "atheris/libFuzzer (coverage-guided on segd's Python)",
        "cases": stat("number_of_executed_units") or 0,
        "outcomes": {},
        "failures": [log[-3000:]] if failed else [],
        "artifacts": artifacts,
        "seconds": seconds,
        "peak_rss_mb": stat("peak_rss_mb"),
        "coverage": {"cov": int(cov[-1][0]), "features": int(cov[-1][1]), "corpus": int(cov[-1][2])} if cov else None,
        "seed": seed,
        "returncode": proc.returncode,
    }


def run_per_format(seconds: int, seed: int, formats: tuple[str, ...]) -> list[dict[str, Any]]:
    """Coverage-guided runs, one per format, each seeded with that format's files only and
    bounded to ``seconds``. A crash stops libFuzzer: the input is saved and the run goes on
    from the grown corpus until the time is used."""
    rows = []
    for fmt in formats:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            t0 = time.perf_counter()
            cases, crashes, log, cov = 0, [], "", None
            while (left := seconds - (time.perf_counter() - t0)) > 5:
                proc = subprocess.run(
                    [sys.executable, __file__, "--atheris-child", "--atheris-runs", "-1", "--seed", str(seed),
                     "--workdir", tmp, "--formats", fmt, "--seconds", str(int(left))],
                    capture_output=True, text=True,
                )  # fmt: skip
                log = proc.stderr
                m = re.search(r"stat::number_of_executed_units:\s+(\d+)", log)
                done = re.findall(r"#(\d+)\s", log)
                cases += int(m.group(1)) if m else (int(done[-1]) if done else 0)
                found = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", log)
                cov = found[-1] if found else cov
                new = [p for p in work.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")) and p.name not in {c[0] for c in crashes}]
                for p in new:
                    FAILURES.mkdir(parents=True, exist_ok=True)
                    (FAILURES / f"{fmt}-{p.name}").write_bytes(p.read_bytes())
                    crashes.append((p.name, _crash_kind(log)))
                if proc.returncode == 0 or not new:
                    break  # time used (or libFuzzer stopped for a reason other than a finding)
                seed += 1
            rows.append({
                "format": fmt, "cases": cases, "seconds": time.perf_counter() - t0,
                "coverage": cov, "crashes": crashes, "seed": seed,
            })  # fmt: skip
            print(f"{fmt}: {cases} cases, {len(crashes)} crashes", file=sys.stderr)
    return rows


def _crash_kind(log: str) -> str:
    for pattern in (r"(Uncaught Python exception: .*)", r"==\d+== ERROR: libFuzzer: (.*)", r"(libpng error: .*)"):
        m = re.search(pattern, log)
        if m:
            return m.group(1).strip()[:120]
    return "unknown"


def report_per_format(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| format (seeds) | executions | wall s | coverage (edges / features / corpus) | crashes |",
        "|---|---:|---:|---|---|",
    ]
    for r in rows:
        cov = " / ".join(r["coverage"]) if r["coverage"] else "?"
        crashes = "; ".join(f"`{n}`: {k}" for n, k in r["crashes"]) or "0"
        lines.append(f"| {r['format']} | {r['cases']} | {r['seconds']:.0f} | {cov} | {crashes} |")
    return "\n".join(lines)


def report(results: list[dict[str, Any]]) -> str:
    lines = [
        "| engine | cases | failures | outcomes | wall s | slowest case ms | peak RSS MB |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in results:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(r["outcomes"].items()))
        if r.get("coverage"):
            c = r["coverage"]
            outcomes = f"coverage: {c['cov']} edges, {c['features']} features, corpus grew to {c['corpus']}"
        slow = f"{r['slowest_ms']:.0f}" if "slowest_ms" in r else "< 20000 (libFuzzer -timeout)"
        rss = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "?"
        lines.append(f"| {r['engine']} (seed {r['seed']}) | {r['cases']} | {len(r['failures'])} | {outcomes} | "
                     f"{r['seconds']:.0f} | {slow} | {rss} |")  # fmt: skip
    total = sum(r["cases"] for r in results)
    failures = sum(len(r["failures"]) for r in results)
    lines += ["", f"Total: {total} cases, {failures} failures (crash, non-segd exception, broken invariant, hang)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=10_000, help="Hypothesis mutated-file cases")
    p.add_argument("--random-cases", type=int, default=2_000, help="Hypothesis magic + random bytes cases")
    p.add_argument("--atheris-runs", type=int, default=100_000, help="libFuzzer executions (0: skip)")
    p.add_argument("--seed", type=int, default=int(time.time()) % 100_000)
    p.add_argument("--write", action="store_true", help="update docs/RELIABILITY.md")
    p.add_argument("--atheris-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--per-format", type=int, default=0, metavar="SECONDS",
                   help="instead: one coverage-guided atheris run per format, SECONDS each")  # fmt: skip
    p.add_argument("--formats", default=",".join(FORMATS), help="with --per-format: which formats")
    p.add_argument("--seconds", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.atheris_child:
        atheris_child(args.atheris_runs, args.seed, args.workdir, args.formats, args.seconds)
        return 0
    if args.per_format:
        rows = run_per_format(args.per_format, args.seed, tuple(args.formats.split(",")))
        text = report_per_format(rows)
        print(text)
        if args.write:
            from bench.report import write_section

            cmd = f"`nice -n 10 .venv/bin/python bench/fuzz.py --per-format {args.per_format} --seed {args.seed}`"
            write_section("fuzz-formats", text + f"\n\nReproduce: {cmd}", doc=DOC)
        return 0 if all(not r["crashes"] for r in rows) else 1
    results = [run_hypothesis(args.cases, args.random_cases, args.seed)]
    if args.atheris_runs:
        try:
            import atheris  # noqa: F401
        except ImportError:
            print("atheris not installed: skipping the coverage-guided run", file=sys.stderr)
        else:
            results.append(run_atheris(args.atheris_runs, args.seed))
    text = report(results)
    print(text)
    for r in results:
        for f in r["failures"][:5]:
            print("\n" + f, file=sys.stderr)
    if args.write:
        from bench.report import write_section

        cmd = f"`.venv/bin/python bench/fuzz.py --cases {args.cases} --random-cases {args.random_cases} " \
              f"--atheris-runs {args.atheris_runs} --seed {args.seed}`"  # fmt: skip
        write_section("fuzz", text + f"\n\nReproduce: {cmd}", doc=DOC)
    return 0 if all(not r["failures"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
