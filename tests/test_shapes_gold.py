"""The gold judge (eval-only, independent of the reward's detector) and the eval figures built on it."""

import math
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from r3rl.evaluate import gold_metrics, hacking_warning, summary_lines, verdict_metrics
from r3rl.models.reflector import Reflection
from r3rl.shapes.gold import gold_objects, gold_scores, gold_verdict
from r3rl.shapes.prompts import all_prompts
from r3rl.shapes.scene import PALETTE, Obj, make_edit_pair, render, sample_scene

METAS = all_prompts()
EXPLOITS = Path(__file__).parent / "fixtures" / "exploits"
GOLD_EXPLOITS = Path(__file__).parent / "fixtures" / "exploits_gold"


@pytest.mark.parametrize("size", [32, 64])
def test_honest_scenes_pass_and_their_flawed_edits_fail(size):
    rng = random.Random(size)
    for meta in METAS[::3]:
        assert gold_verdict(meta, render(sample_scene(meta, rng), size)).passed, meta["prompt"]
        flawed, _, fixed = make_edit_pair(meta, rng)
        assert not gold_verdict(meta, render(flawed, size)).passed, meta["prompt"]
        assert gold_verdict(meta, render(fixed, size)).passed, meta["prompt"]


def test_templates_tell_the_three_shapes_apart_with_high_iou():
    objs = [Obj("circle", "red", 0.25, 0.3, 0.3), Obj("square", "blue", 0.72, 0.3, 0.26),
            Obj("triangle", "green", 0.5, 0.75, 0.34)]
    found = {o.color: o for o in gold_objects(render(objs, 48))}
    assert {c: o.shape for c, o in found.items()} == {"red": "circle", "blue": "square", "green": "triangle"}
    assert min(o.iou for o in found.values()) > 0.9
    assert found["red"].detection.cx == pytest.approx(0.25, abs=0.03)
    assert found["green"].detection.cy == pytest.approx(0.75, abs=0.03)  # box centre, not centroid


@pytest.mark.parametrize("strip", sorted(EXPLOITS.glob("*.png")), ids=lambda p: p.stem)
def test_every_image_our_runs_drew_to_game_the_reward_is_clutter_to_gold(strip):
    from test_shapes_exploits import tiles

    for tile in tiles(strip):
        assert any(o.shape == "clutter" for o in gold_objects(tile))
        assert not any(gold_verdict(m, tile).passed for m in METAS[::5])


def test_what_shared_noise_flow_grpo_drew_while_its_reward_rose_fails_gold():
    """The milder exploit of session 6 (FlowGRPO with one initial noise per group): two-toned,
    bulging objects and stray blobs. The checker's partial credit paid these final-step images
    0.36 on average under their prompts (its trained reward rose 0.28 -> 0.40) and does not refuse
    the pattern; gold must: none passes, and most hold clutter."""
    import json

    from rewards.shapes_geneval import detect, score

    strip = Image.open(GOLD_EXPLOITS / "flow_grpo_shared_noise_step334.png").convert("RGB")
    prompts = json.loads((GOLD_EXPLOITS / "flow_grpo_shared_noise_step334.json").read_text())
    by_prompt = {m["prompt"]: m for m in METAS}
    tiles = [strip.crop((32 * i, 0, 32 * i + 32, 32)) for i in range(len(prompts))]
    verdicts = [gold_verdict(by_prompt[p], t) for p, t in zip(prompts, tiles, strict=True)]
    assert not any(v.passed for v in verdicts)
    assert sum(v.clutter > 0 for v in verdicts) >= 6
    paid = [score(by_prompt[p], detect(t), partial_credit=True) for p, t in zip(prompts, tiles)]
    assert sum(paid) / len(paid) > 0.3  # the gap gold covers: if the checker closes it, say so here


