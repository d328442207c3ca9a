"""The launch recipes. The deepspeed and accelerate launchers really start 2 CPU processes
(gloo) that train the tiny shapes run in sync with one process; the command lines they and the
Slurm script (which needs Slurm to run) build for multi-node runs are checked as dry runs."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
from test_deepspeed import (  # noqa: F401  (cache, one: fixtures, the tiny world and its one-process run)
    assert_matches_one_process,
    cache,
    child_env,
    metric_rows,
    one,
    tiny_args,
)

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"


def _without_launch_vars(env: dict[str, str]) -> dict[str, str]:
    """The caller's environment minus what the scripts read (a test run inside Slurm stays local)."""
    return {k: v for k, v in env.items() if not k.startswith(("SLURM_", "MASTER_", "ZERO", "HOSTFILE"))}


def _dry(script: str, *args: str, **env: str) -> list[str]:
    proc = subprocess.run(["bash", str(LAUNCH / script), *args],
                          env={**_without_launch_vars(dict(os.environ)), "DRY_RUN": "1", **env},
                          capture_output=True, text=True, timeout=30, check=True)
    return shlex.split(proc.stdout)


def _launch(script: str, out: Path, world: Path, **env: str) -> tuple[Path, list[dict]]:
    """Run a launcher for real on the tiny run's first 2 steps; both ranks' RNG states in the
    step-2 checkpoint show that 2 processes took part. Returns the checkpoint and the metrics."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])  # this venv's launchers
    proc = subprocess.run(["bash", str(LAUNCH / script), *tiny_args(out, world, "trainer.max_steps=2")], cwd=REPO,
                          env={**_without_launch_vars(child_env()), "PATH": path, **env},
                          capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metric_rows(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    ckpt = out / "checkpoints" / "step-2"
    assert len(torch.load(ckpt / "rng.pt", weights_only=True)["torch_per_rank"]) == 2
    return ckpt, rows


@pytest.mark.timeout(300)
def test_accelerate_launcher_trains_two_cpu_processes_in_sync(tmp_path: Path, cache: Path, one) -> None:  # noqa: F811
    """`CPU=1 CONFIG=cpu_2proc.yaml launch.sh` on a free port: plain gradient all-reduce."""
    _, rows = _launch("accelerate/launch.sh", tmp_path / "run", cache, CPU="1",
                      CONFIG=str(LAUNCH / "accelerate" / "cpu_2proc.yaml"), MAIN_PROCESS_PORT=str(free_port()))
    assert_matches_one_process(metric_rows(one()), rows)


@pytest.mark.timeout(300)
def test_deepspeed_launcher_trains_two_cpu_processes_under_zero2(tmp_path: Path, cache: Path, one) -> None:  # noqa: F811
    """`NUM_GPUS=2 launch.sh` (the `deepspeed` launcher, ZeRO-2 by default): each rank wrote its optimiser shard."""
    ckpt, rows = _launch("deepspeed/launch.sh", tmp_path / "run", cache, NUM_GPUS="2", MASTER_PORT=str(free_port()))
    assert_matches_one_process(metric_rows(one()), rows)
    assert len(list((ckpt / "deepspeed" / "reflector" / "state").glob("*optim_states.pt"))) == 2


def test_deepspeed_launcher_multi_node_command() -> None:
    cmd = _dry("deepspeed/launch.sh", "recipes/shapes_cpu.yaml", "trainer.max_steps=10",
               HOSTFILE="launch/deepspeed/hostfile.example", ZERO="3", MASTER_ADDR="node-001", MASTER_PORT="29555")
    assert cmd == ["deepspeed", "--hostfile", "launch/deepspeed/hostfile.example", "--master_addr", "node-001",
                   "--master_port", "29555", "--no_local_rank", "--module", "r3rl.cli", "train", "recipes/shapes_cpu.yaml",
                   f"distributed.deepspeed={LAUNCH / 'deepspeed' / 'zero3.json'}", "resume=auto", "trainer.max_steps=10"]


def test_deepspeed_launcher_defaults_to_zero2_on_this_machine() -> None:
    cmd = _dry("deepspeed/launch.sh", "r.yaml", NUM_GPUS="2")
    assert cmd[:5] == ["deepspeed", "--num_gpus", "2", "--master_port", "29500"]
    assert f"distributed.deepspeed={LAUNCH / 'deepspeed' / 'zero2.json'}" in cmd


def test_accelerate_launcher_multi_node_and_cpu_commands() -> None:
    cmd = _dry("accelerate/launch.sh", "r.yaml", "seed=3", NUM_MACHINES="2", MACHINE_RANK="1",
               MAIN_PROCESS_IP="10.0.0.1", MAIN_PROCESS_PORT="29555", ZERO="2")
    assert cmd == ["accelerate", "launch", "--config_file", str(LAUNCH / "accelerate" / "multi_gpu.yaml"),
                   "--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "10.0.0.1",
                   "--main_process_port", "29555", "-m", "r3rl.cli", "train", "r.yaml", "resume=auto",
                   f"distributed.deepspeed={LAUNCH / 'accelerate' / '..' / 'deepspeed' / 'zero2.json'}", "seed=3"]
    cpu = _dry("accelerate/launch.sh", "r.yaml", CPU="1", CONFIG=str(LAUNCH / "accelerate" / "cpu_2proc.yaml"))
    assert cpu[:5] == ["ACCELERATE_USE_CPU=true", "accelerate", "launch", "--config_file",
                       str(LAUNCH / "accelerate" / "cpu_2proc.yaml")]
    assert "--main_process_port" not in cpu  # the config's port, unless MAIN_PROCESS_PORT is set


def test_slurm_script_one_torchrun_per_node_with_rendezvous_from_slurm_env() -> None:
    cmd = _dry("slurm/r3rl.sbatch", "recipes/shapes_cpu.yaml", "output_dir=/shared/run",
               SLURM_JOB_NODELIST="gpu-a,gpu-b", SLURM_JOB_ID="1234", SLURM_JOB_NUM_NODES="2", GPUS_PER_NODE="4",
               ZERO="2", SLURM_SUBMIT_DIR=str(REPO), PATH="/usr/bin:/bin")  # no scontrol on PATH
    assert cmd == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "torchrun", "--nnodes", "2",
                   "--nproc_per_node", "4", "--rdzv_id", "1234", "--rdzv_backend", "c10d",
                   "--rdzv_endpoint", "gpu-a:21234", "-m", "r3rl.cli", "train", "recipes/shapes_cpu.yaml",
                   "resume=auto", f"distributed.deepspeed={REPO / 'launch' / 'deepspeed' / 'zero2.json'}",
                   "output_dir=/shared/run"]


def test_slurm_script_requeues_on_preemption() -> None:
    text = (LAUNCH / "slurm" / "r3rl.sbatch").read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@" in text
    assert "trap requeue USR1 TERM" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text


def test_scripts_without_a_recipe_exit_2() -> None:
    for script in ("deepspeed/launch.sh", "accelerate/launch.sh", "slurm/r3rl.sbatch"):
        proc = subprocess.run(["bash", str(LAUNCH / script)], check=False, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and "usage" in proc.stderr
