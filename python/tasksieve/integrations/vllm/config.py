"""The plugin's settings: which FlexPrefill configuration a vLLM engine runs, read from one environment variable.

``TASKSIEVE_FLEXPREFILL`` holds a JSON object (or ``1`` / ``on`` for the defaults) with the keys of
:class:`tasksieve.FlexPrefill`: ``gamma``, ``tau``, ``block_size``, ``min_budget``, ``max_budget``, ``dense_below``.
Unset, empty, ``0`` or ``off``: the plugin does nothing and vLLM runs unchanged. The variable is read in every vLLM
process (main, engine core, workers inherit the environment), so one setting covers tensor-parallel ranks too.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from typing import Mapping, Optional

from ...methods.flexprefill import FlexPrefill

__all__ = ["ENV_VAR", "read_config", "parse_config"]

ENV_VAR = "TASKSIEVE_FLEXPREFILL"
_KEYS = tuple(f.name for f in fields(FlexPrefill))
_OFF = ("", "0", "off", "false", "no")
_ON = ("1", "on", "true", "yes")


def parse_config(text: str) -> Optional[FlexPrefill]:
    """``FlexPrefill`` from the variable's text, None when it says off.

    Raises
    ------
    ValueError
        Not JSON, not an object, an unknown key (named, with the known ones), or a value out of range (FlexPrefill's
        own message, naming the field).
    """
    stripped = text.strip()
    if stripped.lower() in _OFF:
        return None
    if stripped.lower() in _ON:
        return FlexPrefill()
    try:
        raw = json.loads(stripped)
    except json.JSONDecodeError as e:
        raise ValueError(f"{ENV_VAR} must be a JSON object of FlexPrefill settings (or 1 / 0), got {text!r}: "
                         f"{e.msg}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{ENV_VAR} must be a JSON object of FlexPrefill settings, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise ValueError(f"{ENV_VAR}: unknown key(s) {unknown}; the keys are {list(_KEYS)}")
    try:
        return FlexPrefill(**raw)
    except ValueError as e:
        raise ValueError(f"{ENV_VAR}: {e}") from None


def read_config(environ: Optional[Mapping[str, str]] = None) -> Optional[FlexPrefill]:
    """The engine's FlexPrefill settings from ``TASKSIEVE_FLEXPREFILL`` (None: plugin off)."""
    env = os.environ if environ is None else environ
    return parse_config(env.get(ENV_VAR, ""))
