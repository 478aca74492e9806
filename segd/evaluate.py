"""``segd eval``: score a variant, a ``.tflite`` file or a running daemon on a labelled dataset
(mIoU, per-class IoU, pixel accuracy) and write the report (confusion CSV, IoU chart, JSON).

TensorFlow-free on purpose (docs/ARCHITECTURE.md, invariant 1): it runs where the daemon runs,
on a Pi too, and scores exactly what segd serves — the engine's mask at the original image size
(a local variant or ``.tflite`` file), or the mask a running daemon returns over HTTP. Datasets
are :mod:`segd.dataset`, the metric :mod:`segd.metrics` (both shared with training).
"""

from __future__ import annotations

import csv
import io
import json
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from segd.dataset import Sample, find_samples, read_mask
from segd.errors import BadParameter, DatasetError, ModelError, RuntimeUnavailable
from segd.labels import voc_palette
from segd.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy
from segd.progress import Progress
from segd.settings import Settings

__all__ = [
    "EvalResult",
    "HttpPredictor",
    "confusion_csv",
    "evaluate",
    "iou_chart",
    "open_local",
    "segmenter_for_file",
    "write_report",
]


Predictor = Callable[[bytes], np.ndarray]
ProgressFn = Callable[[int, int], None]


@dataclass
class EvalResult:
    """Summed confusion matrix of a run plus what it was measured on."""

    confusion: np.ndarray
    names: tuple[str, ...]
    n_images: int
    model: str = ""

    @property
    def iou(self) -> np.ndarray:
        return iou_per_class(self.confusion)

    @property
    def miou(self) -> float:
        return mean_iou(self.confusion)

    @property
    def pixel_accuracy(self) -> float:
        return pixel_accuracy(self.confusion)

    def to_dict(self) -> dict[str, Any]:
        iou = self.iou
        return {
            "model": self.model,
            "images": self.n_images,
            "pixels": int(self.confusion.sum()),
            "miou": _num(self.miou),
            "pixel_accuracy": _num(self.pixel_accuracy),
            "classes": [
                {
                    "id": i,
                    "name": n,
                    "iou": _num(float(iou[i])),
                    "pixels": int(self.confusion[i].sum()),
                }
                for i, n in enumerate(self.names)
            ],
        }

    def format_table(self) -> str:
        iou = self.iou
        width = max(8, *(len(n) for n in self.names))
        lines = [f"{'class':{width}}  {'IoU':>7}  {'pixels':>12}"]
        for i, name in enumerate(self.names):
            value = "    n/a" if math.isnan(iou[i]) else f"{iou[i]:7.4f}"
            lines.append(f"{name:{width}}  {value}  {int(self.confusion[i].sum()):12d}")
        lines.append(f"{'mIoU':{width}}  {self.miou:7.4f}")
        lines.append(f"{'pixel acc':{width}}  {self.pixel_accuracy:7.4f}")
        return "\n".join(lines)


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x


def evaluate(
    samples: Sequence[Sample],
    predict: Predictor,
    names: Sequence[str],
    *,
    model: str = "",
    progress: ProgressFn | None = None,
) -> EvalResult:
    """Run ``predict(image bytes) -> mask at the original size`` over the samples and sum the
    confusion matrix over ``len(names)`` classes."""
    n = len(names)
    cm = np.zeros((n, n), dtype=np.int64)
    for done, sample in enumerate(samples, 1):
        try:
            truth = read_mask(sample.mask.read_bytes())
            data = sample.image.read_bytes()
        except OSError as exc:
            raise DatasetError(f"{sample.id}: cannot read {exc.filename}: {exc.strerror}") from exc
        except DatasetError as exc:
            raise DatasetError(f"{sample.id}: {sample.mask.name}: {exc.detail}") from exc
        pred = predict(data)
        if pred.shape != truth.shape:
            raise DatasetError(
                f"{sample.id}: mask {sample.mask.name} is {truth.shape[1]}x{truth.shape[0]} but "
                f"the model's mask of {sample.image.name} is {pred.shape[1]}x{pred.shape[0]}"
            )
        try:
            cm += confusion_matrix(truth, pred, n)
        except ValueError as exc:
            raise DatasetError(f"{sample.id}: {exc} (the model has {n} classes)") from exc
        if progress is not None:
            progress(done, len(samples))
    return EvalResult(cm, tuple(names), len(samples), model)


