"""Turn a judge's answer into a number: yes/no probability, a numeric score, or validated JSON.

Pure functions, so each rule is unit-tested on hand-written answers. Anything that cannot be
read returns `None` (the sample is masked, never scored 0): a judge that rambles must not
look like a judge that said "no".
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

T = TypeVar("T", bound=BaseModel)

# One generated position's alternatives: (token text, log-probability).
TopLogprobs = Sequence[tuple[str, float]]

_WORD = re.compile(r"[a-z]+")
_NUMBER = r"(-?\d+(?:\.\d+)?)"
_LABELLED = re.compile(rf"score\W{{0,3}}{_NUMBER}", re.IGNORECASE)  # "Final Score: 7", "score = 7"
_FRACTION = re.compile(rf"{_NUMBER}\s*(?:/|out of)\s*\d+", re.IGNORECASE)  # "7/10", "7 out of 10"
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def _token_word(token: str) -> str:
    """'Yes', ' yes', 'YES.' -> 'yes': tokenizers differ in case, spacing and punctuation."""
    words = _WORD.findall(token.lower())
    return words[0] if len(words) == 1 else ""


def _starts(word: str) -> Callable[[str], bool]:
    """Whether a token is a non-empty prefix of `word` ('y', 'Ye', 'yes' for "yes")."""
    return lambda token: bool(token.strip()) and word.startswith(token.strip().lower())


def yes_probability(
    positions: Sequence[TopLogprobs] | None, *, constrained: bool = False
) -> float | None:
    """P(yes) / (P(yes) + P(no)) at the first generated position that offers either word.

    Free text: whole-word tokens only ('Yes', ' no'); renormalising over the two answers ignores
    the mass on formatting tokens. `constrained`: the server's guided decoding allowed only the
    answers yes/no, so the first position's distribution is over their spellings and every
    allowed token is a prefix of one ('y' + 'es' is a path to "yes" too): each prefix counts
    for its word. `None` when the server sent no log-probs or no position considered yes or no.
    """
    if constrained:
        is_yes, is_no = _starts("yes"), _starts("no")
    else:
        is_yes = lambda tok: _token_word(tok) == "yes"
        is_no = lambda tok: _token_word(tok) == "no"
    for alternatives in positions or ():
        p_yes = sum(math.exp(lp) for tok, lp in alternatives if is_yes(tok))
        p_no = sum(math.exp(lp) for tok, lp in alternatives if is_no(tok))
        if p_yes + p_no > 0:
            return p_yes / (p_yes + p_no)
        if constrained:
            return None  # the first position decides; a later one is no answer to the question
    return None


def yes_no_from_text(text: str) -> float | None:
    """1.0 / 0.0 when the answer starts with yes / no, or names exactly one of them; else None."""
    words = _WORD.findall(text.lower())
    if words and words[0] in ("yes", "no"):
        return 1.0 if words[0] == "yes" else 0.0
    said = {w for w in words if w in ("yes", "no")}
    return (1.0 if said == {"yes"} else 0.0) if len(said) == 1 else None


def yes_score(
    text: str, positions: Sequence[TopLogprobs] | None, *, constrained: bool = False
) -> float | None:
    """Log-probs when the server returned them (a graded score), the text otherwise (0 or 1)."""
    p = yes_probability(positions, constrained=constrained)
    return p if p is not None else yes_no_from_text(text)


def parse_score(text: str, low: float, high: float) -> float | None:
    """The score in `text` scaled to [0, 1]; None unless exactly one reading lies in [low, high].

    Readings, most explicit first: the last "score: N" (a final score follows sub-scores),
    then "N/M" or "N out of M", then a lone number.
    """
    for pattern in (_LABELLED, _FRACTION):
        found = pattern.findall(text)
        if found:
            value = float(found[-1])
            break
    else:
        numbers = re.findall(_NUMBER, text)
        if len(numbers) != 1:
            return None
        value = float(numbers[0])
    if not low <= value <= high:
        return None
    return (value - low) / (high - low)


def parse_json(text: str, schema: type[T]) -> T | None:
    """The first JSON object in `text` (markdown fences allowed) validated by `schema`, or None."""
    fenced = _FENCE.search(text)
    body = fenced.group(1) if fenced else text
    start, end = body.find("{"), body.rfind("}")
    if start < 0 or end < start:
        return None
    try:
        return schema.model_validate_json(body[start : end + 1])
    except ValidationError:
        return None


def scores_from_json(body: Any, n: int, key: str = "scores") -> list[float | None] | None:
    """The `scores` (or `key`) list of a reward server's answer: n numbers or nulls, else None."""
    scores = body.get(key) if isinstance(body, dict) else None
    if not isinstance(scores, list) or len(scores) != n:
        return None
    number = lambda s: isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
    return [float(s) if number(s) else None for s in scores]
