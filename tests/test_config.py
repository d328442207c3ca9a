"""Recipes: defaults, dotted overrides, and one-line errors naming key, value and expectation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from r3rl.config import Config, load_config, parse_config
from r3rl.errors import ConfigError, UserError


def test_minimal_recipe_fills_defaults(minimal_recipe: Path) -> None:
    cfg = load_config(minimal_recipe)
    assert cfg.output_dir == "runs/test-minimal"
    assert cfg.trainer.max_steps == 2
    assert cfg.rollout.max_rounds == 2
    assert cfg.resume is None
    assert cfg.refiner.train is True and cfg.generator.train is False
    assert cfg.refiner.noise_level == 1.0 and cfg.generator.noise_level == 0.7
    assert [(r.name, r.weight, r.args) for r in cfg.rewards] == [("shapes_geneval", 1.0, {})]


def test_overrides_are_dotted_and_parsed_as_yaml(minimal_recipe: Path) -> None:
    cfg = load_config(
        minimal_recipe,
        [
            "trainer.max_steps=3",
            "rollout.max_rounds=1",
            "reflector.lr=5e-6",
            "refiner.lora.r=8",
            "resume=null",
            "rewards=[{name: shapes_geneval, weight: 2, args: {partial_credit: true}}]",
        ],
    )
    assert cfg.trainer.max_steps == 3
    assert cfg.rollout.max_rounds == 1
    assert cfg.reflector.lr == 5e-6
    assert cfg.refiner.lora is not None and (cfg.refiner.lora.r, cfg.refiner.lora.alpha) == (8, 32)
    assert cfg.rewards[0].weight == 2.0 and cfg.rewards[0].args == {"partial_credit": True}


def test_override_into_a_list_item() -> None:
    cfg = parse_config(
        {"output_dir": "o", "rewards": [{"name": "shapes_geneval"}]}, ["rewards.0.weight=0.5"]
    )
    assert cfg.rewards[0].weight == 0.5


def test_unknown_key_suggests_the_closest(minimal_recipe: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(minimal_recipe, ["trainer.max_stepz=3"])
    assert (
        str(e.value)
        == "config error: unknown key 'trainer.max_stepz' (did you mean 'trainer.max_steps'?)"
    )


def test_unknown_key_inside_a_list_item() -> None:
    with pytest.raises(
        ConfigError,
        match=r"unknown key 'rewards\[0\]\.wieght' \(did you mean 'rewards\[0\]\.weight'\?\)",
    ):
        parse_config({"output_dir": "o", "rewards": [{"name": "shapes_geneval", "wieght": 1}]})


def test_wrong_type_names_key_value_and_type(minimal_recipe: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(minimal_recipe, ["trainer.max_steps=abc"])
    assert str(e.value) == "config error: trainer.max_steps='abc' is not a valid integer"


def test_choice_lists_the_allowed_values() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"output_dir": "o", "device": "gpu"})
    assert str(e.value) == "config error: device='gpu' is invalid: expected 'auto', 'cpu' or 'cuda'"


@pytest.mark.parametrize(
    "override, key",
    [
        ("rollout.group_size=1", "rollout.group_size=1"),
        ("trainer.max_steps=0", "trainer.max_steps=0"),
        ("rollout.perfect_prob=1.5", "rollout.perfect_prob=1.5"),
        ("reflector.top_p=0", "reflector.top_p=0"),
    ],
)
def test_ranges_are_checked(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"config error: {key} is invalid: expected"):
        parse_config({"output_dir": "o"}, [override])


def test_missing_required_key() -> None:
    with pytest.raises(ConfigError, match="missing required key 'output_dir'"):
        parse_config({})


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="recipe file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_recipe_that_is_not_yaml(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("output_dir: o\ntrainer: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML \\(line 3"):
        load_config(recipe)


def test_override_without_equals_sign() -> None:
    with pytest.raises(
        ConfigError, match="override 'trainer.max_steps' is not of the form key=value"
    ):
        parse_config({"output_dir": "o"}, ["trainer.max_steps"])


def test_prompt_files_must_exist(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=f"data.train_prompts: file not found: {tmp_path}/missing.jsonl"
    ):
        parse_config(
            {"output_dir": "o", "data": {"train_prompts": str(tmp_path / "missing.jsonl")}}
        )
    present = tmp_path / "p.jsonl"
    present.write_text('{"prompt": "a circle"}\n')
    assert parse_config(
        {"output_dir": "o", "data": {"eval_prompts": str(present)}}
    ).data.eval_prompts == str(present)


def test_resume_is_null_auto_or_an_existing_path(tmp_path: Path) -> None:
    assert parse_config({"output_dir": "o", "resume": "auto"}).resume == "auto"
    assert parse_config({"output_dir": "o", "resume": str(tmp_path)}).resume == str(tmp_path)
    with pytest.raises(ConfigError, match="resume: file not found"):
        parse_config({"output_dir": "o", "resume": str(tmp_path / "step-9")})


def test_unknown_reward_lists_available_ones() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"output_dir": "o"}, ["rewards=[{name: shapes_genevl}]"])
    message = str(e.value)
    assert message.startswith("config error: rewards[0].name: unknown reward 'shapes_genevl'")
    assert "(did you mean 'shapes_geneval'?)" in message
    assert "shapes_geneval" in message.split("; available: ")[1].split(", ")  # one of the installed rewards


def test_file_rewards_are_checked_at_load_time(tmp_path: Path) -> None:
    reward_file = tmp_path / "my_reward.py"
    reward_file.write_text(
        "def score(prompts, images, metadata):\n    return [1.0] * len(prompts)\n"
    )
    cfg = parse_config({"output_dir": "o", "rewards": [{"name": f"{reward_file}:score"}]})
    assert cfg.rewards[0].name == f"{reward_file}:score"
    with pytest.raises(ConfigError, match="reward file not found"):
        parse_config({"output_dir": "o", "rewards": [{"name": f"{tmp_path}/gone.py:score"}]})


def test_resolved_config_round_trips(tmp_path: Path, minimal_recipe: Path) -> None:
    cfg = load_config(minimal_recipe, ["reflector.lora.r=4", "seed=7"])
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.to_yaml())
    assert load_config(saved) == cfg


def test_errors_are_user_errors_on_one_line(minimal_recipe: Path) -> None:
    with pytest.raises(UserError) as e:
        load_config(minimal_recipe, ["trainer={max_stepz: 1, eval_everyy: 2}"])
    assert "\n" not in str(e.value)
    assert str(e.value).endswith("(and 1 more)")


def _models(model: type[BaseModel]) -> list[type[BaseModel]]:
    found = [model]
    for field in model.model_fields.values():
        inner = [
            a
            for a in (field.annotation, *getattr(field.annotation, "__args__", ()))
            if isinstance(a, type)
        ]
        found += [m for a in inner if issubclass(a, BaseModel) for m in _models(a)]
    return found


def test_every_field_is_documented() -> None:
    undocumented = [
        f"{m.__name__}.{name}"
        for m in _models(Config)
        for name, f in m.model_fields.items()
        if not f.description
    ]
    assert undocumented == []
