"""Reward plugins: find them by name, load them, and combine them into one weighted reward.

A reward is `fn(prompts, images, metadata, **kwargs) -> list[float | None]`, sync or async;
`None` means "could not score" (masked downstream, never counted as 0). Names resolve from the
entry-point group `r3rl.rewards` (our own built-ins in `rewards/` are registered there by
r3rl's pyproject, exactly as a third-party package would register its own), or from
`path/to/file.py:function`.

Text rewards written for TRL (`trl.rewards.think_format_reward`, `get_soft_overlong_punishment`,
...) are recognised by a `completions` or `completion_ids` parameter and called as TRL's GRPOTrainer
calls them: keyword arguments only, `prompts`, `completions`, `completion_ids` and every metadata
column (each a list over samples), with completions as the caller gives them (for a chat model,
TRL's conversational form: `chat_prompts` / `chat_completions`). They shape the reflector's tokens
only: `CombinedReward.__call__` (the image score) never runs them, `CombinedReward.score_text` does.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib.util
import inspect
import math
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, Protocol

from r3rl.errors import UserError, did_you_mean

ENTRY_POINT_GROUP = "r3rl.rewards"


class RewardSpecLike(Protocol):
    """What `CombinedReward` needs from a recipe's reward entry (`r3rl.config.RewardSpec`)."""

    name: str
    weight: float
    args: dict[str, Any]


def _entry_points() -> dict[str, EntryPoint]:
    """Reward entry points by name; the first installed package to claim a name wins."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)
    return found


def _source(ep: EntryPoint) -> str:
    """Say where an entry point comes from, so users can tell built-ins from plugins."""
    dist = ep.dist
    if dist is not None and dist.name == "r3rl":
        return f"builtin ({ep.value})"
    package = f"package {dist.name} {dist.version}" if dist is not None else "entry point"
    return f"{package} ({ep.value})"


def available_rewards() -> dict[str, str]:
    """Map each reward name that resolves without a file path to where it comes from."""
    return {name: _source(ep) for name, ep in sorted(_entry_points().items())}


def is_file_reward(name: str) -> bool:
    """True for the `path/to/file.py:function` form."""
    path, sep, attr = name.rpartition(":")
    return bool(sep and attr and path.endswith(".py"))


def check_reward_name(name: str) -> None:
    """Raise `UserError` unless `name` would resolve, without importing anything.

    Config validation calls this so a typo fails at load time, not after pretraining.
    """
    if is_file_reward(name):
        path = name.rpartition(":")[0]
        if not Path(path).is_file():
            raise UserError(f"reward file not found: {path}")
        return
    names = available_rewards()
    if name not in names:
        listed = ", ".join(names) or "(none installed)"
        raise UserError(
            f"unknown reward '{name}'{did_you_mean(name, names)}; available: {listed}"
            " (or give path/to/file.py:function)"
        )


def _load_file_object(name: str) -> Any:
    """Import `path/to/file.py` as a fresh module and return its attribute `function`."""
    path_str, _, attr = name.rpartition(":")
    path = Path(path_str).resolve()
    module_name = f"r3rl_reward_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    module = sys.modules.get(module_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(module_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling look the module up here
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
    if not hasattr(module, attr):
        public = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise UserError(f"reward file {path_str} has no '{attr}'{did_you_mean(attr, public)}")
    return getattr(module, attr)


def _instantiate(obj: Any, args: dict[str, Any]) -> Callable[..., Any]:
    """Classes are built with `args` and `setup()` once (to load models); functions get `args`
    bound."""
    if inspect.isclass(obj):
        instance = obj(**args)
        if callable(getattr(instance, "setup", None)):
            instance.setup()
        return instance
    return functools.partial(obj, **args) if args else obj


def _run_awaitable(awaitable: Any) -> Any:
    """Run an async reward to completion from sync code.

    Without a running loop in this thread we use `asyncio.run`; inside one (e.g. a notebook)
    we run it on a private loop in a helper thread, which blocks the caller's loop meanwhile.
    """

    async def wait() -> Any:
        return await awaitable

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(wait())
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, wait()).result()


def _to_score(value: Any, name: str) -> float | None:
    """One score as a float; `None` and non-finite values both mean "could not score"."""
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, (bool, int, float)):
        score = float(value)
        return score if math.isfinite(score) else None
    raise UserError(f"reward '{name}' returned {value!r}; expected a number or None per sample")


TEXT_PARAMS = ("completions", "completion_ids")  # what marks a TRL-style text reward
# dataset columns TRL does not pass as keyword columns (they are passed under their own names)
_NOT_COLUMNS = ("prompt", "completion", "completion_ids")


def chat_prompts(texts: Sequence[str]) -> list[list[dict[str, str]]]:
    """Prompts in TRL's conversational form, one user message each (what GRPOTrainer passes a
    reward for a chat model's dataset)."""
    return [[{"role": "user", "content": t}] for t in texts]


