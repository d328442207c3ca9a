"""`r3rl train` under DeepSpeed with 2 CPU processes (gloo): ZeRO-3 matches one process (full
fine-tuning and LoRA) and does not hang in generation, its consolidated save gathers one
submodule at a time and equals the one-process save, resume is exact under ZeRO-2 and ZeRO-3,
SIGTERM reaching one rank stops every rank at the same step with a resumable checkpoint, and
sharded state is refused in one line by another process count.

The shapes world is pretrained once per module (by the one-process run) and shared."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
ZERO = {2: "distributed.deepspeed=launch/deepspeed/zero2.json", 3: "distributed.deepspeed=launch/deepspeed/zero3.json"}


def tiny_args(out: Path, cache: Path, *extra: str) -> list[str]:
    """Tiny overrides: steps 1/3 are generate steps, 2/4 reflect-refine steps; a checkpoint at step 2."""
    return ["recipes/shapes_cpu.yaml", f"output_dir={out}", f"world.cache_dir={cache}",
            "world.pretrain_vae_steps=4", "world.pretrain_diffusion_steps=4", "world.pretrain_pairs=16",
            "world.pretrain_reflector_steps=30", "world.reflector_sft_examples=16", "world.pretrain_batch_size=8",
            "generator.num_steps=3", "refiner.num_steps=3", "rollout.group_size=4", "trainer.max_steps=4",
            "trainer.save_every=2", "trainer.keep_last=3", "trainer.eval_every=0", "trainer.log_images_every=0",
            "eval.rounds=1", "eval.num_steps=2", "eval.samples_per_prompt=1", "data.num_eval_prompts=2",
            "flow_grpo.beta=0.004", *extra]


def child_env() -> dict[str, str]:
    return {**os.environ, "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "r3rl" / "torch_extensions")}


def _command(nproc: int, *args: str, program: tuple[str, ...] = ("-m", "r3rl.cli", "train")) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port())] if nproc > 1 else [sys.executable]
    return [*launcher, *program, *args]


def _train(out: Path, cache: Path, *extra: str, nproc: int = 2) -> list[dict]:
    proc = subprocess.run(_command(nproc, *tiny_args(out, cache, *extra)), check=False, cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return metric_rows(out)


def metric_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def assert_matches_one_process(one: list[dict], many: list[dict]) -> None:
    """Step 0 (every rank evaluates alike) is equal; the metrics of a generate step (1) and a
    reflect-refine step (2) agree to 1e-4 (the group is split across ranks, gradients averaged)."""
    assert one[0] == many[0]
    for step in (1, 2):
        compared = [k for k in one[step] if isinstance(one[step][k], float)]
        assert {"reward/mean", "grad_norm"} <= set(compared)
        for key in compared:
            x, y = one[step][key], many[step][key]
            assert (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-6), (step, key, x, y)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("world")


# full fine-tuning, or LoRA adapters on all three policies
VARIANTS = {"full": (), "lora": tuple(f"{p}.lora={{r: 4, alpha: 8}}" for p in ("reflector", "generator", "refiner"))}


def _runs(factory: pytest.TempPathFactory, cache: Path, nproc: int):
    """Module-wide 4-step runs, each made once on first use: `get(zero_stage or None, variant)`."""
    runs: dict[tuple, Path] = {}

    def get(stage: int | None, variant: str = "full") -> Path:
        if (stage, variant) not in runs:
            out = factory.mktemp(f"zero{stage}-{variant}") / "run"
            _train(out, cache, *([ZERO[stage]] if stage else []), *VARIANTS[variant], nproc=nproc)
            runs[stage, variant] = out
        return runs[stage, variant]

    return get


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory, cache: Path):
    """One process, no DeepSpeed; its first run pretrains the world every other run reuses."""
    get = _runs(tmp_path_factory, cache, nproc=1)
    get(None)
    return lambda variant="full": get(None, variant)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, cache: Path, one):
    """4 uninterrupted steps on 2 processes: `straight(zero_stage, variant)`."""
    return _runs(tmp_path_factory, cache, nproc=2)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("variant", ["full", "lora"])
def test_zero3_two_processes_match_one_process(one, straight, variant: str) -> None:
    """Metrics of a generate and a reflect-refine step, and the consolidated weights of step 2,
    equal the one-process run's; the engines' own states are sharded (one file per rank), and
    the consolidated weights are exactly what DeepSpeed's zero_to_fp32 rebuilds from them."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    b = metric_rows(straight(3, variant))
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]
    assert_matches_one_process(metric_rows(one(variant)), b)
    ckpt_a, ckpt_b = one(variant) / "checkpoints" / "step-2", straight(3, variant) / "checkpoints" / "step-2"
    for policy in ("reflector", "generator/transformer", "refiner/transformer"):
        wa, wb = _weights(ckpt_a / policy), _weights(ckpt_b / policy)
        assert wa.keys() == wb.keys() and wa
        assert (variant == "lora") == any("lora" in k for k in wa)
        for k, w in wa.items():
            torch.testing.assert_close(w, wb[k], rtol=0, atol=1e-5, msg=f"{policy} {k}")
    for policy in ("reflector", "generator", "refiner"):
        shards = sorted(p.name for p in (ckpt_b / "deepspeed" / policy / "state").glob("*optim_states.pt"))
        assert len(shards) == 2, shards
    for policy in ("generator", "refiner"):  # diffusers keys are the in-memory names zero_to_fp32 uses
        rebuilt = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_b / "deepspeed" / policy), tag="state")
        saved = _weights(ckpt_b / policy / "transformer")
        assert rebuilt and rebuilt.keys() <= saved.keys()
        for k, w in rebuilt.items():  # the trained weights themselves, exactly
            assert w.dtype == saved[k].dtype and torch.equal(w, saved[k]), f"{policy} {k}"


