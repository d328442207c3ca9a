"""A LoRA run's diffusion transformer survives a checkpoint round trip (resume path)."""

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