# --- predictors ------------------------------------------------------------------------------
def open_local(
    model: str,
    *,
    models_dir: Path | None = None,
    accelerator: str = "auto",
    device: str | None = None,
    runtime: str | None = None,
    num_threads: int | None = None,
    mirror: str | None = None,
) -> Any:
    """A :class:`segd.engine.Segmenter` for a variant name or a ``.tflite`` file.

    A name is a manifest variant. A file that a manifest describes (a published model with its
    ``<name>.toml`` beside it, or one of the manifest's files by sha256, e.g. Google's) runs as
    that variant, through :func:`segd.resolve.open_segmenter`. Any other file is
    described from its own tensors (see :func:`segmenter_for_file`).
    """
    from segd.engine import Segmenter
    from segd.variants import load_manifest

    manifest = load_manifest(models_dir=models_dir)
    path = Path(model)
    if model in manifest.variants or not (path.suffix == ".tflite" or path.is_file()):
        return Segmenter.open(
            manifest.get(model), models_dir=models_dir, accelerator=accelerator, device=device,
            runtime=runtime, num_threads=num_threads, mirror=mirror,
        )  # fmt: skip
    from segd.errors import UnknownModel
    from segd.resolve import open_segmenter

    try:
        return open_segmenter(
            path, models_dir=models_dir, mirror=mirror, device=device, accelerator=accelerator,
            runtime=runtime, num_threads=num_threads,
        )  # fmt: skip
    except UnknownModel:
        return segmenter_for_file(path, runtime=runtime, num_threads=num_threads)


def segmenter_for_file(
    path: Path, *, runtime: str | None = None, num_threads: int | None = None
) -> Any:
    """A CPU Segmenter for a ``.tflite`` no manifest describes, described from its tensors by
    :func:`segd.manifest.describe_tflite`.

    Assumed, as for every coral_deeplab and Coral DeepLab file: raw RGB input bytes (mean =
    std = 128); a resize/argmax tail is stripped when present; the logits grid is DeepLab's
    align-corners grid (16k+1 input sides such as 513, ``H - 1 = stride (h - 1)`` on both axes —
    an even input side is refused, as its logit positions cannot be told from the shapes);
    classes are named ``class_<i>``. A model that outputs only a class map cannot say its number
    of classes and is refused.
    """
    from segd.engine import Segmenter
    from segd.manifest import describe_tflite

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror}") from exc
    if b"edgetpu-custom-op" in data:
        raise ModelError(
            f"{path} is compiled for the Edge TPU and no manifest describes it; evaluate its "
            "published variant by name, or its CPU twin"
        )
    try:
        variant = describe_tflite(
            data, name=path.stem, file_name=path.name, strip_tail=None,
            description=f"{path.name} (described from its tensors)",
        )  # fmt: skip
    except ModelError as exc:
        raise ModelError(
            f"{path}: {exc.detail}; describe it in a <name>.toml manifest (output.stride, "
            "output.align_corners) or publish it with its labels, and evaluate it by name"
        ) from None
    return Segmenter.open(
        variant, models_dir=path.parent, accelerator="cpu", runtime=runtime,
        num_threads=num_threads, download=False,
    )  # fmt: skip


