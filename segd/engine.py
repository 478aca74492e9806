"""The engine: a :class:`Segmenter` is one model variant + one runner + pre- and post-processing.

It is the only thing the CLI, the HTTP app and the benchmarks call. Its stages are separate
methods so the daemon can run decode and postprocess of other requests while an inference is in
flight; :meth:`Segmenter.segment` runs them all in order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from segd import postprocess, preprocess
from segd.errors import ModelError, RequestTimeout, RuntimeUnavailable, WorkerCrashed
from segd.preprocess import DecodedImage, ImageHeader
from segd.runtime import Runner, open_cpu
from segd.settings import DEFAULT_MAX_PIXELS, check_accelerator
from segd.variants import FileSpec, Variant, check_tensor, read_verified, resolve_file

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Selection:
    """Which file and backend a variant runs on, and why."""

    backend: str  # "edgetpu" | "cpu"
    file: FileSpec
    path: Path
    reason: str
    device: str | None = None
    #: The variant that runs: the requested one (with tensors read from the file when its
    #: manifest entry leaves them out), or the CPU fallback of an Edge-TPU-only variant.
    variant: Variant | None = None


@dataclass
class Prepared:
    """A decoded image turned into a model input tensor, plus what is needed to map back."""

    tensor: np.ndarray
    content_box: Box
    original_hw: tuple[int, int]


@dataclass
class Segmentation:
    mask: np.ndarray  # H x W uint8 class ids at the original (oriented) image size
    counts: np.ndarray  # pixels per class
    image: DecodedImage
    timings: dict[str, float] = field(default_factory=dict)  # milliseconds per stage
    model: str = ""
    backend: str = ""


def strip_model_tail(model: bytes) -> bytes:
    """Cut RESIZE_BILINEAR / ARG_MAX off the end of a model (in memory, after the checksum)."""
    from segd.tflite.surgery import strip_tail

    try:
        return strip_tail(model).model_bytes
    except ValueError as exc:
        raise ModelError(f"cannot strip the resize/argmax tail: {exc}") from exc


def model_bytes(variant: Variant, spec: FileSpec, path: Path) -> bytes:
    """Verified bytes of a model file, with the tail stripped when the manifest asks for it."""
    data = read_verified(path, spec)
    return strip_model_tail(data) if variant.output.strip_tail else data


def settle(variant: Variant, spec: FileSpec, path: Path) -> tuple[Variant, bytes]:
    """Verified model bytes, and the variant with its tensors read from them when its manifest
    entry leaves them out (sanity-checked, :mod:`segd.model_io`)."""
    data = model_bytes(variant, spec, path)
    if variant.tensors_from_file:
        from segd.model_io import read_tensors

        variant = read_tensors(variant, data, str(path))
    return variant, data


def check_runner(variant: Variant, runner: Runner, path: Path) -> None:
    """The loaded model's tensors must be what the manifest says."""
    check_tensor(str(path), "input", runner.input.shape, runner.input.dtype,
                 variant.input.shape, variant.input.dtype)  # fmt: skip
    check_tensor(str(path), "output", runner.output.shape, runner.output.dtype,
                 variant.output.shape, variant.output.dtype)  # fmt: skip


#: Opens an Edge TPU runner from (model bytes, device), e.g. through a supervised worker process.
EdgeTpuOpener = Callable[[bytes, str | None], Runner]


