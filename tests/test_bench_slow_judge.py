"""bench/slow_judge_bench.py on a tiny world: two real reward servers, the same work on both
sides, and the server's latency shows up in the slow side's step time."""

from __future__ import annotations

from conftest import load_bench


def _bench():
    return load_bench("slow_judge_bench")


def test_slow_judge_bench_runs_on_a_tiny_world(tiny_world, one_thread):
    tiny = [*tiny_world, "rollout.group_size=2"]
    out = _bench().main(["--steps", "2", "--warmup", "1", "--delay", "0.5", "--no-results", *tiny])
    assert out["same_work"], out["rewards"]
    assert len(out["rewards"]["0 ms"]) == 3
    assert out["ratio"] > 1.0  # every step sends at least one request to the slow server
