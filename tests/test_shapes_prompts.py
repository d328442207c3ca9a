"""Shapes world prompt records (GenEval metadata format) and the train/eval split."""

import json
from collections import Counter

import pytest

from r3rl.shapes.prompts import TAGS, all_prompts, shapes_prompts, split_prompts, write_jsonl


def test_all_prompts_cover_every_combination_once():
    # 3 shapes, 6 colours, 4 relations, counts 2..4:
    # single 3, two_object 3*2 ordered pairs = 6, counting 3*3 = 9, colors 3*6 = 18,
    # position 6 pairs * 4 relations = 24, color_attr 6 pairs * (6*5) colour pairs = 180
    records = all_prompts()
    assert Counter(r["tag"] for r in records) == {
        "single_object": 3,
        "two_object": 6,
        "counting": 9,
        "colors": 18,
        "position": 24,
        "color_attr": 180,
    }
    assert len({r["prompt"] for r in records}) == 240


@pytest.mark.parametrize(
    "record",
    [
        {
            "tag": "single_object",
            "include": [{"class": "triangle", "count": 1}],
            "prompt": "a photo of a triangle",
        },
        {
            "tag": "two_object",
            "include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1}],
            "prompt": "a photo of a square and a circle",
        },
        {
            "tag": "counting",
            "include": [{"class": "circle", "count": 3}],
            "exclude": [{"class": "circle", "count": 4}],
            "prompt": "a photo of three circles",
        },
        {
            "tag": "colors",
            "include": [{"class": "circle", "count": 1, "color": "orange"}],
            "prompt": "a photo of an orange circle",
        },
        {
            "tag": "position",
            "include": [
                {"class": "square", "count": 1},
                {"class": "circle", "count": 1, "position": ["right of", 0]},
            ],
            "prompt": "a photo of a circle right of a square",
        },
        {
            "tag": "color_attr",
            "include": [
                {"class": "triangle", "count": 1, "color": "yellow"},
                {"class": "square", "count": 1, "color": "purple"},
            ],
            "prompt": "a photo of a yellow triangle and a purple square",
        },
    ],
    ids=lambda r: r["tag"],
)
def test_records_have_geneval_format(record):
    match = [r for r in all_prompts() if r["prompt"] == record["prompt"]]
    assert match == [record]
    assert json.loads(json.dumps(match[0])) == record  # plain JSON types only


def test_position_refers_to_include_zero_and_color_attr_uses_two_classes_and_colours():
    for r in all_prompts():
        if r["tag"] == "position":
            assert (
                r["include"][1]["position"][1] == 0
                and r["include"][0]["class"] != r["include"][1]["class"]
            )
        if r["tag"] == "color_attr":
            a, b = r["include"]
            assert a["class"] != b["class"] and a["color"] != b["color"]


def test_split_is_disjoint_complete_and_stratified():
    train, evals = split_prompts()
    train_p, eval_p = {r["prompt"] for r in train}, {r["prompt"] for r in evals}
    assert len(evals) == 48 and not train_p & eval_p
    assert train_p | eval_p == {r["prompt"] for r in all_prompts()}
    per_tag = Counter(r["tag"] for r in evals)
    # round-robin over tags, each capped at a third of its prompts:
    # single 1, two_object 2, counting 3, colors 6, position 8, the remaining 28 color_attr
    assert per_tag == {
        "single_object": 1,
        "two_object": 2,
        "counting": 3,
        "colors": 6,
        "position": 8,
        "color_attr": 28,
    }
    assert [r["tag"] for r in evals[:6]] == list(TAGS)  # interleaved: any prefix is balanced


def test_split_is_fixed_per_seed_and_changes_with_seed():
    assert split_prompts(0) == split_prompts(0)
    assert split_prompts(0)[1] != split_prompts(1)[1]


def test_split_rejects_impossible_sizes():
    with pytest.raises(ValueError):
        split_prompts(n_eval=5)  # fewer than one per tag
    with pytest.raises(ValueError):
        split_prompts(n_eval=81)  # more than a third of every tag: 1+2+3+6+8+60 = 80


def test_train_sampling_is_deterministic_from_train_only_and_tag_balanced():
    train, _ = split_prompts()
    train_p = {r["prompt"] for r in train}
    records = shapes_prompts("train", 600, seed=3)
    assert len(records) == 600 and all(r["prompt"] in train_p for r in records)
    assert records == shapes_prompts("train", 600, seed=3)
    assert records != shapes_prompts("train", 600, seed=4)
    per_tag = Counter(r["tag"] for r in records)
    assert set(per_tag) == set(TAGS) and min(per_tag.values()) > 600 / 6 * 0.7


def test_train_records_are_copies():
    first = shapes_prompts("train", 1)[0]
    first["include"][0]["class"] = "hexagon"
    assert shapes_prompts("train", 1)[0]["include"][0]["class"] != "hexagon"


def test_eval_returns_the_first_held_out_records():
    _, evals = split_prompts()
    assert shapes_prompts("eval", 10) == evals[:10]
    with pytest.raises(ValueError):
        shapes_prompts("eval", 49)
    with pytest.raises(ValueError):
        shapes_prompts("test", 1)


def test_write_jsonl_writes_one_object_per_line(tmp_path):
    records = shapes_prompts("eval", 5)
    path = tmp_path / "sub" / "prompts.jsonl"
    write_jsonl(records, path)
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == records
