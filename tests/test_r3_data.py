"""R3's own prompt files load (issue 17 item 10).

The fixtures in tests/fixtures/r3/ are sen-ye/R3's files at commit e9912ac5 as they are:
`data/rl_test/test_geneval++.jsonl` (279 newlines, 280 records: the last line has no newline),
`data/rl_test/test_TIIF.jsonl` (277 records) and the first 60, 20 more with a "no" answer, and
the last 5 records of `data/rl_train/train_TIIF.jsonl` (2261 records, 2.3 MB: not copied whole).
R3 reads TIIF with `TIIFDataset(file, key="short_description")`, which sets
`item['prompt'] = item[key]`, and groups its eval figures by `type` (METADATA_TAG_KEY["tiif"]).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from r3rl.config import DataConfig
from r3rl.data import load_prompts
from r3rl.errors import UserError

R3 = Path(__file__).parent / "fixtures" / "r3"
GENEVAL_PP = R3 / "test_geneval++.jsonl"
TIIF_TEST = R3 / "test_TIIF.jsonl"
TIIF_TRAIN = R3 / "train_TIIF_head.jsonl"


def _raw(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_geneval_plus_plus_loads_with_region_and_size() -> None:
    records = load_prompts(GENEVAL_PP)
    assert records == _raw(GENEVAL_PP)  # nothing dropped or rewritten
    assert len(records) == 280
    includes = [i for r in records for i in r["include"]]
    assert Counter(i.get("region") for i in includes if "region" in i) == {
        "above": 70, "below": 70, "left": 50, "right": 50}
    assert Counter(i["size"] for i in includes if "size" in i) == {"larger": 40, "smaller": 40}
    assert records[40]["tag"] == "spatial_count_attr"  # line 41, where loading used to fail


@pytest.mark.parametrize("path, n", [(TIIF_TEST, 277), (TIIF_TRAIN, 85)])
def test_tiif_loads_with_an_explicit_prompt_field(path: Path, n: int) -> None:
    raw = _raw(path)
    records = load_prompts(path, prompt_field="short_description", tag_field="type")
    assert len(records) == n
    for rec, orig in zip(records, raw):
        # R3's TIIFDataset: item['prompt'] = item[key]; every original key is kept for the judges
        assert rec == {**orig, "prompt": orig["short_description"], "tag": orig["type"]}
    long = load_prompts(path, prompt_field="long_description")
    assert [r["prompt"] for r in long] == [r["long_description"] for r in raw]
    assert all("tag" not in r for r in long)


def test_tiif_expected_answers() -> None:
    answers = Counter(a for r in load_prompts(TIIF_TEST, prompt_field="short_description")
                      for a in r["yn_answer_list"])
    assert answers == {"yes": 1161, "Yes": 251, "no": 34}  # the 34 "no" answers


def test_tiif_without_prompt_field_names_the_fix() -> None:
    with pytest.raises(UserError) as e:
        load_prompts(TIIF_TEST)
    msg = str(e.value)
    assert f"{TIIF_TEST}:1: missing required key 'prompt'" in msg
    assert "data.prompt_field" in msg and "short_description" in msg


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "p", "include": [{"class": "a", "count": 1, "region": "middle"}]}',
         "include[0].region must be one of left, right, above, below"),
        ('{"prompt": "p", "include": [{"class": "a", "count": 1, "size": "huge"}]}',
         "include[0].size must be one of larger, smaller"),
        ('{"prompt": "p", "yn_question_list": ["Q?"], "yn_answer_list": ["yes", "no"]}',
         "has 1 questions but 'yn_answer_list' 2 answers"),
        ('{"prompt": "p", "yn_question_list": ["Q?"], "yn_answer_list": ["maybe"]}',
         "yn_answer_list[0] must be yes or no"),
        ('{"prompt": "p", "yn_question_list": "Q?", "yn_answer_list": ["yes"]}',
         "'yn_question_list' must be a non-empty list of strings"),
    ],
)
def test_bad_r3_records(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(UserError) as e:
        load_prompts(path)
    assert message in str(e.value)


def test_data_config_keys() -> None:
    cfg = DataConfig(eval_prompts=str(TIIF_TEST), prompt_field="short_description", tag_field="type")
    assert (cfg.prompt_field, cfg.tag_field) == ("short_description", "type")
    assert (DataConfig().prompt_field, DataConfig().tag_field) == ("prompt", "tag")


def test_run_prompts_use_the_data_config() -> None:
    """`r3rl train`/`r3rl eval` load prompts through run._prompts with data.prompt_field and
    data.tag_field."""
    from r3rl import run

    records = run._prompts(str(TIIF_TEST), "eval", None, prompt_field="short_description", tag_field="type")
    assert records[0]["prompt"] == "A cat is situated beneath a microwave."
