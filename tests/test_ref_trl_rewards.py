"""TRL's own reward functions plug in as TRL's GRPOTrainer calls them for a chat model (issue 17, items 4-5).

The reference is TRL 1.16's `GRPOTrainer._calculate_rewards`, written out below: every reward is called
with keyword arguments only, `prompts=`, `completions=` (a chat model's: `[{"role": "assistant",
"content": text}]`), `completion_ids=` (the completion's token ids up to and including EOS) and each
dataset column but prompt/completion/completion_ids as a list over the samples. Text rewards shape the
reflector's tokens only: scoring images never runs them and never needs completions.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import Qwen2Config, Qwen2ForCausalLM
from trl.rewards import get_repetition_penalty_reward, get_soft_overlong_punishment, think_format_reward

from r3rl.config import RewardSpec
from r3rl.errors import UserError
from r3rl.models.tokenizer import train_chat_tokenizer
from r3rl.rewards import CombinedReward, chat_completions, chat_prompts, load_reward
from r3rl.text_grpo import CausalLMPolicy, TextGRPOSettings, grpo_step

TEXTS = ["<think>\nthe circle is blue\n</think>\nmake the circle red",
         "make it red",
         "<think>a</think> <think>b</think> no further edit needed"]
IDS = [[5, 6, 7, 8, 9, 2], [5, 5, 5, 5, 5, 5, 5, 5, 5, 2], [1, 2]]
METAS = [{"prompt": "a red circle", "tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}]},
         {"prompt": "a red circle", "tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}]},
         {"prompt": "two squares", "tag": "counting", "include": [{"class": "square", "count": 2}]}]


def _seen(combined: CombinedReward) -> list[dict]:
    """What the user file's `record` reward (the recipe's only one) was called with."""
    return combined.fns[0]._fn.__globals__["seen"]


def trl_calls(reward_func, inputs, prompts, completions, completion_ids_list):
    """TRL 1.16 `_calculate_rewards` for a plain (non-Module, sync) reward function, without the
    trainer-only kwargs (trainer_state, log_extra, log_metric, environments)."""
    keys = [key for key in inputs[0] if key not in ["prompt", "completion", "completion_ids"]]
    reward_kwargs = {key: [example[key] for example in inputs] for key in keys}
    out = reward_func(prompts=prompts, completions=completions, completion_ids=completion_ids_list, **reward_kwargs)
    return [r if r is not None else float("nan") for r in out]


@pytest.fixture
def trl_file(tmp_path: Path) -> Path:
    """A user's reward file naming TRL's functions, as a recipe would: `trl_rewards.py:think`."""
    f = tmp_path / "trl_rewards.py"
    f.write_text(textwrap.dedent("""
        import numpy as np
        from trl.rewards import get_repetition_penalty_reward, get_soft_overlong_punishment, think_format_reward

        think = think_format_reward
        overlong = get_soft_overlong_punishment(max_completion_len=8, soft_punish_cache=4)
        repetition = get_repetition_penalty_reward(ngram_size=2, max_penalty=-1.0)
        seen = []

        def record(prompts, completions, completion_ids, tag, include, **kwargs):
            seen.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids,
                         "tag": tag, "include": include, "kwargs": sorted(kwargs)})
            return [0.0] * len(completions)

        def brightness(prompts, images, metadata, **kwargs):  # an image reward
            return [float(np.asarray(im.convert("L")).mean()) / 255.0 for im in images]
    """))
    return f


def test_trl_functions_score_as_in_grpo_trainer(trl_file):
    prompts, completions = chat_prompts([m["prompt"] for m in METAS]), chat_completions(TEXTS)
    refs = {"think": think_format_reward,
            "overlong": get_soft_overlong_punishment(max_completion_len=8, soft_punish_cache=4),
            "repetition": get_repetition_penalty_reward(ngram_size=2, max_penalty=-1.0)}
    for name, fn in refs.items():
        ours = load_reward(f"{trl_file}:{name}")
        assert ours.is_text, name  # completion_ids alone marks a text reward too
        expected = trl_calls(fn, METAS, prompts, completions, IDS)
        assert ours(prompts, [None] * 3, METAS, completions=completions, completion_ids=IDS) == expected, name
    # the functions have teeth on this batch
    assert trl_calls(think_format_reward, METAS, prompts, completions, IDS) == [1.0, 0.0, 0.0]
    assert trl_calls(refs["overlong"], METAS, prompts, completions, IDS) == [-0.5, -1.0, 0.0]  # 6 tokens: (8 - 4 - 6) / 4
    assert trl_calls(refs["repetition"], METAS, prompts, completions, IDS)[1] < 0


def test_combined_text_score_is_trls_weighted_sum_and_never_enters_the_image_score(trl_file):
    specs = [RewardSpec(name=f"{trl_file}:brightness", weight=1.0), RewardSpec(name=f"{trl_file}:think", weight=0.5),
             RewardSpec(name=f"{trl_file}:overlong", weight=2.0)]
    combined = CombinedReward(specs)
    assert combined.has_text and combined.has_image
    images = [Image.new("RGB", (8, 8), (255, 255, 255)), Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8))]
    prompts, completions = chat_prompts([m["prompt"] for m in METAS]), chat_completions(TEXTS)
    # item 5: scoring images runs the image rewards alone, with or without completions
    for kwargs in ({}, {"completions": completions, "completion_ids": IDS}):
        res = combined([m["prompt"] for m in METAS], images, METAS, **kwargs)
        assert res.total == pytest.approx([1.0, 0.0, 0.0]) and set(res.components) == {"brightness"}
    text = combined.score_text(prompts, completions, METAS, completion_ids=IDS)
    think = trl_calls(think_format_reward, METAS, prompts, completions, IDS)
    over = trl_calls(get_soft_overlong_punishment(8, 4), METAS, prompts, completions, IDS)
    assert text.total == pytest.approx([0.5 * a + 2.0 * b for a, b in zip(think, over)])
    assert set(text.components) == {"think", "overlong"}


def test_text_rewards_get_what_trl_passes(trl_file):
    combined = CombinedReward([RewardSpec(name=f"{trl_file}:record")])
    prompts, completions = chat_prompts([m["prompt"] for m in METAS]), chat_completions(TEXTS)
    combined.score_text(prompts, completions, METAS, completion_ids=IDS)
    call = _seen(combined)[-1]
    assert call["prompts"] == [[{"role": "user", "content": m["prompt"]}] for m in METAS]
    assert call["completions"] == [[{"role": "assistant", "content": t}] for t in TEXTS]
    assert call["completion_ids"] == IDS
    assert call["tag"] == [m["tag"] for m in METAS] and call["include"] == [m["include"] for m in METAS]
    assert call["kwargs"] == []  # no 'prompt' column, no images


def test_a_text_only_recipe_has_no_image_score(trl_file):
    combined = CombinedReward([RewardSpec(name=f"{trl_file}:think")])
    with pytest.raises(UserError, match="image reward"):
        combined(["p"], [Image.new("RGB", (8, 8))], [{"prompt": "p"}])


def test_text_grpo_passes_a_chat_policys_completions_as_trl_does(tmp_path, trl_file):
    """grpo_step on a tiny chat causal LM: the reward sees TRL's conversational prompts and
    completions and the completion ids up to and including EOS."""
    tok = train_chat_tokenizer(["the red circle is left of the blue square.", "<think> look </think> no"])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    policy = CausalLMPolicy(model, tok)
    combined = CombinedReward([RewardSpec(name=f"{trl_file}:record")])
    s = TextGRPOSettings(group=2, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=6)
    metas = [{"prompt": "the red circle", "tag": "colors", "include": []}]
    torch.manual_seed(1)
    grpo_step(policy, torch.optim.SGD([p for p in model.parameters()], lr=0.0), ["the red circle"], combined, s,
              metadata=metas)
    call = _seen(combined)[-1]
    assert call["prompts"] == [[{"role": "user", "content": "the red circle"}]] * 2
    assert all(c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for c in call["completions"])
    for c, ids in zip(call["completions"], call["completion_ids"]):
        assert c[0]["content"] == tok.decode(ids, skip_special_tokens=True)
        assert len(ids) <= 6 and (ids[-1] == tok.eos_token_id or len(ids) == 6)
        assert tok.eos_token_id not in ids[:-1]
    assert call["tag"] == ["colors", "colors"]
    json.dumps(call)  # plain Python values, as TRL passes
