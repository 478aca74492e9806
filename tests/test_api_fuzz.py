"""Property-based API fuzzing against a real daemon, generated from the daemon's own
``/openapi.json`` by schemathesis: valid and invalid parameters, bodies and content types for
every operation. Properties: no 5xx except the documented 503s; every error is the JSON
``{"error", "detail"}`` (``/readyz``'s 503 is its readiness document, as documented); status
codes, content types and error bodies are the ones the schema documents; invalid input is
refused with a 4xx; unsupported methods get 405. Then the same for real images mutated by the
decode fuzzer (tests/test_fuzz.py), sent over HTTP: 200 masks equal the in-process engine's.

Bounded for CI by ``SEGD_API_FUZZ_EXAMPLES`` (default 150 per operation and mode).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import read_mask_png
from daemon import Daemon, start_daemon
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from test_fuzz import mutated_images, seed_corpus

from segd.engine import Segmenter

schemathesis = pytest.importorskip("schemathesis")

DM05 = "deeplabv3_mnv2_dm05_pascal"
API_KEY = "api-fuzz-key-5e1f"
EXAMPLES = int(os.environ.get("SEGD_API_FUZZ_EXAMPLES", "150"))
SERVICE_503 = {"model_not_ready", "overloaded", "timeout", "worker_crashed", "runtime_unavailable", "no_frame"}
CAMERA = "fuzz-cam-7f3"  # a configured source, so the camera routes are in the schema (a name no generator hits)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, test_data: Path) -> Iterator[Daemon]:
    from camera import Camera
    from test_sources import jpeg, write_config

    tmp = tmp_path_factory.mktemp("apifuzz")
    cam = Camera([jpeg(test_data / "bird.bmp")], fps=2)
    config = write_config(tmp, {CAMERA: {"url": cam.url + "/stream", "fps": 1, "model": DM05}})
    d = start_daemon(tmp, models_dir, "--config", str(config), "--model", DM05, "--accelerator", "cpu",
                     env={"SEGD_API_KEY": API_KEY, "SEGD_QUEUE_SIZE": "16"})  # fmt: skip
    yield d
    d.stop()
    cam.stop()


def problems_with(method: str, path: str, status: int, ctype: str, body: Any) -> list[str]:
    """What is wrong with one answer, by segd's own rules (empty: nothing)."""
    where = f"{method.upper()} {path} -> {status}"
    out = []
    if status >= 500 and status != 503:
        out.append(f"{where}: server error")
    if status < 400:
        return out
    if path == "/readyz" and status == 503:
        if not (isinstance(body, dict) and body.get("ready") is False):
            out.append(f"{where}: not a readiness document: {body!r}")
        return out
    if not ctype.startswith("application/json"):
        out.append(f"{where}: error with content type {ctype!r}")
    elif not (isinstance(body, dict) and set(body) == {"error", "detail"} and body["detail"]):
        out.append(f"{where}: error body is not {{error, detail}}: {body!r}")
    elif status == 503 and body["error"] not in SERVICE_503:
        out.append(f"{where}: undocumented 503 {body['error']!r}")
    return out


def _json(r: Any) -> Any:
    try:
        return r.json()
    except ValueError:
        return None


def fuzz_operation(op: Any, mode: Any, url: str, failures: list[str], statuses: dict[int, int],
                   runs: dict[str, int]) -> None:  # fmt: skip
    """Generated requests for one operation in one mode (valid or invalid data), each answer
    checked by segd's rules and schemathesis' checks; failures collected, not raised."""
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.failures import FailureGroup
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
        unsupported_method,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              negative_data_rejection, unsupported_method]  # fmt: skip
    auth = {"X-API-Key": API_KEY}
    key = f"{op.method.upper()} {op.path} {mode.value}"

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        r = case.call(base_url=url, headers=auth, timeout=60)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        runs[key] = runs.get(key, 0) + 1
        ctype = (r.headers.get("content-type") or [""])[0]
        failures.extend(problems_with(op.method, op.path, r.status_code, ctype, _json(r)))
        try:
            case.validate_response(r, checks=checks, headers=auth, transport_kwargs={"base_url": url})
        except FailureGroup as group:
            failures.extend(f"{key}: {f.title}: {f.message[:300]}" for f in group.exceptions)

    try:
        run()
    except Unsatisfiable:  # nothing to make invalid (e.g. GET /healthz has no parameters)
        assert mode.value == "negative", key