class HttpPredictor:
    """Masks from a running segd daemon: ``POST /segment?format=png`` with the raw image.

    The labels (and so the number of classes) come from ``GET /models/<name>``.
    """

    def __init__(
        self, url: str, model: str | None = None, *, api_key: str | None = None,
        keep_aspect: bool = False, timeout: float = 120.0,
    ) -> None:  # fmt: skip
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.keep_aspect = keep_aspect
        self.timeout = timeout
        if model is None:
            model = str(self._json("/models")["default"])
        self.model = model
        info = self._json(f"/models/{urllib.parse.quote(model, safe='')}")
        self.names: tuple[str, ...] = tuple(str(n) for n in info["labels"])

    def _request(self, path: str, body: bytes | None = None) -> bytes:
        headers = {"User-Agent": "segd-eval"}
        if self.api_key:
            headers["X-API-Key"] = self.api_key
        if body is not None:
            headers["Content-Type"] = "application/octet-stream"
        req = urllib.request.Request(self.url + path, data=body, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return bytes(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            try:
                doc = json.loads(detail)
                detail = f"{doc['error']}: {doc['detail']}"
            except (ValueError, KeyError, TypeError):
                pass
            error = BadParameter if 400 <= exc.code < 500 else RuntimeUnavailable
            raise error(f"{self.url}{path}: HTTP {exc.code} {detail}") from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RuntimeUnavailable(f"cannot reach segd at {self.url}: {reason}") from exc

    def _json(self, path: str) -> dict[str, Any]:
        doc = json.loads(self._request(path))
        if not isinstance(doc, dict):
            raise RuntimeUnavailable(f"{self.url}{path}: unexpected answer {doc!r}")
        return doc

    def __call__(self, data: bytes) -> np.ndarray:
        query = urllib.parse.urlencode(
            {"model": self.model, "format": "png", "keep_aspect": str(self.keep_aspect).lower()}
        )
        body = self._request(f"/segment?{query}", data)
        try:
            return read_mask(body)
        except DatasetError as exc:
            raise RuntimeUnavailable(f"segd at {self.url} sent an unreadable mask: {exc}") from exc


# --- reports ---------------------------------------------------------------------------------
def confusion_csv(cm: np.ndarray, names: Sequence[str]) -> str:
    """CSV: header ``truth \\ prediction, <names>``, one row per true class, pixel counts."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["truth \\ prediction", *names])
    for name, row in zip(names, np.asarray(cm), strict=True):
        writer.writerow([name, *(int(x) for x in row)])
    return out.getvalue()


def iou_chart(
    iou: np.ndarray, names: Sequence[str], *, title: str = "", palette: np.ndarray | None = None
) -> np.ndarray:
    """Horizontal bar chart of per-class IoU as a BGR image (OpenCV only, no matplotlib).

    One bar per class in its palette colour with the value printed, a dashed line at the
    mIoU, "n/a" for classes that never occur.
    """
    iou = np.asarray(iou, dtype=np.float64)
    pal = voc_palette(256) if palette is None else np.asarray(palette, dtype=np.uint8)
    font, scale, thick = cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1
    row, pad, bar_w = 22, 10, 420
    label_w = max(cv2.getTextSize(n, font, scale, thick)[0][0] for n in [*names, "mIoU"]) + 2 * pad
    top = 40
    width = label_w + bar_w + 80
    height = top + row * len(names) + 40
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    finite = iou[np.isfinite(iou)]
    miou = float(finite.mean()) if finite.size else math.nan
    heading = f"{title}  mIoU {miou:.4f}" if title else f"mIoU {miou:.4f}"
    cv2.putText(img, heading, (pad, 25), font, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    x0 = label_w
    for i, name in enumerate(names):
        y = top + i * row
        (tw, th), _ = cv2.getTextSize(name, font, scale, thick)
        cv2.putText(img, name, (x0 - pad - tw, y + row // 2 + th // 2), font, scale, (0, 0, 0), thick, cv2.LINE_AA)
        value = iou[i]
        if math.isnan(value):
            cv2.putText(img, "n/a", (x0 + 4, y + row // 2 + th // 2), font, scale, (128, 128, 128), thick, cv2.LINE_AA)
            continue
        x1 = x0 + round(bar_w * float(np.clip(value, 0, 1)))
        r, g, b = (int(c) for c in pal[i % len(pal)])
        if x1 > x0:
            cv2.rectangle(img, (x0, y + 3), (x1, y + row - 3), (b, g, r), cv2.FILLED)
        cv2.rectangle(img, (x0, y + 3), (max(x1, x0 + 1), y + row - 3), (60, 60, 60), 1)
        cv2.putText(img, f"{value:.3f}", (x1 + 5, y + row // 2 + th // 2), font, scale, (0, 0, 0), thick, cv2.LINE_AA)
    axis_y = top + row * len(names) + 4
    cv2.line(img, (x0, top - 2), (x0, axis_y), (0, 0, 0), 1)
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = x0 + round(bar_w * tick)
        cv2.line(img, (x, axis_y), (x, axis_y + 4), (0, 0, 0), 1)
        cv2.putText(img, f"{tick:g}", (x - 8, axis_y + 18), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    if math.isfinite(miou):
        x = x0 + round(bar_w * miou)
        for yy in range(top - 2, axis_y, 8):
            cv2.line(img, (x, yy), (x, min(yy + 4, axis_y)), (0, 0, 200), 1)
    return img


def write_report(
    result: EvalResult, out_dir: str | Path, *, palette: np.ndarray | None = None
) -> dict[str, Path]:
    """Write ``confusion.csv``, ``iou.png`` and ``metrics.json`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "confusion.csv", "chart": out / "iou.png", "json": out / "metrics.json"}
    paths["csv"].write_text(confusion_csv(result.confusion, result.names))
    chart = iou_chart(result.iou, result.names, title=result.model, palette=palette)
    ok, png = cv2.imencode(".png", chart)
    if not ok:
        raise OSError("OpenCV could not encode the chart as PNG")
    paths["chart"].write_bytes(png.tobytes())
    paths["json"].write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return paths


# --- command line (``segd eval``) ------------------------------------------------------------
def run_cli(args: Any, settings: Settings) -> int:
    """``segd eval``: evaluate a local variant/file or a daemon (``--url``) on ``--data``."""
    samples = find_samples(args.data, args.split)
    if args.limit:
        samples = samples[: args.limit]
    palette: np.ndarray | None = None
    if args.url:
        api_key = args.api_key
        if api_key is None and args.api_key_file is not None:
            try:
                api_key = args.api_key_file.read_text().strip()
            except OSError as exc:
                raise BadParameter(f"cannot read {args.api_key_file}: {exc.strerror}") from exc
        remote = HttpPredictor(args.url, args.model, api_key=api_key, keep_aspect=args.keep_aspect)
        predict: Predictor = remote
        names, model_name = remote.names, remote.model
    else:
        if not args.model:
            raise BadParameter("--model NAME|FILE is required without --url")
        seg = open_local(
            args.model, models_dir=settings.models_dir, accelerator=settings.accelerator,
            device=settings.device, runtime=settings.runtime, num_threads=settings.threads,
            mirror=settings.mirror,
        )  # fmt: skip

        def predict(data: bytes) -> np.ndarray:
            return np.asarray(seg.segment(data, keep_aspect=args.keep_aspect).mask)

        names, model_name = seg.variant.labels.names, seg.variant.name
        palette = seg.variant.labels.palette
    bar = Progress(model_name, unit="images")
    result = evaluate(samples, predict, names, model=model_name, progress=bar)
    bar.close()
    out_dir = args.out or Path(f"eval-{Path(model_name).name}")
    paths = write_report(result, out_dir, palette=palette)
    if args.json:
        print(json.dumps({**result.to_dict(), "files": {k: str(v) for k, v in paths.items()}}, indent=2))
    else:
        print(f"{model_name} on {len(samples)} image(s) of {args.data}")
        print(result.format_table())
        print(f"wrote {paths['csv']}, {paths['chart']}, {paths['json']}")
    return 0
