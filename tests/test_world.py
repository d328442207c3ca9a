"""The shapes world's pretraining cache: keyed by config, written atomically, reused."""

from __future__ import annotations

from pathlib import Path

import torch

from r3rl.config import WorldConfig
from r3rl.models.flux import FluxModel
from r3rl.models.reflector import HFReflector
from r3rl.shapes.world import ensure_world, world_key

TINY = {"pretrain_vae_steps": 2, "pretrain_diffusion_steps": 2, "pretrain_pairs": 8, "pretrain_reflector_steps": 2,
        "reflector_sft_examples": 8, "pretrain_batch_size": 4}


def test_world_is_cached_by_config_and_loads_through_the_real_classes(tmp_path: Path) -> None:
    cfg = WorldConfig(cache_dir=str(tmp_path), **TINY)
    logs: list[str] = []
    paths = ensure_world(cfg, seed=0, log=logs.append)
    assert (paths.root / "COMPLETE").exists() and (paths.root / "pretrain.json").exists()
    assert not list(tmp_path.glob("*.tmp-*")), "the temp build folder must be renamed away"
    stamp = (paths.root / "COMPLETE").stat().st_mtime_ns
    assert ensure_world(cfg, seed=0, log=logs.append) == paths  # second call: cache hit, no pretraining
    assert (paths.root / "COMPLETE").stat().st_mtime_ns == stamp
    assert sum("pretraining the shapes world" in m for m in logs) == 1
    # world.seed pins the pretraining: a run of another seed reuses this world
    pinned = cfg.model_copy(update={"seed": 0})
    assert ensure_world(pinned, seed=7, log=logs.append) == paths
    assert sum("pretraining the shapes world" in m for m in logs) == 1
    # the saved models are ordinary transformers / diffusers checkpoints
    reflector = HFReflector.from_pretrained(paths.reflector)
    flux = FluxModel.from_pretrained(paths.flux, image_size=cfg.image_size)
    assert type(reflector.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(flux.transformer).__name__ == "FluxTransformer2DModel"
    assert flux.max_text_len == 32  # a prompt and its plan (rollout.reason) fit


def test_world_key_changes_with_config_and_seed_but_not_cache_dir(tmp_path: Path) -> None:
    a = WorldConfig(cache_dir=str(tmp_path), **TINY)
    assert world_key(a, 0) == world_key(a.model_copy(update={"cache_dir": "/elsewhere"}), 0)
    assert world_key(a, 0) != world_key(a, 1)
    assert world_key(a, 0) != world_key(a.model_copy(update={"pretrain_diffusion_steps": 3}), 0)


def test_flow_pretraining_runs_for_any_step_count() -> None:
    """A short `world.pretrain_diffusion_steps` must not crash the LR schedule (20 steps once did)."""
    import torch
    from PIL import Image

    from r3rl.shapes.critique import corpus
    from r3rl.shapes.tiny_diffusion import FlowPairs, build_tiny_flux, pretrain_flow
    from r3rl.shapes.tiny_reflector import build_tiny_reflector

    flux = build_tiny_flux(build_tiny_reflector(corpus(), 32).tokenizer, 32)
    with torch.no_grad():
        x0 = flux.encode_images([Image.new("RGB", (32, 32), (200, 40, 40))] * 4)
    before = [p.detach().clone() for p in flux.transformer.parameters()]
    for steps in (1, 2, 20, 21):
        pretrain_flow(flux, [FlowPairs(["one red square"] * 4, x0)], steps=steps, batch_size=2)
    assert any(not torch.equal(a, b) for a, b in zip(before, flux.transformer.parameters()))


def test_vae_loss_weighs_object_pixels_over_the_background() -> None:
    from r3rl.shapes.tiny_diffusion import _object_weight

    x = torch.full((2, 3, 8, 8), 0.9)  # light background
    x[0, :, 2:4, 2:4] = torch.tensor([-0.5, 0.2, 0.8])[:, None, None]  # one coloured object
    w = _object_weight(x, weight=10.0)
    assert w.shape == (2, 1, 8, 8)
    assert w[0, 0, 2:4, 2:4].eq(10.0).all() and w[0].sum() == 4 * 10 + 60
    assert w[1].eq(1.0).all()  # an empty canvas is all background
