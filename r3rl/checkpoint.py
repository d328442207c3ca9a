"""Atomic checkpoints: weights in safetensors (transformers / diffusers / peft layouts), optimiser
and RNG state loaded with `weights_only=True`, the rollout buffer, and a COMPLETE marker.

Written to a temp folder and renamed, so a run killed mid-save resumes from the previous complete
checkpoint. With several processes rank 0 writes everything except what only a collective can
produce: consolidated weights (ZeRO-3 gathers them a submodule at a time), each DeepSpeed engine's
own sharded state (`deepspeed/<policy>/`, every rank writes its shard of the optimiser; resuming
needs the same number of processes) and the RNG state of every rank. References for KL are never
restored from a checkpoint: they stay the original weights (R3's resume made the reference drift to
the resumed policy).

With `trainer.ema`, `ema/` holds each trained policy's average twice: as weights in the layout
of the live ones (`ema/reflector/`, `ema/generator/transformer/`, `ema/refiner/transformer/`,
what a user loads) and as `ema/state.pt`, the float32 averages and step counts a resume restores.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file

from r3rl.distributed import barrier, gather
from r3rl.errors import UserError
from r3rl.rollout import BufferItem
from r3rl.run import Run

COMPLETE = "COMPLETE"
EMA_DIR = "ema"


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    root = out / "checkpoints"
    found = []
    for p in root.glob("step-*") if root.exists() else []:
        if (p / COMPLETE).exists() and p.name[5:].isdigit():
            found.append((int(p.name[5:]), p))
    return sorted(found)


def find_resume(resume: str | None, out: Path) -> Path | None:
    """`auto` = newest complete checkpoint in output_dir (None when there is none); a path = that
    one."""
    if resume is None:
        return None
    if resume == "auto":
        found = _checkpoints(out)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / COMPLETE).exists():
        raise UserError(f"resume={resume!r} is not a complete checkpoint (no {COMPLETE} marker)")
    return path


def load_module(module: torch.nn.Module, folder: Path) -> None:
    """Load weights saved in `folder` into `module`, in place (optimisers keep their params).

    A peft model gets its adapter state; a diffusers model with an injected adapter (a LoRA
    run's transformer) takes the saved state dict as it is (`to_q.base_layer.weight`,
    `to_q.lora_A.default.weight`; its class's `from_pretrained` knows no adapter). Anything else
    goes through its own class's `from_pretrained` (transformers >= 5 writes checkpoint-format
    key names, e.g. `visual.*` for Qwen-VL's `model.visual.*`, that only `from_pretrained` maps
    back), then a strict copy.
    """
    from peft import PeftModel, set_peft_model_state_dict

    from r3rl.models.lora import has_lora

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"checkpoint folder {folder} has no *.safetensors weights")
    state = (
        {k: v for f in files for k, v in load_file(f).items()}
        if isinstance(module, PeftModel) or has_lora(module)
        else None
    )
    if isinstance(module, PeftModel):
        set_peft_model_state_dict(module, state)
        return
    try:
        module.load_state_dict(
            state if state is not None else type(module).from_pretrained(folder).state_dict(),
            strict=True,
        )
    except RuntimeError as e:
        raise UserError(
            f"checkpoint {folder} does not match the model ({str(e).splitlines()[0]})"
        ) from None


@contextlib.contextmanager
def _consolidated(module: torch.nn.Module, engine: Any) -> Iterator[None]:
    """Inside, on rank 0: every parameter of `module` holds its whole value in CPU memory, so the
    module's own `save_pretrained` writes the usual layout (a no-op unless `engine` is ZeRO-3).

    ZeRO-3 partitions the parameters across ranks. DeepSpeed's consolidation (the one
    accelerate's `get_state_dict` calls) gathers them one submodule at a time, copies them to
    rank 0's CPU in their own dtype and frees them, so no device ever holds more than one
    submodule's parameters beyond its shard: a model larger than one device can be saved.
    Every rank must call this (the gathers are collectives); the partitions are put back after.
    """
    zero3 = engine is not None and engine.zero_optimization_partition_weights()
    # "16bit" in name only: the dtypes are kept; None on ranks other than 0
    state = engine._zero3_consolidated_16bit_state_dict() if zero3 else None
    shards = {}
    try:
        if state is not None:
            for name, p in module.named_parameters():
                shards[name], p.data = p.data, state[name]
        yield
    finally:
        for name, p in module.named_parameters():
            if name in shards:
                p.data = shards[name]


def save_checkpoint(run: Run, out: Path, step: int, *, keep_last: int) -> Path:
    """Called by every rank (collective under several processes); returns the final folder."""
    topo, main = run.dist, run.dist.is_main
    root = out / "checkpoints"
    final = root / f"step-{step}"
    tmp = (
        root / f".tmp-step-{step}-{gather([os.getpid()], topo)[0]}"
    )  # rank 0's pid names it for all
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(topo)
    if run.reflector is not None:  # None in a generator-only run (credit=flow_grpo)
        with _consolidated(run.reflector.model, run.engines.get("reflector")):
            if main:
                _save_weights(run, "reflector", tmp)
    optim = {}
    if run.reflector_opt is not None and "reflector" not in run.engines:
        optim["reflector"] = run.reflector_opt.state_dict()
    for pol in run.diffusion_policies:
        if pol.trainable:
            with _consolidated(pol.model.transformer, run.engines.get(pol.name)):
                if main:
                    _save_weights(run, pol.name, tmp)
            if pol.name not in run.engines:
                optim[pol.name] = pol.opt.state_dict()
    if main and run.ema:  # trainer.ema is refused under ZeRO-3: rank 0 holds every weight
        for name, ema in run.ema.items():
            with ema.applied(run.trained_params(name)):
                _save_weights(run, name, tmp / EMA_DIR)
        torch.save(
            {name: ema.state_dict() for name, ema in run.ema.items()}, tmp / EMA_DIR / "state.pt"
        )
    for name, engine in run.engines.items():
        engine.save_checkpoint(str(tmp / "deepspeed" / name), tag="state")
    torch_states = gather([torch.get_rng_state()], topo)
    # each rank's GPU generator too (dropout in training forwards draws from it)
    cuda_states = gather([torch.cuda.get_rng_state()], topo) if torch.cuda.is_available() else []
    if main:
        _write_rest(run, tmp, final, step, optim, torch_states, cuda_states)
        publish(tmp, final, keep_last=keep_last)
    barrier(topo)
    return final


def _save_weights(run: Run, name: str, root: Path) -> None:
    """Rank 0: policy `name`'s weights under `root`, in the checkpoint layout `load_module`
    reads."""
    if name == "reflector":
        run.reflector.save_pretrained(root / "reflector")
    else:
        run.policy(name).model.transformer.save_pretrained(root / name / "transformer")


def publish(tmp: Path, final: Path, *, keep_last: int) -> None:
    """Mark a fully written `tmp` complete and rename it to `final` (atomic: a reader sees the old
    checkpoint or the new one), then keep the newest `keep_last` and drop temp folders left by
    runs killed while saving. `final` is `output_dir/checkpoints/step-N`."""
    (tmp / COMPLETE).touch()
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for _, old in _checkpoints(final.parent.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in final.parent.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _write_rest(
    run: Run, tmp: Path, final: Path, step: int, optim: dict, torch_states: list, cuda_states: list
) -> None:
    """Rank 0: optimisers, RNGs, buffer and trainer state (`publish` then makes it the
    checkpoint)."""
    torch.save(optim, tmp / "optimizers.pt")
    torch.save(
        {
            "torch": torch_states[0],
            "torch_per_rank": torch_states,
            "cuda_per_rank": cuda_states,
            "python": list(_py_state(run.rng)),
        },
        tmp / "rng.pt",
    )
    buf = tmp / "buffer"
    buf.mkdir()
    items = []
    for i, it in enumerate(run.buffer.items):
        it.image.save(buf / f"{i}.png")
        items.append({"meta": it.meta, "reward": it.reward, "round": it.round})
    state = {"step": step, "buffer": items, "nonfinite_in_row": run.nonfinite_in_row}
    (tmp / "trainer_state.json").write_text(json.dumps(state))


def _py_state(rng: random.Random) -> tuple:
    version, internal, gauss = rng.getstate()
    return version, list(internal), gauss


def load_checkpoint(run: Run, path: Path) -> int:
    """Restore policies, optimisers, RNGs and buffer; return the step to continue after."""
    rng = torch.load(path / "rng.pt", weights_only=True)
    per_rank = rng.get("torch_per_rank", [])
    if run.engines and len(per_rank) != run.dist.world:  # DeepSpeed cannot re-partition ZeRO state
        raise UserError(
            f"checkpoint {path} holds DeepSpeed state sharded over {len(per_rank)} processes; "
            f"resume it with {len(per_rank)} processes, not {run.dist.world}"
        )
    for name, engine in run.engines.items():  # weights and sharded optimiser state
        folder = path / "deepspeed" / name
        if not folder.exists():
            raise UserError(
                f"checkpoint {path} has no DeepSpeed state for {name} (saved without "
                "distributed.deepspeed?)"
            )
        engine.load_checkpoint(str(folder), tag="state")
    if run.reflector is not None and "reflector" not in run.engines:
        load_module(run.reflector.model, path / "reflector")
    optim = torch.load(path / "optimizers.pt", weights_only=True)
    if run.reflector_opt is not None and "reflector" in optim:
        run.reflector_opt.load_state_dict(optim["reflector"])
    for pol in run.diffusion_policies:
        if pol.trainable and (path / pol.name).exists() and pol.name not in run.engines:
            load_module(pol.model.transformer, path / pol.name / "transformer")
            pol.opt.load_state_dict(optim[pol.name])
    if run.ema:  # the float32 averages as they were (the ema/ weight folders are for users)
        state = path / EMA_DIR / "state.pt"
        saved = torch.load(state, weights_only=True, map_location="cpu") if state.exists() else {}
        for name, ema in run.ema.items():
            if name not in saved:
                raise UserError(
                    f"checkpoint {path} holds no EMA of the {name} (saved without trainer.ema); "
                    "resume it with trainer.ema=null, or start a new run"
                )
            ema.load_state_dict(saved[name], f"checkpoint {path} ({name})")
    torch.set_rng_state(per_rank[run.dist.rank] if run.dist.rank < len(per_rank) else rng["torch"])
    cuda = rng.get("cuda_per_rank", [])
    if cuda and torch.cuda.is_available() and run.dist.rank < len(cuda):
        torch.cuda.set_rng_state(cuda[run.dist.rank])
    version, internal, gauss = rng["python"]
    run.rng.setstate((version, tuple(internal), gauss))
    state = json.loads((path / "trainer_state.json").read_text())
    run.buffer.items = [
        BufferItem(
            it["meta"],
            Image.open(path / "buffer" / f"{i}.png").convert("RGB"),
            it["reward"],
            it["round"],
        )
        for i, it in enumerate(state["buffer"])
    ]
    run.nonfinite_in_row = state["nonfinite_in_row"]
    return int(state["step"])
