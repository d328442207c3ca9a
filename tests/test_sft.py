"""`r3rl sft`: the boundary-consistency loss by hand, and the real CLI on a tiny world."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from r3rl.algos.flow_matching import boundary_band, boundary_weights, token_weights, weighted_flow_loss

FIXTURES = Path(__file__).parent / "fixtures"


def test_boundary_band_is_dilation_minus_erosion() -> None:
    mask = np.zeros((6, 6), bool)
    mask[2:4, 2:4] = True
    band = boundary_band(mask, 1)
    expected = np.zeros((6, 6), bool)
    expected[1:5, 2:4] = expected[2:4, 1:5] = True  # the block grown by the 4-neighbour cross; erosion empties it
    assert (band == expected).all()
    big = np.zeros((8, 8), bool)
    big[1:7, 1:7] = True
    inner = boundary_band(big, 1)
    assert not inner[3:5, 3:5].any() and inner[1, 3] and inner[0, 3] and not inner[0, 0]
    assert not boundary_band(mask, 0).any()


def test_boundary_weights_add_the_weight_in_the_band_only() -> None:
    mask = np.zeros((6, 6), bool)
    mask[2:4, 2:4] = True
    w = boundary_weights(mask, 1, 3.0)
    assert w[2, 2] == 4.0 and w[1, 2] == 4.0 and w[0, 0] == 1.0 and w[1, 1] == 1.0


def test_token_weights_average_pixels_over_each_token() -> None:
    pix = torch.tensor([[[1.0, 3.0, 1.0, 1.0], [1.0, 3.0, 1.0, 1.0], [5.0, 5.0, 2.0, 2.0], [5.0, 5.0, 2.0, 4.0]]])
    assert token_weights(pix, 2).tolist() == [[2.0, 1.0, 5.0, 2.5]]


def test_weighted_flow_loss_by_hand() -> None:
    pred = torch.tensor([[[1.0, 1.0], [2.0, 0.0]]])  # per-token squared errors: mean(1, 1) = 1, mean(4, 0) = 2
    target = torch.zeros(1, 2, 2)
    assert weighted_flow_loss(pred, target, None).item() == pytest.approx(1.5)
    assert weighted_flow_loss(pred, target, torch.tensor([[1.0, 3.0]])).item() == pytest.approx((1 * 1 + 3 * 2) / 4)


@pytest.fixture(scope="module")
def sft_setup(tmp_path_factory) -> Path:
    """A tiny-world recipe and a JSONL of rendered (flawed, instruction, fixed, region) pairs."""
    from r3rl.shapes.prompts import split_prompts
    from r3rl.shapes.scene import make_edit_pair, render

    root = tmp_path_factory.mktemp("sft")
    rng = random.Random(0)
    train, _ = split_prompts()
    lines = []
    for i in range(6):
        meta = rng.choice(train)
        flawed, instruction, fixed = make_edit_pair(meta, rng)
        render(flawed, 32).save(root / f"in{i}.png")
        render(fixed, 32).save(root / f"out{i}.png")
        lines.append({"input": f"in{i}.png", "instruction": instruction, "target": f"out{i}.png",
                      "prompt": meta["prompt"], "region": [0.0, 0.0, 0.5, 0.5]})  # a focus window smaller than the canvas
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    recipe = root / "tiny.yaml"
    recipe.write_text(f"""
output_dir: {root / 'run'}
world: {{pretrain_vae_steps: 2, pretrain_diffusion_steps: 2, pretrain_pairs: 8, pretrain_reflector_steps: 2,
        reflector_sft_examples: 8, pretrain_batch_size: 4, cache_dir: {root / 'cache'}}}
refiner: {{sft: {{data: {root / 'pairs.jsonl'}, steps: 3, batch_size: 4}}, regenerate: {{pretrain_steps: 2, pretrain_pairs: 8}}}}
rewards: [{{name: "{FIXTURES / 'noisy_reward.py'}:noisy_reward"}}]
""")
    return recipe


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r3rl.cli", *args], check=False, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("mode", ["edit", "region", "regenerate"])
def test_sft_fine_tunes_the_refiner_in_each_mode(sft_setup, tmp_path: Path, mode: str, one_thread) -> None:
    from r3rl.config import load_config
    from r3rl.models.flux import FluxModel
    from r3rl.sft import run_sft

    recipe = sft_setup
    out = run_sft(load_config(recipe, [f"output_dir={tmp_path}", f"refiner.mode={mode}"]))
    assert out == tmp_path / "sft" / "refiner"
    stats = json.loads((out / "sft.json").read_text())
    assert stats["pairs"] == 6 and stats["steps"] == 3 and np.isfinite(stats["last_loss"])
    FluxModel.from_pretrained(out, image_size=32)  # a refiner folder `refiner.model` can point at
    assert (out / "semantic_projection").exists() == (mode == "regenerate")


@pytest.fixture(scope="module")
def qwen_image_edit(sft_setup: Path, tokenizer) -> Path:
    """A tiny random-weight Qwen-Image-Edit checkpoint at the pairs' size."""
    from r3rl.models.tiny import build_tiny_qwen_image_edit

    path = sft_setup.parent / "qwen_image_edit"
    build_tiny_qwen_image_edit(tokenizer, 32, seed=0).save_pretrained(path)
    return path


