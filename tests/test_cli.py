"""The real `r3rl` command: exit codes, one-line errors, and the reward listing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import r3rl


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("r3rl: error: ")
    return lines[0]


def test_version(run_cli) -> None:
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"r3rl {r3rl.__version__}"


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "r3rl"
    result = subprocess.run(
        [str(script), "--version"], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stdout.strip() == f"r3rl {r3rl.__version__}"


def test_help_lists_the_commands(run_cli) -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("train", "eval", "rewards", "data"):
        assert f"    {command} " in result.stdout


def test_unknown_key_suggests_the_right_one(run_cli, minimal_recipe: Path) -> None:
    line = _one_error_line(run_cli("train", str(minimal_recipe), "trainer.max_stepz=3"))
    assert (
        line
        == "r3rl: error: config error: unknown key 'trainer.max_stepz' (did you mean 'trainer.max_steps'?)"
    )


def test_wrong_type_names_key_and_expected_type(run_cli, minimal_recipe: Path) -> None:
    line = _one_error_line(run_cli("train", str(minimal_recipe), "trainer.max_steps=abc"))
    assert line == "r3rl: error: config error: trainer.max_steps='abc' is not a valid integer"


def test_unknown_reward_lists_available(run_cli, minimal_recipe: Path) -> None:
    line = _one_error_line(
        run_cli("train", str(minimal_recipe), "rewards=[{name: no_such_reward}]")
    )
    assert "unknown reward 'no_such_reward'" in line
    assert "shapes_geneval" in line.split("; available: ")[1].split(" (or give")[0].split(", ")


def test_missing_recipe_file(run_cli, tmp_path: Path) -> None:
    line = _one_error_line(run_cli("train", str(tmp_path / "missing.yaml")))
    assert line == f"r3rl: error: config error: recipe file not found: {tmp_path / 'missing.yaml'}"


def test_missing_prompt_file(run_cli, minimal_recipe: Path) -> None:
    line = _one_error_line(
        run_cli("train", str(minimal_recipe), "data.train_prompts=no/such.jsonl")
    )
    assert line == "r3rl: error: config error: data.train_prompts: file not found: no/such.jsonl"


def test_overrides_after_options_are_still_overrides(run_cli, minimal_recipe: Path) -> None:
    line = _one_error_line(
        run_cli("eval", str(minimal_recipe), "--prompts", "p.jsonl", "eval.roundz=2")
    )
    assert (
        line == "r3rl: error: config error: unknown key 'eval.roundz' (did you mean 'eval.rounds'?)"
    )


def test_usage_errors_exit_2(run_cli) -> None:
    assert run_cli("train").returncode == 2
    assert run_cli("no-such-command").returncode == 2
    assert run_cli("rewards", "list", "--bogus").returncode == 2


def test_rewards_list_names_builtins_and_installed_plugins(run_cli, toy_plugin_site: Path) -> None:
    result = run_cli("rewards", "list", pythonpath=toy_plugin_site)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split(None, 1)[1] for line in result.stdout.splitlines()}
    assert rows["shapes_geneval"] == "builtin (rewards.shapes_geneval:ShapesGenEval)"
    assert rows["toy_exclamations"] == "package toy-rewards 0.1 (toy_rewards_pkg:exclamations)"
    assert rows["toy_judge"] == "package toy-rewards 0.1 (toy_rewards_pkg:Judge)"


def _openmp_env(**launcher: str) -> tuple[str | None, str | None]:
    """(GOMP_SPINCOUNT, OMP_WAIT_POLICY) as a fresh process sees them after importing the CLI."""
    import os

    env = {k: v for k, v in os.environ.items()
           if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE")}
    code = "import os, r3rl.cli; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], env=env | launcher, capture_output=True, text=True, check=True)
    spin, policy = out.stdout.split()
    return (None if spin == "None" else spin), (None if policy == "None" else policy)


def test_openmp_threads_spin_briefly_alone_and_sleep_when_ranks_share_the_node() -> None:
    assert _openmp_env() == ("1000", None)
    assert _openmp_env(WORLD_SIZE="2") == (None, "PASSIVE")
    assert _openmp_env(OMPI_COMM_WORLD_SIZE="4") == (None, "PASSIVE")
    assert _openmp_env(WORLD_SIZE="1") == ("1000", None)
    assert _openmp_env(OMP_WAIT_POLICY="ACTIVE") == (None, "ACTIVE")  # a user's setting is left alone
    assert _openmp_env(GOMP_SPINCOUNT="50", WORLD_SIZE="2") == ("50", None)
