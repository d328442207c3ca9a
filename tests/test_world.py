"""The shapes world's pretraining cache: keyed by config, written atomically, reused."""

from __future__ import annotations

from pathlib import Path

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
    # the saved models are ordinary transformers / diffusers checkpoints
    reflector = HFReflector.from_pretrained(paths.reflector)
    flux = FluxModel.from_pretrained(paths.flux, image_size=cfg.image_size)
    assert type(reflector.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(flux.transformer).__name__ == "FluxTransformer2DModel"
    assert flux.max_text_len == 16


def test_world_key_changes_with_config_and_seed_but_not_cache_dir(tmp_path: Path) -> None:
    a = WorldConfig(cache_dir=str(tmp_path), **TINY)
    assert world_key(a, 0) == world_key(a.model_copy(update={"cache_dir": "/elsewhere"}), 0)
    assert world_key(a, 0) != world_key(a, 1)
    assert world_key(a, 0) != world_key(a.model_copy(update={"pretrain_diffusion_steps": 3}), 0)