def chat_completions(texts: Sequence[str]) -> list[list[dict[str, str]]]:
    """Completions as TRL's GRPOTrainer passes a chat model's: `[{"role": "assistant", "content":
    text}]`."""
    return [[{"role": "assistant", "content": t}] for t in texts]


def metadata_columns(metadata: Sequence[dict]) -> dict[str, list[Any]]:
    """TRL's reward keyword columns: every key of the first record but
    prompt/completion/completion_ids, as a list over the samples (missing keys are None)."""
    if not metadata:
        return {}
    return {k: [m.get(k) for m in metadata] for k in metadata[0] if k not in _NOT_COLUMNS}


class RewardFn:
    """A loaded reward with one sync signature: `(prompts, images, metadata, **kwargs)`.

    It awaits async rewards, passes each reward only the keyword arguments it accepts,
    checks that there is one score per prompt, and converts numpy/torch numbers to float.
    A text reward (`is_text`: it takes `completions` or `completion_ids`) is called as TRL calls
    it: `fn(prompts=..., completions=..., completion_ids=..., **metadata columns, **kwargs)`.
    """

    def __init__(self, name: str, fn: Callable[..., Any]) -> None:
        self.name = name
        self._fn = fn
        # the (lowest, highest) score the reward can give, from a `score_range` attribute of the
        # function, class or instance; (0, 1), GenEval's and R3's, when it declares none
        declared = getattr(fn, "score_range", None) or getattr(
            getattr(fn, "func", None), "score_range", None
        )
        self.score_range: tuple[float, float] = tuple(float(v) for v in (declared or (0.0, 1.0)))
        params = inspect.signature(fn).parameters
        self.is_text = any(p in params for p in TEXT_PARAMS)
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self._accepts: Callable[[str], bool] = (
            (lambda key: True) if takes_any else params.__contains__
        )

    def __call__(
        self, prompts: Sequence[Any], images: Sequence[Any], metadata: Sequence[dict], **kwargs: Any
    ) -> list[float | None]:
        if self.is_text:
            if not any(kwargs.get(p) is not None for p in TEXT_PARAMS):
                raise UserError(
                    f"reward '{self.name}' scores text (it takes 'completions' or "
                    "'completion_ids') "
                    "but no completions were passed"
                )
            named = {**metadata_columns(metadata), **kwargs, "prompts": list(prompts)}
            result = self._fn(**{k: v for k, v in named.items() if self._accepts(k)})
        else:
            extra = {k: v for k, v in kwargs.items() if self._accepts(k)}
            result = self._fn(prompts, images, metadata, **extra)
        if inspect.isawaitable(result):
            result = _run_awaitable(result)
        if hasattr(result, "tolist"):
            result = result.tolist()
        if not isinstance(result, (list, tuple)):
            raise UserError(
                f"reward '{self.name}' returned {type(result).__name__}; expected a list"
            )
        if len(result) != len(prompts):
            raise UserError(
                f"reward '{self.name}' returned {len(result)} scores for {len(prompts)} samples"
            )
        return [_to_score(v, self.name) for v in result]


def load_reward(name: str, **args: Any) -> RewardFn:
    """Load a reward by entry-point name or `path/to/file.py:function`, configured with `args`."""
    check_reward_name(name)
    obj = _load_file_object(name) if is_file_reward(name) else _entry_points()[name].load()
    return RewardFn(name, _instantiate(obj, args))


@dataclass
class RewardResult:
    """Scores of one batch: the weighted total and every component, for logging."""

    total: list[float | None]
    components: dict[str, list[float | None]]
    failures: dict[str, int]
    latency_s: dict[str, float]


def _component_keys(names: Sequence[str]) -> list[str]:
    """Short, unique metric keys: a file reward is keyed by its function name; repeats get #2,
    #3."""
    keys: list[str] = []
    for name in names:
        base = name.rpartition(":")[2] if is_file_reward(name) else name
        key, n = base, 1
        while key in keys:
            n += 1
            key = f"{base}#{n}"
        keys.append(key)
    return keys


