"""The JSON files her2jax writes beside its outputs (config.json, port.json, her2jax.json)."""

from __future__ import annotations

import json
from pathlib import Path

from her2jax.errors import Her2jaxError


def read_json(path, *, missing: str, where=None) -> dict:
    """Reads ``path``; a missing file or bad JSON is a one-line user error.

    Args:
      path: the JSON file.
      missing: the reason given when it does not exist (e.g. "is not a her2jax workdir").
      where: what the missing-file message names (default: ``path``), e.g. its folder.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise Her2jaxError(missing, file=str(where if where is not None else path)) from None
    except (OSError, json.JSONDecodeError) as e:
        raise Her2jaxError(f"unreadable {path.name} ({e})", file=str(path)) from None
