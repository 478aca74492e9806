"""Model files: a variant's file is found in the models directory, else copied from a mirror
(directory or base URL, ``SEGD_MODEL_MIRROR``), else downloaded from the manifest URL or Google
Drive (``gdrive_id``, :mod:`segd.gdrive`) — sha256-verified in every case (a publisher that gave
only an md5: the md5 once, then the sha256 pinned at that first verification, :mod:`segd.pins`),
written to a temporary name and renamed into place only once verified, so a crash or a full disk
never leaves a partial or corrupt file where a model is expected. The manifest itself (schema, load, dump) is :mod:`segd.manifest`; its names are
re-exported here for existing imports.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segd import pins, settings
from segd.errors import ChecksumMismatch, ModelError, ModelNotFound
from segd.fsutil import fsync_dir
from segd.manifest import (
    BUILTIN_MANIFEST,
    FileSpec,
    Manifest,
    Variant,
    builtin_manifest,
    check_tensor,
    default_models_dir,
    load_manifest,
    sha256_bytes,
)

__all__ = [
    "BUILTIN_MANIFEST",
    "FileSpec",
    "Manifest",
    "Variant",
    "builtin_manifest",
    "check_tensor",
    "default_models_dir",
    "fetch",
    "load_manifest",
    "read_verified",
    "resolve_file",
    "sha256_bytes",
    "sha256_file",
]

CHUNK = 1 << 20
GDRIVE_SOURCE = "gdrive:"  # a source "gdrive:<file id>" is fetched through segd.gdrive
MAX_DOWNLOAD = 1 << 30  # bound on a download whose size the manifest does not give

ProgressFn = Callable[[int, int], None]


# --- files ---------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_verified(path: Path, spec: FileSpec) -> bytes:
    """Read a model file and check it against the manifest; the bytes returned are the ones
    checked, so nothing can change between verification and load."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelNotFound(f"model file {path} does not exist") from None
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc}") from exc
    if spec.size is not None and len(data) != spec.size:
        raise ChecksumMismatch(
            f"{path}: size {len(data)} bytes, manifest says {spec.size} "
            "(truncated or wrong file; run `segd models pull --force`)"
        )
    if spec.sha256:
        pins.verify_digests(str(path), spec, path.parent, sha256_bytes(data), None)
    else:  # md5-only publisher checksum: the sha256 pin, else the md5 (then pinned)
        pins.verify_digests(str(path), spec, path.parent, *pins.bytes_digests(data))
    return data


def resolve_file(
    spec: FileSpec,
    models_dir: Path | None = None,
    *,
    mirror: str | None = None,
    download: bool = True,
    force: bool = False,
    progress: ProgressFn | None = None,
    gdrive_url: str | None = None,
) -> Path:
    """Return the path of a verified copy of ``spec`` in the models dir, fetching it if needed."""
    mdir = models_dir or default_models_dir()
    target = mdir / spec.name
    if target.exists() and not force:
        if spec.size is not None and target.stat().st_size != spec.size:
            raise ChecksumMismatch(
                f"{target}: does not match the manifest sha256 {spec.sha256} ({target.stat().st_size} bytes, "
                f"the manifest says {spec.size}: corrupt or replaced file; run `segd models pull --force` "
                "to fetch it again)"
            )
        _verify_file(str(target), target, spec, mdir)
        return target
    mirror = mirror if mirror is not None else settings.env_mirror()  # none passed down: SEGD_MODEL_MIRROR
    errors: list[str] = []
    sources: list[str] = []
    if mirror:
        sources.append(_join(mirror, spec.name))
    if download and spec.url:
        sources.append(spec.url)
    if download and spec.gdrive_id:
        sources.append(GDRIVE_SOURCE + spec.gdrive_id)
    if not sources:
        raise ModelNotFound(
            f"model file {spec.name} is not in {mdir} and there is no mirror or URL to fetch it from"
        )
    mdir.mkdir(parents=True, exist_ok=True)
    for src in sources:
        try:
            fetch(src, target, spec, progress=progress, gdrive_url=gdrive_url)
            return target
        except ChecksumMismatch:
            raise
        except (OSError, ValueError) as exc:
            errors.append(f"{src}: {exc}")
    raise ModelNotFound(f"could not fetch {spec.name}: " + "; ".join(errors))


def _join(mirror: str, name: str) -> str:
    if "://" in mirror:
        return mirror.rstrip("/") + "/" + urllib.parse.quote(name)
    return str(Path(mirror) / name)


