"""Cameras configured in the settings file (``[sources.NAME]``): one small reader per kind
behind :class:`~segd.sources.base.FrameReader`, and a runner that segments their frames
through the same service path as ``POST /segment``."""

from __future__ import annotations

from segd.settings import SourceSettings
from segd.sources.base import FrameReader, SourceError
from segd.sources.mjpeg import MjpegReader
from segd.sources.rtsp import RtspReader
from segd.sources.snapshot import SnapshotReader

READERS: dict[str, type[FrameReader]] = {"rtsp": RtspReader, "mjpeg": MjpegReader, "snapshot": SnapshotReader}


def open_reader(settings: SourceSettings, max_frame_bytes: int) -> FrameReader:
    return READERS[settings.kind](settings, max_frame_bytes)


__all__ = ["READERS", "FrameReader", "SourceError", "open_reader"]
