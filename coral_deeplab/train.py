"""Fine-tune (or train from scratch) a coral_deeplab model on labelled images, then export,
check, compile and publish it so ``segd`` serves it.

API: :func:`train` (options are the fields of :class:`TrainConfig`). CLI: ``segd train`` or
``python -m coral_deeplab.train`` (same arguments, :func:`add_arguments`).

The loop (a plain ``tf.GradientTape`` step, so freezing, resuming and the progress bar are
exact rather than callbacks around ``fit``):

1. samples from :func:`coral_deeplab.data.split_samples`; labels from the argument, a
   ``labels.txt`` in the dataset, or ``background, class_1, ...`` up to the largest mask id;
2. the model: ``weights='pascal_voc'`` imports Google's PASCAL VOC weights — with a different
   number of classes every layer except ``logits_semantic`` (freshly initialised from the
   seed); ``None`` trains from scratch; a path loads a ``.h5`` weights file;
3. batches of DeepLab-augmented crops (:mod:`coral_deeplab.data`), the masked cross-entropy on
   upsampled logits (:mod:`coral_deeplab.losses`) plus the model's L2 weight decay; Adam or
   momentum SGD with DeepLab's polynomial learning-rate decay (power 0.9);
4. backbone freezing for the first N steps (or the whole run). BatchNorm statistics are frozen
   by default when fine-tuning (DeepLab: batch statistics need batches of 12+; Google's
   imported BN layers carry folded biases) while their scale/offset still train; from scratch
   they train;
5. checkpoints every N steps (``<out>/checkpoints``, model + optimizer + step), resume from the
   latest one with the same data stream (:func:`coral_deeplab.data.train_dataset` is a pure
   function of seed and step); validation mIoU before training, every N steps and at the end;
6. the end: ``<out>/weights.h5``, int8 export through :func:`coral_deeplab.export.to_tflite`
   calibrated on training images, the Edge TPU op-mapping check, and
   :func:`coral_deeplab.zoo.publish` (compiles when ``edgetpu_compiler`` is on PATH) into the
   segd models directory.

This module imports TensorFlow only inside :func:`train`, so ``segd``'s command line can list
``segd train`` without loading it.

One module (~530 lines) on purpose: the run's options (:class:`TrainConfig`), its steps and its
command line are one API read together; the pieces the steps call live in ``data``, ``losses``
and ``export``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coral_deeplab.loop import TrainingRun
from segd.fsutil import atomic_write
from segd.geometry import SUPPORTED_ALPHAS

__all__ = [
    "DESCRIPTION",
    "TrainConfig",
    "TrainResult",
    "add_arguments",
    "main",
    "run",
    "train",
]

DESCRIPTION = """\
Fine-tune DeepLab (MobileNetV2, Edge-TPU-clean) on your labelled images and publish it to segd.