def fetch(
    src: str, target: Path, spec: FileSpec, *, progress: ProgressFn | None = None, gdrive_url: str | None = None
) -> None:
    """Copy or download ``src`` to ``target`` via ``target.partial``: resumes a partial download
    (HTTP Range), verifies size and sha256 (or the publisher's md5, then pins the sha256), fsyncs,
    then renames atomically; ``gdrive:<id>`` sources go through :mod:`segd.gdrive`. On any failure the
    partial file is removed — except after a network interruption of a download, which the next
    attempt resumes — so a failed fetch never holds disk space another model needs. A full disk
    is named as such (ENOSPC)."""
    partial = target.with_name(target.name + ".partial")
    try:
        _fetch_to(src, partial, spec, progress, gdrive_url)
    except OSError as exc:
        from segd.gdrive import DriveTruncated

        storage = exc.errno in STORAGE_ERRNOS
        network = ("://" in src and isinstance(exc, NETWORK_ERRORS)) or isinstance(exc, DriveTruncated)
        resumable = network and not storage
        if not resumable:
            partial.unlink(missing_ok=True)
        if storage:
            for stale in target.parent.glob("*.partial"):  # earlier interrupted downloads: free their space too
                stale.unlink(missing_ok=True)
            name = errno.errorcode.get(exc.errno or 0, "")
            raise OSError(exc.errno, f"no space for {target.name} ({name}: {exc.strerror})") from exc
        raise
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)
    fsync_dir(target.parent)


class ShortTransfer(OSError):
    """A download ended before its size: the connection was cut (resumable)."""


STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)
NETWORK_ERRORS = (urllib.error.URLError, TimeoutError, ConnectionError, ShortTransfer, http.client.HTTPException)


def _fetch_to(src: str, partial: Path, spec: FileSpec, progress: ProgressFn | None, gdrive_url: str | None) -> None:
    if src.startswith(GDRIVE_SOURCE):
        from segd import gdrive

        base = gdrive_url or settings.env_gdrive_url()
        gdrive.download(src[len(GDRIVE_SOURCE):], partial, base_url=base, progress=progress,
                        max_bytes=spec.size or MAX_DOWNLOAD)  # fmt: skip
    elif "://" not in src:
        if not Path(src).is_file():
            raise FileNotFoundError(f"not in mirror ({src})")
        partial.unlink(missing_ok=True)
        with open(src, "rb") as fin, open(partial, "wb") as fout:
            _copy(fin, fout, spec.size or 0, 0, progress)
            fout.flush()
            os.fsync(fout.fileno())
    else:
        have = partial.stat().st_size if partial.exists() else 0
        if spec.size is not None and have > spec.size:
            partial.unlink()
            have = 0
        req = urllib.request.Request(src, headers={"User-Agent": "segd"})
        if have:
            req.add_header("Range", f"bytes={have}-")
        with urllib.request.urlopen(req, timeout=60) as resp:
            if have and resp.status != 206:
                have = 0  # server ignored the range: start again
            with open(partial, "ab" if have else "wb") as fout:
                _copy(resp, fout, spec.size or 0, have, progress)
                fout.flush()
                os.fsync(fout.fileno())
    size = partial.stat().st_size
    if spec.size is not None and size != spec.size:
        if size < spec.size and "://" in src:
            raise ShortTransfer(f"got {size} bytes, expected {spec.size}")
        raise OSError(f"got {size} bytes, expected {spec.size}")
    try:
        _verify_file(src, partial, spec, partial.parent)
    except ChecksumMismatch as exc:
        partial.unlink(missing_ok=True)
        raise ChecksumMismatch(f"{exc.detail}; not installed") from None


def _verify_file(where: str, path: Path, spec: FileSpec, models_dir: Path) -> None:
    """Manifest sha256, else the sha256 pin, else the publisher's md5 (see segd.pins)."""
    if spec.sha256:
        pins.verify_digests(where, spec, models_dir, sha256_file(path), None)
    else:
        pins.verify_digests(where, spec, models_dir, *pins.file_digests(path))


def _copy(fin: Any, fout: Any, total: int, done: int, progress: ProgressFn | None) -> None:
    read = getattr(fin, "read1", fin.read)  # what has arrived, so a stall still shows progress
    while chunk := read(CHUNK):
        fout.write(chunk)
        done += len(chunk)
        if progress:
            progress(done, total)


