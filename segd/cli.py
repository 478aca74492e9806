"""``segd`` command line: serve, segment, models list|pull|check|build, bench, doctor, eval."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from segd.errors import SegdError


def _common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models-dir", type=Path, default=None, help="where model files live (SEGD_MODELS_DIR)")
    p.add_argument("--mirror", default=None, help="directory or base URL to fetch models from (SEGD_MODEL_MIRROR)")
    p.add_argument(
        "--accelerator", choices=("auto", "cpu", "edgetpu"), default="auto",
        help="auto: Edge TPU when present, else CPU (default)",
    )  # fmt: skip
    p.add_argument("--device", default=None, help="Edge TPU device: usb, usb:0, pci:0, ...")
    p.add_argument("--runtime", choices=("litert", "tflite_runtime"), default=None, help="CPU runtime (default: first installed)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the interpreter")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="segment one image file")
    p.add_argument("image", type=Path)
    p.add_argument("--model", default=None, help="variant name (default: the manifest's default)")
    p.add_argument("--format", choices=("png", "json", "overlay"), default="json")
    p.add_argument("--keep-aspect", action="store_true", help="letterbox instead of stretching")
    p.add_argument("-o", "--output", type=Path, default=None, help="output file (default: stdout for json)")
    _common_model_args(p)

    p = sub.add_parser("serve", help="run the HTTP daemon")
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8080)")
    p.add_argument("--config", type=Path, default=None, help="TOML settings file (SEGD_CONFIG)")
    p.add_argument("--model", dest="models", action="append", default=None, help="variant to serve (repeatable; default: the default variant)")
    p.add_argument("--default-model", default=None)
    p.add_argument("--api-key-file", type=Path, default=None, help="file holding the API key (or SEGD_API_KEY)")
    p.add_argument("--insecure", action="store_true", default=None, help="allow a non-loopback bind without an API key")
    p.add_argument("--log-level", default=None, choices=("critical", "error", "warning", "info", "debug"))
    _common_model_args(p)

    p = sub.add_parser("bench", help="latency per variant at 513x513 (ms/iter, FPS) on this machine")
    p.add_argument("--model", action="append", default=None, help="variant(s) (default: all)")
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    _common_model_args(p)

    models = sub.add_parser("models", help="list, pull, check or build models").add_subparsers(dest="models_command", required=True)
    p = models.add_parser("list", help="variants in the manifest and whether their files are present")
    p.add_argument("--models-dir", type=Path, default=None)
    p.add_argument("--json", action="store_true")
    p = models.add_parser("pull", help="fetch model files (sha256-checked, atomic)")
    p.add_argument("names", nargs="*", help="variants (default: the default variant; 'all' for every one)")
    p.add_argument("--models-dir", type=Path, default=None)
    p.add_argument("--mirror", default=None, help="directory or base URL (default SEGD_MODEL_MIRROR, then the manifest URLs)")
    p.add_argument("--force", action="store_true", help="fetch again even if present")
    p.add_argument("--cpu-only", action="store_true", help="skip the Edge TPU files")
    p = models.add_parser("check", help="static Edge TPU op-mapping report for a .tflite file")
    p.add_argument("file", type=Path)
    p.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = COMMANDS[args.command if args.command != "models" else f"models {args.models_command}"]
    try:
        return handler(args)
    except SegdError as exc:
        print(f"segd: {exc.code}: {exc.detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# --- commands ------------------------------------------------------------------------------


def _open(args: argparse.Namespace, name: str | None) -> Any:
    from segd.engine import Segmenter
    from segd.variants import load_manifest

    manifest = load_manifest(models_dir=args.models_dir)
    variant = manifest.get(name)
    return Segmenter.open(
        variant, models_dir=args.models_dir, accelerator=args.accelerator, device=args.device,
        runtime=args.runtime, num_threads=args.threads, mirror=args.mirror,
    )  # fmt: skip


def cmd_segment(args: argparse.Namespace) -> int:
    from segd import encode
    from segd.engine import summary

    try:
        data = args.image.read_bytes()
    except OSError as exc:
        print(f"segd: cannot read {args.image}: {exc.strerror}", file=sys.stderr)
        return 2
    seg = _open(args, args.model)
    result = seg.segment(data, keep_aspect=args.keep_aspect, reduce=args.format != "overlay")
    labels = seg.variant.labels
    if args.format == "json":
        out = json.dumps(summary(result, seg), indent=2).encode() + b"\n"
    elif args.format == "png":
        out = encode.encode_mask_png(result.mask, labels.palette)
    else:
        fmt = "png" if args.output and args.output.suffix.lower() == ".png" else "jpeg"
        out = encode.encode_image(encode.overlay(result.image.rgb, result.mask, labels.palette), fmt)
    if args.output:
        args.output.write_bytes(out)
        print(f"{args.output}: {result.model} on {result.backend} ({seg.selection.reason})", file=sys.stderr)
    elif args.format == "json":
        sys.stdout.write(out.decode())
    else:
        print("segd: binary output needs -o FILE", file=sys.stderr)
        return 2
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from segd.variants import default_models_dir, load_manifest

    mdir = args.models_dir or default_models_dir()
    manifest = load_manifest(models_dir=args.models_dir)
    rows: list[dict[str, Any]] = []
    for name, v in manifest.variants.items():
        rows.append({
            "name": name,
            "default": name == manifest.default,
            "description": v.description,
            "classes": v.n_classes,
            "input": list(v.input.hw),
            "files": {f.name: (mdir / f.name).is_file() for f in v.files()},
        })  # fmt: skip
    if args.json:
        print(json.dumps({"models_dir": str(mdir), "variants": rows}, indent=2))
        return 0
    print(f"models dir: {mdir}")
    for r in rows:
        star = "*" if r["default"] else " "
        present = ", ".join(f"{n} [{'present' if ok else 'missing'}]" for n, ok in r["files"].items())
        print(f"{star} {r['name']:34} {r['classes']:3d} classes  {r['input'][0]}x{r['input'][1]}  {present}")
    return 0


def cmd_models_pull(args: argparse.Namespace) -> int:
    from segd.variants import default_models_dir, load_manifest, resolve_file

    manifest = load_manifest(models_dir=args.models_dir)
    names = args.names or [manifest.default]
    if names == ["all"]:
        names = list(manifest.variants)
    mdir = args.models_dir or default_models_dir()
    for name in names:
        variant = manifest.get(name)
        specs = [variant.cpu] if args.cpu_only else variant.files()
        for spec in specs:
            bar = _Progress(spec.name)
            path = resolve_file(spec, mdir, mirror=args.mirror, force=args.force, progress=bar)
            bar.done(f"{path} ok (sha256 {spec.sha256[:12]}…)")
    return 0


class _Progress:
    """A one-line progress bar on stderr (only when it is a terminal)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self.tty:
            return
        if total:
            frac = min(1.0, done / total)
            bar = "#" * int(frac * 30)
            sys.stderr.write(f"\r{self.label}: [{bar:30}] {frac * 100:5.1f}% {done / 1e6:.1f} MB")
        else:
            sys.stderr.write(f"\r{self.label}: {done / 1e6:.1f} MB")
        sys.stderr.flush()

    def done(self, message: str) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
        print(message, file=sys.stderr)


