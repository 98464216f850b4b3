"""Reading configuration files: one YAML mapping, with errors that name the file."""
from __future__ import annotations

from pathlib import Path

import yaml


def read_mapping(path: str | Path, error: type[Exception] = ValueError, what: str = "configuration") -> dict:
    """The YAML mapping in `path`; raises `error` with a one-line message naming the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except (OSError, yaml.YAMLError) as exc:
        raise error(f"{path}: cannot read {what}: {exc}") from exc
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise error(f"{path}: {what} must be a YAML mapping, got {type(data).__name__}")
    return data
