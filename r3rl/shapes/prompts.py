"""GenEval-style prompt records for the shapes world, and its fixed train/eval split.

Records follow GenEval's `evaluation_metadata.jsonl` exactly (djghosh13/geneval,
prompts/create_prompts.py): same tags, templates, articles, plurals, and a counting
record carries `exclude: count + 1` so the count must be exact.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Iterable
from itertools import permutations
from pathlib import Path

from r3rl.shapes.scene import COLORS, RELATIONS, SHAPES

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBERS = ("zero", "one", "two", "three", "four")
COUNTS = (2, 3, 4)


def _a(word: str) -> str:
    """GenEval's article: 'an orange circle', 'a red circle'."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def all_prompts() -> list[dict]:
    """Every distinct record the world supports, grouped by tag in TAGS order."""
    records: list[dict] = []
    for s in SHAPES:
        records.append(
            {
                "tag": "single_object",
                "include": [{"class": s, "count": 1}],
                "prompt": f"a photo of {_a(s)}",
            }
        )
    for a, b in permutations(SHAPES, 2):
        records.append(
            {
                "tag": "two_object",
                "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
                "prompt": f"a photo of {_a(a)} and {_a(b)}",
            }
        )
    for s in SHAPES:
        for n in COUNTS:
            records.append(
                {
                    "tag": "counting",
                    "include": [{"class": s, "count": n}],
                    "exclude": [{"class": s, "count": n + 1}],
                    "prompt": f"a photo of {NUMBERS[n]} {s}s",
                }
            )
    for s in SHAPES:
        for c in COLORS:
            records.append(
                {
                    "tag": "colors",
                    "include": [{"class": s, "count": 1, "color": c}],
                    "prompt": f"a photo of {_a(c)} {s}",
                }
            )
    for a, b in permutations(SHAPES, 2):
        for rel in RELATIONS:
            records.append(
                {
                    "tag": "position",
                    "include": [
                        {"class": b, "count": 1},
                        {"class": a, "count": 1, "position": [rel, 0]},
                    ],
                    "prompt": f"a photo of {_a(a)} {rel} {_a(b)}",
                }
            )
    for a, b in permutations(SHAPES, 2):
        for ca, cb in permutations(COLORS, 2):
            records.append(
                {
                    "tag": "color_attr",
                    "include": [
                        {"class": a, "count": 1, "color": ca},
                        {"class": b, "count": 1, "color": cb},
                    ],
                    "prompt": f"a photo of {_a(ca)} {a} and {_a(cb)} {b}",
                }
            )
    return records


def _eval_quota(sizes: dict[str, int], n_eval: int) -> dict[str, int]:
    """Deal eval slots round-robin over tags, each keeping two thirds of its prompts for
    training: eval stays as tag-balanced as the pool allows (as GenEval's suite is),
    instead of 3/4 color_attr under proportional sampling."""
    caps = {t: n // 3 for t, n in sizes.items()}
    if not len(sizes) <= n_eval <= sum(caps.values()) or min(caps.values()) < 1:
        raise ValueError(
            f"n_eval={n_eval}: expected {len(sizes)}..{sum(caps.values())} (one per tag, a third "
            "of each tag at most)"
        )
    quota = dict.fromkeys(sizes, 0)
    while n_eval:
        for t in sizes:
            if n_eval and quota[t] < caps[t]:
                quota[t] += 1
                n_eval -= 1
    return quota


def split_prompts(seed: int = 0, n_eval: int = 48) -> tuple[list[dict], list[dict]]:
    """Fixed disjoint (train, eval) split, stratified by tag.

    Train keeps all_prompts() order; eval is interleaved tag by tag, so any prefix of it
    is balanced too.
    """
    by_tag: dict[str, list[dict]] = {t: [] for t in TAGS}
    for rec in all_prompts():
        by_tag[rec["tag"]].append(rec)
    quota = _eval_quota({t: len(r) for t, r in by_tag.items()}, n_eval)
    rng = random.Random(seed)
    held: dict[str, list[dict]] = {t: rng.sample(recs, quota[t]) for t, recs in by_tag.items()}
    held_prompts = {r["prompt"] for recs in held.values() for r in recs}
    train = [r for r in all_prompts() if r["prompt"] not in held_prompts]
    evals = [held[t][k] for k in range(max(quota.values())) for t in TAGS if k < quota[t]]
    return train, evals


def shapes_prompts(split: str, n: int, seed: int = 0) -> list[dict]:
    """`n` records from the fixed split (split_prompts' defaults).

    train: drawn with replacement, tag first then record, so every tag is equally
    frequent; `seed` fixes the draw. eval: the first `n` held-out records, no repeats.
    """
    train, evals = split_prompts()
    if split == "train":
        rng = random.Random(seed)
        by_tag = {t: [r for r in train if r["tag"] == t] for t in TAGS}
        return [copy.deepcopy(rng.choice(by_tag[rng.choice(TAGS)])) for _ in range(n)]
    if split == "eval":
        if n > len(evals):
            raise ValueError(f"n={n}: the eval split has {len(evals)} records")
        return copy.deepcopy(evals[:n])
    raise ValueError(f"split={split!r}: expected 'train' or 'eval'")


def write_jsonl(records: Iterable[dict], path: str | Path) -> None:
    """One JSON object per line (GenEval's metadata format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
