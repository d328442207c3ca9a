"""FluxModel adapter on tiny random-weight FLUX components (no downloads).

Expected values are computed here by hand (index loops, explicit formulas, direct calls of the
diffusers modules), not by calling the helpers under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from r3rl.models.flux import FluxModel, latent_ids, pack_latents, to_pil, to_tensor, unpack_latents
from r3rl.shapes.tiny_diffusion import build_tiny_flux

SIZE = 32  # tiny VAE downsamples by 4: 8x8 latents -> 16 packed tokens of 64 features
TEXTS = ["a red circle above a blue square", "two green triangles"]


pytestmark = pytest.mark.usefixtures("one_thread")


def frozen(model: FluxModel) -> FluxModel:
    """Inference setup, as the trainer leaves non-trained components."""
    for m in (model.transformer, model.vae, model.text_encoder, model.text_encoder_2):
        m.eval().requires_grad_(False)
    return model


@pytest.fixture
def model(tokenizer) -> FluxModel:
    return frozen(build_tiny_flux(tokenizer, SIZE, seed=0))


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(n)
    ]


def capture_transformer_kwargs(model: FluxModel) -> list[dict]:
    calls: list[dict] = []
    model.transformer.register_forward_pre_hook(
        lambda mod, args, kw: calls.append(kw), with_kwargs=True
    )
    return calls


# ---------------------------------------------------------------------- packing and ids


def hand_pack(z: torch.Tensor) -> torch.Tensor:
    """FluxPipeline._pack_latents by index: token (i, j) row-major, features (c, dy, dx)."""
    b, c, h, w = z.shape
    out = torch.empty(b, (h // 2) * (w // 2), 4 * c)
    for n in range(b):
        for i in range(h // 2):
            for j in range(w // 2):
                for ch in range(c):
                    for dy in range(2):
                        for dx in range(2):
                            out[n, i * (w // 2) + j, ch * 4 + dy * 2 + dx] = z[
                                n, ch, 2 * i + dy, 2 * j + dx
                            ]
    return out


def test_pack_matches_hand_loop_and_round_trips():
    z = torch.randn(2, 3, 4, 6)
    packed = pack_latents(z)
    assert packed.shape == (2, 2 * 3, 12)
    assert torch.equal(packed, hand_pack(z))
    assert torch.equal(unpack_latents(packed, 4, 6), z)
    # an arbitrary packed tensor also survives unpack -> pack
    t = torch.randn(2, 6, 12)
    assert torch.equal(pack_latents(unpack_latents(t, 4, 6)), t)


def test_latent_ids_grid_and_kontext_marker():
    ids = latent_ids(8, 8)  # 8x8 latents -> a 4x4 token grid
    expected = torch.tensor([[0.0, k // 4, k % 4] for k in range(16)])
    assert torch.equal(ids, expected)
    ref = latent_ids(8, 8, first=1.0)
    assert torch.equal(ref[:, 0], torch.ones(16))
    assert torch.equal(ref[:, 1:], expected[:, 1:])
    # non-square: rows index the height, columns the width, in the packing's token order
    rect = latent_ids(4, 8)
    assert torch.equal(rect, torch.tensor([[0.0, k // 4, k % 4] for k in range(8)]))


def test_to_tensor_to_pil_range_and_round_trip():
    ims = [Image.new("RGB", (SIZE, SIZE), (0, 255, 51)), *images(1)]
    x = to_tensor(ims, SIZE)
    assert x.shape == (2, 3, SIZE, SIZE)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([-1.0, 1.0, 51 / 127.5 - 1]))
    for a, b in zip(to_pil(x), ims):
        assert np.array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------- images


def test_encode_images_is_shifted_scaled_packed_vae_mean(model):
    model.vae.register_to_config(shift_factor=0.3, scaling_factor=1.7)
    ims = images(2)
    lat = model.encode_images(ims)
    assert lat.shape == (2, 16, 64)
    x = (
        torch.from_numpy(np.stack([np.asarray(im) for im in ims])).permute(0, 3, 1, 2).float()
        / 127.5
        - 1
    )
    with torch.no_grad():
        z = model.vae.encode(x).latent_dist.mean
    assert torch.allclose(lat, hand_pack((z - 0.3) * 1.7), atol=1e-6)
    # decode undoes the normalisation and unpacking before the VAE decoder
    out = model.decode(lat)
    assert len(out) == 2 and all(im.size == (SIZE, SIZE) and im.mode == "RGB" for im in out)
    with torch.no_grad():
        dec = model.vae.decode(z).sample
    for a, b in zip(out, dec):
        expected = b.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).numpy()
        assert np.abs(np.asarray(a).astype(int) - expected.astype(int)).max() <= 1


def test_noise_shape(model):
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    n = model.noise(3, g1)
    assert n.shape == (3, 16, 64)
    assert torch.equal(n, model.noise(3, g2))


# ---------------------------------------------------------------------- velocity


def test_velocity_with_reference_returns_target_tokens_and_uses_reference(model):
    cond = model.encode_text(TEXTS)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 64, generator=g)
    ref_a, ref_b = torch.randn(2, 16, 64, generator=g), torch.randn(2, 16, 64, generator=g)
    calls = capture_transformer_kwargs(model)
    sigma = torch.tensor([0.8, 0.3])
    with torch.no_grad():
        v_none = model.velocity(x, sigma, cond, None)
        v_a = model.velocity(x, sigma, cond, ref_a)
        v_b = model.velocity(x, sigma, cond, ref_b)
    assert v_none.shape == v_a.shape == x.shape
    # the reference image is live conditioning: it changes the target tokens' velocity
    assert (v_a - v_b).abs().max() > 1e-3
    assert (v_a - v_none).abs().max() > 1e-3

    # what reached the transformer: target tokens then reference tokens, ids with id[0]=1 on the
    # reference half, timestep = sigma (the transformer scales by 1000 itself), zero text ids
    kw = calls[1]
    assert torch.equal(kw["hidden_states"], torch.cat([x, ref_a], 1))
    grid = torch.tensor([[0.0, k // 4, k % 4] for k in range(16)])
    ref_grid = grid.clone()
    ref_grid[:, 0] = 1.0
    assert torch.equal(kw["img_ids"], torch.cat([grid, ref_grid]))
    assert torch.equal(kw["txt_ids"], torch.zeros(cond.embeds.shape[1], 3))
    assert torch.equal(kw["timestep"], sigma)
    assert kw["guidance"] is None  # the tiny transformer has no guidance embedding
    assert torch.equal(calls[0]["img_ids"], grid)

    # the first 16 output tokens of the joint sequence are what velocity returns
    with torch.no_grad():
        full = model.transformer(
            hidden_states=torch.cat([x, ref_a], 1),
            encoder_hidden_states=cond.embeds,
            pooled_projections=cond.pooled,
            timestep=sigma,
            img_ids=torch.cat([grid, ref_grid]),
            txt_ids=torch.zeros(cond.embeds.shape[1], 3),
            return_dict=False,
        )[0]
    assert full.shape == (2, 32, 64)
    assert torch.allclose(v_a, full[:, :16], atol=1e-6)


def test_scalar_sigma_is_broadcast(model):
    cond = model.encode_text(TEXTS)
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(
            model.velocity(x, torch.tensor(0.6), cond, None),
            model.velocity(x, torch.full((2,), 0.6), cond, None),
        )


def test_true_cfg_is_negative_plus_scale_times_difference(model):
    model.true_cfg_scale, model.negative_prompt = 3.5, "blurry"
    cond = model.encode_text(TEXTS)
    assert cond.neg_embeds is not None and cond.neg_pooled is not None
    neg = model._encode_uncached(["blurry", "blurry"])
    assert torch.allclose(cond.neg_embeds, neg[0], atol=1e-6)
    assert torch.allclose(cond.neg_pooled, neg[1], atol=1e-6)
    g = torch.Generator().manual_seed(2)
    x, ref = torch.randn(2, 16, 64, generator=g), torch.randn(2, 16, 64, generator=g)
    sigma = torch.tensor([0.9, 0.5])
    with torch.no_grad():
        guided = model.velocity(x, sigma, cond, ref)
        v_pos = model._forward(x, sigma, cond.embeds, cond.pooled, ref)
        v_neg = model._forward(x, sigma, cond.neg_embeds, cond.neg_pooled, ref)
    expected = v_neg + 3.5 * (v_pos - v_neg)
    assert torch.allclose(guided, expected, atol=1e-5)
    assert (guided - v_pos).abs().max() > 1e-3  # the guidance actually does something


def test_true_cfg_off_runs_one_branch(model):
    cond = model.encode_text(TEXTS)
    assert cond.neg_embeds is None
    calls = capture_transformer_kwargs(model)
    with torch.no_grad():
        model.velocity(torch.zeros(2, 16, 64), torch.tensor(0.5), cond, None)
    assert len(calls) == 1


def test_distilled_guidance_embedding_gets_guidance_scale(model):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model.transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        axes_dims_rope=(8, 12, 12),
        guidance_embeds=True,
    ).eval()
    calls = capture_transformer_kwargs(model)
    cond = model.encode_text(TEXTS)
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.guidance_scale = 3.5
        v1 = model.velocity(x, torch.tensor(0.5), cond, None)
        model.guidance_scale = 1.0
        v2 = model.velocity(x, torch.tensor(0.5), cond, None)
    assert torch.equal(calls[0]["guidance"], torch.tensor([3.5, 3.5]))
    assert (v1 - v2).abs().max() > 1e-4


# ---------------------------------------------------------------------- text cache


def count_calls(module: torch.nn.Module) -> list[int]:
    n = [0]
    module.register_forward_hook(lambda *a: n.__setitem__(0, n[0] + 1))
    return n


def test_text_cache_matches_uncached_and_skips_encoders(model):
    texts = ["two green triangles", "a red circle", "two green triangles"]
    ref = model.encode_text(texts, cache=False)
    t5_calls = count_calls(model.text_encoder_2)
    cached = model.encode_text(texts)
    assert torch.allclose(cached.embeds, ref.embeds, atol=1e-6)
    assert torch.allclose(cached.pooled, ref.pooled, atol=1e-6)
    assert cached.embeds.shape == (3, model.max_text_len, 64) and cached.pooled.shape == (3, 64)
    assert t5_calls[0] == 1
    # a second call, in another order, is served from the cache
    again = model.encode_text(texts[::-1])
    assert t5_calls[0] == 1
    assert torch.equal(again.embeds, cached.embeds.flip(0))
    assert not again.embeds.requires_grad


@pytest.mark.parametrize("which", ["text_encoder", "text_encoder_2"])
def test_text_cache_bypassed_while_an_encoder_trains(model, which):
    model.encode_text(TEXTS)  # fill the cache
    getattr(model, which).requires_grad_(True)
    out = model.encode_text(TEXTS)
    # gradients reach the encoder being trained (CLIP gives the pooled, T5 the sequence)
    trained, other = (
        (out.pooled, out.embeds) if which == "text_encoder" else (out.embeds, out.pooled)
    )
    assert trained.requires_grad and not other.requires_grad
    getattr(model, which).requires_grad_(False)
    getattr(model, which).train()
    t5_calls = count_calls(model.text_encoder_2)
    model.encode_text(TEXTS)
    assert t5_calls[0] == 1  # train mode alone also bypasses the cache


def test_text_cache_not_stale_after_encoders_were_trained(model):
    before = model.encode_text(TEXTS)  # cached with the initial weights
    # a training phase (as pretrain_flow does): unfreeze, step, freeze again
    for m in (model.text_encoder, model.text_encoder_2):
        m.train().requires_grad_(True)
    cond = model.encode_text(TEXTS, cache=False)
    (cond.embeds.square().mean() + cond.pooled.square().mean()).backward()
    with torch.no_grad():
        for m in (model.text_encoder, model.text_encoder_2):
            for p in m.parameters():
                if p.grad is not None:
                    p -= 0.5 * p.grad.sign() * 0.01
    frozen(model)
    after = model.encode_text(TEXTS)
    fresh = model.encode_text(TEXTS, cache=False)
    assert (fresh.embeds - before.embeds).abs().max() > 1e-4  # the weights did change
    assert torch.allclose(after.embeds, fresh.embeds, atol=1e-6)
    assert torch.allclose(after.pooled, fresh.pooled, atol=1e-6)


# ---------------------------------------------------------------------- save / load


def test_save_load_round_trip_gives_identical_velocities(tokenizer, tmp_path):
    model = frozen(build_tiny_flux(tokenizer, SIZE, seed=1))
    model.vae.register_to_config(shift_factor=0.1, scaling_factor=2.0)
    model.save_pretrained(tmp_path / "flux")
    loaded = frozen(FluxModel.from_pretrained(tmp_path / "flux", image_size=SIZE))
    assert loaded.max_text_len == model.max_text_len
    assert loaded.vae.config.shift_factor == 0.1 and loaded.vae.config.scaling_factor == 2.0
    g = torch.Generator().manual_seed(0)
    x, ref = torch.randn(2, 16, 64, generator=g), torch.randn(2, 16, 64, generator=g)
    sigma = torch.tensor([0.7, 0.2])
    with torch.no_grad():
        c1, c2 = model.encode_text(TEXTS), loaded.encode_text(TEXTS)
        assert torch.equal(c1.embeds, c2.embeds) and torch.equal(c1.pooled, c2.pooled)
        assert torch.equal(model.velocity(x, sigma, c1, ref), loaded.velocity(x, sigma, c2, ref))
        assert torch.equal(model.velocity(x, sigma, c1, None), loaded.velocity(x, sigma, c2, None))
    ims = images(1)
    assert torch.equal(model.encode_images(ims), loaded.encode_images(ims))


def test_from_pretrained_kwargs_override_saved_text_length(tokenizer, tmp_path):
    model = build_tiny_flux(tokenizer, SIZE)
    model.save_pretrained(tmp_path / "flux")
    loaded = FluxModel.from_pretrained(
        tmp_path / "flux", image_size=SIZE, max_text_len=8, guidance_scale=2.0
    )
    assert loaded.max_text_len == 8 and loaded.guidance_scale == 2.0
    assert loaded.encode_text(TEXTS).embeds.shape == (2, 8, 64)
