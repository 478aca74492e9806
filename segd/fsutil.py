"""One atomic file writer for segd and coral_deeplab (no TensorFlow, no numpy).

Readers of model files, manifests, caches and config files must never see a partial file,
and a crash must leave either the old file or the new one. The recipe is the usual one:
write a temporary file in the same directory, fsync it, rename it over the target (atomic
on POSIX within one file system), then fsync the directory so the rename itself survives a
power cut.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "fsync_dir"]


def atomic_write(path: str | os.PathLike[str], data: bytes | str, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably, with permissions ``mode``.

    ``str`` data is written as UTF-8. The temporary file is created private (0600) and set to
    ``mode`` only once complete, so a secret never sits world-readable; the umask does not
    change ``mode``. On any error the temporary file is removed and the target is untouched.
    """
    target = Path(path)
    payload = data.encode() if isinstance(data, str) else bytes(data)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable; some file systems cannot open a directory."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