def open_runner(
    variant: Variant,
    *,
    models_dir: Path | None = None,
    accelerator: str = "auto",
    device: str | None = None,
    runtime: str | None = None,
    num_threads: int | None = None,
    mirror: str | None = None,
    download: bool = True,
    edgetpu_factory: EdgeTpuOpener | None = None,
    edgetpu_pairing: str = "check",
    edgetpu_pairings: Path | None = None,
    gdrive_url: str | None = None,
    edgetpu_library: str | None = None,
) -> tuple[Runner, Selection]:
    """Open the Edge TPU file when a device is there and usable, else the CPU twin.

    ``accelerator``: "auto" (TPU if possible, else CPU — the reason is recorded), "edgetpu"
    (fail with the reason instead of falling back) or "cpu". ``edgetpu_factory(model, device)``
    replaces the in-process delegate, e.g. with a crash-isolated worker process (which checks
    the libedgetpu/runtime pairing itself); in process, ``edgetpu_pairing`` / ``edgetpu_pairings``
    decide it (:func:`segd.runtime.edgetpu.check_pairing`); ``edgetpu_library`` is the libedgetpu
    to load (None: ``SEGD_EDGETPU_LIBRARY`` or the loader's default). An Edge-TPU-only variant runs on the
    CPU as its declared ``cpu_fallback`` variant (a different network); ``Selection.variant`` is
    then that variant and the reason says so.
    """
    check_accelerator(accelerator)
    reason = "CPU requested"
    if accelerator != "cpu":
        if variant.edgetpu is None:
            reason = "variant has no Edge TPU file"
            if accelerator == "edgetpu":
                raise RuntimeUnavailable(f"{variant.name}: {reason}")
        else:
            try:
                return _open_edgetpu(
                    variant, variant.edgetpu, models_dir=models_dir, device=device,
                    runtime=runtime, num_threads=num_threads, mirror=mirror,
                    download=download, factory=edgetpu_factory, pairing=edgetpu_pairing,
                    pairings=edgetpu_pairings, gdrive_url=gdrive_url, library=edgetpu_library,
                )  # fmt: skip
            except (RuntimeUnavailable, WorkerCrashed, RequestTimeout, ModelError) as exc:
                # auto: anything wrong on the Edge TPU side (no library or device, a delegate
                # that fails or a worker that dies while opening, a missing or corrupt TPU file)
                # leaves the CPU twin, with the reason recorded.
                if accelerator == "edgetpu":
                    raise
                reason = exc.detail if isinstance(exc, RuntimeUnavailable) else f"Edge TPU unusable: {exc.detail}"
    served = variant.cpu_variant()
    if served is not variant:
        reason += (
            f"; {variant.name} is Edge TPU only, so its declared CPU fallback {served.name} serves "
            f"(a different network: {served.description})"
        )
    spec = served.cpu
    assert spec is not None
    path = resolve_file(spec, models_dir, mirror=mirror, download=download, gdrive_url=gdrive_url)
    served, data = settle(served, spec, path)
    runner = open_cpu(data, runtime=runtime, num_threads=num_threads)
    check_runner(served, runner, path)
    return runner, Selection("cpu", spec, path, reason, variant=served)


def _open_edgetpu(
    variant: Variant,
    spec: FileSpec,
    *,
    models_dir: Path | None,
    device: str | None,
    runtime: str | None,
    num_threads: int | None,
    mirror: str | None,
    download: bool,
    factory: EdgeTpuOpener | None,
    pairing: str = "check",
    pairings: Path | None = None,
    gdrive_url: str | None = None,
    library: str | None = None,
) -> tuple[Runner, Selection]:
    from segd.runtime import edgetpu

    status = edgetpu.library_status(library)
    if status.reason is not None:
        raise RuntimeUnavailable(status.reason)
    path = resolve_file(spec, models_dir, mirror=mirror, download=download, gdrive_url=gdrive_url)
    variant, data = settle(variant, spec, path)
    if factory is not None:
        runner = factory(data, device)
    else:
        runner = edgetpu.open_paired(data, device=device, library=library, policy=pairing,
                                     pairings=pairings, preferred=runtime, num_threads=num_threads)  # fmt: skip
    try:
        check_runner(variant, runner, path)
    except ModelError:
        runner.close()
        raise
    where = runner.device or device or "first device"
    return runner, Selection("edgetpu", spec, path, f"Edge TPU found ({where})", device=runner.device, variant=variant)


class Decoder(Protocol):
    """Where image bytes are decoded (e.g. segd.decode_worker.DecodePool: in a worker
    process, so a crashing native decoder costs one request). None means in this process."""

    def decode(
        self, data: bytes, *, header: ImageHeader, reduce: int, max_pixels: int
    ) -> DecodedImage: ...


