"""Prompt files: JSONL in GenEval's metadata format, checked line by line.

Each line is an object with a string `prompt` and optional GenEval metadata:
`tag`, `include` (objects with `class`, `count`, optional `color` and `position`
`[relation, index of the include it is relative to]`) and `exclude` (objects with `class`
and `count`: fewer than `count` such objects may appear). Other top-level keys (ids, notes)
are kept. A bad line fails at load time with `file:line`, before any model is built.

R3's own files load as they are (sen-ye/R3 `data/rl_test`, `data/rl_train`):
- GenEval++ (`test_geneval++.jsonl`): includes may carry `region` (where in the image the
  objects lie: left, right, above, below) and `size` (larger, smaller), which R3's judge
  writes into its checklist;
- TIIF (`test_TIIF.jsonl`, `train_TIIF.jsonl`): no `prompt`, but `type` (the category),
  `short_description`, `long_description`, and `yn_question_list` with the expected
  `yn_answer_list` (yes/no, any case). The prompt is the field named by `prompt_field`
  (`data.prompt_field`; R3's TIIFDataset uses `short_description`), copied into `prompt` as
  R3 does; `tag_field` (`data.tag_field`; R3 uses `type` for TIIF) is copied into `tag`, the key
  evaluation groups its per-category figures by.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from r3rl.errors import UserError

RELATIONS = ("left of", "right of", "above", "below")
_INCLUDE_KEYS = {"class", "count", "color", "position", "region", "size"}
REGIONS = ("left", "right", "above", "below")  # GenEval++'s `region`: a part of the image
SIZES = ("larger", "smaller")  # GenEval++'s `size`: relative to the record's other objects
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
        for key, allowed in (("region", REGIONS), ("size", SIZES)):
            if key in item and item[key] not in allowed:
                raise ValueError(
                    f"{where}.{key} must be one of {', '.join(allowed)}; got {item[key]!r}"
                )
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


def _check_questions(record: dict) -> None:
    """TIIF's yes/no questions and the answers a faithful image earns, one per question."""
    questions, answers = record.get("yn_question_list"), record.get("yn_answer_list")
    if questions is None and answers is None:
        return
    for key, value in (("yn_question_list", questions), ("yn_answer_list", answers)):
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise ValueError(f"'{key}' must be a non-empty list of strings, got {value!r}")
    if len(questions) != len(answers):
        raise ValueError(
            f"'yn_question_list' has {len(questions)} questions but 'yn_answer_list' "
            f"{len(answers)} answers"
        )
    for i, a in enumerate(answers):
        if a.strip().lower() not in ("yes", "no"):
            raise ValueError(f"yn_answer_list[{i}] must be yes or no, got {a!r}")


def _check_record(record: Any, prompt_field: str = "prompt", tag_field: str = "tag") -> None:
    """One prompt record; raises ValueError saying what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if prompt_field not in record:
        hint = ""
        if prompt_field == "prompt":
            texts = [k for k, v in record.items() if isinstance(v, str) and k != tag_field]
            texts.sort(
                key=lambda k: not any(w in k for w in ("prompt", "caption", "description", "text"))
            )
            hint = (
                f"; this record has {', '.join(sorted(record))}: name the prompt's key with "
                f"data.prompt_field (e.g. data.prompt_field={texts[0] if texts else 'KEY'})"
            )
        raise ValueError(f"missing required key '{prompt_field}'{hint}")
    value = record[prompt_field]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'{prompt_field}' must be a non-empty string, got {value!r}")
    if tag_field in record and not isinstance(record[tag_field], str):
        raise ValueError(f"'{tag_field}' must be a string, got {record[tag_field]!r}")
    _check_questions(record)
    if "include" in record:
        _check_include(record["include"])
    if "exclude" in record:
        if not isinstance(record["exclude"], list):
            raise ValueError(f"exclude must be a list, got {record['exclude']!r}")
        for i, item in enumerate(record["exclude"]):
            _check_object(item, f"exclude[{i}]", _EXCLUDE_KEYS)


def load_prompts(
    path: str | Path, prompt_field: str = "prompt", tag_field: str = "tag"
) -> list[dict]:
    """Read a prompt file; blank lines are skipped, and any bad line raises `UserError` with
    file:line.

    `prompt_field` names the key holding the prompt and `tag_field` the one holding the category;
    other names are copied into `prompt` / `tag` (overwriting them), as R3's TIIFDataset does, so
    the rest of r3rl reads `prompt` and `tag`, and the original keys stay for the judges."""
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
                _check_record(record, prompt_field, tag_field)
            except ValueError as e:
                raise UserError(f"{path}:{lineno}: {e}") from None
            if prompt_field != "prompt":
                record["prompt"] = record[prompt_field]
            if tag_field != "tag" and tag_field in record:
                record["tag"] = record[tag_field]
            records.append(record)
    if not records:
        raise UserError(f"{path}: no prompts in file")
    return records
