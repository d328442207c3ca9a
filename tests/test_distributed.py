"""Multi-process training: topology from launcher environments, sharding, DeepSpeed configs,
split-invariant sampling, and `r3rl train` under torchrun (2 CPU processes, gloo, ZeRO-2)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port

from r3rl.distributed import Shard, Topology, deepspeed_config, topology_from_env
from r3rl.errors import UserError
from r3rl.models.base import TextCond
from r3rl.sampling import SDEConfig, sample

REPO = Path(__file__).resolve().parents[1]


def test_topology_from_each_launcher_environment() -> None:
    assert topology_from_env({}) == Topology(0, 1, 0)
    assert topology_from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == Topology(3, 8, 1)
    mpi = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    assert topology_from_env(mpi) == Topology(2, 4, 0)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "1"}
    assert topology_from_env(slurm) == Topology()  # a plain `python` inside an allocation: one process
    assert topology_from_env({**slurm, "MASTER_ADDR": "n1"}) == Topology(5, 6, 1)
    # torchrun inside srun: torchrun's variables win
    assert topology_from_env({**slurm, "MASTER_ADDR": "n1", "RANK": "0", "WORLD_SIZE": "2"}) == Topology(0, 2, 0)
    with pytest.raises(UserError, match="RANK=4"):
        topology_from_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_shard_splits_a_batch_into_contiguous_blocks_and_takes_this_ranks_rows() -> None:
    assert [list(Shard(6, Topology(r, 3)).rows) for r in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert list(Shard(5, Topology()).rows) == [0, 1, 2, 3, 4]
    assert Shard(5, Topology()).keep is None  # one process simulates every row
    assert Shard(6, Topology(1, 3)).keep.tolist() == [2, 3]
    assert Shard(1, Topology(1, 2)).keep.tolist() == [0]  # an empty block keeps a stand-in row
    assert Shard(5, Topology(1, 2)).take(torch.arange(5)).tolist() == [3, 4]
    assert Shard(5, Topology(0, 2)).take(list("abcde")) == ["a", "b", "c"]
    assert Shard(3, Topology()).gather(["x", "y"]) == ["x", "y"]  # one process: as it is


def test_a_group_the_ranks_cannot_split_is_refused_before_any_model_loads(monkeypatch) -> None:
    from r3rl.config import parse_config
    from r3rl.trainer import train

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = parse_config({"output_dir": "unused", "rollout": {"group_size": 6}})
    with pytest.raises(UserError, match="group_size=6 must be divisible by the number of processes \\(4\\)"):
        train(cfg)


def test_deepspeed_config_fills_auto_values_from_the_recipe(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": "auto", "gradient_clipping": 0.5,
                                "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": 0.1}},
                                "zero_optimization": {"stage": 3}}))
    adamw = {"lr": 2e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0}
    cfg = deepspeed_config(path, adamw=adamw, world=4, grad_accum=3, max_grad_norm=1.0)
    assert cfg["train_batch_size"] == 12 and cfg["train_micro_batch_size_per_gpu"] == 1
    assert cfg["gradient_accumulation_steps"] == 3 and cfg["gradient_clipping"] == 0.5  # explicit values stay
    assert cfg["optimizer"]["params"] == {"lr": 2e-4, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8,
                                          "torch_adam": not torch.cuda.is_available()}


class _Linear:
    """A velocity field v = W x + b: enough to check which random numbers a row receives."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.w, self.b = torch.randn(4, 4, generator=g) * 0.1, torch.randn(4, generator=g)

    def noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(batch, 3, 4, generator=generator)

    def velocity(self, x, sigma, cond, ref):
        return x @ self.w + self.b + cond.embeds.mean(1, keepdim=True)


