"""Ask pip, for another machine, which files an install would use: ``pip install --dry-run
--report`` with ``--platform/--python-version/--implementation/--abi`` and ``--only-binary=:all:``.

A resolution that succeeds names a wheel for every package, so installing there needs no
compiler. Only package metadata is fetched (PEP 658), into a persistent cache dir, so repeated
runs take seconds. Used by test_aarch64_wheels.py and test_dockerfile.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# Raspberry Pi OS bookworm (Debian 12) has glibc 2.36: pip there accepts manylinux_2_17 ...
# manylinux_2_36 (manylinux2014 = manylinux_2_17) wheels.
BOOKWORM_GLIBC_MINOR = 36
NETWORK_ERRORS = re.compile(
    r"NewConnectionError|Could not fetch URL|Temporary failure in name resolution|Network is unreachable"
    r"|ConnectTimeoutError|ProxyError|Max retries exceeded|Name or service not known"
)
WHEEL = re.compile(
    r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$"
)


def cache_dir(request: pytest.FixtureRequest) -> Path:
    """pytest's cache (kept between runs), or a temporary directory under -p no:cacheprovider."""
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("pip-cross-resolve"))
    return Path(request.getfixturevalue("tmp_path_factory").mktemp("pip-cache"))


def aarch64_platforms(glibc_minor: int = BOOKWORM_GLIBC_MINOR) -> list[str]:
    return [f"manylinux_2_{m}_aarch64" for m in range(glibc_minor, 16, -1)] + [
        "manylinux2014_aarch64"
    ]


@dataclass(frozen=True)
class Resolved:
    name: str
    version: str
    filename: str  # of the wheel (or the local project directory's name)
    local: bool  # the project itself, from a directory


def resolve(
    requirements: list[str],
    python: str,
    platforms: list[str],
    *,
    cache_dir: Path,
    work_dir: Path,
    only_binary: bool = True,
    timeout: float = 600,
) -> list[Resolved]:
    """What pip would install for CPython ``python`` ("3.11") on ``platforms``; pytest.skip if the
    package index cannot be reached, pytest.fail with pip's message if resolution fails."""
    abi = "cp" + python.replace(".", "")
    report = work_dir / f"report-{abi}.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--report", str(report), "--target", str(work_dir / f"target-{abi}"),
           "--python-version", python, "--implementation", "cp", "--abi", abi,
           "--cache-dir", str(cache_dir), "--retries", "1", "--timeout", "30"]  # fmt: skip
    if only_binary:
        cmd.append("--only-binary=:all:")
    for platform in platforms:
        cmd += ["--platform", platform]
    proc = subprocess.run(
        [*cmd, *requirements], capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        output = proc.stdout + proc.stderr
        if NETWORK_ERRORS.search(output):
            pytest.skip(
                f"the package index is unreachable: {NETWORK_ERRORS.search(output).group(0)}"
            )  # type: ignore[union-attr]
        pytest.fail(
            f"pip could not resolve for cp{abi[2:]} on {platforms[0]}...:\n{' '.join(cmd)} ...\n{output[-4000:]}"
        )
    items = json.loads(report.read_text())["install"]
    out = []
    for item in items:
        url = item["download_info"]["url"]
        meta = item["metadata"]
        out.append(
            Resolved(
                meta["name"],
                meta["version"],
                url.rsplit("/", 1)[-1],
                url.startswith("file:") and "dir_info" in item["download_info"],
            )
        )
    return out


def wheel_platforms(filename: str) -> set[str]:
    """The platform tags of a wheel file name (compressed tag sets split)."""
    m = WHEEL.match(filename)
    assert m, f"not a wheel: {filename}"
    return set(m.group("plat").split("."))


def installable_on(filename: str, arch: str, glibc_minor: int) -> bool:
    """Would pip on ``arch`` with glibc 2.``glibc_minor`` take this wheel's platform tag?"""
    for tag in wheel_platforms(filename):
        if tag == "any":
            return True
        m = re.fullmatch(r"manylinux_2_(\d+)_" + arch, tag)
        if m and int(m.group(1)) <= glibc_minor:
            return True
        if tag == f"manylinux2014_{arch}" and glibc_minor >= 17:
            return True
    return False
