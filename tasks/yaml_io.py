"""Reading configuration files: one YAML mapping, with errors that name the file.

A key given twice in one mapping is an error (PyYAML's safe loader silently keeps the last one: `g:` twice in
an ingest configuration would store one band's images as another's), and so is a file that is not text.
"""
from __future__ import annotations

from pathlib import Path

import yaml

__all__ = ["read_mapping", "load_yaml", "UniqueKeyLoader"]


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key repeated within one mapping."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                break  # an unhashable key: the base class gives its own error
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found the key {key!r} twice (first on line {seen[key].line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str):
    """The YAML document in `text`, with repeated keys refused (yaml.YAMLError)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_mapping(path: str | Path, error: type[Exception] = ValueError, what: str = "configuration") -> dict:
    """The YAML mapping in `path`; raises `error` with a message naming the file (one line, or the line of the
    YAML problem)."""
    path = Path(path)
    try:
        data = load_yaml(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a {what} file") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not a text file; a {what} is YAML") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{path}: cannot read {what}{where}: {problem}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise error(f"{path}: {what} must be a YAML mapping, got {type(data).__name__}")
    return data


def relative_to_file(config: str | Path, value: str | Path) -> Path:
    """`value` as a path: as given when absolute, else relative to the directory of the file `config` (how
    every path in deepfield's configuration files is read)."""
    p = Path(value)
    return p if p.is_absolute() else Path(config).resolve().parent / p
