"""Prompt files: JSONL in GenEval's metadata format, checked line by line.

Each line is an object with a string `prompt` and optional GenEval metadata:
`tag`, `include` (objects with `class`, `count`, optional `color` and `position`
`[relation, index of the include it is relative to]`) and `exclude` (objects with `class`
and `count`: fewer than `count` such objects may appear). Other top-level keys (ids, notes)
are kept. A bad line fails at load time with `file:line`, before any model is built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from r3rl.errors import UserError

RELATIONS = ("left of", "right of", "above", "below")
_INCLUDE_KEYS = {"class", "count", "color", "position"}
_EXCLUDE_KEYS = {"class", "count"}


def _check_object(item: Any, where: str, allowed: set[str]) -> None:
    """An include/exclude entry: a mapping with a class name and a positive count."""
    if not isinstance(item, dict):
        raise ValueError(f"{where} must be an object, got {item!r}")
    unknown = sorted(set(item) - allowed)
    if unknown:
        raise ValueError(
            f"{where} has unknown key '{unknown[0]}' (allowed: {', '.join(sorted(allowed))})"
        )
    if not isinstance(item.get("class"), str) or not item["class"]:
        raise ValueError(f"{where}.class must be a non-empty string")
    count = item.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"{where}.count must be a positive integer, got {count!r}")


def _check_include(items: Any) -> None:
    """Objects that must appear, with optional colour and a position relative to another include."""
    if not isinstance(items, list):
        raise ValueError(f"include must be a list, got {items!r}")
    for i, item in enumerate(items):
        where = f"include[{i}]"
        _check_object(item, where, _INCLUDE_KEYS)
        if "color" in item and not isinstance(item["color"], str):
            raise ValueError(f"{where}.color must be a string, got {item['color']!r}")
        if "position" in item:
            position = item["position"]
            ok = (
                isinstance(position, list)
                and len(position) == 2
                and position[0] in RELATIONS
                and isinstance(position[1], int)
                and 0 <= position[1] < len(items)
                and position[1] != i
            )
            if not ok:
                raise ValueError(
                    f"{where}.position must be [relation, index of another include] with relation"
                    f" one of {', '.join(RELATIONS)}; got {position!r}"
                )


def _check_record(record: Any) -> None:
    """One prompt record; raises ValueError saying what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "prompt" not in record:
        raise ValueError("missing required key 'prompt'")
    if not isinstance(record["prompt"], str) or not record["prompt"].strip():
        raise ValueError(f"'prompt' must be a non-empty string, got {record['prompt']!r}")
    if "tag" in record and not isinstance(record["tag"], str):
        raise ValueError(f"'tag' must be a string, got {record['tag']!r}")
    if "include" in record:
        _check_include(record["include"])
    if "exclude" in record:
        if not isinstance(record["exclude"], list):
            raise ValueError(f"exclude must be a list, got {record['exclude']!r}")
        for i, item in enumerate(record["exclude"]):
            _check_object(item, f"exclude[{i}]", _EXCLUDE_KEYS)


def load_prompts(path: str | Path) -> list[dict]:
    """Read a prompt file; blank lines are skipped, and any bad line raises `UserError` with file:line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file not found: {path}")
    records: list[dict] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})"
                ) from None
            try:
                _check_record(record)
            except ValueError as e:
                raise UserError(f"{path}:{lineno}: {e}") from None
            records.append(record)
    if not records:
        raise UserError(f"{path}: no prompts in file")
    return records
