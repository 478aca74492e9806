"""Google Drive downloads (segd.gdrive) against a local imitation of Drive's answers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from drive_imitation import DriveImitation

from segd import gdrive

FILE_ID = "1YmaaQ9qOxlMfB9eAI7roOqgeo4y7Mosg"  # the original's DM1 compiled model id (not fetched)


@pytest.fixture
def drive() -> Iterator[DriveImitation]:
    imitation = DriveImitation().start()
    yield imitation
    imitation.stop()


@pytest.fixture
def payload(test_data: Path) -> bytes:
    """A real compiled Coral model from the test data, as the bytes Drive serves."""
    return (test_data / "deeplabv3_mnv2_dm05_pascal_quant_edgetpu.tflite").read_bytes()


def test_small_file_is_served_directly(drive: DriveImitation, payload: bytes, tmp_path: Path) -> None:
    drive.add(FILE_ID, payload, "direct")
    dest = tmp_path / "m.partial"
    gdrive.download(FILE_ID, dest, base_url=drive.base_url)
    assert dest.read_bytes() == payload


@pytest.mark.parametrize("mode", ["cookie", "form"])
def test_virus_scan_interstitial_is_confirmed(mode: str, drive: DriveImitation, payload: bytes, tmp_path: Path) -> None:
    drive.add(FILE_ID, payload, mode)
    dest = tmp_path / "m.partial"
    seen: list[tuple[int, int]] = []
    gdrive.download(FILE_ID, dest, base_url=drive.base_url, progress=lambda d, t: seen.append((d, t)))
    assert dest.read_bytes() == payload
    assert len(drive.requests) == 2
    if mode == "form":
        assert drive.requests[1][0] == "/download" and "uuid" in drive.requests[1][1]
    else:
        assert drive.requests[1][1]["confirm"].startswith("Tk3n_")
    assert seen[-1] == (len(payload), len(payload))


def test_quota_page_is_named_and_nothing_is_kept(drive: DriveImitation, payload: bytes, tmp_path: Path) -> None:
    drive.add(FILE_ID, payload, "quota")
    dest = tmp_path / "m.partial"
    dest.write_bytes(b"old partial bytes")
    with pytest.raises(gdrive.DriveQuotaExceeded, match="quota exceeded"):
        gdrive.download(FILE_ID, dest, base_url=drive.base_url)
    assert not dest.exists()


def test_sign_in_page_is_not_saved_as_a_model(drive: DriveImitation, payload: bytes, tmp_path: Path) -> None:
    drive.add(FILE_ID, payload, "signin")
    dest = tmp_path / "m.partial"
    with pytest.raises(gdrive.DriveAccessDenied, match="sign-in"):
        gdrive.download(FILE_ID, dest, base_url=drive.base_url)
    assert not dest.exists()


def test_unknown_id_is_a_404_saying_the_link_is_dead(drive: DriveImitation, tmp_path: Path) -> None:
    dest = tmp_path / "m.partial"
    with pytest.raises(gdrive.DriveNotFound, match="404"):
        gdrive.download("1bukSOJf8JL_RSQwrCIypvzxxamEhO9cV", dest, base_url=drive.base_url)
    assert not dest.exists()


def test_cut_off_transfer_resumes_with_range(drive: DriveImitation, payload: bytes, tmp_path: Path) -> None:
    drive.add(FILE_ID, payload, "truncate")
    dest = tmp_path / "m.partial"
    gdrive.download(FILE_ID, dest, base_url=drive.base_url)
    assert dest.read_bytes() == payload
    ranges = [r for _, _, r in drive.requests]
    assert ranges == [None, f"bytes={len(payload) // 2}-"]


def test_partial_file_from_an_earlier_run_is_resumed(drive: DriveImitation, payload: bytes, tmp_path: Path) -> None:
    drive.add(FILE_ID, payload, "direct")
    dest = tmp_path / "m.partial"
    dest.write_bytes(payload[:1000])
    gdrive.download(FILE_ID, dest, base_url=drive.base_url)
    assert dest.read_bytes() == payload
    assert drive.requests[0][2] == "bytes=1000-"


def test_unreachable_drive_is_named(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(gdrive.DriveError, match="cannot reach Google Drive"):
        gdrive.download(FILE_ID, tmp_path / "m.partial", base_url=f"http://127.0.0.1:{port}/uc", timeout=5)


def test_a_file_larger_than_expected_is_cut_off_and_removed(drive: DriveImitation, payload: bytes, tmp_path: Path) -> None:
    drive.add(FILE_ID, payload, "direct")
    dest = tmp_path / "m.partial"
    with pytest.raises(gdrive.DriveError, match="more than"):
        gdrive.download(FILE_ID, dest, base_url=drive.base_url, max_bytes=1000)
    assert not dest.exists()


def test_gdrive_url_is_a_setting_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from segd.errors import ConfigError
    from segd.settings import DEFAULT_GDRIVE_URL, env_gdrive_url, load_settings

    monkeypatch.delenv("SEGD_GDRIVE_URL", raising=False)
    assert env_gdrive_url() == DEFAULT_GDRIVE_URL == gdrive.DEFAULT_BASE_URL
    monkeypatch.setenv("SEGD_GDRIVE_URL", "http://127.0.0.1:9/uc")
    assert env_gdrive_url() == "http://127.0.0.1:9/uc"
    assert load_settings(env={"SEGD_GDRIVE_URL": "http://127.0.0.1:9/uc"}).gdrive_url == "http://127.0.0.1:9/uc"
    with pytest.raises(ConfigError, match="gdrive_url must be an http"):
        load_settings(env={"SEGD_GDRIVE_URL": "file:///etc/passwd"})