class Segmenter:
    """Image bytes -> class mask at the original size, for one variant on one runner."""

    def __init__(
        self,
        variant: Variant,
        runner: Runner,
        selection: Selection | None = None,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        decoder: Decoder | None = None,
    ) -> None:
        self.variant = variant
        self.runner = runner
        self.selection = selection
        self.max_pixels = max_pixels
        self.decoder = decoder
        self.lock = threading.Lock()
        self.input_hw = variant.input.hw
        spec = runner.input
        self.lut = preprocess.input_lut(
            variant.input.mean, variant.input.std, spec.scale, spec.zero_point, spec.dtype
        )

    @classmethod
    def open(
        cls, variant: Variant, *, max_pixels: int = DEFAULT_MAX_PIXELS,
        decoder: Decoder | None = None, **kwargs: Any,
    ) -> Segmenter:  # fmt: skip
        runner, selection = open_runner(variant, **kwargs)
        return cls(selection.variant or variant, runner, selection, max_pixels=max_pixels, decoder=decoder)

    @property
    def backend(self) -> str:
        return self.runner.backend

    # --- stages ------------------------------------------------------------------------
    def decode(
        self, data: bytes, *, reduce: bool = False, header: ImageHeader | None = None
    ) -> DecodedImage:
        """Decode (optionally at reduced JPEG scale: fine when only the mask is wanted).
        ``header``: what probe_image read from these bytes, when the caller already has it
        (a request's header is probed once)."""
        if header is None:
            header = preprocess.probe_image(data)
        preprocess.check_limits(header, self.max_pixels)
        factor = preprocess.choose_reduce(header, self.input_hw) if reduce else 1
        if self.decoder is not None:
            return self.decoder.decode(
                data, header=header, reduce=factor, max_pixels=self.max_pixels
            )
        return preprocess.decode_image(
            data, max_pixels=self.max_pixels, reduce=factor, header=header
        )

    def prepare(self, image: DecodedImage, *, keep_aspect: bool = False) -> Prepared:
        resized, box = preprocess.fit_to_input(image.rgb, self.input_hw, keep_aspect)
        return Prepared(preprocess.quantize(resized, self.lut), box, image.original_hw)

    def infer(self, tensor: np.ndarray) -> np.ndarray:
        """Run the model; serialised by the segmenter's lock (interpreters are not thread-safe)
        unless the runner serialises per device itself (a pool of Edge TPUs)."""
        if getattr(self.runner, "thread_safe", False):
            return self.runner.run(tensor)
        with self.lock:
            return self.runner.run(tensor)

    def finish(self, raw: np.ndarray, prepared: Prepared) -> np.ndarray:
        """Model output -> uint8 mask at the original image size."""
        out = self.variant.output
        grid = postprocess.SampleGrid.for_model(
            raw.shape[:2], self.input_hw, prepared.original_hw,
            align_corners=out.align_corners, content_box=prepared.content_box,
        )  # fmt: skip
        if out.kind == "argmax":
            return postprocess.nearest_resize_labels(raw, grid)
        spec = self.runner.output
        return postprocess.upsample_argmax(raw, grid, spec.scale, spec.zero_point)

    # --- all at once ---------------------------------------------------------------------
    def segment(self, data: bytes, *, keep_aspect: bool = False, reduce: bool = False) -> Segmentation:
        timings: dict[str, float] = {}
        clock = time.perf_counter

        t0 = clock()
        image = self.decode(data, reduce=reduce)
        t1 = clock()
        prepared = self.prepare(image, keep_aspect=keep_aspect)
        t2 = clock()
        raw = self.infer(prepared.tensor)
        t3 = clock()
        mask = self.finish(raw, prepared)
        counts = postprocess.class_pixel_counts(mask, self.variant.n_classes)
        t4 = clock()
        for name, a, b in (("decode", t0, t1), ("preprocess", t1, t2), ("invoke", t2, t3), ("postprocess", t3, t4)):
            timings[name] = (b - a) * 1000.0
        return Segmentation(mask, counts, image, timings, self.variant.name, self.backend)

    def describe(self) -> dict[str, Any]:
        sel = self.selection
        return {
            "name": self.variant.name,
            "description": self.variant.description,
            "backend": self.backend,
            "reason": sel.reason if sel else None,
            "device": self.runner.device,
            "runtime": self.runner.runtime,
            "file": sel.file.name if sel else None,
            "sha256": sel.file.sha256 if sel else None,
            "input_size": list(self.input_hw),
            "output": {
                "kind": self.variant.output.kind,
                "shape": list(self.runner.output.shape),
                "stride": self.variant.output.stride,
                "align_corners": self.variant.output.align_corners,
            },
            "labels": list(self.variant.labels.names),
        }

    def close(self) -> None:
        self.runner.close()


def summary(result: Segmentation, segmenter: Segmenter) -> dict[str, Any]:
    """The JSON document of a segmentation: size, model, backend, class areas, timings."""
    from segd.encode import class_summary

    h, w = result.mask.shape
    return {
        "width": w,
        "height": h,
        "model": result.model,
        "backend": result.backend,
        "classes": class_summary(result.counts, segmenter.variant.labels),
        "background": segmenter.variant.labels.background,  # the class an overlay leaves untinted
        "timings_ms": {k: round(v, 3) for k, v in result.timings.items()},
    }