def _fixed_batch_loss(cfg) -> float:
    """Flow-matching loss of the recipe's refiner (loaded as `r3rl sft` and `r3rl train` load it) on
    all pairs at fixed noise and times, conditioned as rollouts condition it (`encode_condition`)."""
    from r3rl.models.base import encode_condition
    from r3rl.sft import _load, load_pairs, mode_examples

    model, _ = _load(cfg, 32)
    trained, examples = mode_examples(model, load_pairs(cfg.refiner.sft.data), cfg.refiner.sft.data)
    with torch.no_grad():
        x0 = getattr(trained, "inner", trained).encode_images([e.target for e in examples])
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        s = torch.linspace(0.2, 0.9, len(examples))[:, None, None]
        cond, ref = encode_condition(trained, [e.text for e in examples], [e.input for e in examples])
        return weighted_flow_loss(trained.velocity((1 - s) * x0 + s * eps, s[:, 0, 0], cond, ref), eps - x0, None).item()


@pytest.mark.parametrize("mode", ["edit", "region", "regenerate"])
def test_sft_fine_tunes_a_qwen_image_edit_refiner(sft_setup, qwen_image_edit: Path, tmp_path: Path, mode: str,
                                                   one_thread) -> None:
    """Its text encoder reads each input with the instruction in the loss too; the result loads back
    as a refiner in the same mode and has a lower loss on the pairs."""
    from r3rl.config import load_config
    from r3rl.models.registry import detect_family
    from r3rl.sft import run_sft

    cfg = load_config(sft_setup, [f"output_dir={tmp_path}", f"refiner.mode={mode}", f"refiner.model={qwen_image_edit}",
                                  "refiner.sft.steps=8", "refiner.sft.lr=1.0e-3"])
    out = run_sft(cfg)
    assert detect_family(out) == "qwen_image_edit" and not (out / "semantic_projection").exists()
    before = _fixed_batch_loss(cfg)
    after = _fixed_batch_loss(load_config(sft_setup, [f"refiner.mode={mode}", f"refiner.model={out}"]))
    assert after < 0.9 * before, (before, after)


def test_sft_bad_pair_line_is_a_one_line_user_error(sft_setup, tmp_path: Path) -> None:
    recipe = sft_setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "add a red circle", "target": "out0.png"}\n{"instruction": 3}\n')
    proc = _cli("sft", str(recipe), f"output_dir={tmp_path}", f"refiner.sft.data={bad}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"r3rl: error: {bad}:1: image not found: {tmp_path / 'out0.png'}"
    assert not (tmp_path / "sft").exists()


def test_sft_with_offloaded_encoders_trains_and_saves_the_same_refiner(sft_setup, tmp_path: Path, one_thread) -> None:
    """`refiner.offload`: the frozen encoders (and regenerate's semantic VLM) run from host memory;
    the losses are unchanged and the saved folder holds their real weights, not placeholders."""
    from safetensors.torch import load_file

    from r3rl.config import load_config
    from r3rl.sft import run_sft

    outs = [run_sft(load_config(sft_setup, [f"output_dir={tmp_path / off}", "refiner.mode=regenerate",
                                            f"refiner.offload={off}"])) for off in ("false", "true")]
    stats = [json.loads((o / "sft.json").read_text()) for o in outs]
    assert stats[0] == stats[1]
    weights = lambda o: {f.relative_to(o): load_file(f) for f in sorted(o.rglob("*.safetensors"))}
    plain, offloaded = weights(outs[0]), weights(outs[1])
    assert plain.keys() == offloaded.keys() and any("semantic_encoder" in str(f) for f in plain)
    assert all(torch.equal(plain[f][k], offloaded[f][k]) for f in plain for k in plain[f])
