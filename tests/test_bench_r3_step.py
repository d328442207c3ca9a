"""bench/r3_step_bench.py runs on a tiny world and accounts for the step's time sensibly.

Timings are the benchmark's business (design.md §6); here: it runs, every phase is present,
and the model compute it attributes never exceeds the step that contains it.
"""

from __future__ import annotations

from conftest import load_bench


def _bench():
    return load_bench("r3_step_bench")


def test_r3_step_bench_runs_on_a_tiny_world(tiny_world, one_thread):
    out = _bench().main(["--steps", "2", "--warmup", "1", "--groups", "2,3", "--rounds", "1,2", "--no-results", *tiny_world])
    res = out["overhead"]
    phases = res["phases"]
    assert res["stages"] == ["refine", "generate"]  # R3 alternates; both kinds are measured
    for kind in ("reflector generate", "diffusion transformer", "backward", "optimiser step", "rewards", "logging"):
        assert phases[kind] > 0, kind
    assert phases["model compute"] <= phases["step"]
    assert res["ratio"] >= 1.0
    assert set(out["groups"]) == {2, 3} and set(out["tree"]) == {1, 2}
    assert res["checkpoint_s"] > 0