DATA is a PASCAL VOC layout (JPEGImages/, SegmentationClass/ palette PNGs,
ImageSets/Segmentation/train.txt and val.txt) or a folder pair images/ + masks/ (same-named
PNG masks whose pixel values are class ids; 255 = ignore). Class names come from --labels,
DATA/labels.txt, or are numbered. The run ends by exporting an int8 .tflite, checking its
Edge TPU op mapping, compiling it when edgetpu_compiler is on PATH, and writing <name>.toml
into the models dir, after which `segd serve --model NAME` serves it.
"""

# Config fields that define the network, its data stream and its optimizer: a resumed run must
# agree on them, or it would continue a different run than the one checkpointed.
_IDENTITY_FIELDS = (
    "data", "train_split", "val_fraction", "architecture", "alpha", "input_size", "labels",
    "seed", "batch_size", "min_scale", "max_scale", "scale_step", "flip", "optimizer",
)  # fmt: skip


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved as ``<out_dir>/config.json``)."""

    data: str
    name: str
    #: Training directory (checkpoints, logs, weights); default ``./train-<name>``.
    out_dir: str | None = None
    #: Class names (index = class id). None: ``<data>/labels.txt``, else numbered.
    labels: list[str] | None = None
    palette: str | list[list[int]] = "voc"
    #: Separate validation dataset (its ``val`` split / every image); default: from ``data``.
    val_data: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    #: Held out for validation when no val list exists (folder pairs).
    val_fraction: float = 0.1
    architecture: str = "v3"  # "v3" | "v3plus"
    alpha: float = 0.5
    #: Crop / model input size: one side or [height, width]; each 16k+1 (e.g. 321), see
    #: :mod:`segd.geometry`.
    input_size: int | list[int] = 321
    #: Input size of the exported model (default: input_size); e.g. train on 321 crops and
    #: serve at 513. All weights are size-independent.
    export_size: int | list[int] | None = None
    #: "pascal_voc", None (from scratch) or the path of a ``.h5`` weights file.
    weights: str | None = "pascal_voc"
    steps: int = 2000
    batch_size: int = 8
    optimizer: str = "adam"  # "adam" | "sgd" (momentum 0.9)
    #: Initial learning rate; default 1e-3 (Adam from scratch), 3e-4 (Adam fine-tune), 7e-3 (SGD).
    learning_rate: float | None = None
    #: Keep the backbone (MobileNetV2) frozen for this many steps; -1: the whole run.
    freeze_backbone: int = 0
    #: Train BatchNorm statistics; None: only from scratch or with batch_size >= 12.
    train_batchnorm: bool | None = None
    min_scale: float = 0.5
    max_scale: float = 2.0
    scale_step: float = 0.25
    flip: bool = True
    seed: int = 0
    #: Validation every N steps (0: only before and after training).
    eval_every: int = 500
    #: Validate once before the first step (the "before" number).
    eval_before: bool = True
    max_val_images: int | None = None
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    resume: bool = False
    #: Stop after this step with a checkpoint, as an interrupted run would (no final
    #: evaluation or export); ``resume=True`` continues it. For training in time-boxed chunks.
    stop_at: int | None = None
    #: Export + check (+ compile) + publish at the end.
    export: bool = True
    publish: bool = True
    compile: bool = True
    num_calibration: int = 32
    #: segd models directory to publish into (default: segd's).
    models_dir: str | None = None
    description: str = ""
    #: Where Google's PASCAL source model is found/fetched (weights='pascal_voc').
    source_models_dir: str | None = None
    mirror: str | None = None
    weights_cache: str | None = None

    def input_hw(self) -> tuple[int, int]:
        return _hw(self.input_size, "input_size")

    def export_hw(self) -> tuple[int, int]:
        return _hw(self.export_size, "export_size") if self.export_size else self.input_hw()

    def output_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir else Path(f"train-{self.name}")

    def lr(self) -> float:
        if self.learning_rate is not None:
            return float(self.learning_rate)
        if self.optimizer == "sgd":
            return 7e-3
        return 1e-3 if self.weights is None else 3e-4

    def batchnorm_trains(self) -> bool:
        if self.train_batchnorm is not None:
            return bool(self.train_batchnorm)
        return self.weights is None or self.batch_size >= 12

    def validate(self) -> None:
        from coral_deeplab.zoo import NAME_PATTERN
        from segd import geometry

        if not NAME_PATTERN.fullmatch(self.name):
            raise ValueError(f"name {self.name!r} must match {NAME_PATTERN.pattern} (a file name)")
        if self.architecture not in ("v3", "v3plus"):
            raise ValueError(f"architecture must be v3 or v3plus, not {self.architecture!r}")
        geometry.check_alpha(self.alpha)
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be adam or sgd, not {self.optimizer!r}")
        for what, value in (("steps", self.steps), ("batch_size", self.batch_size)):
            if value < 1:
                raise ValueError(f"{what} must be >= 1")
        if self.stop_at is not None and self.stop_at < 1:
            raise ValueError("stop_at must be >= 1")
        if self.freeze_backbone < -1:
            raise ValueError("freeze_backbone must be -1 (always), 0 (never) or a step count")
        geometry.check_input_hw(self.input_hw(), "input_size")
        geometry.check_input_hw(self.export_hw(), "export_size")
        if self.labels is not None and len(self.labels) < 2:
            raise ValueError("labels must name at least 2 classes (background included)")