# rank 0 samples 1 token, rank 1 up to 24: without transformers' synced_gpus, ZeRO-3 would deadlock
# (rank 0 stops calling forward while rank 1's forward waits for rank 0's parameter shards)
UNEVEN_GENERATE = """
import os, sys, torch.distributed as dist
from PIL import Image
from r3rl.config import load_config
from r3rl.distributed import gather, init_process_group, topology_from_env
from r3rl.run import build_run

topo = topology_from_env()
init_process_group(topo, force=True)
run = build_run(load_config(sys.argv[1], sys.argv[2:]), topo=topo)
assert "reflector" in run.engines
refl = run.reflector.reflect(["a red circle"], [Image.new("RGB", (32, 32), "white")], temperature=2.0, top_k=0,
                             top_p=1.0, max_new_tokens=1 if topo.rank == 0 else 24, seed=topo.rank)
lengths = gather([len(refl[0].token_ids)], topo)
if topo.is_main:  # one writer: two ranks printing to one pipe can interleave their lines
    print("LENGTHS", lengths, flush=True)
dist.destroy_process_group()
os._exit(0)  # as `r3rl train` ends a multi-process run (r3rl/cli.py): gloo's threads can abort teardown
"""


@pytest.mark.timeout(300)
def test_zero3_generation_with_uneven_lengths_does_not_hang(tmp_path: Path, cache: Path, one) -> None:
    script = tmp_path / "uneven.py"
    script.write_text(UNEVEN_GENERATE)
    proc = subprocess.run(_command(2, *tiny_args(tmp_path, cache, ZERO[3]), program=(str(script),)),
                          check=False, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lengths = json.loads(proc.stdout.split("LENGTHS", 1)[1].splitlines()[0])
    assert lengths[0] == 1 and lengths[1] > 1  # the ranks really ran different numbers of decoding steps


# build the run (DeepSpeed engines when configured), save it once as step 0, and report the most
# parameter elements whole on this rank while any of the save's gathers is open
SAVE_AT_START = """
import json, os, sys
from pathlib import Path
import deepspeed, torch.distributed as dist
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from r3rl.checkpoint import save_checkpoint
from r3rl.config import load_config
from r3rl.distributed import init_process_group, topology_from_env
from r3rl.run import build_run

topo = topology_from_env()
init_process_group(topo, force=topo.distributed)
cfg = load_config(sys.argv[1], sys.argv[2:])
run = build_run(cfg, topo=topo)
models = [engine.module for engine in run.engines.values()]
whole = [0]

class Counting(deepspeed.zero.GatheredParameters):
    def __enter__(self):
        super().__enter__()
        whole.append(sum(p.numel() for m in models for p in m.parameters() if p.ds_status == ZeroParamStatus.AVAILABLE))

deepspeed.zero.GatheredParameters = Counting
save_checkpoint(run, Path(cfg.output_dir), 0, keep_last=1)
if models and topo.is_main:
    own = [sum(p.ds_numel for p in s.parameters(recurse=False)) for m in models for s in m.modules()]
    print("GATHERED", json.dumps({"peak": max(whole), "gathers": len(whole) - 1, "largest_module": max(own),
                                  "smallest_model": min(sum(p.ds_numel for p in m.parameters()) for m in models)}))
if topo.distributed:
    dist.destroy_process_group()
    os._exit(0)  # as `r3rl train` ends a multi-process run
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", ["full", "lora"])
def test_zero3_consolidated_save_gathers_one_module_at_a_time(tmp_path: Path, cache: Path, one, variant: str) -> None:
    """The ZeRO-3 save never holds more than one submodule's parameters whole (a model larger than
    one device can be saved), and writes what one process saves: same files, keys, dtypes and
    values, bit for bit (LoRA: the same adapter layout)."""
    script = tmp_path / "save.py"
    script.write_text(SAVE_AT_START)
    runs = {}
    for nproc, extra in ((1, ()), (2, (ZERO[3],))):
        runs[nproc] = tmp_path / f"nproc{nproc}"
        proc = subprocess.run(_command(nproc, *tiny_args(runs[nproc], cache, *extra, *VARIANTS[variant]),
                                       program=(str(script),)),
                              check=False, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
    gathered = json.loads(proc.stdout.split("GATHERED", 1)[1].splitlines()[0])
    assert gathered["gathers"] > 3 and 0 < gathered["peak"] <= gathered["largest_module"], gathered
    assert gathered["peak"] < gathered["smallest_model"], gathered
    for policy in ("reflector", "generator/transformer", "refiner/transformer"):
        one_dir, two_dir = (runs[n] / "checkpoints" / "step-0" / policy for n in (1, 2))
        assert sorted(p.name for p in one_dir.iterdir()) == sorted(p.name for p in two_dir.iterdir())
        a, b = _weights(one_dir), _weights(two_dir)
        assert a.keys() == b.keys() and a and (variant == "lora") == any("lora" in k for k in a)
        for k, w in a.items():
            assert w.dtype == b[k].dtype and torch.equal(w, b[k]), f"{policy} {k}"


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("stage", "variant"), [(2, "full"), (3, "full"), (3, "lora")])
def test_resume_under_deepspeed_is_exact(tmp_path: Path, cache: Path, straight, stage: int, variant: str) -> None:
    """`resume=auto` from step 2 reproduces steps 3-4 of the uninterrupted run. The output folder
    is the 4-step run's up to its step-2 checkpoint, which is what a run stopped after step 2
    leaves (the SIGTERM test below stops one for real and resumes it)."""
    full, cut = straight(stage, variant), tmp_path / "run"
    shutil.copytree(full / "checkpoints" / "step-2", cut / "checkpoints" / "step-2")
    (cut / "metrics.jsonl").write_text("".join(f"{line}\n" for line in
                                               (full / "metrics.jsonl").read_text().splitlines()[:3]))
    assert _train(cut, cache, ZERO[stage], *VARIANTS[variant], "resume=auto") == metric_rows(full)


def _worker_pid(launcher: int, rank: int) -> int:
    """The pid of the torchrun worker with this RANK (workers are the launcher's children)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in env:
            return int(proc.name)
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher}")


