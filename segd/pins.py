"""sha256 pins for model files whose publisher gave only an md5.

The original coral-deeplab lists its Google Drive files with md5 sums only. md5 still detects a
broken or substituted download, but collisions are cheap to make, so segd checks the md5 once —
at the first download, or the first load of a file put into the models dir by hand — and then
records the file's sha256 in ``<models dir>/pinned.sha256`` (``sha256sum`` format, so
``sha256sum -c pinned.sha256`` works in that directory). From then on the file must match the
pin: a replaced file is refused even if its md5 was forged to match.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Protocol

from segd.errors import ChecksumMismatch
from segd.fsutil import atomic_write

__all__ = ["PIN_FILE", "bytes_digests", "file_digests", "pinned_sha256", "problem", "read_pins", "verify_digests", "write_pin"]

PIN_FILE = "pinned.sha256"
log = logging.getLogger("segd")
_LINE = re.compile(r"([0-9a-f]{64}) [ *](\S.*)")


class _Spec(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def sha256(self) -> str: ...
    @property
    def md5(self) -> str | None: ...


def read_pins(models_dir: Path) -> dict[str, str]:
    """File name -> pinned sha256 (an unreadable or absent pin file pins nothing)."""
    try:
        text = (models_dir / PIN_FILE).read_text()
    except (OSError, UnicodeDecodeError):
        return {}
    pins: dict[str, str] = {}
    for line in text.splitlines():
        m = _LINE.fullmatch(line.strip())
        if m:
            pins[m.group(2)] = m.group(1)
    return pins


def pinned_sha256(models_dir: Path, name: str) -> str | None:
    return read_pins(models_dir).get(name)


def write_pin(models_dir: Path, name: str, sha256: str) -> None:
    """Add or replace the pin of ``name`` (the whole file rewritten atomically)."""
    pins = read_pins(models_dir)
    pins[name] = sha256
    text = "".join(f"{digest}  {n}\n" for n, digest in sorted(pins.items()))
    atomic_write(models_dir / PIN_FILE, text)


def problem(spec: _Spec, models_dir: Path, sha256: str, md5: str | None) -> str | None:
    """Why a file with these digests is not ``spec`` (None if it is), without pinning."""
    try:
        verify_digests("file", spec, models_dir, sha256, md5, pin=False)
    except ChecksumMismatch as exc:
        return exc.detail
    return None


def verify_digests(
    where: str, spec: _Spec, models_dir: Path, sha256: str, md5: str | None, *, pin: bool = True
) -> str:
    """Check a file's digests against the manifest (sha256), else its pin, else the publisher's
    md5 — pinning the sha256 after a good md5. Returns the sha256 the file was held to.
    Raises ChecksumMismatch naming the file, the digests and what to do."""
    if spec.sha256:
        if sha256 != spec.sha256:
            raise ChecksumMismatch(
                f"{where}: sha256 {sha256}, manifest says {spec.sha256} "
                "(corrupt or replaced file; run `segd models pull --force`)"
            )
        return sha256
    pinned = pinned_sha256(models_dir, spec.name)
    if pinned is not None:
        if sha256 != pinned:
            raise ChecksumMismatch(
                f"{where}: sha256 {sha256}, but {models_dir / PIN_FILE} pinned {pinned} at its first "
                "verified download (replaced or corrupt file; run `segd models pull --force`, "
                "and delete its pin line only if you trust the new file)"
            )
        return sha256
    if not spec.md5:
        raise ChecksumMismatch(f"{where}: the manifest gives neither a sha256 nor an md5")
    if md5 is None:
        raise ChecksumMismatch(f"{where}: md5 not computed")
    if md5 != spec.md5:
        raise ChecksumMismatch(
            f"{where}: md5 {md5}, the publisher's md5 is {spec.md5} (wrong or corrupt file)"
        )
    if not pin:
        return sha256
    try:
        write_pin(models_dir, spec.name, sha256)
    except OSError as exc:  # a read-only models dir: the md5 was checked, the pin waits
        log.warning("%s: md5 verified but its sha256 cannot be pinned in %s: %s", where, models_dir, exc)
    return sha256


def file_digests(path: Path, chunk: int = 1 << 20) -> tuple[str, str]:
    """(sha256, md5) of a file in one pass."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
            md5.update(block)
    return sha.hexdigest(), md5.hexdigest()


def bytes_digests(data: bytes) -> tuple[str, str]:
    return hashlib.sha256(data).hexdigest(), hashlib.md5(data, usedforsecurity=False).hexdigest()
