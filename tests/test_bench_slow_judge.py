"""bench/slow_judge_bench.py on a tiny world: two real reward servers, the same work on both
sides, and the server's latency shows up in the slow side's step time."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("slow_judge_bench", ROOT / "bench/slow_judge_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_slow_judge_bench_runs_on_a_tiny_world(tmp_path, one_thread):
    tiny = [
        f"world.cache_dir={tmp_path / 'cache'}", "world.pretrain_vae_steps=2", "world.pretrain_diffusion_steps=2",
        "world.pretrain_pairs=8", "world.pretrain_reflector_steps=2", "world.reflector_sft_examples=8",
        "world.pretrain_batch_size=4", "reflector.max_new_tokens=6", "generator.num_steps=2", "refiner.num_steps=2",
        "rollout.group_size=2",
    ]
    out = _bench().main(["--steps", "2", "--warmup", "1", "--delay", "0.5", "--no-results", *tiny])
    assert out["same_work"], out["rewards"]
    assert len(out["rewards"]["0 ms"]) == 3
    assert out["ratio"] > 1.0  # every step sends at least one request to the slow server
