"""The deepfield version, from the installed distribution (deepfield/__init__.py reads it)."""
from __future__ import annotations

from deepfield import __version__

__all__ = ["__version__"]
