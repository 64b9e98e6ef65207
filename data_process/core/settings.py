"""Settings files: the one YAML reader of training, caption and enrichment configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML settings file (an empty file is ``{}``); every error names the file."""
    import yaml  # noqa: PLC0415 - only the config readers need it

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: must be a mapping of settings, got {type(raw).__name__}")
    return raw


def parse_bool(value: str) -> bool:
    """A command-line boolean: 1/true/yes/on or 0/false/no/off (argparse ``type=``)."""
    import argparse  # noqa: PLC0415

    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")
