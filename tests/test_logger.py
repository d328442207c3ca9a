"""Run outputs: metrics.jsonl rows, TensorBoard scalars and image grids, config.yaml, rank gating."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from r3rl.config import load_config
from r3rl.logger import RunLogger, image_grid


def _rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _events(output_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(
        str(output_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0}
    )
    acc.Reload()
    return acc


def test_log_appends_one_json_row_per_call(tmp_path: Path) -> None:
    with RunLogger(tmp_path, total_steps=2) as logger:
        logger.log(0, {"eval/final_mean": 0.25})
        logger.log(
            1,
            {
                "stage": "generate",
                "reward/mean": np.float32(0.5),
                "loss/grpo": torch.tensor(2.0),
                "kl/text": float("nan"),
                "judge/failures": 0,
                "note": None,
            },
        )
    assert _rows(tmp_path) == [
        {"step": 0, "eval/final_mean": 0.25},
        {
            "step": 1,
            "stage": "generate",
            "reward/mean": 0.5,
            "loss/grpo": 2.0,
            "kl/text": None,
            "judge/failures": 0,
            "note": None,
        },
    ]


def test_numbers_go_to_tensorboard_scalars(tmp_path: Path) -> None:
    with RunLogger(tmp_path, total_steps=3) as logger:
        for step, reward in [(1, 0.25), (2, 0.5), (3, 0.75)]:
            logger.log(step, {"reward/mean": reward, "stage": "refine"})
    acc = _events(tmp_path)
    assert acc.Tags()["scalars"] == ["reward/mean"]  # strings are not scalars
    assert [(e.step, e.value) for e in acc.Scalars("reward/mean")] == [
        (1, 0.25),
        (2, 0.5),
        (3, 0.75),
    ]


def test_image_grid_goes_to_tensorboard(tmp_path: Path) -> None:
    images = [Image.new("RGB", (32, 32), color) for color in ["red", "green", "blue", "white"]]
    captions = ["a red circle", "<think>two</think> add one", "round 1", "no further edit needed"]
    with RunLogger(tmp_path, total_steps=1) as logger:
        logger.log_images(1, "rounds", images, captions, ncols=2)
    (event,) = _events(tmp_path).Images("rounds")
    assert event.step == 1
    assert event.width == 2 * (128 + 4) + 4  # two 128-px cells with 4-px gaps and margins
    assert event.height > 2 * 128  # two rows of images plus captions


def test_image_grid_enlarges_pixels_and_leaves_room_for_captions() -> None:
    red = Image.new("RGB", (32, 32), "red")
    grid = image_grid([red, red, red], ["a", "b", "c"], ncols=2, cell_size=64)
    assert grid.width == 2 * (64 + 4) + 4
    assert grid.getpixel((4, 4)) == (255, 0, 0) and grid.getpixel((4 + 63, 4 + 63)) == (255, 0, 0)
    assert grid.getpixel((4 + 64 + 4, 4 + 64 + 1)) == (255, 255, 255)  # just below the 2nd image
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        image_grid([red, red, red], ["a", "b"])


def test_resume_drops_rows_from_the_interrupted_run(tmp_path: Path) -> None:
    rows = [json.dumps({"step": s, "reward/mean": s / 10}) for s in range(5)]
    (tmp_path / "metrics.jsonl").write_text(
        "\n".join(rows) + '\n{"step": 5, "rew'
    )  # killed mid-write
    with RunLogger(tmp_path, total_steps=10, start_step=3) as logger:
        logger.log(3, {"reward/mean": 1.0})
    assert _rows(tmp_path) == [
        {"step": 0, "reward/mean": 0.0},
        {"step": 1, "reward/mean": 0.1},
        {"step": 2, "reward/mean": 0.2},
        {"step": 3, "reward/mean": 1.0},
    ]


def test_save_config_writes_the_resolved_recipe(tmp_path: Path, minimal_recipe: Path) -> None:
    cfg = load_config(minimal_recipe, ["seed=3"])
    with RunLogger(tmp_path, total_steps=1) as logger:
        path = logger.save_config(cfg)
    assert path == tmp_path / "config.yaml"
    assert load_config(path) == cfg


def test_disabled_logger_writes_nothing(tmp_path: Path, minimal_recipe: Path) -> None:
    out = tmp_path / "rank1"
    with RunLogger(out, total_steps=1, enabled=False) as logger:
        logger.log(1, {"reward/mean": 1.0})
        logger.log_images(1, "rounds", [Image.new("RGB", (8, 8))], ["x"])
        logger.save_config(load_config(minimal_recipe))
        logger.info("hello")
    assert not out.exists()