class CombinedReward:
    """The recipe's rewards as one: weighted sum, with components scored concurrently.

    Components run in threads because the slow ones are HTTP judges that wait on the network.
    A sample's total is `None` when any component could not score it: a partial sum would
    silently change the reward's scale for that sample.

    Image rewards and text rewards (`RewardFn.is_text`) are two sums: calling the reward scores
    images with the image rewards alone (a text reward never enters an image score, and scoring
    images never needs completions); `score_text` scores completions with the text rewards alone.
    """

    def __init__(self, specs: Sequence[RewardSpecLike]) -> None:
        if not specs:
            raise UserError("no rewards given; a recipe needs at least one entry in 'rewards'")
        self.keys = _component_keys([s.name for s in specs])  # all rewards, in recipe order
        self.weights = [float(s.weight) for s in specs]
        self.fns = [load_reward(s.name, **s.args) for s in specs]
        self._image = [i for i, f in enumerate(self.fns) if not f.is_text]
        self._text = [i for i, f in enumerate(self.fns) if f.is_text]

    @property
    def has_text(self) -> bool:
        return bool(self._text)

    @property
    def has_image(self) -> bool:
        return bool(self._image)

    @property
    def max_total(self) -> float:
        """The highest image score the weighted sum can reach: each image reward at the end of its
        `score_range` its weight favours (1.0 for one [0, 1] reward of weight 1)."""
        return sum(
            w * (f.score_range[1] if w >= 0 else f.score_range[0])
            for f, w in zip(self.fns, self.weights)
            if not f.is_text
        )

    def is_perfect(self, score: float | None) -> bool:
        """Whether an image score is the best the combined image reward can give (R3: `reward ==
        1`), up to float rounding of the weighted sum."""
        if score is None or math.isnan(score):
            return False
        top = self.max_total
        return score >= top - 1e-6 * max(1.0, abs(top))

    def _part(self, idx: list[int]) -> tuple[list[RewardFn], list[str], list[float]]:
        return (
            [self.fns[i] for i in idx],
            [self.keys[i] for i in idx],
            [self.weights[i] for i in idx],
        )

    def _timed(
        self, fn: RewardFn, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[list[float | None], float]:
        start = time.perf_counter()
        scores = fn(*args, **kwargs)
        return scores, time.perf_counter() - start

    def _combine(
        self,
        fns: list[RewardFn],
        keys: list[str],
        weights: list[float],
        n: int,
        args: tuple,
        kwargs: dict[str, Any],
    ) -> RewardResult:
        if not fns:
            return RewardResult(total=[0.0] * n, components={}, failures={}, latency_s={})
        with ThreadPoolExecutor(max_workers=len(fns)) as pool:
            futures = [pool.submit(self._timed, fn, args, kwargs) for fn in fns]
            outcomes = [f.result() for f in futures]
        components = {key: scores for key, (scores, _) in zip(keys, outcomes)}
        total: list[float | None] = []
        for i in range(n):
            column = [scores[i] for scores, _ in outcomes]
            total.append(
                None
                if any(s is None for s in column)
                else sum(w * s for w, s in zip(weights, column))
            )
        return RewardResult(
            total=total,
            components=components,
            failures={k: sum(s is None for s in v) for k, v in components.items()},
            latency_s={key: seconds for key, (_, seconds) in zip(keys, outcomes)},
        )

    def __call__(
        self, prompts: Sequence[str], images: Sequence[Any], metadata: Sequence[dict], **kwargs: Any
    ) -> RewardResult:
        """The image score: the weighted sum of the image rewards (text rewards are not run; a
        recipe with text rewards only has no image score: an error)."""
        if not self._image:
            raise UserError(
                "the recipe's rewards are all text rewards (they take 'completions'); "
                "scoring images needs at least one image reward"
            )
        extra = {k: v for k, v in kwargs.items() if k not in TEXT_PARAMS}
        return self._combine(
            *self._part(self._image), len(prompts), (prompts, images, metadata), extra
        )

    def score_text(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        metadata: Sequence[dict],
        *,
        completion_ids: Sequence[Sequence[int]] | None = None,
        images: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> RewardResult:
        """The text score of completions: the weighted sum of the text rewards alone (total 0.0 per
        sample when there are none), each called as TRL calls it (see `RewardFn`). `prompts` and
        `completions` go through as given: for a chat model pass `chat_prompts` /
        `chat_completions`."""
        n = len(completions)
        kwargs = {**kwargs, "completions": list(completions)}
        if completion_ids is not None:
            kwargs["completion_ids"] = [list(ids) for ids in completion_ids]
        images = [None] * n if images is None else images
        return self._combine(*self._part(self._text), n, (prompts, images, metadata), kwargs)
