"""LoRA on a diffusion transformer's attention projections, through diffusers' own peft integration.

Why diffusers' `add_adapter` and the pipelines' `save_lora_weights` rather than a peft wrapper:
the saved file is then exactly what `Pipeline.load_lora_weights(dir)` reads, so a refiner or
generator trained here drops into any diffusers pipeline. The frozen KL reference is the same
transformer with the adapter switched off: no second copy of the weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

# attention projections of the image stream and the families' added (text-stream) projections
DEFAULT_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)
WEIGHTS = "pytorch_lora_weights.safetensors"  # the file name load_lora_weights looks for


def add_lora(
    transformer: torch.nn.Module,
    *,
    r: int,
    alpha: int,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
) -> None:
    """Add a trainable LoRA adapter and freeze everything else.

    Default targets are those of `DEFAULT_TARGETS` this transformer has (FLUX single blocks
    have no `to_out`, SD3's last block no added projections); `init_lora_weights="gaussian"`
    keeps B = 0, so the adapted model starts equal to the base. The adapter weights are float32
    whatever the base's dtype (peft does the same for the reflector's): in bfloat16 an AdamW step
    of 1e-4 is below half the spacing of weights around 0.1 and would be rounded away.
    """
    names = {
        n.rsplit(".", 1)[-1] if not n.endswith("to_out.0") else "to_out.0"
        for n, _ in transformer.named_modules()
    }
    targets = target_modules or [t for t in DEFAULT_TARGETS if t in names]
    transformer.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=targets,
            init_lora_weights="gaussian",
        )
    )
    cast_training_params(transformer, dtype=torch.float32)


def has_lora(transformer: torch.nn.Module) -> bool:
    return bool(getattr(transformer, "_hf_peft_config_loaded", False))


@contextmanager
def adapter_disabled(transformer: torch.nn.Module) -> Iterator[None]:
    """The base model (the KL reference of a LoRA run) for the duration of the block."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def save_lora(transformer: torch.nn.Module, pipeline_cls: type, path: str | Path) -> None:
    """Write the adapter in the family pipeline's LoRA format
    (`pytorch_lora_weights.safetensors`)."""
    # the metadata carries lora_alpha: without it loaders assume alpha = r and rescale the adapter
    pipeline_cls.save_lora_weights(
        Path(path),
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        safe_serialization=True,
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
    )


def load_lora(transformer: torch.nn.Module, path: str | Path, *, trainable: bool = False) -> None:
    """Load a LoRA saved by `save_lora` (or any diffusers-format LoRA of the family) into
    `transformer`."""
    transformer.load_lora_adapter(
        Path(path), weight_name=WEIGHTS, prefix="transformer", adapter_name="default"
    )
    for name, p in transformer.named_parameters():
        p.requires_grad_(trainable and "lora_" in name)


class BaseView(torch.nn.Module):
    """A LoRA transformer seen with its adapter switched off: the frozen KL reference at no memory
    cost, usable wherever a separate reference transformer would be (same call, config, dtype)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.inner = transformer

    @property
    def config(self):
        return self.inner.config

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    def forward(self, *args, **kwargs):
        with adapter_disabled(self.inner):
            return self.inner(*args, **kwargs)
