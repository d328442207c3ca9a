"""What ends a training run before `trainer.max_steps`: a signal (the step finishes, a checkpoint
is saved, the run exits cleanly), NaN/inf losses several steps in a row, too many reward
failures in a step."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import NoReturn

from r3rl.checkpoint import save_checkpoint
from r3rl.errors import UserError
from r3rl.models.vllm_rollout import RolloutError
from r3rl.run import Run


class StopRequested:
    """SIGTERM/SIGINT set a flag; the loop finishes the step, checkpoints and exits cleanly."""

    def __init__(self) -> None:
        self.flag = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.flag:  # second signal: give up immediately
            raise KeyboardInterrupt
        self.flag = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    @staticmethod
    def message(step: int, checkpoint: Path, out: Path) -> str:
        """What the run says as it stops for a signal."""
        return (
            f"stopped by signal at step {step}; checkpoint {checkpoint}. "
            f"Resume with: r3rl train <recipe> output_dir={out} resume=auto"
        )


def skip_nonfinite(run: Run, finite: bool) -> bool:
    """Whether an optimiser step is skipped for a NaN/inf loss; `trainer.max_nonfinite_steps` in
    a row stop the run (the count is part of a checkpoint)."""
    run.nonfinite_in_row = 0 if finite else run.nonfinite_in_row + 1
    if run.nonfinite_in_row >= run.cfg.trainer.max_nonfinite_steps:
        raise UserError(
            f"loss was NaN/inf for {run.nonfinite_in_row} steps in a row; stopping "
            "(lower the learning rates or check the rewards)"
        )
    return not finite


def reward_failures(run: Run, row: dict, step: int) -> str | None:
    """Why the run stops after `step` when its share of unscored samples (`judge/failures` of
    `judge/samples`; a tree scores more than `rollout.group_size`) exceeds
    `judge.max_failure_rate`, else None."""
    samples = row.get("judge/samples", run.cfg.rollout.group_size)
    rate = row.get("judge/failures", 0) / max(1, samples)
    limit = run.cfg.judge.max_failure_rate
    if rate > limit:
        return f"reward failures {rate:.0%} exceed judge.max_failure_rate={limit} at step {step}"
    return None


def stop_on_rollout_error(run: Run, error: RolloutError, step: int, out: Path) -> NoReturn:
    """One line and a checkpoint of the last completed update: this step's if the failure came
    after its optimiser step (the sync), else the previous one's (kept as saved, if it was)."""
    tc = run.cfg.trainer
    done = step if getattr(error, "row", None) is not None else step - 1
    path = out / "checkpoints" / f"step-{done}"
    if not (path / "COMPLETE").exists():
        path = save_checkpoint(run, out, done, keep_last=tc.keep_last)
    raise RolloutError(
        f"{error} (step {step}); checkpoint {path}. Resume with: r3rl train <recipe> "
        f"output_dir={out} resume=auto"
    ) from None
