"""Prompt files: GenEval-format JSONL, with bad lines reported as file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r3rl.data import load_prompts
from r3rl.errors import UserError

VALID = Path(__file__).parent / "fixtures" / "prompts_valid.jsonl"


def test_every_geneval_tag_loads_and_blank_lines_are_skipped() -> None:
    records = load_prompts(VALID)
    expected = [json.loads(line) for line in VALID.read_text().splitlines() if line.strip()]
    assert records == expected
    assert [r["tag"] for r in records] == [
        "single_object",
        "counting",
        "colors",
        "position",
        "color_attr",
    ]
    assert records[4]["id"] == 7  # extra top-level keys are kept


def _write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = '{"prompt": "a photo of a circle"}'


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        ('{"prompt": "a circle"', "not valid JSON"),
        ('["a circle"]', "expected a JSON object, got list"),
        ('{"tag": "counting"}', "missing required key 'prompt'"),
        ('{"prompt": ""}', "'prompt' must be a non-empty string"),
        (
            '{"prompt": "p", "include": [{"class": "circle", "count": "three"}]}',
            "include[0].count must be a positive integer, got 'three'",
        ),
        (
            '{"prompt": "p", "include": [{"class": "circle", "count": 1, "colour": "red"}]}',
            "include[0] has unknown key 'colour'",
        ),
        (
            '{"prompt": "p", "include": [{"count": 1}]}',
            "include[0].class must be a non-empty string",
        ),
        (
            '{"prompt": "p", "include": [{"class": "a", "count": 1}, {"class": "b", "count": 1, "position": ["next to", 0]}]}',
            "include[1].position must be [relation, index of another include]",
        ),
        (
            '{"prompt": "p", "include": [{"class": "a", "count": 1, "position": ["left of", 0]}]}',
            "include[0].position must be",
        ),
        ('{"prompt": "p", "exclude": {"class": "a", "count": 2}}', "exclude must be a list"),
    ],
)
def test_bad_line_is_reported_with_file_and_line(
    tmp_path: Path, bad_line: str, problem: str
) -> None:
    path = _write(tmp_path, GOOD, "", bad_line, GOOD)
    with pytest.raises(UserError) as e:
        load_prompts(path)
    assert str(e.value).startswith(f"{path}:3: ")  # line numbers count blank lines
    assert problem in str(e.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="prompt file not found: .*nope.jsonl"):
        load_prompts(tmp_path / "nope.jsonl")


def test_file_without_prompts(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no prompts in file"):
        load_prompts(_write(tmp_path, "", "  "))
