"""Each family samples on the σ grid its diffusers pipeline uses by default (issue 17, item 2).

The reference is the pipeline itself: a tiny-config pipeline of each family, with the scheduler
config of the real checkpoint, is called with `num_inference_steps`; its scheduler's `sigmas` right
after the pipeline's own `set_timesteps` call are what the adapter's `sigmas(n)` must equal.
(StableDiffusion3Pipeline passes no sigmas; FLUX / Kontext / Qwen-Image pass linspace(1, 1/n, n) and mu.)
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline
from PIL import Image

from r3rl.models.tiny import build_tiny_qwen_image, build_tiny_qwen_image_edit, build_tiny_sd3
from r3rl.shapes.tiny_diffusion import build_tiny_flux

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 32

# the real checkpoints' scheduler configs (scheduler/scheduler_config.json), sequence lengths scaled
# down where the shift is dynamic so that the tiny image's length lands inside the interpolation
SD35 = {"shift": 3.0}
SD3_DYNAMIC = {"shift": 3.0, "use_dynamic_shifting": True, "base_image_seq_len": 16, "max_image_seq_len": 256,
               "base_shift": 0.5, "max_shift": 1.15}
FLUX = {"shift": 3.0, "use_dynamic_shifting": True, "base_image_seq_len": 4, "max_image_seq_len": 64,
        "base_shift": 0.5, "max_shift": 1.15}
QWEN_IMAGE = {"shift": 1.0, "use_dynamic_shifting": True, "base_image_seq_len": 16, "max_image_seq_len": 256,
              "base_shift": 0.5, "max_shift": 0.9, "shift_terminal": 0.02, "time_shift_type": "exponential"}


class _Recorded(Exception):
    pass


def pipeline_sigmas(pipe, num_steps: int, **call) -> torch.Tensor:
    """The pipeline's scheduler sigmas right after the pipeline's own set_timesteps (the call stops there)."""
    original = pipe.scheduler.set_timesteps
    seen = {}

    @functools.wraps(original)  # the pipelines inspect its signature for `sigmas`
    def record(*args, **kwargs):
        original(*args, **kwargs)
        seen["sigmas"] = pipe.scheduler.sigmas.clone()
        raise _Recorded

    pipe.scheduler.set_timesteps = record
    try:
        with pytest.raises(_Recorded):
            pipe(**{"prompt": "a red circle", "num_inference_steps": num_steps, "height": SIZE, "width": SIZE, **call})
    finally:
        pipe.scheduler.set_timesteps = original
    return seen["sigmas"].float()


@pytest.fixture(scope="module")
def models(tokenizer):
    return {
        "sd3": build_tiny_sd3(tokenizer, SIZE, seed=1),
        "flux": build_tiny_flux(tokenizer, SIZE, seed=1),
        "qwen_image": build_tiny_qwen_image(tokenizer, SIZE, seed=1),
        "qwen_image_edit": build_tiny_qwen_image_edit(tokenizer, SIZE, seed=1),
    }


def _flux_pipe(model, pipeline, scheduler):
    tokenizer = copy.deepcopy(model.tokenizer)
    tokenizer.model_max_length = 16  # the pipeline's CLIP length (the shapes tokenizer sets none)
    return pipeline(scheduler=scheduler, vae=model.vae, text_encoder=model.text_encoder, tokenizer=tokenizer,
                    text_encoder_2=model.text_encoder_2, tokenizer_2=tokenizer, transformer=model.transformer)


@pytest.mark.parametrize("num_steps", [10, 40])
@pytest.mark.parametrize("config", [SD35, SD3_DYNAMIC], ids=["sd35", "sd3_dynamic"])
def test_sd3_grid_is_the_pipelines(models, config, num_steps):
    model = models["sd3"]
    model.pipe.scheduler = FlowMatchEulerDiscreteScheduler(**config)
    ref = pipeline_sigmas(model.pipe, num_steps, max_sequence_length=16)
    assert torch.allclose(model.sigmas(num_steps), ref, atol=1e-6)
    if config is SD35 and num_steps == 10:  # issue 17's numbers: not FLUX's linspace grid
        assert ref[[1, 2, -3, -2]].tolist() == pytest.approx([0.960, 0.913, 0.278, 0.0089], abs=5e-4)


@pytest.mark.parametrize("num_steps", [10, 40])
@pytest.mark.parametrize("pipeline", [FluxPipeline, FluxKontextPipeline], ids=["flux", "flux_kontext"])
def test_flux_grid_is_the_pipelines(models, pipeline, num_steps):
    model = models["flux"]
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX)
    model.scheduler_config = dict(scheduler.config)
    call = {"max_sequence_length": 16}
    if pipeline is FluxKontextPipeline:  # an edit at the tiny size (its default area is 1024^2)
        call.update(image=Image.fromarray(np.zeros((SIZE, SIZE, 3), dtype=np.uint8)), max_area=SIZE**2,
                    _auto_resize=False)
    ref = pipeline_sigmas(_flux_pipe(model, pipeline, scheduler), num_steps, **call)
    assert torch.allclose(model.sigmas(num_steps), ref, atol=1e-6)


@pytest.mark.parametrize("num_steps", [10, 40])
@pytest.mark.parametrize("family", ["qwen_image", "qwen_image_edit"])
def test_qwen_image_grid_is_the_pipelines(models, family, num_steps, monkeypatch):
    model = models[family]
    model.pipe.scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE)
    dim = model.pipe.text_encoder.config.text_config.hidden_size  # given embeddings: no (slow) text encoding
    call = {"prompt": None, "prompt_embeds": torch.zeros(1, 4, dim), "prompt_embeds_mask": torch.ones(1, 4, dtype=torch.long)}
    if family == "qwen_image_edit":
        call["image"] = Image.fromarray(np.zeros((SIZE, SIZE, 3), dtype=np.uint8))
        # the pipeline VAE-encodes the image at a 1024^2 area (minutes on one core); the grid does not read it
        ch, f = model.pipe.latent_channels, model.pipe.vae_scale_factor
        monkeypatch.setattr(model.pipe, "_encode_vae_image", lambda image, generator: torch.zeros(
            image.shape[0], ch, 1, image.shape[-2] // f, image.shape[-1] // f))
    ref = pipeline_sigmas(model.pipe, num_steps, **call)
    assert torch.allclose(model.sigmas(num_steps), ref, atol=1e-6)
    assert float(ref[-2]) == pytest.approx(0.02)


def test_without_a_scheduler_the_grid_is_uniform():
    from r3rl.models.base import scheduler_sigmas

    assert scheduler_sigmas(None, 16, 4).tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    with pytest.raises(ValueError, match="grid"):
        scheduler_sigmas(None, 16, 4, grid="sdxl")
