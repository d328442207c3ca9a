import pytest
import torch

from r3rl.shapes.critique import corpus
from r3rl.shapes.tiny_diffusion import build_tiny_flux
from r3rl.shapes.tiny_reflector import build_tiny_reflector


def test_clip_reads_at_most_its_own_positions_while_t5_reads_max_text_len():
    """FLUX's CLIP has 77 positions while T5 reads `max_text_len` (512 for a checkpoint): CLIP is
    cut at its own length, as FluxPipeline does, instead of indexing past its position table."""
    tokenizer = build_tiny_reflector(corpus(), 32).tokenizer
    flux = build_tiny_flux(tokenizer, 32)
    clip_positions = flux.text_encoder.config.max_position_embeddings
    flux.max_text_len = clip_positions + 36
    text = "a photo of a red square left of a blue circle " * 12
    cond = flux.encode_text([text, "a photo of a square"])
    assert cond.embeds.shape[:2] == (2, clip_positions + 36)  # T5: the whole budget
    ids = tokenizer([text], truncation=True, max_length=clip_positions, padding="max_length",
                    return_tensors="pt").input_ids
    expected = flux.text_encoder(input_ids=ids).pooler_output
    torch.testing.assert_close(cond.pooled[:1], expected)