def _hw(value: int | Sequence[int] | None, what: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if value is None or len(value) != 2:
        raise ValueError(f"{what} must be one side or [height, width], got {value!r}")
    return int(value[0]), int(value[1])


@dataclass
class TrainResult:
    """What a run produced and measured."""

    config: TrainConfig
    out_dir: Path
    labels: list[str]
    #: (step, cross-entropy of that step's batch) for every step run in this process.
    losses: list[tuple[int, float]] = field(default_factory=list)
    #: (step, val mIoU, per-class IoU list with None for absent classes).
    evals: list[tuple[int, float, list[float | None]]] = field(default_factory=list)
    start_step: int = 0
    weights_path: Path | None = None
    tflite_path: Path | None = None
    tflite: bytes | None = None
    #: Op-mapping report of the exported file (segd.tflite.checker.CheckReport).
    check: Any = None
    #: coral_deeplab.zoo.PublishResult when published.
    published: Any = None
    seconds: float = 0.0
    #: True when the run ended at ``stop_at`` (resume it to finish).
    stopped: bool = False

    @property
    def miou_before(self) -> float | None:
        return self.evals[0][1] if self.evals and self.evals[0][0] == self.start_step else None

    @property
    def miou_after(self) -> float | None:
        return self.evals[-1][1] if self.evals else None


# --- helpers ---------------------------------------------------------------------------------
def _read_labels_file(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text().splitlines()]
    return [n for n in names if n and not n.startswith("#")]


def resolve_labels(config: TrainConfig, samples: Sequence[Any]) -> list[str]:
    """Labels from the config, ``<data>/labels.txt``, or numbered up to the largest mask id."""
    from coral_deeplab.data import infer_num_classes

    if config.labels is not None:
        return [str(n) for n in config.labels]
    path = Path(config.data) / "labels.txt"
    if path.is_file():
        names = _read_labels_file(path)
        if len(names) < 2:
            raise ValueError(f"{path} must name at least 2 classes, one per line")
        return names
    n = infer_num_classes(samples)
    return ["background", *(f"class_{i}" for i in range(1, n))]


def _config_json(config: TrainConfig, labels: list[str]) -> dict[str, Any]:
    doc = dataclasses.asdict(config)
    doc["labels"] = labels
    doc["data"] = str(Path(config.data).resolve())  # the same data however it was spelled
    return doc


def _check_resume(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    diff = [k for k in _IDENTITY_FIELDS if saved.get(k) != current.get(k)]
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff)
        raise ValueError(f"cannot resume: {path} was made with different settings ({shown})")


# --- the run ---------------------------------------------------------------------------------
def train(
    data: str | os.PathLike[str],
    *,
    name: str,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    **options: Any,
) -> TrainResult:
    """Train a model on ``data`` and (by default) publish it to segd as ``name``.

    ``options`` are :class:`TrainConfig` fields (``steps``, ``input_size``, ``weights``,
    ``freeze_backbone``, ``resume``, ``models_dir``...). Returns a :class:`TrainResult` with
    the loss of every step, validation mIoU before/during/after, and the export/publish results.
    """
    config = TrainConfig(
        data=os.fspath(data), name=name, out_dir=os.fspath(out_dir) if out_dir else None, **options
    )
    return train_config(config, progress=progress)


def train_config(config: TrainConfig, *, progress: bool = True) -> TrainResult:
    """:func:`train` for a ready :class:`TrainConfig`: data, run directory, model, the loop, then
    the weights file and the export."""
    config.validate()
    started = time.perf_counter()
    out = config.output_dir()
    out.mkdir(parents=True, exist_ok=True)
    train_samples, val_samples, labels = _samples_and_labels(config)
    _start_run_dir(config, out, labels)
    run = TrainingRun(config, out, labels, val_samples)
    result = TrainResult(config, out, labels, start_step=run.start_step)
    run.loop(result, train_samples, progress=progress)
    if not result.stopped:
        run.configure(False)
        result.weights_path = out / "weights.h5"
        partial = out / ".weights.partial.h5"
        run.model.save_weights(str(partial))
        os.replace(partial, result.weights_path)  # never a half-written weights.h5
        if config.export:
            _export(config, run.model, run.builder, labels, train_samples, result)
    result.seconds = time.perf_counter() - started
    return result


def _samples_and_labels(config: TrainConfig) -> tuple[list[Any], list[Any], list[str]]:
    """Training and validation samples, the class names, and every mask checked against them."""
    from coral_deeplab import data
    from segd.dataset import find_samples

    train_samples, val_samples = data.split_samples(
        config.data, train_split=config.train_split, val_split=config.val_split,
        val_fraction=config.val_fraction, seed=config.seed,
    )  # fmt: skip
    if config.val_data:
        val_samples = find_samples(config.val_data, None)
    if config.max_val_images:
        val_samples = val_samples[: config.max_val_images]
    labels = resolve_labels(config, train_samples)
    data.check_masks([*train_samples, *val_samples], len(labels))
    return list(train_samples), list(val_samples), labels


def _start_run_dir(config: TrainConfig, out: Path, labels: list[str]) -> None:
    """Write ``config.json``; a resumed run must match it, a new one must not find checkpoints."""
    config_path = out / "config.json"
    ckpt_dir = out / "checkpoints"
    current = _config_json(config, labels)
    if config.resume and config_path.is_file():
        _check_resume(json.loads(config_path.read_text()), current, config_path)
    elif not config.resume and ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
        raise ValueError(
            f"{out} already holds checkpoints: pass resume=True (--resume) to continue that run, "
            "or choose another out_dir"
        )
    atomic_write(config_path, json.dumps(current, indent=2) + "\n")


def _export(
    config: TrainConfig, model: Any, builder: Any, labels: list[str], samples: Sequence[Any],
    result: TrainResult,
) -> None:  # fmt: skip
    """int8 export calibrated on training images, op-mapping check, publish (+ compile)."""
    import numpy as np

    from coral_deeplab import export
    from coral_deeplab.data import load_pair
    from segd.tflite.checker import check_model

    # A fresh model at the export size with the trained weights (all size-independent): the
    # converter also saves the model it is given, and one that has trained carries traced
    # training functions that make that save markedly slower.
    export_hw = config.export_hw()
    serving = builder((*export_hw, 3), alpha=float(config.alpha), n_classes=len(labels))
    serving.set_weights(model.get_weights())
    order = np.random.default_rng(config.seed).permutation(len(samples))[: config.num_calibration]
    calibration = [load_pair(samples[int(i)], len(labels))[0] for i in order]
    tflite = export.to_tflite(serving, calibration, num_calibration=len(calibration))
    result.tflite = tflite
    result.tflite_path = result.out_dir / f"{config.name}.tflite"
    atomic_write(result.tflite_path, tflite)
    result.check = check_model(tflite)
    if not config.publish:
        return
    from coral_deeplab import zoo

    arch = "DeepLab v3" if config.architecture == "v3" else "DeepLab v3+"
    best = result.miou_after
    description = config.description or (
        f"{arch}, MobileNetV2 depth multiplier {float(config.alpha)}, "
        f"{export_hw[0]}x{export_hw[1]}, trained by coral_deeplab.train on {Path(config.data).name}"
        + (f" (val mIoU {best:.3f}, float model)" if best is not None else "")
    )
    result.published = zoo.publish(
        tflite, name=config.name, labels=labels, palette=config.palette,
        models_dir=Path(config.models_dir) if config.models_dir else None,
        description=description, compile=config.compile,
        build_info={
            "architecture": config.architecture, "alpha": float(config.alpha),
            "input_size": f"{export_hw[0]}x{export_hw[1]}", "weights": str(config.weights),
            "steps": config.steps, "train_images": len(samples),
            "calibration_images": len(calibration),
            **({"val_miou_float": round(best, 6)} if best is not None else {}),
        },
    )  # fmt: skip


# --- command line ----------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The training options (shared by ``segd train`` and ``python -m coral_deeplab.train``)."""
    d = TrainConfig(data="", name="x")
    p.add_argument("data", type=Path, help="dataset directory (VOC layout or images/ + masks/)")
    p.add_argument("--name", required=True, help="variant name to publish (also the file stem)")
    p.add_argument("--out", type=Path, default=None, help="training directory (default ./train-NAME)")
    p.add_argument("--labels", default=None, help="labels file (one name per line) or comma-separated names")
    p.add_argument("--val-data", type=Path, default=None, help="separate validation dataset")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="held out when there is no val list")
    p.add_argument("--architecture", choices=("v3", "v3plus"), default=d.architecture)
    p.add_argument("--alpha", type=float, choices=SUPPORTED_ALPHAS, default=d.alpha, help="MobileNetV2 depth multiplier")
    p.add_argument("--input-size", type=int, default=d.input_size, help="square crop / model input side, 16k+1 (e.g. 321, 513)")
    p.add_argument("--export-size", type=int, default=None, help="input side of the exported model (default: --input-size)")
    p.add_argument("--weights", default="pascal_voc", help="pascal_voc (default), none (from scratch) or a .h5 file")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--optimizer", choices=("adam", "sgd"), default=d.optimizer)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--freeze-backbone", type=int, default=0, metavar="STEPS", help="freeze the backbone for the first STEPS steps (-1: always)")
    p.add_argument("--train-batchnorm", choices=("auto", "yes", "no"), default="auto")
    p.add_argument("--min-scale", type=float, default=d.min_scale)
    p.add_argument("--max-scale", type=float, default=d.max_scale)
    p.add_argument("--no-flip", action="store_true")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP", help="checkpoint and stop after STEP (continue later with --resume)")
    p.add_argument("--num-calibration", type=int, default=d.num_calibration)
    p.add_argument("--no-export", action="store_true", help="stop after training (weights.h5)")
    p.add_argument("--no-publish", action="store_true", help="export and check, but do not publish")
    p.add_argument("--no-compile", action="store_true", help="do not run edgetpu_compiler even if on PATH")
    p.add_argument("--models-dir", type=Path, default=None, help="segd models dir: publish there, find Google's PASCAL model there (SEGD_MODELS_DIR)")
    p.add_argument("--mirror", default=None, help="where to fetch Google's PASCAL model from (SEGD_MODEL_MIRROR)")
    p.add_argument("--description", default="")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _labels_arg(value: str | None) -> list[str] | None:
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return _read_labels_file(path)
    return [n.strip() for n in value.split(",") if n.strip()]


