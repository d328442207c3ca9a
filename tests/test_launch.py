"""Dry runs of the launch recipes: the command lines each script builds for multi-node runs."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"


def _dry(script: str, *args: str, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "ZERO", "HOSTFILE"))}
    proc = subprocess.run(["bash", str(LAUNCH / script), *args], env={**clean, "DRY_RUN": "1", **env},
                          capture_output=True, text=True, timeout=30, check=True)
    return shlex.split(proc.stdout)


def test_deepspeed_launcher_multi_node_command() -> None:
    cmd = _dry("deepspeed/launch.sh", "recipes/shapes_cpu.yaml", "trainer.max_steps=10",
               HOSTFILE="launch/deepspeed/hostfile.example", ZERO="3", MASTER_ADDR="node-001", MASTER_PORT="29555")
    assert cmd == ["deepspeed", "--hostfile", "launch/deepspeed/hostfile.example", "--master_addr", "node-001",
                   "--master_port", "29555", "--module", "r3rl.cli", "train", "recipes/shapes_cpu.yaml",
                   f"distributed.deepspeed={LAUNCH / 'deepspeed' / 'zero3.json'}", "resume=auto", "trainer.max_steps=10"]


def test_deepspeed_launcher_defaults_to_zero2_on_this_machine() -> None:
    cmd = _dry("deepspeed/launch.sh", "r.yaml", NUM_GPUS="2")
    assert cmd[:5] == ["deepspeed", "--num_gpus", "2", "--master_port", "29500"]
    assert f"distributed.deepspeed={LAUNCH / 'deepspeed' / 'zero2.json'}" in cmd


def test_accelerate_launcher_multi_node_and_cpu_commands() -> None:
    cmd = _dry("accelerate/launch.sh", "r.yaml", "seed=3", NUM_MACHINES="2", MACHINE_RANK="1",
               MAIN_PROCESS_IP="10.0.0.1", ZERO="2")
    assert cmd == ["accelerate", "launch", "--config_file", str(LAUNCH / "accelerate" / "multi_gpu.yaml"),
                   "--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "10.0.0.1",
                   "--main_process_port", "29500", "-m", "r3rl.cli", "train", "r.yaml", "resume=auto",
                   f"distributed.deepspeed={LAUNCH / 'accelerate' / '..' / 'deepspeed' / 'zero2.json'}", "seed=3"]
    cpu = _dry("accelerate/launch.sh", "r.yaml", CPU="1", CONFIG=str(LAUNCH / "accelerate" / "cpu_2proc.yaml"))
    assert cpu[0] == "ACCELERATE_USE_CPU=true" and cpu[4].endswith("cpu_2proc.yaml")


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
