"""Checkpoint round trips on the resume path: a LoRA run's diffusion transformer, and the GPU generator states."""

from __future__ import annotations

import torch

from r3rl.checkpoint import load_module
from r3rl.models.lora import add_lora
from r3rl.models.tiny import build_tiny_sd3


def test_lora_transformer_reloads_exactly(tokenizer, tmp_path, one_thread):
    trained = build_tiny_sd3(tokenizer, 32, seed=0).transformer
    add_lora(trained, r=4, alpha=8)
    with torch.no_grad():  # B starts at 0: give the adapter weights a save would lose unnoticed
        for name, p in trained.named_parameters():
            if "lora_" in name:
                p.normal_()
    trained.save_pretrained(tmp_path / "transformer")  # what save_checkpoint writes
    fresh = build_tiny_sd3(tokenizer, 32, seed=1).transformer
    add_lora(fresh, r=4, alpha=8)
    load_module(fresh, tmp_path / "transformer")
    want, got = trained.state_dict(), fresh.state_dict()
    assert want.keys() == got.keys() and any(".lora_A." in k for k in got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_checkpoint_round_trips_each_ranks_gpu_generator_state(tiny_world, tmp_path, monkeypatch, one_thread):
    """On a GPU box a checkpoint also holds the CUDA generator's state (dropout draws from it). No
    GPU here: torch.cuda's state functions are replaced by a stand-in device generator."""
    from r3rl.checkpoint import load_checkpoint, save_checkpoint
    from r3rl.config import load_config
    from r3rl.run import build_run

    run = build_run(load_config("recipes/shapes_cpu.yaml", [*tiny_world, f"output_dir={tmp_path}", "device=cpu"]))
    device_state = {"now": torch.arange(8, dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: device_state["now"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: device_state.update(now=s.clone()))
    path = save_checkpoint(run, tmp_path, 1, keep_last=2)
    saved = device_state["now"].clone()
    device_state["now"] = torch.zeros(8, dtype=torch.uint8)  # the generator moved on after the save
    load_checkpoint(run, path)
    assert torch.equal(device_state["now"], saved)


def test_lora_on_a_bfloat16_transformer_trains_in_float32(tokenizer, one_thread):
    """The adapter is float32 on a bfloat16 base: an AdamW step of 1e-4 moves every lora_A weight,
    where the same step on bfloat16 copies of them is rounded away for most."""
    transformer = build_tiny_sd3(tokenizer, 32, seed=0).transformer.to(torch.bfloat16)
    add_lora(transformer, r=4, alpha=8)
    lora = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    assert lora and all(".lora_" in n and p.dtype == torch.float32 for n, p in lora.items())
    assert all(p.dtype == torch.bfloat16 for n, p in transformer.named_parameters() if n not in lora)

    def moved_fraction(params: list[torch.nn.Parameter]) -> float:
        before = [p.detach().clone() for p in params]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(p.dtype)
        opt.step()
        return float(torch.cat([(p.detach() != b).flatten() for p, b in zip(params, before)]).float().mean())

    a = [p for n, p in lora.items() if ".lora_A." in n]
    as_bf16 = [torch.nn.Parameter(p.detach().bfloat16()) for p in a]
    assert moved_fraction(a) == 1.0 and moved_fraction(as_bf16) < 0.5
    c = transformer.config
    out = transformer(hidden_states=torch.randn(1, c.in_channels, 4, 4, dtype=torch.bfloat16), timestep=torch.ones(1),
                      encoder_hidden_states=torch.randn(1, 8, c.joint_attention_dim, dtype=torch.bfloat16),
                      pooled_projections=torch.randn(1, c.pooled_projection_dim, dtype=torch.bfloat16),
                      return_dict=False)[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_full_fine_tuning_in_bfloat16_without_deepspeed_is_warned_about(caplog):
    from r3rl.config import load_config, warn_low_precision_full_finetuning

    base = ["output_dir=unused", "generator.train=true", "refiner.train=true"]
    cases = {("reflector.dtype=bfloat16",): ["reflector"],  # shapes recipe: no LoRA anywhere
             ("reflector.dtype=bfloat16", "reflector.lora={r: 4, alpha: 8}", "generator.dtype=float16"): ["generator"],
             ("reflector.dtype=bfloat16", "distributed.deepspeed=launch/deepspeed/zero2.json"): []}
    for extra, warned in cases.items():
        caplog.clear()
        with caplog.at_level("WARNING", logger="r3rl.config"):
            warn_low_precision_full_finetuning(load_config("recipes/shapes_cpu.yaml", [*base, *extra]),
                                                ("reflector", "generator", "refiner"))
        assert [r.getMessage().split(":")[0] for r in caplog.records] == warned, extra
