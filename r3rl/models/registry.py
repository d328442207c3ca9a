"""Which FlowModel adapter a local diffusers checkpoint needs, read from the checkpoint itself.

The family is the transformer's class (`transformer/config.json` `_class_name`), which every
diffusers checkpoint records; `model_index.json` is not required (the shapes world has none),
except to tell Qwen-Image-Edit from Qwen-Image, whose transformers share one class.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from r3rl.errors import UserError
from r3rl.models.flux import FluxModel
from r3rl.models.qwen_image import EDIT_PIPELINES, QwenImageEditModel, QwenImageModel
from r3rl.models.sd3 import SD3Model

FAMILIES: dict[str, type] = {
    "flux": FluxModel,
    "sd3": SD3Model,
    "qwen_image": QwenImageModel,
    "qwen_image_edit": QwenImageEditModel,
}
_BY_TRANSFORMER = {
    "FluxTransformer2DModel": "flux",
    "SD3Transformer2DModel": "sd3",
    "QwenImageTransformer2DModel": "qwen_image",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def detect_family(path: str | Path) -> str:
    """'flux' | 'sd3' | 'qwen_image' | 'qwen_image_edit' for a diffusers folder; a UserError names
    what was found instead."""
    config = Path(path) / "transformer" / "config.json"
    if not config.exists():
        raise UserError(f"{path}: not a diffusers checkpoint (no transformer/config.json)")
    name = json.loads(config.read_text()).get("_class_name", "")
    if name not in _BY_TRANSFORMER:
        raise UserError(
            f"{path}: transformer class {name!r} is not supported "
            f"(expected one of {', '.join(sorted(_BY_TRANSFORMER))})"
        )
    family = _BY_TRANSFORMER[name]
    index = Path(path) / "model_index.json"
    if (
        family == "qwen_image"
        and index.exists()
        and json.loads(index.read_text()).get("_class_name") in EDIT_PIPELINES
    ):
        return "qwen_image_edit"
    return family


def load_flow_model(
    path: str | Path,
    *,
    family: str = "auto",
    image_size: int,
    dtype: str = "float32",
    max_text_len: int | None = None,
    **settings,
):
    """The family's adapter loaded from `path`; `settings` are its sampling options (CFG, guidance);
    `max_text_len` None keeps the checkpoint's or the family's text length."""
    if max_text_len is not None:
        settings["max_text_len"] = max_text_len
    found = detect_family(path)
    if family != "auto" and family != found:
        raise UserError(
            f"{path}: family={family!r} but the checkpoint's transformer is a {found!r} model"
        )
    return FAMILIES[found].from_pretrained(
        path, image_size=image_size, dtype=DTYPES[dtype], **settings
    )
