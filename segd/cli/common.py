"""What the commands share: the settings a command runs with (environment < flags) and the
models directory they name."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from segd.settings import Settings


def _settings(args: argparse.Namespace, config: Path | None = None, **overrides: Any) -> Settings:
    """The settings a command runs with: ``config`` (a TOML file) < ``SEGD_*`` environment <
    this command's model flags < ``overrides``. The CLI passes them down, so library code never
    looks at the environment for it."""
    from segd.settings import load_settings

    flags = {name: getattr(args, flag, None) for name, flag in (
        ("models_dir", "models_dir"), ("mirror", "mirror"), ("device", "device"),
        ("runtime", "runtime"), ("threads", "threads"),
    )}  # fmt: skip
    accelerator = getattr(args, "accelerator", None)
    flags["accelerator"] = accelerator if accelerator != "auto" else None
    return load_settings(config, overrides={**flags, **overrides})


def _models_dir(settings: Settings) -> Path:
    from segd.variants import default_models_dir

    return settings.models_dir or default_models_dir()