def run(args: argparse.Namespace) -> int:
    """Run a training from parsed :func:`add_arguments` options; print a summary."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow  # noqa: F401
        import tf_keras  # noqa: F401
    except ImportError:
        print("train needs TensorFlow: pip install 'segd[train]'", file=sys.stderr)
        return 2
    weights = None if args.weights.lower() == "none" else args.weights
    config = TrainConfig(
        data=str(args.data), name=args.name, out_dir=str(args.out) if args.out else None,
        labels=_labels_arg(args.labels), val_data=str(args.val_data) if args.val_data else None,
        val_fraction=args.val_fraction, architecture=args.architecture, alpha=args.alpha,
        input_size=args.input_size, export_size=args.export_size, weights=weights,
        steps=args.steps, batch_size=args.batch_size, optimizer=args.optimizer,
        learning_rate=args.learning_rate, freeze_backbone=args.freeze_backbone,
        train_batchnorm={"auto": None, "yes": True, "no": False}[args.train_batchnorm],
        min_scale=args.min_scale, max_scale=args.max_scale, flip=not args.no_flip, seed=args.seed,
        eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, resume=args.resume,
        stop_at=args.stop_at,
        export=not args.no_export, publish=not args.no_publish, compile=not args.no_compile,
        num_calibration=args.num_calibration,
        models_dir=str(args.models_dir) if args.models_dir else None, mirror=args.mirror,
        source_models_dir=str(args.models_dir) if args.models_dir else None,
        description=args.description,
    )  # fmt: skip
    try:
        result = train_config(config, progress=not args.quiet)
    except ValueError as exc:  # bad options, resume mismatch, PublishError
        print(f"train: {exc}", file=sys.stderr)
        return 2
    print(summary(result))
    return 0


def summary(result: TrainResult) -> str:
    """Human-readable end-of-run report."""
    lines = [f"{result.config.name}: {len(result.losses)} steps in {result.seconds:.0f} s, out dir {result.out_dir}"]
    if result.losses:
        k = max(1, min(10, len(result.losses) // 4))
        first = sum(v for _, v in result.losses[:k]) / k
        last = sum(v for _, v in result.losses[-k:]) / k
        lines.append(f"loss: {first:.4f} (first {k} steps) -> {last:.4f} (last {k})")
    if result.miou_before is not None:
        lines.append(f"val mIoU before: {result.miou_before:.4f}")
    if result.evals:
        step, miou, per_class = result.evals[-1]
        shown = ", ".join(
            f"{n} {'n/a' if v is None else f'{v:.3f}'}" for n, v in zip(result.labels, per_class, strict=True)
        )
        lines.append(f"val mIoU at step {step}: {miou:.4f} ({shown})")
    if result.stopped:
        lines.append(f"stopped at step {result.start_step + len(result.losses)} of {result.config.steps}; "
                     "continue with --resume")  # fmt: skip
    if result.weights_path:
        lines.append(f"weights: {result.weights_path}")
    if result.tflite_path:
        lines.append(f"int8 export: {result.tflite_path} ({len(result.tflite or b'')} bytes)")
    if result.check is not None:
        from coral_deeplab.zoo import describe_report

        lines.append(f"Edge TPU check: {describe_report(result.check)}")
    if result.published is not None:
        pub = result.published
        lines.append(f"published: {pub.manifest_path} (serve with: segd serve --model {result.config.name})")
        if pub.edgetpu_path:
            lines.append(f"Edge TPU file: {pub.edgetpu_path}")
        else:
            lines.append(f"no Edge TPU file: {pub.compile_skipped_reason}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m coral_deeplab.train", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_arguments(parser)
    args = parser.parse_args(argv)
    from segd.errors import SegdError

    try:
        return run(args)
    except SegdError as exc:
        print(f"train: {exc.code}: {exc.detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
