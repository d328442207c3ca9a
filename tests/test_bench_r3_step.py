"""bench/r3_step_bench.py runs on a tiny world and accounts for the step's time sensibly.

Timings are the benchmark's business (design.md §6); here: it runs, every phase is present,
and the model compute it attributes never exceeds the step that contains it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("r3_step_bench", ROOT / "bench/r3_step_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_r3_step_bench_runs_on_a_tiny_world(tmp_path, one_thread):
    tiny = [
        f"world.cache_dir={tmp_path / 'cache'}", "world.pretrain_vae_steps=2", "world.pretrain_diffusion_steps=2",
        "world.pretrain_pairs=8", "world.pretrain_reflector_steps=2", "world.reflector_sft_examples=8",
        "world.pretrain_batch_size=4", "reflector.max_new_tokens=6", "generator.num_steps=2", "refiner.num_steps=2",
    ]
    out = _bench().main(["--steps", "2", "--warmup", "1", "--groups", "2,3", "--rounds", "1,2", "--no-results", *tiny])
    res = out["overhead"]
    phases = res["phases"]
    assert res["stages"] == ["refine", "generate"]  # R3 alternates; both kinds are measured
    for kind in ("reflector generate", "diffusion transformer", "backward", "optimiser step", "rewards", "logging"):
        assert phases[kind] > 0, kind
    assert phases["model compute"] <= phases["step"]
    assert res["ratio"] >= 1.0
    assert set(out["groups"]) == {2, 3} and set(out["tree"]) == {1, 2}
    assert res["checkpoint_s"] > 0
