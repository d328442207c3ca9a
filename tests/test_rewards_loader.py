"""Reward plugins: entry points of installed packages, file.py:function, sync/async/None, combining."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from r3rl.config import RewardSpec, parse_config
from r3rl.errors import UserError
from r3rl.rewards import CombinedReward, RewardFn, available_rewards, load_reward

FILE_REWARDS = Path(__file__).parent / "fixtures" / "file_rewards.py"
PROMPTS = ["a circle!", "two squares!!", "a red triangle"]
IMAGES = [None, None, None]  # these rewards never look at the images
METADATA = [{}, {}, {}]


@pytest.fixture
def toy_installed(toy_plugin_site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(toy_plugin_site))


def _fn(name: str, fn) -> RewardFn:
    return RewardFn(name, fn)


def test_builtins_are_registered_through_the_entry_point_group() -> None:
    assert available_rewards()["shapes_geneval"] == "builtin (rewards.shapes_geneval:ShapesGenEval)"


def test_installed_package_reward_is_listed_and_loads_by_name(toy_installed: None) -> None:
    assert (
        available_rewards()["toy_exclamations"]
        == "package toy-rewards 0.1 (toy_rewards_pkg:exclamations)"
    )
    fn = load_reward("toy_exclamations")
    assert fn(PROMPTS, IMAGES, METADATA) == [1.0, 2.0, 0.0]


def test_installed_class_reward_gets_args_and_setup(toy_installed: None) -> None:
    fn = load_reward("toy_judge", bonus=0.25)
    assert fn(PROMPTS, IMAGES, METADATA) == [0.25, 0.25, 0.25]  # None until setup() ran


def test_installed_reward_passes_config_validation(toy_installed: None) -> None:
    cfg = parse_config({"output_dir": "o", "rewards": [{"name": "toy_async", "weight": 2}]})
    assert cfg.rewards[0].name == "toy_async"


def test_async_reward_is_awaited(toy_installed: None) -> None:
    assert load_reward("toy_async")(PROMPTS, IMAGES, METADATA) == [0.5, 0.5, 0.5]


def test_async_reward_inside_a_running_event_loop(toy_installed: None) -> None:
    fn = load_reward("toy_async")

    async def caller() -> list[float | None]:
        return fn(PROMPTS, IMAGES, METADATA)

    assert asyncio.run(caller()) == [0.5, 0.5, 0.5]


def test_file_function_loads_by_path_with_args() -> None:
    fn = load_reward(f"{FILE_REWARDS}:prompt_length", scale=0.5)
    assert fn(PROMPTS, IMAGES, METADATA) == [4.5, 6.5, 7.0]


def test_file_class_is_instantiated_and_set_up_once() -> None:
    fn = load_reward(f"{FILE_REWARDS}:CountingReward", offset=10.0)
    assert fn(PROMPTS, IMAGES, METADATA) == [11.0, 11.0, 11.0]


def test_file_without_the_function_suggests_one() -> None:
    with pytest.raises(
        UserError, match="has no 'prompt_lenght' \\(did you mean 'prompt_length'\\?\\)"
    ):
        load_reward(f"{FILE_REWARDS}:prompt_lenght")


def test_unknown_name_suggests_and_lists_available() -> None:
    with pytest.raises(UserError) as e:
        load_reward("shapes_genevall")
    assert str(e.value).startswith(
        "unknown reward 'shapes_genevall' (did you mean 'shapes_geneval'?); available: "
    )
    assert "shapes_geneval" in str(e.value).split("available: ")[1]


def test_none_means_unscored_and_non_finite_too() -> None:
    fn = _fn("holes", lambda prompts, images, metadata: [1.0, None, float("nan")])
    assert fn(PROMPTS, IMAGES, METADATA) == [1.0, None, None]


def test_numpy_and_torch_scores_become_floats() -> None:
    as_array = _fn("np", lambda prompts, images, metadata: np.array([1, 2, 3], dtype=np.float32))
    as_tensor = _fn("torch", lambda prompts, images, metadata: torch.tensor([0.5, 1.5, 2.5]))
    as_scalars = _fn(
        "scalars", lambda prompts, images, metadata: [np.float64(1.0), torch.tensor(2.0), 3]
    )
    for fn, expected in [
        (as_array, [1.0, 2.0, 3.0]),
        (as_tensor, [0.5, 1.5, 2.5]),
        (as_scalars, [1.0, 2.0, 3.0]),
    ]:
        scores = fn(PROMPTS, IMAGES, METADATA)
        assert scores == expected and all(type(s) is float for s in scores)


def test_wrong_number_of_scores_is_a_clear_error() -> None:
    fn = _fn("short", lambda prompts, images, metadata: [1.0])
    with pytest.raises(UserError, match="reward 'short' returned 1 scores for 3 samples"):
        fn(PROMPTS, IMAGES, METADATA)


def test_non_numeric_score_is_a_clear_error() -> None:
    fn = _fn("words", lambda prompts, images, metadata: ["good", "bad", "ugly"])
    with pytest.raises(
        UserError, match="reward 'words' returned 'good'; expected a number or None"
    ):
        fn(PROMPTS, IMAGES, METADATA)


def test_trl_style_text_reward_gets_completions() -> None:
    def think_format(completions, **kwargs):
        return [1.0 if c.startswith("<think>") else 0.0 for c in completions]

    fn = _fn("format", think_format)
    assert fn.is_text
    completions = ["<think>ok</think> add a circle", "add a circle", "<think>x</think>"]
    assert fn(PROMPTS, IMAGES, METADATA, completions=completions) == [1.0, 0.0, 1.0]


def test_text_reward_without_kwargs_gets_only_what_it_names() -> None:
    def length(prompts, completions):
        return [len(c) - len(p) for p, c in zip(prompts, completions)]

    fn = _fn("length", length)
    assert fn(PROMPTS, IMAGES, METADATA, completions=["abcdefghij"] * 3, step=4) == [
        1.0,
        -3.0,
        -4.0,
    ]


def test_text_reward_without_completions_is_a_clear_error() -> None:
    fn = _fn("format", lambda prompts, completions, **kwargs: [1.0] * len(prompts))
    with pytest.raises(UserError, match="takes 'completions'"):
        fn(PROMPTS, IMAGES, METADATA)


def _write_components(tmp_path: Path) -> Path:
    module = tmp_path / "components.py"
    module.write_text(
        "def a(prompts, images, metadata, **kw):\n    return [1.0, 2.0, None]\n"
        "def b(prompts, images, metadata, **kw):\n    return [0.5, None, 1.0]\n"
        "def c(prompts, images, metadata, **kw):\n    return [4.0, 4.0, 4.0]\n"
        "def sleepy(prompts, images, metadata, seconds=0.3, **kw):\n"
        "    import time; time.sleep(seconds); return [0.0] * len(prompts)\n"
    )
    return module


def test_combined_reward_weights_masks_and_counts(tmp_path: Path) -> None:
    module = _write_components(tmp_path)
    specs = [
        RewardSpec(name=f"{module}:a", weight=2.0),
        RewardSpec(name=f"{module}:b", weight=-1.0),
    ]
    result = CombinedReward(specs)(PROMPTS, IMAGES, METADATA)
    # sample 0: 2*1.0 - 1*0.5 = 1.5; samples 1 and 2 have a None component, so no total
    assert result.total == [1.5, None, None]
    assert result.components == {"a": [1.0, 2.0, None], "b": [0.5, None, 1.0]}
    assert result.failures == {"a": 1, "b": 1}
    assert set(result.latency_s) == {"a", "b"} and all(t >= 0 for t in result.latency_s.values())


def test_combined_reward_repeated_names_get_distinct_keys(tmp_path: Path) -> None:
    module = _write_components(tmp_path)
    result = CombinedReward(
        [RewardSpec(name=f"{module}:c"), RewardSpec(name=f"{module}:c", weight=0.5)]
    )(PROMPTS, IMAGES, METADATA)
    assert list(result.components) == ["c", "c#2"]
    assert result.total == [6.0, 6.0, 6.0]  # 4 + 0.5*4


def test_combined_reward_runs_components_concurrently(tmp_path: Path) -> None:
    module = _write_components(tmp_path)
    combined = CombinedReward([RewardSpec(name=f"{module}:sleepy") for _ in range(3)])
    start = time.perf_counter()
    result = combined(PROMPTS, IMAGES, METADATA)
    assert time.perf_counter() - start < 0.6  # three 0.3 s components in sequence would take 0.9 s
    assert all(t >= 0.3 for t in result.latency_s.values())


def test_combined_reward_passes_completions_to_text_rewards(tmp_path: Path) -> None:
    module = tmp_path / "text.py"
    module.write_text(
        "def fmt(completions, **kw):\n    return [float('</think>' in c) for c in completions]\n"
    )
    module_c = _write_components(tmp_path)
    combined = CombinedReward(
        [RewardSpec(name=f"{module}:fmt"), RewardSpec(name=f"{module_c}:c", weight=0.25)]
    )
    completions = ["<think></think>x", "x", "</think>"]
    # a text reward never enters the image score (issue 17 item 5) ...
    assert combined(PROMPTS, IMAGES, METADATA, completions=completions).total == [1.0, 1.0, 1.0]  # 0.25*4
    # ... it scores the completions
    assert combined.score_text(PROMPTS, completions, METADATA).total == [1.0, 0.0, 1.0]