def test_a_sample_trajectory_does_not_depend_on_how_the_group_is_split() -> None:
    model, b, steps = _Linear(), 6, 4
    cond = TextCond(torch.randn(b, 2, 4), torch.zeros(b, 4))
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    mask = torch.zeros(b, steps, dtype=torch.bool)
    mask[torch.arange(b), torch.tensor([0, 1, 2, 0, 1, 3])] = True  # rows train different steps
    full = sample(model, cond, None, sigmas, mask, SDEConfig(), generator=torch.Generator().manual_seed(7))
    for rows in ([0, 1, 2], [3, 4, 5], [1, 4]):
        keep = torch.tensor(rows)
        part = sample(model, cond.index(keep), None, sigmas, mask, SDEConfig(),
                      generator=torch.Generator().manual_seed(7), keep=keep)
        for name in ("latents", "states", "next_states", "sigmas", "logps"):
            torch.testing.assert_close(getattr(part, name), getattr(full, name)[keep], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- 2 processes


def _train(out: Path, cache: Path, *extra: str, nproc: int = 1) -> list[dict]:
    args = ["recipes/shapes_cpu.yaml", f"output_dir={out}", f"world.cache_dir={cache}",
            "world.pretrain_vae_steps=4", "world.pretrain_diffusion_steps=4", "world.pretrain_pairs=16",
            "world.pretrain_reflector_steps=30", "world.reflector_sft_examples=16", "world.pretrain_batch_size=8",
            "generator.num_steps=3", "refiner.num_steps=3", "rollout.group_size=4", "trainer.max_steps=2",
            "trainer.eval_every=0", "trainer.log_images_every=0", "eval.rounds=1", "eval.num_steps=2",
            "eval.samples_per_prompt=1", "data.num_eval_prompts=2", "flow_grpo.beta=0.004", *extra]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port())] if nproc > 1 else [sys.executable]
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "r3rl" / "torch_extensions")}
    proc = subprocess.run([*launcher, "-m", "r3rl.cli", "train", *args], check=False, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(900)
def test_two_processes_under_zero2_match_one_process(tmp_path: Path) -> None:
    """Same global group (4 = 2 ranks x 2): rewards, advantages and the update agree, on a
    generate step (step 1) and on a reflect-refine step (step 2: text sampled and trained)."""
    one = _train(tmp_path / "one", tmp_path / "cache")
    two = _train(tmp_path / "two", tmp_path / "cache", "distributed.deepspeed=launch/deepspeed/zero2.json",
                 nproc=2)
    assert [r["step"] for r in two] == [0, 1, 2] and [r["stage"] for r in two[1:]] == ["generate", "refine"]
    for step, must in ((1, {"reward/mean", "loss/flow_grpo", "grad_norm", "kl/image"}),
                       (2, {"reward/mean", "loss/grpo", "refine/stop_rate", "grad_norm"})):
        compared = [k for k in one[step] if not k.startswith("time/") and isinstance(one[step][k], float)]
        assert must <= set(compared), step
        for key in compared:
            a, b = one[step][key], two[step][key]
            assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6), (step, key, a, b)
    assert one[0] == two[0]  # step-0 evaluation: every rank runs the same one
    ckpt = tmp_path / "two" / "checkpoints" / "step-2"
    assert (ckpt / "COMPLETE").exists() and len(torch.load(ckpt / "rng.pt", weights_only=True)["torch_per_rank"]) == 2
    assert sorted(p.name for p in (ckpt / "deepspeed").iterdir()) == ["generator", "refiner", "reflector"]



def test_launched_runs_refuse_what_they_cannot_split_before_joining_the_group(monkeypatch, minimal_recipe) -> None:
    """Rank 0 of a 2-process launch: a group of 3 cannot be split in equal shares, and plain text
    GRPO runs in one process only; both refuse before waiting on the other rank or loading a model."""
    from r3rl.config import load_config
    from r3rl.text_grpo import train_text
    from r3rl.trainer import train

    for var, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(var, value)
    with pytest.raises(UserError, match=r"group_size=3 must be divisible by the number of processes \(2\)"):
        train(load_config(minimal_recipe, ["rollout.group_size=3"]))
    with pytest.raises(UserError, match="rollout.credit=text runs in one process only"):
        train_text(load_config(minimal_recipe, ["rollout.credit=text"]))
