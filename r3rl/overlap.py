"""A slow judge off the critical path (`judge.overlap`): rollouts scored in a thread, and a
generate step's rollout begun during the refine step before it.

Each rollout's images are scored in the step's scoring thread while the trainer goes on with
work that does not read the scores: the loss's forwards (`r3rl.losses`), and, in a refine step
followed by a generate step, the next step's generator rollout (`Ahead`). That rollout stays
exactly on-policy: a refine step updates the reflector and the refiner, never the generator, so
the generator samples with the weights the generate step would have sampled with, and its draws
(run.rng's prompt, the step's seeded noise) are the ones it would have made. Its scores may
still be in flight when the refine step ends; the generate step waits for them before its
advantages. Only the advantages wait, so the numbers are those of scoring inline
(`judge.overlap: false`).

Checkpoint rule: before an evaluation or a checkpoint the rollout begun for the next step is
dropped (`drop`: its scoring finished, its draw from run.rng undone), so a checkpoint holds the
state after its step and nothing in flight, and the next step, resumed or not, makes the same
rollout again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

from r3rl.run import Run

T = TypeVar("T")


@dataclass
class Ahead(Generic[T]):
    """Step `step`'s generator rollout, begun by the refine step before it while that step's
    judge scored; its scores may still be in flight in `pool`, the thread it hands on."""

    step: int
    rng_before: tuple  # run.rng's state before the rollout drew its prompt
    started: T  # the rollout, drawn and sent to `pool` to be scored
    pool: ThreadPoolExecutor
    seconds: float

    def close(self) -> None:
        """Wait for its scoring to end (never two reward calls at once) and drop it."""
        self.pool.shutdown(wait=True, cancel_futures=True)


def scoring_thread(run: Run) -> ThreadPoolExecutor | None:
    """A step's one scoring thread (None: score inline). One thread, so the recipe's rewards are
    never called twice at once (an HTTP judge's pool serves one call at a time)."""
    if not run.cfg.judge.overlap:
        return None
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="r3rl-score")


@contextmanager
def step_thread(run: Run, ahead: Ahead | None) -> Iterator[ThreadPoolExecutor | None]:
    """The step's scoring thread: the one its rollout begun in the step before (`ahead`) scores
    in, or a new one. It ends with the step unless it goes on with the next step's rollout."""
    pool = ahead.pool if ahead is not None else scoring_thread(run)
    try:
        yield pool
    finally:
        if pool is not None and (run.ahead is None or run.ahead.pool is not pool):
            pool.shutdown(wait=True)


def can_begin(run: Run, step: int, stage: str, n: int) -> bool:
    """Whether the refine step before `step` begins its rollout: `step` is a generate step
    (`stage`) of this run (not past max_steps) that samples only the generator (no plans: the
    reflector writes them, and the refine step trains it), with one rollout a step (`n`), and
    the judge scores in a thread. Every rank decides alike. Not under DeepSpeed engines
    (untested there)."""
    return (
        run.cfg.judge.overlap
        and n == 1
        and step <= run.cfg.trainer.max_steps
        and stage == "generate"
        and run.reason is None
        and not run.engines
    )


def begin(run: Run, step: int, pool: ThreadPoolExecutor, start: Callable[[], T]) -> None:
    """Begin step `step`'s rollout now: `start()` draws it and sends it to `pool` to be scored.
    It waits on the run (`run.ahead`) for `take` or `drop`."""
    t0 = time.perf_counter()
    rng_before = run.rng.getstate()
    started = start()
    run.ahead = Ahead(step, rng_before, started, pool, time.perf_counter() - t0)


def take(run: Run, step: int) -> Ahead | None:
    """The rollout begun for `step`, taken off the run; one begun for another step is dropped."""
    ahead = run.ahead
    if ahead is not None and ahead.step != step:
        drop(run)
        return None
    run.ahead = None
    return ahead


def drop(run: Run) -> None:
    """Drop the rollout begun for the next step, if any: its scoring is waited for, run.rng goes
    back to before its draw (the next step draws the same again). Before an evaluation (which
    calls the rewards) and a checkpoint (which then holds the state after its step, nothing in
    flight)."""
    ahead, run.ahead = run.ahead, None
    if ahead is not None:
        ahead.close()
        run.rng.setstate(ahead.rng_before)
