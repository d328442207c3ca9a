"""Reflector rollouts served by a REAL vLLM server (CPU build): sampling, weight sync, IS metrics.

The server and the trainer hold the same tiny Idefics3 (float32 both sides): the server samples
a group of reflections per image, the trainer re-scores the same tokens, and the truncated
importance-sampling metrics measure how far apart they are. After the trainer's weights move,
`VLLMRollout` puts them on the server and checks that the server's log-probs equal the trainer's.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import start_vllm
from PIL import Image

from r3rl.judges.vllm_server import free_port
from r3rl.models.reflector import HFReflector, lora_kwargs, with_lora
from r3rl.models.vllm_rollout import (
    RolloutError,
    VLLMRollout,
    rollout_server_args,
    truncated_importance_weights,
)

pytestmark = pytest.mark.vllm

SAMPLING = {"temperature": 0.9, "top_k": 50, "top_p": 0.95, "max_new_tokens": 12}


@pytest.fixture(scope="module")
def rollout_server(vllm_judge_model):
    args, env = rollout_server_args()
    server = start_vllm(vllm_judge_model, "tiny-reflector", vllm_judge_model.parent / "server-rollout.log",
                        extra_args=args, env=env)  # fmt: skip
    try:
        yield server
    finally:
        server.stop()


def _trainer(path) -> HFReflector:
    return HFReflector.from_pretrained(path)


def _rescore(reflector: HFReflector, prompts, images, refl) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(trainer log-probs, vLLM log-probs, mask) of the sampled tokens, as the text loss sees them."""
    comp = [r.token_ids for r in refl]
    logps, mask, _ = reflector.completion_logprobs(prompts, images, comp, temperature=SAMPLING["temperature"],
                                                   top_k=SAMPLING["top_k"], top_p=SAMPLING["top_p"],
                                                   with_grad=False)  # fmt: skip
    served = torch.zeros_like(logps)
    for i, r in enumerate(refl):
        served[i, : len(r.logprobs)] = torch.tensor(r.logprobs)
    return logps, served, mask


def test_the_server_samples_the_trainers_distribution(vllm_judge_model, rollout_server) -> None:
    trainer = _trainer(vllm_judge_model)
    rollout = VLLMRollout(trainer, rollout_server.base_url, "tiny-reflector")
    images = [Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 32), "blue")]
    prompts = ["a red circle"] * 4 + ["two blue squares"] * 4  # two groups of 4, one image each
    group_images = [images[0]] * 4 + [images[1]] * 4
    refl = rollout.reflect(prompts, group_images, seed=0, **SAMPLING)
    assert rollout.version == 1  # the first call synced (and verified) the weights
    assert len(refl) == 8 and all(1 <= len(r.token_ids) <= SAMPLING["max_new_tokens"] for r in refl)
    assert all(len(r.token_ids) == len(r.logprobs) for r in refl)
    assert not any(t in trainer.banned_ids for r in refl for t in r.token_ids)
    assert len({tuple(r.token_ids) for r in refl}) > 1  # sampled, not one greedy answer
    logps, served, mask = _rescore(trainer, prompts, group_images, refl)
    assert torch.isfinite(logps[mask]).all()  # every token lies inside the trainer's top-k/top-p
    weights, m = truncated_importance_weights(logps, served, mask, cap=2.0)
    assert m["rollout/logprob_diff_mean"] < 1e-4  # float32 on both sides: the same distribution
    assert m["rollout/is_ratio_mean"] == pytest.approx(1.0, abs=1e-3)
    assert 1.0 <= m["rollout/is_ratio_max"] < 1.001
    assert weights[~mask].abs().sum() == 0


