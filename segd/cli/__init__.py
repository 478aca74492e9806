"""``segd`` command line: serve, segment, models list|pull|check|build, bench, doctor, eval, train.

Exit codes: 0 success; 1 the command ran but its answer is "no" (``models check``: not every op
maps to the Edge TPU; ``doctor``: something to fix); 2 bad usage or input (unreadable file, bad
image, unknown model, bad settings), also when any of several images failed; 130 interrupted
(Ctrl-C); 141 the reader of stdout went away (``segd ... | head``), as for a shell tool killed by
SIGPIPE.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from segd import __version__
from segd.cli.common import _settings
from segd.cli.models import cmd_models_build, cmd_models_check, cmd_models_list, cmd_models_pull
from segd.errors import SegdError
from segd.geometry import SUPPORTED_ALPHAS
from segd.settings import ACCELERATORS

CPU_RUNTIMES = ("litert", "tflite_runtime")
"""The keys of ``segd.runtime.tpu_worker.RUNTIMES``, spelled out: importing the runtime package
loads numpy, which ``segd --help``, doctor and install-service do not need (a test keeps the two equal)."""


def _common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models-dir", type=Path, default=None, help="where model files live (SEGD_MODELS_DIR)")
    p.add_argument("--mirror", default=None, help="directory or base URL to fetch models from (SEGD_MODEL_MIRROR)")
    p.add_argument(
        "--accelerator", choices=ACCELERATORS, default="auto",
        help="auto: Edge TPU when present, else CPU (default)",
    )  # fmt: skip
    p.add_argument("--device", default=None, help="Edge TPU device: usb, usb:0, pci:0, ...")
    p.add_argument("--runtime", choices=CPU_RUNTIMES, default=None, help="CPU runtime (default: first installed)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the interpreter")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"segd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "segment", help="segment image files, directories of images, or stdin",
        description="Segment each IMAGE (a file, a directory: its images, or - for stdin). One image: "
        "the answer goes to -o FILE, or to stdout for json and with -o -. Several: json is printed as "
        "one JSON document per line (with its 'file'), or every answer is written into -o DIR "
        "(<name>.json / .png / .jpg). A progress bar is shown on a terminal.",
    )  # fmt: skip
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--model", default=None, help="variant name (default: the manifest's default)")
    p.add_argument("--format", choices=("png", "json", "overlay"), default="json")
    p.add_argument("--keep-aspect", action="store_true", help="letterbox instead of stretching")
    p.add_argument("-o", "--output", default=None, help="output file, - for stdout, or a directory for several images")
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
    p.add_argument("--original", action="store_true",
                   help="the original coral-deeplab latency table: its compiled files and Google's DM1, next to its published figures")  # fmt: skip
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
    p = models.add_parser(
        "build", help="pretrained PASCAL VOC DeepLab -> int8 export -> check -> compile -> publish (needs TensorFlow)",
        description="Import Google's PASCAL VOC weights into coral_deeplab's Edge-TPU-clean DeepLab, export it "
        "to int8 calibrated on your images, check the Edge TPU op mapping, compile it when edgetpu_compiler is "
        "on PATH, and publish it as a variant in the models dir (<name>.tflite + <name>.toml).",
    )  # fmt: skip
    p.add_argument("--variant", choices=("v3", "v3plus"), default="v3", help="v3+: only the encoder is pretrained (from Google's files)")
    p.add_argument("--weights", choices=("google-tflite", "coral-deeplab"), default="google-tflite",
                   help="PASCAL VOC weights: Google's Coral model (default) or the original coral-deeplab's trained .h5 (v3 and v3+)")  # fmt: skip
    p.add_argument("--alpha", type=float, choices=SUPPORTED_ALPHAS, default=1.0, help="MobileNetV2 depth multiplier")
    p.add_argument("--input-size", type=int, default=513, help="square input side, 16k+1 (e.g. 513, 321, 257)")
    p.add_argument("--name", default=None, help="variant name (default cdl_<variant>_dm<alpha>_<size>_pascal)")
    p.add_argument("--calibration", type=Path, default=None, help="directory of real photos like the ones you will segment (required)")
    p.add_argument("--num-calibration", type=int, default=32, help="use at most this many calibration images")
    p.add_argument("--models-dir", type=Path, default=None)
    p.add_argument("--mirror", default=None, help="where to fetch Google's source model from (SEGD_MODEL_MIRROR)")
    p.add_argument("--no-compile", action="store_true", help="do not run edgetpu_compiler even if it is on PATH")
    p.add_argument("--no-cache", action="store_true", help="export again even if an identical export is cached")

    p = sub.add_parser(
        "eval", help="mIoU and per-class IoU of a variant, .tflite file or running daemon on a labelled dataset",
        description="Evaluate on a PASCAL VOC layout (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/"
        "<split>.txt) or a folder pair images/ + masks/; mask value 255 is ignored. Writes confusion.csv, "
        "iou.png and metrics.json to --out.",
    )  # fmt: skip
    p.add_argument("--data", type=Path, required=True, help="dataset directory")
    p.add_argument("--model", default=None, help="variant name or .tflite file (with --url: a served variant)")
    p.add_argument("--split", default=None, help="split list to use (default: val for VOC, every image for a folder pair)")
    p.add_argument("--url", default=None, help="evaluate a running daemon, e.g. http://127.0.0.1:8080")
    p.add_argument("--api-key", default=None, help="API key for --url (or --api-key-file)")
    p.add_argument("--api-key-file", type=Path, default=None)
    p.add_argument("--keep-aspect", action="store_true", help="letterbox instead of stretching")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--out", type=Path, default=None, help="report directory (default ./eval-<model>)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _common_model_args(p)

    # argparse only: coral_deeplab.train loads TensorFlow when a training starts.
    from coral_deeplab import train as cdl_train

    p = sub.add_parser("train", help="fine-tune or train DeepLab on your labelled images, export, publish (needs TensorFlow)",
                       description=cdl_train.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    cdl_train.add_arguments(p)

    from segd import doctor, install

    p = sub.add_parser("doctor", help="check Python, runtime, libedgetpu, Edge TPUs, udev, models; say what to fix")
    doctor.add_arguments(p)
    p = sub.add_parser("install-service", help="install the systemd unit, /etc/segd/segd.env and the Coral udev rules")
    install.add_arguments(p)
    return parser


def enable_crash_reports() -> None:
    """A native crash in any thread (a runtime's CPU kernels, a decoder) prints which Python
    code every thread was running and then ends the process with the signal, so the log says
    why segd died. Without it a crash in the inference thread leaves no Python-level trace; under
    qemu-user (an arm64 image tested on x86-64) the process may not even die."""
    if not faulthandler.is_enabled():
        faulthandler.enable(all_threads=True)


def supervise_if_pid1() -> int | None:
    """As PID 1 (a container's entrypoint without ``--init``) the kernel drops every signal whose
    default action would end the process, unless the kernel itself forces it. Under qemu-user
    (an arm64 image on x86-64) a crash becomes exactly such a self-sent signal, so the daemon
    printed its crash report and then hung for ever. As PID 1, segd therefore forks: the child
    serves, this process passes SIGTERM/SIGINT/SIGHUP/SIGQUIT on, reaps orphans and returns the
    child's exit status (128 + signal number when a signal ended it). Returns None in the child
    and when not PID 1."""
    import os
    import signal

    if os.getpid() != 1:
        return None
    passed_on = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT}
    # Held back until the handlers are in place: a SIGTERM right after the fork is not lost.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, passed_on)
    child = os.fork()
    if child == 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return None
    for sig in passed_on:
        signal.signal(sig, lambda signum, _frame: os.kill(child, signum))
    signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 1
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code


def main(argv: Sequence[str] | None = None) -> int:
    enable_crash_reports()
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = COMMANDS[args.command if args.command != "models" else f"models {args.models_command}"]
    try:
        code = handler(args)
        sys.stdout.flush()
        return code
    except SegdError as exc:
        print(f"segd: {exc.code}: {exc.detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (e.g. `head`) closed the pipe: stop quietly; the interpreter must not try
        # to flush into the closed pipe again at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


# --- commands ------------------------------------------------------------------------------


def _open(args: argparse.Namespace, name: str | None) -> Any:
    from segd.engine import Segmenter
    from segd.variants import load_manifest

    s = _settings(args)
    variant = load_manifest(models_dir=s.models_dir).get(name)
    return Segmenter.open(
        variant, models_dir=s.models_dir, accelerator=s.accelerator, device=s.device,
        runtime=s.runtime, num_threads=s.threads, mirror=s.mirror, gdrive_url=s.gdrive_url,
    )  # fmt: skip


def _inputs(items: list[str]) -> list[Path | None]:
    """Files in the order given, a directory's images sorted by name; None for stdin."""
    from segd.dataset import IMAGE_SUFFIXES

    found: list[Path | None] = []
    for item in items:
        if item == "-":
            found.append(None)
            continue
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found.append(path)
    return found


def cmd_segment(args: argparse.Namespace) -> int:
    from segd import encode
    from segd.engine import summary
    from segd.progress import Progress

    inputs = _inputs(args.images)
    if not inputs:
        print("segd: no images found in " + ", ".join(args.images), file=sys.stderr)
        return 2
    several = len(inputs) > 1 or any(Path(i).is_dir() for i in args.images if i != "-")
    out_dir = Path(args.output) if several and args.output not in (None, "-") else None
    if several:
        if args.format != "json" and out_dir is None:
            print("segd: several images with --format png/overlay need -o DIR", file=sys.stderr)
            return 2
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
    elif args.format != "json" and args.output is None:
        print("segd: binary output needs -o FILE (or -o - for stdout)", file=sys.stderr)
        return 2
    seg = _open(args, args.model)
    labels = seg.variant.labels
    bar = Progress("segment", show=None if several else False)
    failed = 0
    for n, path in enumerate(inputs):
        name = "stdin" if path is None else str(path)
        bar(n, len(inputs), file=Path(name).name)
        try:
            data = sys.stdin.buffer.read() if path is None else path.read_bytes()
        except OSError as exc:
            bar.close(f"segd: cannot read {name}: {exc.strerror}")
            failed += 1
            continue
        try:
            result = seg.segment(data, keep_aspect=args.keep_aspect, reduce=args.format != "overlay")
        except SegdError as exc:
            bar.close(f"segd: {name}: {exc.code}: {exc.detail}")
            failed += 1
            continue
        doc = summary(result, seg)
        suffix = {"json": ".json", "png": ".png", "overlay": ".jpg"}[args.format]
        target: Path | None = None
        if out_dir is not None:
            target = out_dir / ((path.stem if path is not None else "stdin") + suffix)
        elif not several and args.output not in (None, "-"):
            target = Path(args.output)
        if args.format == "json":
            if several:
                doc = {"file": name, **doc}
            out = (json.dumps(doc) if several and target is None else json.dumps(doc, indent=2)).encode() + b"\n"
        else:
            overlay_format = "png" if target is not None and target.suffix.lower() == ".png" else "jpeg"
            out, _ = encode.render(args.format, result.mask, labels.palette, result.image.rgb, overlay_format,
                                   labels.background)  # fmt: skip
        if target is not None:
            target.write_bytes(out)
            if not several:
                print(f"{target}: {result.model} on {result.backend} ({seg.selection.reason})", file=sys.stderr)
        else:
            bar.write("")  # the bar line ends before the answer goes to the same terminal
            sys.stdout.buffer.write(out)
            sys.stdout.flush()
    if several:
        bar(len(inputs), len(inputs))
        bar.close(f"{len(inputs) - failed}/{len(inputs)} images: {seg.variant.name} on {seg.backend} ({seg.selection.reason})")
    return 2 if failed else 0


def cmd_serve(args: argparse.Namespace) -> int:
    supervisor_exit = supervise_if_pid1()
    if supervisor_exit is not None:
        return supervisor_exit
    from segd.app.server import serve
    from segd.settings import config_path

    overrides = {
        "host": args.host, "port": args.port, "models": args.models, "default_model": args.default_model,
        "insecure": args.insecure, "log_level": args.log_level,
    }  # fmt: skip
    if args.api_key_file is not None:
        try:
            overrides["api_key"] = args.api_key_file.read_text().strip()
        except OSError as exc:
            print(f"segd: cannot read {args.api_key_file}: {exc.strerror}", file=sys.stderr)
            return 2
    serve(_settings(args, args.config or config_path(), **overrides))  # a SegdError (bad setting, insecure bind) -> main
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from segd.bench import ORIGINAL_TABLE, bench_variants, format_original_table, format_table
    from segd.progress import Progress

    s = _settings(args)
    names = args.model or (list(ORIGINAL_TABLE) if args.original else None)
    rows = bench_variants(
        names, iterations=args.iterations, warmup=args.warmup, models_dir=s.models_dir,
        mirror=s.mirror, accelerator=s.accelerator, device=s.device, runtime=s.runtime,
        num_threads=s.threads, gdrive_url=s.gdrive_url, progress=Progress("bench"),
    )  # fmt: skip
    print(format_original_table(rows) if args.original else format_table(rows))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from segd import evaluate

    return evaluate.run_cli(args, _settings(args))


def cmd_train(args: argparse.Namespace) -> int:
    from coral_deeplab import train

    return train.run(args)


def cmd_doctor(args: argparse.Namespace) -> int:
    from segd import doctor

    return doctor.run(args)


def cmd_install_service(args: argparse.Namespace) -> int:
    from segd import install

    return install.run(args)


COMMANDS = {
    "segment": cmd_segment,
    "bench": cmd_bench,
    "serve": cmd_serve,
    "models list": cmd_models_list,
    "models pull": cmd_models_pull,
    "models check": cmd_models_check,
    "models build": cmd_models_build,
    "doctor": cmd_doctor,
    "install-service": cmd_install_service,
    "eval": cmd_eval,
    "train": cmd_train,
}

if __name__ == "__main__":
    sys.exit(main())
