"""Device placement and CPU offloading of frozen modules (`r3rl.models.placement`).

No GPU here, so offloading runs with the CPU as its execution device: that still proves the
mechanism (the module's own parameters are `meta` placeholders between uses, the weights live in
the offload hook's host copy) and that every family's encoders, the KL references and a whole
R3 run give exactly the numbers they give without offloading.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from r3rl.config import load_config
from r3rl.errors import UserError
from r3rl.models.base import encode_condition
from r3rl.models.placement import execution_device, place_flow_model, resolve_device
from r3rl.models.tiny import build_tiny_qwen_image, build_tiny_qwen_image_edit, build_tiny_sd3
from r3rl.shapes.tiny_diffusion import build_tiny_flux

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
SIZE = 32
BUILDERS = {"flux": build_tiny_flux, "sd3": build_tiny_sd3, "qwen_image": build_tiny_qwen_image,
            "qwen_image_edit": build_tiny_qwen_image_edit}


def _resident(module: torch.nn.Module) -> bool:
    return any(p.device.type != "meta" for p in module.parameters())


def test_resolve_device_auto_cpu_and_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU and resolve_device("cpu", 3) == CPU
    with pytest.raises(UserError, match="device='cuda' but torch sees no CUDA GPU") as err:
        resolve_device("cuda")
    assert "\n" not in str(err.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", 3) == torch.device("cuda", 3) == resolve_device("cuda", 3)
    assert resolve_device("cpu") == CPU


@pytest.mark.parametrize("family", list(BUILDERS))
def test_offloaded_encoders_give_the_same_conditioning_latents_and_images(family, tokenizer):
    model = BUILDERS[family](tokenizer, SIZE, seed=1)
    for m in model.encoders:
        m.eval().requires_grad_(False)
    offloaded = copy.deepcopy(model)  # before any encoding: no cached text embeddings
    place_flow_model(offloaded, CPU, offload_frozen=True)
    assert not any(_resident(m) for m in offloaded.encoders) and _resident(offloaded.transformer)
    assert all(execution_device(m) == CPU for m in offloaded.encoders)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(2)]
    texts = ["a red circle", "two blue squares"]
    refs = images if family == "qwen_image_edit" else None  # its text encoder reads the image
    latents = torch.randn(2, *model.noise(1).shape[1:], generator=torch.Generator().manual_seed(0))
    outs = []
    for m in (model, offloaded):
        cond, ref = encode_condition(m, texts, refs)
        outs.append((cond, ref, m.encode_images(images), [np.asarray(im) for im in m.decode(latents)]))
    (c0, r0, z0, im0), (c1, r1, z1, im1) = outs
    for f in c0.__dataclass_fields__:
        a, b = getattr(c0, f), getattr(c1, f)
        assert (a is None and b is None) or torch.equal(a, b), f
    assert (r0 is None and r1 is None) or torch.equal(r0, r1)
    assert torch.equal(z0, z1) and all(np.array_equal(a, b) for a, b in zip(im0, im1))
    assert not any(_resident(m) for m in offloaded.encoders)  # weights went back to their host copy


def test_an_r3_run_with_everything_offloaded_matches_one_without(tiny_world, monkeypatch):
    """Full fine-tuning of all three policies with KL (so each has a full-copy reference); every
    reflection asks for an edit, so the refine step runs the refiner and its reference too."""
    from r3rl.models.reflector import HFReflector, Reflection
    from r3rl.run import build_run
    from r3rl.trainer import train_step

    def edit(self, prompts, images, **kwargs):
        ids = self.encode_completion("<think>x</think> make it red")
        return [Reflection("<think>x</think> make it red", ids, [-1.0] * len(ids), "make it red", True) for _ in prompts]

    monkeypatch.setattr(HFReflector, "reflect", edit)
    base = [*tiny_world, "output_dir=unused", "reflector.beta=0.05", "reflector.lora=null", "generator.train=true",
            "generator.lora=null", "refiner.train=true", "refiner.lora=null", "flow_grpo.beta=0.05",
            "rollout.group_size=3", "rollout.perfect_prob=0",
            # image-dependent scores: the checker scores every image of the tiny world 0, and then no
            # policy would move from its reference (KL 0) and the check below would prove nothing
            f"rewards=[{{name: '{Path(__file__).parent / 'fixtures' / 'noisy_reward.py'}:noisy_reward'}}]"]
    rows = []
    for off in ("false", "true"):
        run = build_run(load_config("recipes/shapes_cpu.yaml",
                                    [*base, *(f"{p}.offload={off}" for p in ("reflector", "generator", "refiner"))]))
        frozen = [run.ref_reflector.model, run.generator.ref_transformer, run.refiner.ref_transformer,
                  *run.generator.model.encoders, *run.refiner.model.encoders]
        assert all(_resident(m) != (off == "true") for m in frozen)
        assert all(_resident(m) for m in (run.reflector.model, run.generator.model.transformer,
                                          run.refiner.model.transformer))
        rows.append([train_step(run, step) for step in (1, 2, 3)])
    assert [r["stage"] for r in rows[0]] == ["generate", "refine", "generate"]
    assert rows[0][1]["refine/stop_rate"] == 0 and "kl/image" in rows[0][1]  # the refiner's reference was read
    assert "kl/text" in rows[0][1] and rows[0][2]["kl/image"] > 0  # so were the reflector's and the generator's
    for plain, offloaded in zip(*rows):
        for key, value in plain.items():
            if key.startswith("time/") or isinstance(value, str):
                continue
            other = offloaded[key]
            assert (math.isnan(value) and math.isnan(other)) or value == pytest.approx(other, rel=1e-6, abs=1e-9), key


def test_regenerate_mode_offloads_its_semantic_encoder(tiny_world):
    """The regenerate refiner's VLM semantic encoder is one of its frozen encoders: offloaded with
    `refiner.offload`, and its semantic tokens unchanged."""
    from r3rl.run import build_run

    images = [Image.new("RGB", (SIZE, SIZE), c) for c in ("red", "navy")]
    tokens = []
    for off in ("false", "true"):
        run = build_run(load_config("recipes/shapes_cpu.yaml", [
            *tiny_world, "output_dir=unused", "refiner.mode=regenerate", f"refiner.offload={off}",
            "refiner.regenerate.pretrain_steps=2", "refiner.regenerate.pretrain_pairs=8"]), for_training=False)
        assert _resident(run.refiner.model.encoder.model) == (off == "false")
        tokens.append(run.refiner.model.encode_images(images))
    assert torch.equal(*tokens)
