"""The model service: loads the configured variants, warms them up, admits requests into a
bounded queue per variant and runs the engine's stages without blocking the event loop.

Decode + preprocess, then postprocess + encode, run on a shared thread pool (one hop each);
inference runs on a single-thread executor per variant (one interpreter, one caller at a time),
so other requests' CPU work overlaps an inference in flight.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from segd import encode, preprocess, regions
from segd.app.slots import (
    MemoryBudget,
    ModelSlot,
    Result,
    ServiceTime,
    device_present,
    device_states,
    in_thread,
    without_paths,
)
from segd.engine import Segmentation, Segmenter, open_runner, summary
from segd.errors import (
    BadParameter,
    ConfigError,
    ModelNotReady,
    Overloaded,
    RequestTimeout,
    RuntimeUnavailable,
    SegdError,
    UnknownModel,
)
from segd.postprocess import class_pixel_counts
from segd.runtime.pool import DevicePool
from segd.settings import Settings
from segd.synthetic import synthetic_jpeg
from segd.variants import Manifest, Variant

log = logging.getLogger("segd")

SELFTEST_AGREEMENT = 0.98  # Edge TPU mask vs CPU twin on the synthetic image (Coral's own bar)
FORMATS = encode.FORMATS


class ModelService:
    def __init__(self, settings: Settings, manifest: Manifest) -> None:
        self.settings = settings
        self.manifest = manifest
        names, self.default = settings.served_models(manifest)
        self.slots: dict[str, ModelSlot] = {}
        for name in names:
            variant = manifest.get(name)  # unknown configured model: fail at start-up
            self.slots[name] = ModelSlot(name, variant)
        if self.default not in self.slots:
            raise ConfigError(f"default model {self.default!r} is not among the served models {names}")
        self.cpu_pool = ThreadPoolExecutor(max(2, (os.cpu_count() or 1) + 1), thread_name_prefix="cpu")
        self.memory_budget = MemoryBudget(settings.memory_budget)
        self.decode_pool = self._decode_pool()
        self.loaded = threading.Event()
        self.stopping = threading.Event()

    def _decode_pool(self) -> Any:
        """Images are decoded in supervised worker processes, started now (they load while the
        models do): a native decoder that crashes costs one request (400), not the daemon."""
        s = self.settings
        if not s.decode_isolation:
            return None
        from segd.decode_worker import TEST_CRASH_MARKER, DecodePool

        return DecodePool(
            s.decode_workers, timeout=s.request_timeout, backoff_base=s.worker_restart_base,
            backoff_max=s.worker_restart_max, crash_marker=TEST_CRASH_MARKER if s.test_hooks else None,
        )  # fmt: skip

    # --- loading -----------------------------------------------------------------------
    def load_all(self) -> None:
        """Load and self-test every slot (runs in a background thread at start-up)."""
        try:
            for slot in self.slots.values():
                if self.stopping.is_set():
                    break
                self.load(slot)
        finally:
            self.loaded.set()

    def _open(self, variant: Variant, accelerator: str) -> Segmenter:
        s = self.settings
        factory = None
        if accelerator != "cpu" and s.tpu_isolation:
            factory = self._worker_factory()
        if accelerator != "cpu" and s.devices:
            factory = self._pool_factory(factory)
        runner, selection = open_runner(
            variant, models_dir=s.models_dir, accelerator=accelerator, device=s.device,
            runtime=s.runtime, num_threads=s.threads, mirror=s.mirror, edgetpu_factory=factory,
            edgetpu_pairing=s.edgetpu_pairing, edgetpu_pairings=s.edgetpu_pairings, gdrive_url=s.gdrive_url,
            edgetpu_library=s.edgetpu_library,
        )  # fmt: skip
        return Segmenter(selection.variant or variant, runner, selection, max_pixels=s.max_pixels, decoder=self.decode_pool)

    def _worker_factory(self) -> Any:
        """Edge TPU interpreters run in a supervised child process: libedgetpu can abort()."""
        from segd.runtime.worker import edgetpu_worker_factory

        s = self.settings
        return edgetpu_worker_factory(
            library=s.edgetpu_library, runtime=s.runtime, num_threads=s.threads, python=s.edgetpu_python,
            pairing=s.edgetpu_pairing, pairings=s.edgetpu_pairings, call_timeout=s.tpu_timeout,
            backoff_base=s.worker_restart_base, backoff_max=s.worker_restart_max,
            depth=s.tpu_pipeline,
        )  # fmt: skip

    def _pool_factory(self, one: Any) -> Any:
        """``devices = [...]``: one worker per listed Edge TPU, behind least-loaded dispatch."""
        from segd.runtime import edgetpu
        from segd.runtime.pool import resolve_devices

        s = self.settings

        def open_pool(model: bytes, device: str | None) -> DevicePool:
            paths = resolve_devices(s.devices, edgetpu.list_devices(s.edgetpu_library))
            if one is not None:
                return DevicePool.open(paths, lambda path: one(model, path))
            return DevicePool.open(paths, lambda path: edgetpu.open_paired(
                model, device=path, library=s.edgetpu_library, policy=s.edgetpu_pairing,
                pairings=s.edgetpu_pairings, preferred=s.runtime, num_threads=s.threads))  # fmt: skip

        return open_pool

    def load(self, slot: ModelSlot) -> None:
        """Open, warm up and self-test one variant. An Edge TPU that fails any step (opening,
        warm-up, or agreement with its CPU twin) leaves the variant on the CPU twin, with the
        reason; only a variant that cannot run at all is marked failed."""
        t0 = time.perf_counter()
        primary: Segmenter | None = None
        fallback: Segmenter | None = None
        try:
            primary = self._open(slot.variant, self.settings.accelerator)
            if primary.backend == "edgetpu":
                fallback = self._open(slot.variant, "cpu")
                if fallback.variant.name != primary.variant.name:
                    reason = self._warm_only(slot, primary, fallback)
                else:
                    reason = self._selftest(slot, primary, fallback)
                if reason is not None:
                    log.error("%s: %s; serving on the CPU twin", slot.name, reason)
                    primary.close()
                    primary, fallback = self._retag(fallback, reason), None
            else:
                t = time.perf_counter()
                self._warm(primary)
                slot.service = ServiceTime(time.perf_counter() - t)  # what admission starts from
                slot.selftest = {"probe": "synthetic", "passed": True}
            if fallback is not None and self.settings.tpu_fallback != "cpu":
                fallback.close()
                fallback = None
            slot.primary, slot.fallback = primary, fallback
            parallel = int(getattr(primary.runner, "parallelism", 1))
            if parallel > 1:
                slot.widen_executor(parallel)
            slot.state = "ready"
            slot.error = None
            log.info("%s: ready on %s (%s)", slot.name, primary.backend, primary.selection.reason if primary.selection else "")
        except Exception as exc:  # a variant that cannot load must not stop the others
            for seg in (primary, fallback):
                if seg is not None:
                    seg.close()
            slot.state = "failed"
            slot.error = getattr(exc, "detail", None) or f"{type(exc).__name__}: {exc}"
            log.error("%s: failed to load: %s", slot.name, slot.error, exc_info=not isinstance(exc, SegdError))
        finally:
            slot.load_seconds = time.perf_counter() - t0

    def _selftest(self, slot: ModelSlot, tpu: Segmenter, cpu: Segmenter) -> str | None:
        """Coral's own bar: the Edge TPU mask on a synthetic image agrees > 0.98 with the CPU twin's.
        Returns why the TPU must not be used, or None."""
        try:
            agreement = self._compare(tpu, cpu)
        except Exception as exc:  # the worker died or the delegate failed on its first invoke
            slot.selftest = {"probe": "synthetic", "passed": False, "error": getattr(exc, "detail", str(exc))}
            return f"Edge TPU failed its warm-up: {slot.selftest['error']}"
        passed = agreement > SELFTEST_AGREEMENT
        slot.selftest = {"probe": "synthetic", "tpu_vs_cpu_agreement": round(agreement, 5),
                         "required": SELFTEST_AGREEMENT, "passed": passed}  # fmt: skip
        if passed:
            return None
        if self.settings.relax_simulated_tpu_selftest:
            from segd.runtime import edgetpu

            if edgetpu.is_simulator():
                slot.selftest["relaxed"] = "simulated Edge TPU (relax_simulated_tpu_selftest, bench only)"
                log.warning("%s: self-test not enforced: the Edge TPU is segd's simulator", slot.name)
                return None
        return f"Edge TPU self-test failed: mask agreement with the CPU twin {agreement:.4f} <= {SELFTEST_AGREEMENT}"

    def _warm_only(self, slot: ModelSlot, tpu: Segmenter, cpu: Segmenter) -> str | None:
        """An Edge-TPU-only variant's CPU fallback is another network: masks are not compared,
        the TPU must only get through its warm-up."""
        note = f"CPU fallback {cpu.variant.name} is a different network: masks not compared"
        try:
            self._warm(tpu)
            self._warm(cpu)
        except Exception as exc:
            slot.selftest = {"probe": "synthetic", "passed": False, "error": getattr(exc, "detail", str(exc)), "note": note}
            return f"Edge TPU failed its warm-up: {slot.selftest['error']}"
        slot.selftest = {"probe": "synthetic", "passed": True, "note": note}
        return None

    @staticmethod
    def _retag(seg: Segmenter, reason: str) -> Segmenter:
        if seg.selection is not None:
            from dataclasses import replace

            seg.selection = replace(seg.selection, reason=reason)
        return seg

    def _warm(self, seg: Segmenter) -> np.ndarray:
        return seg.segment(synthetic_jpeg(seg.input_hw)).mask

    def _compare(self, a: Segmenter, b: Segmenter) -> float:
        """Agreement of ``a`` with ``b``; with several Edge TPUs, of the worst one."""
        reference = self._warm(b)
        run_on_each = getattr(a.runner, "run_on_each", None)
        if run_on_each is None:
            return float((self._warm(a) == reference).mean())
        prepared = a.prepare(a.decode(synthetic_jpeg(a.input_hw)))
        masks = [a.finish(raw, prepared) for raw in run_on_each(prepared.tensor)]
        return min(float((mask == reference).mean()) for mask in masks)

    # --- health ------------------------------------------------------------------------
    def ready(self) -> bool:
        return self.loaded.is_set() and all(s.ready for s in self.slots.values())

    def readiness(self) -> dict[str, Any]:
        return {
            "ready": self.ready(),
            "loaded": self.loaded.is_set(),
            "models": {
                n: {
                    "state": s.state,
                    "ready": s.ready,
                    "backend": s.primary.backend if s.primary else None,
                    "error": without_paths(s.error),
                    # null for a model served on the CPU: there is no device to be present
                    "device_present": s.device_present if s.primary is not None and s.primary.backend == "edgetpu" else None,
                    **device_states(s),
                }
                for n, s in self.slots.items()
            },
        }

    def check_devices(self) -> None:
        """Mark Edge TPU slots whose device disappeared as not ready (and back)."""
        tpu_slots = [s for s in self.slots.values() if s.primary is not None and s.primary.backend == "edgetpu"]
        if not tpu_slots:
            return
        from segd.runtime import edgetpu

        try:
            devices = edgetpu.list_devices(self.settings.edgetpu_library)
        except Exception as exc:  # the library itself vanished or broke
            log.warning("Edge TPU device check failed: %s", exc)
            devices = []
        for slot in tpu_slots:
            assert slot.primary is not None
            pool = slot.primary.runner
            if isinstance(pool, DevicePool):  # several Edge TPUs: each one on its own
                for path, there in pool.mark_present({d.path for d in devices}):
                    log.warning("%s: Edge TPU %s %s", slot.name, path, "is back" if there else "disappeared")
                if self.settings.devices == ["all"] and pool.adopt([d.path for d in devices]):
                    log.warning("%s: now serving on Edge TPUs %s", slot.name, pool.device)
                    slot.widen_executor(pool.parallelism)
                slot.device_present = pool.any_present
                continue
            present = device_present(slot.primary.runner.device, devices)
            if present != slot.device_present:
                log.warning("%s: Edge TPU %s", slot.name, "is back" if present else "disappeared")
            slot.device_present = present

    # --- requests ----------------------------------------------------------------------
    def slot(self, name: str | None) -> ModelSlot:
        key = name or self.default
        if key not in self.slots:
            self.manifest.get(key)  # raises UnknownModel listing the known ones
            raise UnknownModel(f"model {key!r} is in the manifest but not served here; served: {', '.join(self.slots)}")
        return self.slots[key]

    async def segment(
        self, name: str | None, data: bytes, *, fmt: str = "png", keep_aspect: bool = False,
        overlay_format: str = "jpeg", shape: regions.Shape | None = None,
    ) -> Result:  # fmt: skip
        """Segment ``data``, a complete upload: a request takes a place in the model's queue only
        once its body has arrived, so slow uploads never hold the model."""
        if fmt not in FORMATS:
            raise BadParameter(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        if overlay_format not in ("jpeg", "png"):
            raise BadParameter(f"overlay_format must be jpeg or png, not {overlay_format!r}")
        slot = self.slot(name)
        if not slot.can_answer:
            raise ModelNotReady(f"model {slot.name!r} is not ready ({slot.error or slot.state})")
        self.admit(slot)
        slot.queued += 1
        slot.requests += 1
        t0 = time.perf_counter()
        try:
            result = await asyncio.wait_for(
                self._budgeted(slot, data, fmt, keep_aspect, overlay_format, shape), self.settings.request_timeout
            )
        except TimeoutError:
            slot.errors += 1
            raise RequestTimeout(f"request took longer than {self.settings.request_timeout:g} s") from None
        except SegdError:
            slot.errors += 1
            raise
        finally:
            slot.queued -= 1
        total = (time.perf_counter() - t0) * 1000.0
        result.timings["total"] = total
        result.document["timings_ms"] = {k: round(v, 3) for k, v in result.timings.items()}
        slot.latencies_ms.append(total)
        slot.service.completed(time.perf_counter(), total / 1000.0, busy=slot.queued > 0)
        return result

    def admit(self, slot: ModelSlot) -> None:
        """Admission by expected wait: the requests ahead times the measured service time. A
        request is refused (503, Retry-After = when it would fit) only when it could not finish
        within ``request_timeout``; ``queue_size`` (when set) is an extra hard cap."""
        s = self.settings
        if s.queue_size and slot.queued >= s.queue_size:
            raise Overloaded(f"model {slot.name!r} has {slot.queued} requests queued (limit {s.queue_size})",
                             retry_after=max(1, math.ceil(slot.service.seconds)))  # fmt: skip
        finish = (slot.queued + 1) * slot.service.seconds
        if slot.queued and finish > s.request_timeout:  # a lone request is always tried (and measured)
            wait = finish - s.request_timeout
            raise Overloaded(
                f"model {slot.name!r} has {slot.queued} requests queued, about {finish:.1f} s of work at "
                f"{slot.service.seconds * 1000:.0f} ms each, over the request timeout of {s.request_timeout:g} s",
                retry_after=max(1, math.ceil(wait)),
            )

    async def _budgeted(
        self, slot: ModelSlot, data: bytes, fmt: str, keep_aspect: bool, overlay_format: str, shape: regions.Shape | None
    ) -> Result:
        """The pipeline, once what the image needs fits in the memory budget (header probed off the loop;
        bad or oversized images are refused here without waiting)."""
        loop = asyncio.get_running_loop()
        header = await loop.run_in_executor(self.cpu_pool, preprocess.probe_image, data)
        preprocess.check_limits(header, self.settings.max_pixels)
        seg = slot.primary
        assert seg is not None  # slot.can_answer
        # the loaded Segmenter's size: a manifest entry may leave the input shape to be read from the file
        reduce = preprocess.choose_reduce(header, seg.input_hw) if fmt != "overlay" else 1
        output = f"overlay-{overlay_format}" if fmt == "overlay" else fmt
        need = preprocess.request_bytes(header, reduce=reduce, output=output, upload=len(data))
        self.memory_budget.check(need, f"this {header.width}x{header.height} {header.format.upper()} image")
        held = await self.memory_budget.acquire(need)
        try:
            return await self._pipeline(slot, data, header, fmt, keep_aspect, overlay_format, shape)
        finally:
            await self.memory_budget.release(held)

    async def _pipeline(
        self, slot: ModelSlot, data: bytes, header: preprocess.ImageHeader, fmt: str, keep_aspect: bool,
        overlay_format: str, shape: regions.Shape | None,
    ) -> Result:  # fmt: skip
        seg = slot.primary
        assert seg is not None
        timings: dict[str, float] = {}
        clock = time.perf_counter

        def timed(name: str, fn: Any, *args: Any) -> Any:
            t = clock()
            out = fn(*args)
            timings[name] = (clock() - t) * 1000.0
            return out

        # Stages that follow each other run in one thread hop: a hop costs two thread wake-ups.
        def prepare() -> tuple[Any, Any]:
            image = timed("decode", lambda: seg.decode(data, reduce=fmt != "overlay", header=header))
            return image, timed("preprocess", lambda: seg.prepare(image, keep_aspect=keep_aspect))

        image, prepared = await in_thread(self.cpu_pool, prepare)
        used, raw, prepared = await self._infer(slot, image, prepared, keep_aspect, timings)
        n_classes = slot.variant.n_classes
        labels = slot.variant.labels
        keep, fill = shape.resolve(labels) if shape is not None else (None, labels.background)

        def finish() -> tuple[np.ndarray, np.ndarray]:
            mask = used.finish(raw, prepared)
            if shape is not None and shape.changes_mask:
                assert fill is not None
                mask = regions.keep_classes(mask, keep, shape.min_area, fill)
                return mask, class_pixel_counts(mask, 256)
            return mask, class_pixel_counts(mask, n_classes)

        def answer() -> Result:
            mask, counts = timed("postprocess", finish)
            body, media = timed("encode", encode.render, fmt, mask, labels.palette, image.rgb, overlay_format, fill, True)
            segmentation = Segmentation(mask, counts, image, timings, slot.name, used.backend)
            document = summary(segmentation, used)
            if shape is not None:
                timed("regions", shape.describe, document, mask, keep, fill)
            return Result(body, media, slot.name, used.backend, timings, document, segmentation)

        result: Result = await in_thread(self.cpu_pool, answer)
        return result

    async def _infer(
        self, slot: ModelSlot, image: Any, prepared: Any, keep_aspect: bool, timings: dict[str, float]
    ) -> tuple[Segmenter, np.ndarray, Any]:
        """Run the model; when the Edge TPU fails in any way (worker died or hung, delegate error)
        the request goes to the CPU twin if there is one, else it is a 503 naming the failure.
        Returns the segmenter used, its raw output and the input it was given (the CPU fallback
        of an Edge-TPU-only variant is another network: the image is prepared again for it)."""
        primary = slot.primary
        assert primary is not None
        t = time.perf_counter()
        if slot.ready or slot.fallback is None:
            try:
                raw = await in_thread(slot.executor, primary.infer, prepared.tensor)
                timings["invoke"] = (time.perf_counter() - t) * 1000.0
                return primary, raw, prepared
            except Exception as exc:
                if primary.backend != "edgetpu":
                    raise
                detail = getattr(exc, "detail", None) or f"{type(exc).__name__}: {exc}"
                if slot.fallback is None:
                    if isinstance(exc, SegdError) and exc.http_status == 503:
                        raise
                    raise RuntimeUnavailable(f"Edge TPU inference failed: {detail}") from exc
                log.warning("%s: Edge TPU failed (%s); serving this request on the CPU twin", slot.name, detail)
        fallback = slot.fallback
        if fallback is None:
            raise ModelNotReady(f"model {slot.name!r} is not ready")
        slot.fallbacks += 1
        if fallback.variant.name != primary.variant.name:
            prepared = await in_thread(self.cpu_pool, lambda: fallback.prepare(image, keep_aspect=keep_aspect))
        raw = await in_thread(slot.fallback_executor, fallback.infer, prepared.tensor)
        timings["invoke"] = (time.perf_counter() - t) * 1000.0
        return fallback, raw, prepared

    def close(self) -> None:
        self.stopping.set()
        for slot in self.slots.values():
            for seg in (slot.primary, slot.fallback):
                if seg is not None:
                    try:
                        seg.close()
                    except Exception as exc:  # closing must not stop the shutdown
                        log.warning("%s: close failed: %s", slot.name, exc)
            slot.executor.shutdown(wait=False, cancel_futures=True)
            slot.fallback_executor.shutdown(wait=False, cancel_futures=True)
        self.cpu_pool.shutdown(wait=False, cancel_futures=True)
        if self.decode_pool is not None:
            self.decode_pool.close()


__all__ = ["ModelService", "ModelSlot", "Result"]
