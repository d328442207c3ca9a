"""Process topology for multi-process training: who am I, who owns which sample, and the few
collectives the trainer needs (gather a group, agree on a flag, average gradients and metrics).

One code path serves every launcher: torchrun, `accelerate launch`, the `deepspeed` launcher
and mpirun export RANK / WORLD_SIZE / LOCAL_RANK (or OMPI_COMM_WORLD_*); srun exports
SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, used only when MASTER_ADDR says where to meet.
Every helper is a no-op for one process, so the single-process path computes exactly what it
did before multi-process support existed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from r3rl.errors import UserError

# (rank, world size, local rank) variable names, in order of precedence
_ENV_SCHEMES = (
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)


@dataclass(frozen=True)
class Topology:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def topology_from_env(env: Mapping[str, str] | None = None) -> Topology:
    """Rank and world size as the launcher exported them (one process when none did)."""
    env = os.environ if env is None else env
    for rank, world, local in _ENV_SCHEMES:
        if world not in env or rank not in env:
            continue
        if rank == "SLURM_PROCID" and "MASTER_ADDR" not in env:
            continue  # inside an allocation but not started as one task of a multi-task srun
        topo = Topology(int(env[rank]), int(env[world]), int(env.get(local, 0)))
        if not 0 <= topo.rank < topo.world:
            raise UserError(f"{rank}={topo.rank} is outside [0, {world}={topo.world})")
        return topo
    return Topology()


def init_process_group(
    topo: Topology, backend: str = "auto", timeout_s: int = 1800, *, force: bool = False
) -> str | None:
    """Join the process group (gloo on CPU, nccl on CUDA by default); None for one process
    unless `force` (DeepSpeed needs a group of one)."""
    if not topo.distributed and not force:
        return None
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(topo.local_rank)
    if not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise UserError(
                    f"{var} is not set: start multi-process runs with torchrun, accelerate "
                    "launch, deepspeed or launch/slurm/r3rl.sbatch (see launch/README.md)"
                )
        dist.init_process_group(
            backend, rank=topo.rank, world_size=topo.world, timeout=timedelta(seconds=timeout_s)
        )
    return backend


def launcher_env() -> None:
    """What a launcher exports for a group of one process (DeepSpeed wants one even then)."""
    import socket

    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for var, value in (
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", str(port)),
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_RANK", "0"),
    ):
        os.environ.setdefault(var, value)


def block(n: int, topo: Topology) -> range:
    """This rank's contiguous block of `n` items, block sizes differing by at most one (the first
    `n % world` ranks take one more): the one rule by which the ranks split any batch."""
    size, extra = divmod(n, topo.world)
    start = topo.rank * size + min(topo.rank, extra)
    return range(start, start + size + (topo.rank < extra))


@dataclass(frozen=True)
class Shard:
    """A batch of `n` rows that every rank knows whole and each rank simulates a block of: the
    one path of a rollout's data between the ranks. Each rank computes its block (`rows`,
    `keep`), `gather` puts the blocks back together in row order on every rank, the group
    statistics are computed on the whole batch, and `take` slices this rank's rows back out."""

    n: int
    topo: Topology

    @property
    def rows(self) -> range:
        return block(self.n, self.topo)

    @property
    def keep(self) -> torch.Tensor | None:
        """The rows this rank simulates, for `run_diffusion` (None: all, one process). A rank with
        an empty block keeps row 0 as a stand-in, so every rank runs the same forwards (ZeRO-3)."""
        if not self.topo.distributed:
            return None
        return torch.tensor(list(self.rows) or [0])

    def gather(self, local: Sequence[Any]) -> list[Any]:
        """Every rank's block, concatenated in row order."""
        return gather(local, self.topo)

    def take(self, whole: Any) -> Any:
        """This rank's rows of a whole-batch tensor or list."""
        rows = self.rows
        if isinstance(whole, torch.Tensor):
            return whole[rows.start : rows.stop]
        return list(whole[rows.start : rows.stop])


def gather(local: Sequence[Any], topo: Topology) -> list[Any]:
    """Concatenate every rank's list in rank order (picklable items: floats, PIL images, dicts)."""
    if not topo.distributed:
        return list(local)
    parts: list[Any] = [None] * topo.world
    dist.all_gather_object(parts, list(local))
    return [x for part in parts for x in part]


