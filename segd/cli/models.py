"""``segd models list|pull|check|build``: the model commands (``build`` loads coral_deeplab,
and with it TensorFlow, only when it runs)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from segd.cli.common import _models_dir, _settings
from segd.errors import SegdError


def cmd_models_list(args: argparse.Namespace) -> int:
    from segd.variants import load_manifest

    mdir = _models_dir(_settings(args))
    manifest = load_manifest(models_dir=mdir)
    rows: list[dict[str, Any]] = []
    for name, v in manifest.variants.items():
        rows.append({
            "name": name,
            "default": name == manifest.default,
            "description": v.description,
            "classes": v.n_classes,
            "input": list(v.input.hw) if v.input.shape else None,  # None: read from the file
            "files": {f.name: (mdir / f.name).is_file() for f in v.files()},
        })  # fmt: skip
    if args.json:
        print(json.dumps({"models_dir": str(mdir), "variants": rows}, indent=2))
        return 0
    print(f"models dir: {mdir}")
    for r in rows:
        star = "*" if r["default"] else " "
        present = ", ".join(f"{n} [{'present' if ok else 'missing'}]" for n, ok in r["files"].items())
        size = f"{r['input'][0]}x{r['input'][1]}" if r["input"] else "from file"
        print(f"{star} {r['name']:34} {r['classes']:3d} classes  {size}  {present}")
    return 0


def cmd_models_pull(args: argparse.Namespace) -> int:
    from segd.progress import Progress
    from segd.variants import load_manifest, resolve_file

    s = _settings(args)
    mdir = _models_dir(s)
    manifest = load_manifest(models_dir=mdir)
    names = args.names or [manifest.default]
    if names == ["all"]:
        names = list(manifest.variants)
    failed = []
    for name in names:
        variant = manifest.get(name)
        served = variant.cpu_variant()
        pairs: list[tuple[Any, Any]] = [(served, served.cpu)] if args.cpu_only else [(variant, f) for f in variant.files()]
        if not args.cpu_only and served is not variant:
            pairs.append((served, served.cpu))  # what serves it without an Edge TPU
        for owner, spec in pairs:
            assert spec is not None
            bar = Progress(spec.name, unit="MB")
            try:
                path = resolve_file(spec, mdir, mirror=s.mirror, force=args.force, progress=bar, gdrive_url=s.gdrive_url)
                bar.close(f"{path} ok ({_pulled_facts(owner, spec, path)})")
            except SegdError as exc:
                # One variant whose file never arrives must not stop the others.
                bar.close(f"{name}: {spec.name} NOT pulled: {exc.detail}")
                failed.append(name)
    if failed:
        print(f"segd: not pulled: {', '.join(dict.fromkeys(failed))}", file=sys.stderr)
        return 2
    return 0


def _pulled_facts(variant: Any, spec: Any, path: Path) -> str:
    """How the file was verified and, for entries that leave them out, its tensors."""
    from segd.engine import settle
    from segd.pins import pinned_sha256

    if spec.sha256:
        facts = f"sha256 {spec.sha256[:12]}…"
    else:
        facts = f"publisher's md5 {spec.md5} checked once, sha256 pinned {(pinned_sha256(path.parent, spec.name) or '?')[:12]}…"
    if variant.tensors_from_file:
        v, _ = settle(variant, spec, path)
        facts += (f"; read from the file: input {v.input.hw[0]}x{v.input.hw[1]} {v.input.dtype}, logits "
                  f"{v.output.shape[1]}x{v.output.shape[2]}x{v.output.shape[3]} at stride {v.output.stride}")  # fmt: skip
    return facts


def cmd_models_check(args: argparse.Namespace) -> int:
    from segd.tflite.checker import check_model, format_report

    try:
        data = args.file.read_bytes()
    except OSError as exc:
        print(f"segd: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    if args.file.suffix.lower() != ".tflite" and data[4:8] != b"TFL3":
        print(f"segd: {args.file} is not a .tflite model (no TFLite file identifier)", file=sys.stderr)
        return 2
    try:
        report = check_model(data)
    except ValueError as exc:
        print(f"segd: {args.file}: {exc}", file=sys.stderr)
        return 2
    compiled = [r for r in report.rows if r.op == "edgetpu-custom-op"]
    if compiled and not args.json:
        cpu = [f"{r.index} {r.op}" for r in report.rows if r.op != "edgetpu-custom-op"]
        print(f"{args.file} is already compiled for the Edge TPU: {len(compiled)} edgetpu-custom-op "
              f"(the compiled part) and {len(cpu)} ops on the CPU{': ' + ', '.join(cpu) if cpu else ''}. "
              "The op-mapping check reads the model before compiling (the file without _edgetpu).")  # fmt: skip
        return 0
    if args.json:
        print(json.dumps(dataclasses.asdict(report), indent=2))
    else:
        print(format_report(report))
    return 0 if report.fully_mapped else 1


def cmd_models_build(args: argparse.Namespace) -> int:
    if args.calibration is None:
        print(
            "segd: models build needs --calibration DIR: int8 quantization takes its value ranges from "
            "real images, so point it at a directory of photos like the ones you will segment "
            "(a few dozen is plenty)",
            file=sys.stderr,
        )  # fmt: skip
        return 2
    if not args.calibration.is_dir():
        print(f"segd: --calibration {args.calibration} is not a directory", file=sys.stderr)
        return 2
    from coral_deeplab import zoo

    try:
        zoo.require_tensorflow("segd models build")
    except ImportError as exc:
        print(f"segd: {exc}", file=sys.stderr)
        return 2

    if args.variant == "v3plus" and args.weights == "google-tflite":
        print("segd: warning: v3+ gets pretrained weights for the encoder only; its decoder and logits "
              "are untrained, so its masks are meaningless until you train it", file=sys.stderr)  # fmt: skip
    try:
        built, result = zoo.build(
            variant=args.variant, alpha=args.alpha, input_size=args.input_size, calibration=args.calibration,
            name=args.name, models_dir=args.models_dir, mirror=args.mirror, num_calibration=args.num_calibration,
            compile=not args.no_compile, cache=False if args.no_cache else None,
            weights_source=args.weights,
        )  # fmt: skip
    except ValueError as exc:  # keras/TensorFlow's own argument errors; ours are SegdErrors (main)
        print(f"segd: {exc}", file=sys.stderr)
        return 2
    print(f"Edge TPU check: {zoo.describe_report(result.report)}", file=sys.stderr)
    how = f"cached export {built.cache_path}" if built.from_cache else f"exported ({built.n_calibration} calibration images)"
    print(f"{how}; {len(built.tflite)} bytes", file=sys.stderr)
    if result.edgetpu_path is not None and result.compile_log is not None:
        log = result.compile_log
        print(f"compiled: {result.edgetpu_path} ({log.ops_mapped}/{log.ops_total} ops on the Edge TPU)", file=sys.stderr)
    else:
        print(f"no Edge TPU file: {result.compile_skipped_reason}", file=sys.stderr)
    print(f"published {result.manifest_path.stem}: {result.cpu_path}, {result.manifest_path}", file=sys.stderr)
    print(result.manifest_path.stem)
    return 0
