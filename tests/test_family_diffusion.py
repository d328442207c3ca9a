"""Every diffusion family end to end on tiny random weights: build, save, load through the recipe
path (`load_flow_model`), rollout with log-probs (edit families: of edits of two input images),
one FlowGRPO step on a LoRA, and the LoRA round trip through diffusers' own `load_lora_weights`
on the family's pipeline."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from r3rl.algos.flow_grpo import flow_grpo_loss
from r3rl.models.base import encode_condition, scheduler_shift
from r3rl.models.flux import FluxModel
from r3rl.models.lora import adapter_disabled, add_lora, load_lora, save_lora
from r3rl.models.qwen_image import QwenImageEditModel, QwenImageModel, guided
from r3rl.models.registry import detect_family, load_flow_model
from r3rl.models.sd3 import SD3Model
from r3rl.models.tiny import build_tiny_qwen_image, build_tiny_qwen_image_edit, build_tiny_sd3
from r3rl.rollout import SamplerSettings, run_diffusion
from r3rl.sampling import SDEConfig, transition_logprob
from r3rl.shapes.tiny_diffusion import build_tiny_flux

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 32
TEXTS = ["a red circle", "two blue squares left of a green triangle"]
BUILDERS = {"flux": build_tiny_flux, "sd3": build_tiny_sd3, "qwen_image": build_tiny_qwen_image,
            "qwen_image_edit": build_tiny_qwen_image_edit,
            "qwen_image_edit_plus": partial(build_tiny_qwen_image_edit, plus=True)}
CLASSES = {"flux": FluxModel, "sd3": SD3Model, "qwen_image": QwenImageModel, "qwen_image_edit": QwenImageEditModel,
           "qwen_image_edit_plus": QwenImageEditModel}
FAMILY = {"qwen_image_edit_plus": "qwen_image_edit"}  # Edit-Plus checkpoints load as the Edit family
EDITS = {"qwen_image_edit", "qwen_image_edit_plus"}  # families that refine an input image


def _inputs() -> list[Image.Image]:
    """Two different images to edit."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in TEXTS]


def _components(model) -> dict:
    """The pipeline components of an adapter (FluxModel keeps them as attributes, others a pipe)."""
    if isinstance(model, FluxModel):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return {**{n: getattr(model, n) for n in FluxModel.COMPONENTS}, "scheduler": FlowMatchEulerDiscreteScheduler()}
    return dict(model.pipe.components)


def _frozen(model):
    for m in _components(model).values():
        if isinstance(m, torch.nn.Module):
            m.eval().requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name, build in BUILDERS.items():
        build(tokenizer, SIZE, seed=1).save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.mark.parametrize("family", list(BUILDERS))