@pytest.mark.timeout(600)
def test_sigterm_to_one_rank_stops_every_rank_with_a_resumable_checkpoint(tmp_path: Path, cache: Path,
                                                                          straight) -> None:
    """SIGTERM reaches rank 1 only (as when one node is preempted first): both ranks save the same
    step and exit 0; resuming reproduces the uninterrupted run."""
    out = tmp_path / "run"
    cmd = _command(2, *tiny_args(out, cache, ZERO[2], "trainer.max_steps=40"))
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 300
    with (tmp_path / "log.txt").open("w") as log:  # a file: a pipe would fill up while nobody reads it
        launcher = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):  # every rank did step 1
            assert launcher.poll() is None and time.monotonic() < deadline, "run ended before step 1"
            time.sleep(0.05)
        os.kill(_worker_pid(launcher.pid, 1), signal.SIGTERM)
        launcher.wait(timeout=300)
    err = (tmp_path / "log.txt").read_text()
    assert launcher.returncode == 0, err[-3000:]
    stopped = metric_rows(out)[-1]["step"]
    assert 1 <= stopped < 4, stopped
    err = err.replace("\n", "")  # the console wraps long lines
    assert f"stopped by signal at step {stopped}" in err and "resume=auto" in err
    ckpt = out / "checkpoints" / f"step-{stopped}"
    assert (ckpt / "COMPLETE").exists()
    assert len(list((ckpt / "deepspeed" / "reflector" / "state").glob("*optim_states.pt"))) == 2  # both ranks saved
    assert _train(out, cache, ZERO[2], "resume=auto") == metric_rows(straight(2))


@pytest.mark.timeout(300)
def test_a_sharded_checkpoint_resumes_only_with_its_process_count(tmp_path: Path, cache: Path, straight) -> None:
    """A plain `python` process sets DeepSpeed up on its own, then refuses the 2-rank ZeRO state in one line."""
    out = tmp_path / "run"
    shutil.copytree(straight(2) / "checkpoints" / "step-2", out / "checkpoints" / "step-2")
    proc = subprocess.run(_command(1, *tiny_args(out, cache, ZERO[2], "resume=auto")), check=False, cwd=REPO,
                          env={k: v for k, v in child_env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1] == (
        f"r3rl: error: checkpoint {out / 'checkpoints' / 'step-2'} holds DeepSpeed state sharded over 2 processes; "
        "resume it with 2 processes, not 1")