def test_every_operation_of_the_openapi_schema_holds_under_generated_requests(daemon: Daemon) -> None:
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(daemon.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method, op.path) for op in operations} >= {
        ("get", "/healthz"), ("get", "/readyz"), ("get", "/models"), ("get", "/models/{name}"),
        ("get", "/metrics"), ("post", "/segment"), ("get", "/sources"), ("get", "/sources/{name}/latest"),
    }  # fmt: skip
    failures: list[str] = []
    statuses: dict[int, int] = {}
    runs: dict[str, int] = {}
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz_operation(op, mode, daemon.url, failures, statuses, runs)

    assert failures == [], "\n".join(sorted(set(failures))[:30])
    print(f"schemathesis: {sum(runs.values())} requests {runs}, statuses {dict(sorted(statuses.items()))}")
    assert runs.get("POST /segment positive", 0) >= min(EXAMPLES, 20)
    assert runs.get("POST /segment negative", 0) >= min(EXAMPLES, 20)
    assert {415, 422} <= set(statuses)  # random bodies, invalid parameters were really sent
    assert httpx.get(daemon.url + "/healthz").status_code == 200
    assert "Traceback" not in daemon.output()


def test_protected_operations_refuse_requests_without_the_key(daemon: Daemon) -> None:
    spec = httpx.get(daemon.url + "/openapi.json").json()
    with httpx.Client(base_url=daemon.url, timeout=30) as c:
        for path, methods in spec["paths"].items():
            for method in methods:
                concrete = path.replace("{name}", DM05)
                r = c.request(method.upper(), concrete, headers={"X-API-Key": "wrong"})
                if path in ("/healthz", "/readyz"):
                    assert r.status_code == 200, path
                else:
                    assert r.status_code == 401 and r.json()["error"] == "unauthorized", (method, path, r.text)
                    assert "401" in methods[method]["responses"], f"{method} {path} does not document 401"
    assert API_KEY not in daemon.output()


def test_mutated_real_images_over_http_give_masks_or_json_errors(
    daemon: Daemon, engine: Segmenter, test_data: Path
) -> None:
    corpus = seed_corpus(test_data)
    seen: dict[int, int] = {}
    wrong: list[str] = []

    @settings(max_examples=max(EXAMPLES, 100), deadline=None, database=None, derandomize=True,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(blob=mutated_images(corpus), raw=st.booleans())
    def run(blob: bytes, raw: bool) -> None:
        with httpx.Client(base_url=daemon.url, timeout=60, headers={"X-API-Key": API_KEY}) as c:
            if raw:
                r = c.post("/segment", content=blob, headers={"content-type": "application/octet-stream"})
            else:
                r = c.post("/segment", files={"image": ("x", blob, "application/octet-stream")})
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code in (200, 400, 413, 415), r.text
        if r.status_code == 200:
            expected = engine.segment(blob, reduce=True).mask
            if not np.array_equal(read_mask_png(r.content), expected):
                wrong.append(blob[:16].hex())
        else:
            assert problems_with("post", "/segment", r.status_code, r.headers["content-type"], r.json()) == []

    run()
    assert wrong == []
    assert seen.get(200, 0) > 0 and seen.get(400, 0) > 0
    assert "Traceback" not in daemon.output()


def test_the_api_key_is_never_logged_even_at_debug_level(tmp_path: Path, models_dir: Path, test_data: Path) -> None:
    """Right and wrong keys, in both headers, on every kind of route: neither the configured key
    nor what clients sent appears in the log or in any response."""
    key = "debug-level-key-9c0d"
    wrong = "wrong-guess-key-77aa"
    d = start_daemon(tmp_path, models_dir, "--model", DM05, "--accelerator", "cpu",
                     env={"SEGD_API_KEY": key, "SEGD_LOG_LEVEL": "debug"},)  # fmt: skip
    bodies = []
    try:
        jpeg = (test_data / "bird.bmp").read_bytes()
        with httpx.Client(base_url=d.url, timeout=60) as c:
            for headers in ({"X-API-Key": key}, {"Authorization": f"Bearer {key}"}, {"X-API-Key": wrong},
                            {"Authorization": f"Bearer {wrong}"}, {}):  # fmt: skip
                for method, path in (("GET", "/models"), ("GET", f"/models/{DM05}"), ("GET", "/metrics"),
                                     ("GET", "/readyz"), ("GET", "/nope"), ("POST", "/segment")):  # fmt: skip
                    r = c.request(method, path, headers={**headers, "content-type": "image/bmp"},
                                  content=jpeg if method == "POST" else None)  # fmt: skip
                    bodies.append(r.text + str(r.headers))
            assert c.post("/segment", content=b"junk", headers={"X-API-Key": key, "content-type": "image/png"}).status_code == 415
    finally:
        d.stop()
    log = d.output()
    assert "DEBUG" in log or "debug" in log.lower()  # the level really was debug
    for secret in (key, wrong):
        assert secret not in log
        assert not any(secret in b for b in bodies)