def test_an_oval_a_bar_a_speck_and_an_off_palette_blob_are_not_objects():
    img = render([], 64)
    d = ImageDraw.Draw(img)
    d.ellipse((4, 4, 40, 20), fill=PALETTE["red"])  # oval
    d.rectangle((6, 30, 14, 60), fill=PALETTE["blue"])  # bar
    d.ellipse((30, 40, 62, 62), fill=PALETTE["green"])  # huge... but a fine circle
    shapes = sorted(o.shape for o in gold_objects(img))
    assert shapes.count("clutter") == 2
    tiny = render([Obj("circle", "red", 0.5, 0.5, 0.09)], 64)  # far below the world's sizes
    assert [o.shape for o in gold_objects(tiny)] == ["clutter"]
    grey = Image.new("RGB", (32, 32), (245, 245, 240))
    ImageDraw.Draw(grey).ellipse((8, 8, 24, 24), fill=(120, 120, 125))
    assert gold_objects(grey) == []


def test_gold_scores_report_pass_and_clutter_per_image():
    meta = next(m for m in METAS if m["tag"] == "single_object")
    good = render(sample_scene(meta, random.Random(0)), 32)
    dirty = good.copy()
    ImageDraw.Draw(dirty).rectangle((0, 28, 31, 31), fill=PALETTE["purple"])
    assert gold_scores([meta, meta], [good, dirty]) == ([True, False], [False, True])


def _refl(stop: bool) -> Reflection:
    return Reflection("", [], [], None if stop else "add a red circle", format_ok=True)


def test_verdict_metrics_by_hand():
    # round 1 judged round 0: images 0, 1 correct; 2, 3 wrong. stops on 0 and 2, edits 1 and 3.
    correct = torch.tensor([[True, True, False, False], [True, True, True, False]])
    refl = [[None] * 4, [_refl(True), _refl(False), _refl(True), _refl(False)]]
    m = verdict_metrics(refl, correct)
    assert m["eval/verdict_acc"] == 0.5  # right on 0 (stop) and 3 (edit)
    assert m["eval/stop_precision"] == 0.5  # stops: 0 right, 2 wrong
    assert m["eval/stop_recall"] == 0.5  # correct images 0, 1: stopped on 0
    none = verdict_metrics([[None] * 2, [None] * 2], torch.ones(2, 2, dtype=torch.bool))
    assert all(math.isnan(v) for v in none.values())


def test_gold_metrics_per_round_and_final():
    meta = next(m for m in METAS if m["tag"] == "single_object")
    good = render(sample_scene(meta, random.Random(0)), 32)
    junk = render([], 32)
    ImageDraw.Draw(junk).rectangle((0, 10, 31, 14), fill=PALETTE["red"])
    images = [[junk, junk], [good, junk]]
    refl = [[None, None], [_refl(False), _refl(True)]]
    m = gold_metrics(gold_scores, [meta, meta], images, refl)
    assert m["eval/gold/round0_acc"] == 0.0 and m["eval/gold/round0_clutter"] == 1.0
    assert m["eval/gold/round1_acc"] == 0.5 and m["eval/gold/final_acc"] == 0.5
    assert m["eval/gold/final_clutter"] == 0.5
    assert m["eval/gold/verdict_acc"] == 0.5  # edited junk (right), stopped on junk (wrong)


def test_hacking_warning_fires_only_when_reward_rises_while_gold_falls():
    first = {"eval/final_mean": 0.30, "eval/gold/final_acc": 0.20, "eval/gold/final_clutter": 0.1}
    hacked = {"eval/final_mean": 0.55, "eval/gold/final_acc": 0.05, "eval/gold/final_clutter": 0.9}
    honest = {"eval/final_mean": 0.55, "eval/gold/final_acc": 0.35, "eval/gold/final_clutter": 0.1}
    msg = hacking_warning(first, hacked, 400)
    assert msg and "step 400" in msg and "0.300 -> 0.550" in msg and "0.200 -> 0.050" in msg
    assert hacking_warning(first, honest, 400) is None
    assert hacking_warning({"eval/final_mean": 0.3}, {"eval/final_mean": 0.9}, 4) is None  # no gold
    lines = summary_lines(first | {"eval/gold/round0_acc": 0.2}, hacked | {"eval/gold/round0_acc": 0.1}, 400)
    assert any(line.startswith("gold acc, round 0") and "0.200" in line and "0.100" in line for line in lines)
