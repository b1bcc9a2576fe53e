"""TOML reading on every supported Python: ``tomllib`` (3.11+) or its backport ``tomli`` (3.10)."""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    from tomllib import TOMLDecodeError, loads
else:  # Python 3.10 (Ubuntu 22.04, JetPack 6): the same parser, as a package
    from tomli import TOMLDecodeError, loads

__all__ = ["TOMLDecodeError", "loads"]
