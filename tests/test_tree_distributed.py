"""Tree credit with several processes: `r3rl train` under torchrun (2 CPU processes, gloo) gives
the step metrics of one process, when a level's nodes do not split evenly between the ranks and
when a rank has no refinement of its own in a level (it trains a stand-in at weight 0, under
ZeRO-3, which needs every rank to run the same forwards). `block`, the uneven split, is pure."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from test_distributed import _train

from r3rl.distributed import Topology, block

TREE = ("rollout.credit=tree", "rollout.group_size=2", "rollout.tree_k=1", "rollout.max_rounds=2", "world.seed=4")


def test_block_splits_n_items_into_contiguous_blocks_the_first_ranks_one_larger() -> None:
    assert [list(block(5, Topology(r, 2))) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [list(block(1, Topology(r, 2))) for r in range(2)] == [[0], []]  # rank 1 has none
    assert [list(block(7, Topology(r, 3))) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert list(block(4, Topology())) == [0, 1, 2, 3]
    for n in range(9):
        for world in (1, 2, 3, 4):
            parts = [list(block(n, Topology(r, world))) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("world")


# (extra overrides, refine/stop_rate of step 2 that proves the split the case is about), in the
# tiny world of world.seed=4 (TREE), whose reflector makes these splits
CASES = {
    # G=2 roots, K=1, M=3: one root's reflection edits, the three reflections below its
    # refinements stop (stop rate 4/5), so level 0 has 3 refinements and level 1 three
    # reflections, 2 + 1 on the ranks; dr_grpo's text normaliser
    "uneven": (("rollout.tree_m=3", "reflector.loss_type=dr_grpo"), 4 / 5),
    # the same split with dapo, whose normaliser is the valid tokens of all ranks' reflections
    "uneven_dapo": (("rollout.tree_m=3", "reflector.loss_type=dapo"), 4 / 5),
    # M=1: one root edits and its refinement's reflection stops (stop rate 2/3), so level 0 has
    # one refinement and rank 1 none of its own; ZeRO-3
    "rank_without_refinement": (("rollout.tree_m=1", "distributed.deepspeed=launch/deepspeed/zero3.json"), 2 / 3),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES)
def test_tree_credit_on_two_processes_matches_one_process(tmp_path: Path, cache: Path, case: str) -> None:
    extra, stop_rate = CASES[case]
    one = _train(tmp_path / "one", cache, *TREE, *extra)
    two = _train(tmp_path / "two", cache, *TREE, *extra, nproc=2)
    assert [r["step"] for r in two] == [0, 1, 2] and [r["stage"] for r in two[1:]] == ["tree", "tree"]
    assert math.isclose(one[2]["refine/stop_rate"], stop_rate)
    must = {"reward/mean", "refine/stop_rate", "frac_reward_zero_std", "loss/grpo", "kl/text", "entropy",
            "completion_length", "loss/flow_grpo", "kl/image", "grad_norm"}
    for step in (1, 2):
        compared = [k for k in one[step] if not k.startswith("time/") and isinstance(one[step][k], (float, type(None)))]
        assert must <= set(compared), (step, must - set(compared))
        for key in compared:  # None: NaN (e.g. reward/final_mean when every last reflection stopped)
            a, b = one[step][key], two[step][key]
            assert (a is None and b is None) or math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6), (step, key, a, b)
