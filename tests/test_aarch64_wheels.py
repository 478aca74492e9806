"""A Pi install must not need a compiler: every runtime dependency of segd (pyproject's
``dependencies``, not the ``train`` extra) resolves to wheels for 64-bit Raspberry Pi OS bookworm
(linux aarch64, glibc 2.36) on CPython 3.11 (bookworm's python3) and 3.13 (trixie's), asking the
real package index through pip."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from pip_resolve import (
    BOOKWORM_GLIBC_MINOR,
    aarch64_platforms,
    cache_dir,
    installable_on,
    resolve,
    wheel_platforms,
)

REPO = Path(__file__).resolve().parent.parent


def runtime_requirements(python: str, machine: str) -> list[Requirement]:
    """pyproject's dependencies whose markers hold on the target (pip evaluates markers for the
    machine it runs on, not the one passed with --platform, so they are evaluated here)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    target = {"platform_machine": machine, "sys_platform": "linux", "platform_system": "Linux",
              "python_version": python, "python_full_version": python + ".0",
              "implementation_name": "cpython", "platform_python_implementation": "CPython",
              "os_name": "posix", "extra": ""}  # fmt: skip
    reqs = [Requirement(r) for r in project["dependencies"]]
    return [r for r in reqs if r.marker is None or Marker(str(r.marker)).evaluate(target)]


def as_pip_argument(req: Requirement) -> str:
    return (
        f"{req.name}{req.specifier}"
        if not req.extras
        else f"{req.name}[{','.join(sorted(req.extras))}]{req.specifier}"
    )


@pytest.fixture(scope="module")
def pip_cache(request: pytest.FixtureRequest) -> Path:
    return cache_dir(request)


@pytest.mark.parametrize("python", ["3.11", "3.13"])
def test_every_runtime_dependency_has_an_aarch64_wheel(
    python: str, pip_cache: Path, tmp_path: Path
) -> None:
    reqs = runtime_requirements(python, "aarch64")
    names = {r.name for r in reqs}
    assert {"numpy", "opencv-python-headless", "ai-edge-litert", "fastapi", "uvicorn"} <= names
    assert not names & {
        "tensorflow",
        "tf_keras",
        "matplotlib",
    }  # the train extra is not a runtime dependency

    resolved = resolve([as_pip_argument(r) for r in reqs], python, aarch64_platforms(),
                       cache_dir=pip_cache, work_dir=tmp_path)  # fmt: skip
    by_name = {r.name.lower().replace("_", "-"): r for r in resolved}
    for req in reqs:  # each direct dependency is there, at a version its specifier allows
        got = by_name[req.name.lower().replace("_", "-")]
        assert req.specifier.contains(got.version, prereleases=True), (req, got)
    not_wheels = [r.filename for r in resolved if not r.filename.endswith(".whl")]
    assert not_wheels == [], f"these would be built from source on the Pi: {not_wheels}"
    wrong = [
        r.filename
        for r in resolved
        if not installable_on(r.filename, "aarch64", BOOKWORM_GLIBC_MINOR)
    ]
    assert wrong == [], f"not installable on aarch64 glibc 2.{BOOKWORM_GLIBC_MINOR}: {wrong}"
    litert = by_name["ai-edge-litert"]
    print(f"cp{python}: " + ", ".join(f"{r.name} {r.version}" for r in resolved))
    assert any("aarch64" in p for p in wheel_platforms(litert.filename))


def test_the_checks_above_would_reject_a_wheel_for_the_wrong_machine() -> None:
    assert installable_on(
        "numpy-2.4.6-cp311-cp311-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl", "aarch64", 36
    )
    assert installable_on("fastapi-0.115.0-py3-none-any.whl", "aarch64", 36)
    assert not installable_on("numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.whl", "aarch64", 36)
    assert not installable_on(
        "tflite_runtime-2.14.0-cp311-cp311-manylinux_2_34_aarch64.whl", "aarch64", 31
    )
    assert not installable_on("numpy-2.4.6-cp311-cp311-musllinux_1_2_aarch64.whl", "aarch64", 36)


def test_32_bit_raspberry_pi_os_gets_no_ai_edge_litert() -> None:
    """pyproject keeps ai-edge-litert off armv7l (it has no wheels there); docs/RASPBERRY_PI.md says
    what 32-bit users can do instead."""
    names = {r.name for r in runtime_requirements("3.11", "armv7l")}
    assert "ai-edge-litert" not in names and "numpy" in names
    assert "armv7l" in (REPO / "docs" / "RASPBERRY_PI.md").read_text()