def test_family_rollout_train_step_and_lora_round_trip(family, saved, tmp_path):
    path = saved[family]
    assert detect_family(path) == FAMILY.get(family, family)
    refs = _inputs() if family in EDITS else None
    model = _frozen(load_flow_model(path, image_size=SIZE, true_cfg_scale=2.0))
    assert type(model) is CLASSES[family]
    add_lora(model.transformer, r=4, alpha=8)
    lora = [p for n, p in model.transformer.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n, p in model.transformer.named_parameters() if p.requires_grad)

    settings = SamplerSettings(num_steps=3, sde=SDEConfig(noise_level=0.8), strategy="one")
    ro = run_diffusion(model, TEXTS, refs, settings, train=True, generator=torch.Generator().manual_seed(0))
    assert len(ro.images) == 2 and ro.images[0].size == (SIZE, SIZE)
    assert ro.traj.logps.shape == (2, 1) and torch.isfinite(ro.traj.logps).all()

    # recomputed log-probs equal the behaviour ones (ratio 1: guided velocity used in both)
    cond, ref = encode_condition(model, TEXTS, refs)
    logp, mean, std = transition_logprob(model, ro.traj, 0, cond, ref, settings.sde)
    assert torch.allclose(logp, ro.traj.logps[:, 0], atol=1e-4)
    with torch.no_grad(), adapter_disabled(model.transformer):
        _, ref_mean, _ = transition_logprob(model, ro.traj, 0, cond, ref, settings.sde)
    loss, _ = flow_grpo_loss(logp, ro.traj.logps[:, 0], torch.tensor([1.0, -1.0]), clip_range=1e-4,
                             adv_clip_max=5.0, prev_mean=mean, ref_prev_mean=ref_mean, std=std, beta=0.04)
    before = [p.detach().clone() for p in lora]
    base_before = {n: p.detach().clone() for n, p in model.transformer.named_parameters() if not p.requires_grad}
    loss.backward()
    torch.optim.SGD(lora, lr=0.5).step()
    assert any((p - b).abs().max() > 0 for p, b in zip(lora, before))
    assert all(torch.equal(p, base_before[n]) for n, p in model.transformer.named_parameters() if n in base_before)

    # LoRA saved in the pipeline format; diffusers' own loader reproduces our velocity
    save_lora(model.transformer, model.PIPELINE, tmp_path / "lora")
    x = model.noise(2, torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = model.velocity(x, torch.tensor(0.6), cond, ref)
        with adapter_disabled(model.transformer):
            base = model.velocity(x, torch.tensor(0.6), cond, ref)
    assert (ours - base).abs().max() > 1e-6  # the adapter changed the model
    fresh = _frozen(load_flow_model(path, image_size=SIZE, true_cfg_scale=2.0))
    pipe = getattr(fresh, "pipe", None) or model.PIPELINE(**_components(fresh))  # the checkpoint's own pipeline
    pipe.load_lora_weights(tmp_path / "lora")
    with torch.no_grad():
        theirs = fresh.velocity(x, torch.tensor(0.6), *encode_condition(fresh, TEXTS, refs))
    assert torch.allclose(theirs, ours, atol=1e-5)

    # and our loader (resume / inference) restores it too
    again = _frozen(load_flow_model(path, image_size=SIZE, true_cfg_scale=2.0))
    load_lora(again.transformer, tmp_path / "lora")
    with torch.no_grad():
        assert torch.allclose(again.velocity(x, torch.tensor(0.6), *encode_condition(again, TEXTS, refs)), ours, atol=1e-5)


@pytest.mark.parametrize("family", sorted(EDITS))
def test_qwen_image_edit_sampling_matches_the_pipeline(family, saved, monkeypatch):
    """Our conditioning (image read by the text encoder with the pipeline's template, reference
    tokens with two `img_shapes`, true CFG with norm rescale), packing and ODE loop give the
    diffusers pipeline's own latents. The pipeline's 1024^2 target area is scaled to the canvas."""
    import sys

    model = _frozen(load_flow_model(saved[family], image_size=SIZE, true_cfg_scale=2.0))
    module = sys.modules[type(model.pipe).__module__]
    area = module.calculate_dimensions
    monkeypatch.setattr(module, "calculate_dimensions", lambda a, r: area(SIZE * SIZE if a == 1024 * 1024 else a, r))
    images = _inputs()
    settings = SamplerSettings(num_steps=2, sde=SDEConfig())
    ours = run_diffusion(model, TEXTS[:1], images[:1], settings, train=False, generator=torch.Generator().manual_seed(3))
    x = model.noise(1, torch.Generator().manual_seed(3))  # the noise run_diffusion started from
    theirs = model.pipe(image=images[0], prompt=TEXTS[0], negative_prompt=model.negative_prompt, true_cfg_scale=2.0,
                        num_inference_steps=2, latents=x, output_type="latent").images
    assert torch.allclose(ours.traj.latents, theirs, atol=1e-5)

    # the image reaches both the text conditioning and the reference tokens
    cond, ref = encode_condition(model, TEXTS[:1], images[:1])
    cond2, ref2 = encode_condition(model, TEXTS[:1], images[1:])
    assert not torch.allclose(cond.embeds, cond2.embeds) and not torch.allclose(ref, ref2)
    with pytest.raises(ValueError, match="reads the image"):
        model.encode_text(TEXTS)


def test_registry_rejects_wrong_family_and_non_checkpoints(saved, tmp_path):
    from r3rl.errors import UserError

    with pytest.raises(UserError, match="family='flux'.*'sd3'"):
        load_flow_model(saved["sd3"], family="flux", image_size=SIZE)
    with pytest.raises(UserError, match="not a diffusers checkpoint"):
        detect_family(tmp_path)


def test_qwen_true_cfg_rescales_to_conditional_norm():
    v = torch.tensor([[[3.0, 4.0]]])  # norm 5
    v_neg = torch.tensor([[[1.0, 0.0]]])
    comb = torch.tensor([[[1.0 + 2 * 2.0, 2 * 4.0]]])  # v_neg + 2 (v - v_neg) = (5, 8)
    expected = comb * 5.0 / (5.0**2 + 8.0**2) ** 0.5
    assert torch.allclose(guided(v, v_neg, 2.0), expected)


def test_scheduler_shift_static_and_dynamic():
    from r3rl.models.base import scheduler_shift

    assert scheduler_shift(None, 100) == 1.0
    assert scheduler_shift({"shift": 3.0}, 100) == 3.0
    cfg = {"use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096,
           "base_shift": 0.5, "max_shift": 1.15}
    # FLUX at 1024 px: 4096 tokens -> mu = max_shift
    assert scheduler_shift(cfg, 4096) == pytest.approx(2.718281828 ** 1.15)
    assert scheduler_shift(cfg, 256 + (4096 - 256) // 2) == pytest.approx(2.718281828 ** 0.825)


@pytest.mark.parametrize("config", [
    {"shift": 3.0},  # SD3 / SD3.5: static shift
    {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15},  # FLUX
    {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9, "max_image_seq_len": 8192,
     "shift_terminal": 0.02},  # Qwen-Image / -Edit: the last sigma before 0 is stretched to 0.02
], ids=["sd3", "flux", "qwen_image"])
def test_scheduler_sigmas_are_the_diffusers_schedulers(config):
    """The sigma grid r3rl samples on is the one the pipelines get from the scheduler (sigmas
    1 .. 1/n passed as the FLUX/Qwen pipelines do, then shift, terminal stretch and a final 0)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from r3rl.models.base import scheduler_sigmas

    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    seq_len, n = 1024, 10
    mu = math.log(scheduler_shift(dict(scheduler.config), seq_len)) if config.get("use_dynamic_shifting") else None
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n), mu=mu)
    ours = scheduler_sigmas(dict(scheduler.config), seq_len, n)
    assert torch.allclose(ours, scheduler.sigmas.float(), atol=1e-6)
    if "shift_terminal" in config:
        assert ours[-2] == pytest.approx(0.02)


def test_qwen_image_edit_regenerates_from_the_prompt_read_with_the_image_and_no_vae_latents(saved, monkeypatch):
    """`refiner.mode: regenerate` (RvR) on Qwen-Image-Edit: its Qwen2.5-VL text encoder reads the target
    prompt with the current image (the semantic tokens); the image's VAE latents never enter."""
    from r3rl.config import RefinerConfig
    from r3rl.errors import UserError
    from r3rl.modes import refiner_texts
    from r3rl.modes.load import wrap_refiner

    folder = saved["qwen_image_edit"]
    model = _frozen(load_flow_model(folder, image_size=SIZE, true_cfg_scale=2.0))
    refiner = wrap_refiner(model, RefinerConfig(mode="regenerate"), folder)
    texts = refiner_texts(refiner, [{"prompt": t} for t in TEXTS], ["make it blue", "add a circle"])
    assert texts == TEXTS  # the target prompt, not the instruction
    images = _inputs()
    monkeypatch.setattr(model.vae, "encode", lambda *a, **k: pytest.fail("the VAE encoded the input image"))
    settings = SamplerSettings(num_steps=3, sde=SDEConfig(noise_level=0.8), strategy="one")
    ro = run_diffusion(refiner, texts, images, settings, train=True, generator=torch.Generator().manual_seed(0))
    assert ro.ref is None and torch.isfinite(ro.traj.logps).all()
    with torch.no_grad():
        assert torch.equal(ro.cond.embeds, model.encode_text_with_images(texts, images).embeds)
        logp, _, _ = transition_logprob(refiner, ro.traj, 0, ro.cond, None, settings.sde)
    assert torch.allclose(logp, ro.traj.logps[:, 0], atol=1e-4)  # what the loss recomputes
    # the image reaches the result through the text encoder alone: another image, another result
    other = run_diffusion(refiner, texts, images[::-1], settings, train=True, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(other.traj.latents, ro.traj.latents)
    with pytest.raises(UserError, match="reads the image with its own text encoder"):
        wrap_refiner(model, RefinerConfig(mode="regenerate", regenerate={"semantic_encoder": "vlm"}), folder)