def cmd_models_check(args: argparse.Namespace) -> int:
    from coral_deeplab.tflite.checker import check_model, format_report

    try:
        data = args.file.read_bytes()
    except OSError as exc:
        print(f"segd: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    report = check_model(data)
    if args.json:
        print(json.dumps(dataclasses.asdict(report), indent=2))
    else:
        print(format_report(report))
    return 0 if report.fully_mapped else 1


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from segd.app.server import InsecureBind, serve
    from segd.app.settings import load_settings

    overrides = {
        "host": args.host, "port": args.port, "models_dir": args.models_dir, "mirror": args.mirror,
        "models": args.models, "default_model": args.default_model,
        "accelerator": args.accelerator if args.accelerator != "auto" else None,
        "device": args.device, "runtime": args.runtime, "threads": args.threads,
        "insecure": args.insecure, "log_level": args.log_level,
    }  # fmt: skip
    if args.api_key_file is not None:
        try:
            overrides["api_key"] = args.api_key_file.read_text().strip()
        except OSError as exc:
            print(f"segd: cannot read {args.api_key_file}: {exc.strerror}", file=sys.stderr)
            return 2
    config = args.config or (Path(os.environ["SEGD_CONFIG"]) if os.environ.get("SEGD_CONFIG") else None)
    try:
        settings = load_settings(config, overrides=overrides)
        serve(settings)
    except (InsecureBind, ValueError) as exc:
        print(f"segd: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from segd.bench import bench_variants, format_table

    rows = bench_variants(
        args.model, iterations=args.iterations, warmup=args.warmup, models_dir=args.models_dir,
        mirror=args.mirror, accelerator=args.accelerator, device=args.device, runtime=args.runtime,
        num_threads=args.threads,
    )  # fmt: skip
    print(format_table(rows))
    return 0


COMMANDS = {
    "segment": cmd_segment,
    "bench": cmd_bench,
    "serve": cmd_serve,
    "models list": cmd_models_list,
    "models pull": cmd_models_pull,
    "models check": cmd_models_check,
}

if __name__ == "__main__":
    sys.exit(main())