def any_rank(flag: bool, topo: Topology) -> bool:
    """True on every rank when it is true on at least one (stop signals, non-finite losses)."""
    if not topo.distributed:
        return flag
    t = torch.tensor([float(flag)], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def from_main(obj: Any, topo: Topology) -> Any:
    """Rank 0's `obj` on every rank (picklable; the others pass anything, e.g. None)."""
    if not topo.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(topo: Topology) -> None:
    if topo.distributed:
        dist.barrier()


def average_gradients(params: Sequence[torch.nn.Parameter], topo: Topology) -> None:
    """All-reduce the mean gradient (DDP's arithmetic); a parameter without a gradient counts as
    0."""
    if not topo.distributed or not params:
        return
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    )
    dist.all_reduce(flat)
    flat /= topo.world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


# means over a rank's completion tokens; its token count is its mean `completion_length` times its
# (equal) shard size, so weighting by `completion_length` gives the mean over the group's tokens
TOKEN_MEANS = frozenset({"entropy", "kl/text", "clip_ratio"})


def mean_metrics(metrics: Mapping[str, Any], topo: Topology) -> dict[str, Any]:
    """Average every numeric metric over the ranks that report it (NaN = not measured there).

    Per-sample means over equal shards average to the global mean, token means (`TOKEN_MEANS`)
    do when weighted by each rank's token count; counts (`judge/failures`) are computed from
    gathered data before this and are the same on every rank.
    """
    if not topo.distributed:
        return dict(metrics)
    rows: list[Any] = [None] * topo.world
    dist.all_gather_object(rows, dict(metrics))
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for r in rows for k in r):
        vals = [r[key] for r in rows if key in r]
        if not all(_is_number(v) for v in vals):
            out[key] = vals[0]  # not a number (e.g. the stage name): the same on every rank
            continue
        weighted = [
            (r[key], r.get("completion_length", 1.0) if key in TOKEN_MEANS else 1.0)
            for r in rows
            if key in r and not math.isnan(r[key])
        ]
        total = sum(w for _, w in weighted)
        out[key] = sum(v * w for v, w in weighted) / total if total else math.nan
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _device() -> torch.device:
    backend = dist.get_backend() if dist.is_initialized() else "gloo"
    return (
        torch.device("cuda", torch.cuda.current_device())
        if backend == "nccl"
        else torch.device("cpu")
    )


# --------------------------------------------------------------------------- DeepSpeed

_AUTO = "auto"


def deepspeed_config(
    path: str | Path, *, adamw: Mapping[str, Any], world: int, grad_accum: int, max_grad_norm: float
) -> dict:
    """A policy's DeepSpeed config: the JSON file with its "auto" (or missing) values filled from
    the recipe, so one file serves every policy (each gets its own copy, learning rate and AdamW
    settings: `adamw` is `config.adamw_kwargs` of the policy's section); explicit values stay."""
    cfg = json.loads(Path(path).read_text())
    fill = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": world * grad_accum,
        "gradient_clipping": max_grad_norm,
    }
    for key, value in fill.items():
        if cfg.get(key, _AUTO) == _AUTO:
            cfg[key] = value
    params = cfg.setdefault("optimizer", {"type": "AdamW"}).setdefault("params", {})
    # the same AdamW as the single-process path; torch's on CPU, where DeepSpeed's fused one can't
    # build
    defaults = {
        "lr": adamw["lr"],
        "betas": list(adamw["betas"]),
        "eps": adamw["eps"],
        "weight_decay": adamw["weight_decay"],
        "torch_adam": not torch.cuda.is_available(),
    }
    for key, value in defaults.items():
        if params.get(key, _AUTO) == _AUTO:
            params[key] = value
    return cfg


def zero_stage(cfg: dict) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def deepspeed_engine(module: torch.nn.Module, config: dict) -> Any:
    """Wrap one policy's module in its own DeepSpeed engine (ZeRO shards its optimiser state,
    gradients and, at stage 3, parameters). The module object stays usable for forward calls:
    ZeRO-3 gathers its parameters through hooks, so every rank must run the same forwards."""
    import deepspeed

    params = [p for p in module.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params, config=config)
    return engine