def test_weights_reach_the_server_after_an_optimiser_step(vllm_judge_model, rollout_server) -> None:
    trainer = _trainer(vllm_judge_model)
    rollout = VLLMRollout(trainer, rollout_server.base_url, "tiny-reflector")
    rollout.sync()
    assert rollout.check() <= 1e-3
    opt = torch.optim.SGD(trainer.model.parameters(), lr=0.5)
    image = Image.new("RGB", (32, 32), "green")
    refl = rollout.reflect(["a green triangle"] * 2, [image] * 2, seed=1, **SAMPLING)
    logps, _, mask = _rescore(trainer, ["a green triangle"] * 2, [image] * 2, refl)
    trainer.model.train()
    lp, m, _ = trainer.completion_logprobs(["a green triangle"] * 2, [image] * 2, [r.token_ids for r in refl],
                                           temperature=1.0, top_k=0, top_p=1.0)  # fmt: skip
    (-lp[m].sum()).backward()
    opt.step()
    trainer.model.eval()
    assert rollout.check() > 1e-2  # the server still holds the old weights
    version = rollout.version
    refl = rollout.reflect(["a green triangle"] * 2, [image] * 2, seed=2, **SAMPLING)  # syncs first
    assert rollout.version == version + 1
    assert rollout.last_sync["rollout/sync_max_diff"] <= 1e-3
    logps, served, mask = _rescore(trainer, ["a green triangle"] * 2, [image] * 2, refl)
    _, metrics = truncated_importance_weights(logps, served, mask)
    assert metrics["rollout/logprob_diff_mean"] < 1e-4
    rollout.reflect(["a green triangle"] * 2, [image] * 2, seed=3, **SAMPLING)
    assert rollout.version == version + 1  # no step since: no second sync


def test_a_lora_policy_syncs_its_merged_weights(vllm_judge_model, rollout_server) -> None:
    trainer = _trainer(vllm_judge_model)
    trainer.model = with_lora(trainer.model, lora_kwargs(r=4, alpha=8))
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter: B is no longer zero
    rollout = VLLMRollout(trainer, rollout_server.base_url, "tiny-reflector")
    rollout.sync()
    assert rollout.last_sync["rollout/sync_max_diff"] <= 1e-3
    with trainer.model.disable_adapter():  # the base alone disagrees: the adapter really arrived
        assert rollout.check() > 1e-2


def test_an_unreachable_rollout_server_is_one_clear_error(tmp_path) -> None:
    class Stub:  # no model needed to find out that nobody listens
        model = torch.nn.Linear(1, 1)

    rollout = VLLMRollout(Stub(), f"http://127.0.0.1:{free_port()}/v1", "m", sync_dir=tmp_path / "w",
                          timeout_s=5)  # fmt: skip
    rollout._save = lambda: None
    with pytest.raises(RolloutError, match="unreachable"):
        rollout.sync()


def test_truncated_importance_weights_by_hand() -> None:
    trainer = torch.tensor([[math.log(0.5), math.log(0.2), 0.0]])
    served = torch.tensor([[math.log(0.25), math.log(0.4), 0.0]])
    mask = torch.tensor([[True, True, False]])
    weights, m = truncated_importance_weights(trainer, served, mask, cap=1.5)
    assert weights[0].tolist() == pytest.approx([1.5, 0.5, 0.0])  # ratio 2 capped at 1.5, 0.5 kept
    assert m["rollout/is_ratio_max"] == pytest.approx(2.0)
    assert m["rollout/is_ratio_mean"] == pytest.approx(1.25)
    assert m["rollout/logprob_diff_mean"] == pytest.approx(math.log(2))


def test_a_recipe_names_exactly_one_rollout_server(tmp_path) -> None:
    from r3rl.config import VLLMRolloutConfig
    from r3rl.errors import UserError
    from r3rl.models.vllm_rollout import open_rollout

    with pytest.raises(UserError, match="exactly one of reflector.vllm.url .* got none"):
        open_rollout(VLLMRolloutConfig(), None, tmp_path, tmp_path)
    with pytest.raises(UserError, match="got launch, command"):
        open_rollout(VLLMRolloutConfig(launch=True, command="true"), None, tmp_path, tmp_path)


def test_what_vllm_rollouts_do_not_support_is_refused_before_loading(tmp_path) -> None:
    from r3rl.config import parse_config
    from r3rl.errors import UserError
    from r3rl.run import _refuse_vllm_rollout

    def cfg(*overrides):
        return parse_config({"output_dir": str(tmp_path)}, ["reflector.rollout=vllm", *overrides])

    _refuse_vllm_rollout(cfg())  # R3 credit, any number of plain processes: fine
    with pytest.raises(UserError, match="rollout.credit=flow_grpo"):
        _refuse_vllm_rollout(cfg("rollout.credit=flow_grpo"))
    with pytest.raises(UserError, match="distributed.deepspeed"):
        _refuse_vllm_rollout(cfg("distributed.deepspeed=launch/deepspeed/zero2.json"))
