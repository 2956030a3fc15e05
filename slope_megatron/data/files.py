"""The data cache's own checks: a cache directory that can be created, and JSON files that
must be there and readable (with what to do when they are not). Atomic writes, locks and
staging directories are `slope_megatron.io`'s."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import DataError


def make_cache_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data cache directory '{path}': {e.strerror}; "
                        "set data.cache_dir to a writable directory") from None
    return path


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{what} '{path}' is missing; run launch/prepare_data.py (or "
                        "prepare_data) to build it") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{what} '{path}' is unreadable ({e}); delete '{path.parent}' and "
                        "prepare the data again") from None
