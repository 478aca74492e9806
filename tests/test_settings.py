"""Settings: one environment name per setting, conversion by the field's type, typed errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from segd.errors import ConfigError, SegdError
from segd.settings import load_settings


def test_the_mirror_is_read_from_its_documented_name() -> None:
    assert load_settings(env={"SEGD_MODEL_MIRROR": "/srv/m"}).mirror == "/srv/m"


def test_the_old_mirror_name_still_works_and_warns() -> None:
    with pytest.warns(FutureWarning, match="SEGD_MIRROR is deprecated; use SEGD_MODEL_MIRROR"):
        assert load_settings(env={"SEGD_MIRROR": "/old"}).mirror == "/old"
    assert load_settings(env={"SEGD_MIRROR": "/old", "SEGD_MODEL_MIRROR": "/new"}).mirror == "/new"


def test_values_are_converted_by_the_field_type() -> None:
    s = load_settings(env={"SEGD_MODELS": "a, b,", "SEGD_MODELS_DIR": "/m", "SEGD_THREADS": "0",
                           "SEGD_INSECURE": "yes", "SEGD_TPU_TIMEOUT": "2.5", "SEGD_DEVICE": ""})  # fmt: skip
    assert (s.models, s.models_dir, s.threads, s.insecure, s.tpu_timeout, s.device) == (
        ["a", "b"], Path("/m"), None, True, 2.5, None
    )


def test_a_bad_setting_is_a_typed_error_naming_it() -> None:
    with pytest.raises(ConfigError, match="setting port") as info:
        load_settings(env={"SEGD_PORT": "eighty"})
    assert isinstance(info.value, SegdError) and isinstance(info.value, ValueError)
    with pytest.raises(ConfigError, match="accelerator must be auto, cpu or edgetpu"):
        load_settings(env={"SEGD_ACCELERATOR": "gpu"})
