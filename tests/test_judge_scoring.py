"""Reading judge answers (yes/no probabilities, numeric scores, JSON); questions from metadata."""

from __future__ import annotations

import math

import pytest
from pydantic import BaseModel, Field

from r3rl.judges import (
    Question,
    geneval_questions,
    parse_json,
    parse_score,
    scores_from_json,
    yes_no_from_text,
    yes_probability,
    yes_score,
)
from r3rl.judges.chat import parse_answer


def test_yes_probability_renormalises_over_yes_and_no() -> None:
    # P(yes) = 0.6 spread over two spellings, P(no) = 0.2: 0.6 / 0.8 = 0.75
    position = [
        ("Yes", math.log(0.5)),
        (" yes", math.log(0.1)),
        ("No", math.log(0.2)),
        ("The", math.log(0.2)),
    ]
    assert yes_probability([position]) == pytest.approx(0.75)


def test_yes_probability_uses_the_first_position_that_offers_an_answer() -> None:
    preamble = [("The", 0.0)]
    answer = [("no.", math.log(0.9)), ("YES", math.log(0.1))]
    assert yes_probability([preamble, answer]) == pytest.approx(0.1)
    assert yes_probability([preamble]) is None
    assert yes_probability(None) is None
    assert yes_probability([[("yesterday", 0.0), ("nothing", 0.0)]]) is None  # whole words only


def test_yes_no_text_fallback() -> None:
    assert yes_no_from_text("Yes.") == 1.0
    assert yes_no_from_text("  no, there is none") == 0.0
    assert yes_no_from_text("Looking closely, the answer is yes") == 1.0
    assert yes_no_from_text("yes and no") == 1.0  # the first word is the answer
    assert yes_no_from_text("It could be yes or no") is None
    assert yes_no_from_text("a red circle") is None
    assert yes_no_from_text("") is None


def test_yes_score_prefers_logprobs_and_falls_back_to_text() -> None:
    assert yes_score("No", [[("yes", math.log(0.3)), ("no", math.log(0.1))]]) == pytest.approx(0.75)
    assert yes_score("No", None) == 0.0
    assert yes_score("maybe", None) is None


def test_parse_score_scales_to_unit_interval() -> None:
    assert parse_score("Final Score: 7", 1, 10) == pytest.approx(6 / 9)
    # sub-scores first, the final score last: the last labelled number wins
    assert parse_score(
        "Alignment Score: 9\nQuality score: 3\nFinal Score: 5.5", 1, 10
    ) == pytest.approx(0.5)
    assert parse_score("I would rate it 8/10.", 1, 10) == pytest.approx(7 / 9)
    assert parse_score("8 out of 10", 0, 10) == pytest.approx(0.8)
    assert parse_score("4", 1, 5) == pytest.approx(0.75)


def test_parse_score_refuses_what_it_cannot_read() -> None:
    assert parse_score("Final Score: 11", 1, 10) is None  # out of range
    assert parse_score("between 3 and 4", 1, 10) is None  # two bare numbers: ambiguous
    assert parse_score("looks great", 1, 10) is None


class Verdict(BaseModel):
    score: int = Field(ge=1, le=10)
    reason: str


def test_parse_json_validates_against_the_schema() -> None:
    assert parse_json('{"score": 7, "reason": "ok"}', Verdict) == Verdict(score=7, reason="ok")
    fenced = 'Sure:\n```json\n{"score": 3, "reason": "blurry"}\n```'
    assert parse_json(fenced, Verdict) == Verdict(score=3, reason="blurry")
    assert parse_json('{"score": 70, "reason": "ok"}', Verdict) is None  # out of the schema's range
    assert parse_json('{"score": 7}', Verdict) is None  # missing field
    assert parse_json("{not json}", Verdict) is None
    assert parse_json("no object here", Verdict) is None


def test_scores_from_json() -> None:
    assert scores_from_json({"scores": [1, 0.5, None]}, 3) == [1.0, 0.5, None]
    assert scores_from_json({"scores": [True, "x", float("nan")]}, 3) == [None, None, None]
    assert (
        scores_from_json({"scores": [1.0]}, 2) is None
    )  # wrong length: the whole answer is suspect
    assert scores_from_json(["not", "a", "dict"], 3) is None


def test_parse_answer_reads_text_and_top_logprobs() -> None:
    body = {
        "choices": [
            {
                "message": {"content": "Yes"},
                "logprobs": {
                    "content": [
                        {
                            "token": "Yes",
                            "logprob": -0.1,
                            "top_logprobs": [
                                {"token": "Yes", "logprob": -0.1},
                                {"token": "No", "logprob": -2.4},
                            ],
                        }
                    ]
                },
            }
        ]
    }
    answer = parse_answer(body)
    assert answer is not None and answer.text == "Yes"
    assert answer.top_logprobs == [[("Yes", -0.1), ("No", -2.4)]]
    plain = parse_answer({"choices": [{"message": {"content": "no"}, "logprobs": None}]})
    assert plain is not None and plain.top_logprobs is None
    assert parse_answer({"choices": []}) is None
    assert parse_answer({"choices": [{"message": {"content": None}}]}) is None
    assert parse_answer("oops") is None


def test_geneval_questions_one_per_constraint() -> None:
    record = {
        "tag": "position",
        "include": [
            {"class": "circle", "count": 1},
            {"class": "triangle", "count": 1, "color": "red", "position": ["left of", 0]},
        ],
        "prompt": "a photo of a red triangle left of a circle",
    }
    assert geneval_questions(record) == [
        Question("Is there a circle in the image?"),
        Question("Is there a red triangle in the image?"),
        Question("Is the red triangle left of the circle in the image?"),
    ]


def test_geneval_counting_means_exactly() -> None:
    record = {
        "tag": "counting",
        "include": [{"class": "box", "count": 3}],
        "exclude": [{"class": "box", "count": 4}],
        "prompt": "a photo of three boxes",
    }
    assert geneval_questions(record) == [
        Question("Are there at least 3 boxes in the image?"),
        Question("Are there 4 or more boxes in the image?", expect_yes=False),
    ]
    none_of = {"include": [], "exclude": [{"class": "apple", "count": 1}], "prompt": "no apples"}
    assert geneval_questions(none_of) == [
        Question("Is there an apple in the image?", expect_yes=False)
    ]


def test_free_form_questions_and_the_prompt_fallback() -> None:
    assert geneval_questions(
        {"prompt": "p", "questions": ["Is it night?", "Is the sky clear?"]}
    ) == [Question("Is it night?"), Question("Is the sky clear?")]
    assert geneval_questions({"prompt": "a cat on a mat"}) == [
        Question('Does the image show "a cat on a mat"?')
    ]
