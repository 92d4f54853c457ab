"""Limits on free-form JSON (a run's ``config``): depth, size, strings, numbers.

A free-form value is stored as JSON and returned as JSON, so whatever is accepted must also be
storable on both databases and serialisable back. :func:`check_free_json` refuses, naming the
offending path:

- nesting deeper than :data:`MAX_DEPTH` levels (256 broke every read of the run before),
- more than :data:`MAX_ITEMS` members and elements in all,
- strings (keys included) longer than :data:`MAX_STRING_CHARS`, holding NUL (PostgreSQL text
  cannot) or a lone surrogate (not Unicode; PostgreSQL's JSON parser refuses its escape),
- non-finite numbers (JSON has none; Python reads ``1e400`` as infinity),
- more than :data:`MAX_BYTES` bytes as compact UTF-8 JSON.

The walk is iterative and stops at the first violation, so its cost is bounded by the limits,
not by the input. Pure functions; thread-safe; never block.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_ITEMS",
    "MAX_STRING_CHARS",
    "check_free_json",
    "describe_limits",
]

MAX_DEPTH: Final = 32
"""Most nesting levels of objects and arrays (the value itself is level 1)."""
MAX_ITEMS: Final = 10_000
"""Most object members plus array elements, counted over the whole value."""
MAX_STRING_CHARS: Final = 10_000
"""Longest string or object key, in characters."""
MAX_BYTES: Final = 256 * 1024
"""Largest value as compact UTF-8 JSON, in bytes."""

_SHOWN_KEY_CHARS = 40

_Path = tuple["_Path", str] | None  # (parent, step) links: a path is rendered only on error


def describe_limits() -> str:
    """The limits in one sentence (for docs and error messages)."""
    return (
        f"at most {MAX_DEPTH} levels deep, {MAX_ITEMS} members and elements, strings of "
        f"{MAX_STRING_CHARS} characters without NUL, finite numbers, {MAX_BYTES} bytes as JSON"
    )


def check_free_json(value: Any, field: str) -> None:
    """Refuse a free-form JSON value that breaks a limit.

    Args:
        value: A value as ``json.loads`` returns it (dict, list, str, int, float, bool, None).
        field: The field's name, the start of every path in an error (e.g. ``config``).

    Raises:
        ValueError: A limit is broken; the message starts with the offending path
            (``config.optimizer.betas[3]: ...``).
    """
    stack: list[tuple[Any, int, _Path]] = [(value, 1, None)]
    items = 0
    chars = 0
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, dict | list):
            if depth > MAX_DEPTH:
                raise ValueError(
                    f"{_render(field, path)}: nested deeper than {MAX_DEPTH} levels "
                    "(free-form JSON is " + describe_limits() + ")"
                )
            items += len(node)
            if items > MAX_ITEMS:
                raise ValueError(
                    f"{_render(field, path)}: more than {MAX_ITEMS} members and elements in "
                    f"{field} (free-form JSON is " + describe_limits() + ")"
                )
            if isinstance(node, dict):
                for key, child in node.items():
                    chars += _check_string(key, field, path, "key")
                    stack.append((child, depth + 1, (path, _member(key))))
            else:
                stack.extend(
                    (child, depth + 1, (path, f"[{index}]")) for index, child in enumerate(node)
                )
        elif isinstance(node, str):
            chars += _check_string(node, field, path, "string")
        elif isinstance(node, float) and not math.isfinite(node):
            raise ValueError(
                f"{_render(field, path)}: {node} is not a finite number (JSON has no "
                "NaN or Infinity; a literal like 1e400 overflows)"
            )
        elif not isinstance(node, int | float | bool) and node is not None:
            raise ValueError(f"{_render(field, path)}: {type(node).__name__} is not JSON")
        if chars > MAX_BYTES:
            break  # the size check below reports it without encoding a huge value
    size = chars if chars > MAX_BYTES else len(_compact(value))
    if size > MAX_BYTES:
        raise ValueError(f"{field}: more than {MAX_BYTES} bytes as JSON (got at least {size})")


def _check_string(text: str, field: str, path: _Path, what: str) -> int:
    """Check one key or string; return its length in characters."""
    if len(text) > MAX_STRING_CHARS:
        raise ValueError(
            f"{_render(field, path)}: {what} of {len(text)} characters, at most "
            f"{MAX_STRING_CHARS} accepted"
        )
    if "\x00" in text:
        raise ValueError(f"{_render(field, path)}: {what} holds a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"{_render(field, path)}: {what} holds a lone surrogate (not valid Unicode)"
        ) from None
    return len(text)


def _compact(value: Any) -> bytes:
    return json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode()


def _member(key: str) -> str:
    shown = key if len(key) <= _SHOWN_KEY_CHARS else key[:_SHOWN_KEY_CHARS] + "…"
    return f".{shown}" if shown.isidentifier() else f"[{json.dumps(shown)}]"


def _render(field: str, path: _Path) -> str:
    steps: list[str] = []
    while path is not None:
        path, step = path
        steps.append(step)
    return field + "".join(reversed(steps))
