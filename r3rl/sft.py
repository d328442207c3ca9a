"""`r3rl sft`: supervised flow matching of the refiner on (input, instruction, target[, mask])
pairs.

The loss is rectified-flow matching (x_t = (1-s) x0 + s eps, target v = eps - x0) in the
refiner's own mode: `edit` conditions on the input's latents, `regenerate` on its projected
semantic tokens (the projection trains too), `region` trains on the focused crops that
region mode refines. A refiner whose text encoder reads the input (Qwen-Image-Edit) gets the
instruction encoded with the input, exactly as in rollouts. With a mask, RefineAnything's
boundary-consistency term up-weights the tokens in a narrow band around the mask edge, where a
pasted region must blend in.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from r3rl.algos.flow_matching import Example, fit
from r3rl.errors import UserError
from r3rl.models.base import FlowModel, encode_condition
from r3rl.models.placement import onload, place_flow_model, resolve_device
from r3rl.modes.region import box_mask, crop, crop_window, split_box
from r3rl.modes.region_refiner import RegionRefiner, record_box

# --------------------------------------------------------------------------- data


def _open(base: Path, value: str, where: str) -> Image.Image:
    path = Path(value) if Path(value).is_absolute() else base / value
    if not path.exists():
        raise UserError(f"{where}: image not found: {path}")
    return Image.open(path).convert("RGB")


def load_pairs(path: str | Path) -> list[tuple[dict, Example]]:
    """JSONL lines `{"instruction", "target", "input"?, "mask"?, "prompt"?, "region"?}`; image paths
    are relative to the file. `region` ([x0, y0, x1, y1] in fractions) stands for a box mask."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"refiner.sft.data: file not found: {path}")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        if (
            not isinstance(rec, dict)
            or not isinstance(rec.get("instruction"), str)
            or "target" not in rec
        ):
            raise UserError(
                f"{where}: expected an object with 'instruction' (text) and 'target' (image path)"
            )
        target = _open(path.parent, rec["target"], where)
        mask = None
        if "mask" in rec:
            mask = (
                np.asarray(_open(path.parent, rec["mask"], where).convert("L").resize(target.size))
                > 127
            )
        elif rec.get("region"):
            mask = box_mask(record_box(rec), *target.size)
        inp = _open(path.parent, rec["input"], where) if "input" in rec else None
        out.append((rec, Example(rec["instruction"], inp, target, mask)))
    if not out:
        raise UserError(f"{path}: no pairs")
    return out


def focus(model: RegionRefiner, example: Example) -> Example:
    """A region-mode pair as the refiner sees it: input, target and mask cropped to the focus
    window and upsampled to the working resolution (no region: the whole canvas)."""
    text, box = split_box(example.text)
    mask = (
        example.mask
        if example.mask is not None
        else (box_mask(box, *example.target.size) if box else None)
    )
    if mask is None or not mask.any():
        return Example(text, example.input, example.target, None)
    window = crop_window(mask, model.settings.margin)
    size = model.inner.image_size
    left, top, right, bottom = window
    cropped = np.asarray(
        Image.fromarray(mask[top:bottom, left:right]).resize((size, size), Image.NEAREST)
    )
    return Example(
        text, crop(example.input, window, size), crop(example.target, window, size), cropped
    )


# --------------------------------------------------------------------------- the command


def _load(cfg, image_size: int):
    """(the recipe's refiner seen through its mode, the parameters SFT trains)."""
    from r3rl.models.registry import load_flow_model
    from r3rl.modes.load import refiner_folder, wrap_refiner
    from r3rl.modes.regenerate import (
        PROJECTION_DIR,
        RegenerateRefiner,
        SemanticProjection,
        VLMSemanticEncoder,
    )
    from r3rl.shapes.world import SHAPES_MODEL, ensure_world

    rc = cfg.refiner
    world = ensure_world(cfg.world, cfg.seed).root if rc.model == SHAPES_MODEL else None
    base = world / "flux" if world is not None else Path(rc.model)
    if not base.exists():
        raise UserError(
            f"refiner.model={rc.model!r}: no such directory (expected '{SHAPES_MODEL}' or a "
            "local folder)"
        )
    folder = refiner_folder(rc, base, world, image_size, cfg.seed)
    inner = load_flow_model(
        folder,
        family=rc.family,
        image_size=image_size,
        dtype=rc.dtype,
        max_text_len=rc.max_text_len,
    )
    for m in inner.encoders:
        m.eval().requires_grad_(False)
    place_flow_model(inner, resolve_device(cfg.device), offload_frozen=rc.offload)
    params = list(inner.transformer.parameters())
    reads_images = hasattr(
        inner, "encode_edit"
    )  # Qwen-Image-Edit: its own text encoder is the semantic one
    if rc.mode == "regenerate" and not reads_images and not (folder / PROJECTION_DIR).exists():
        if rc.regenerate.semantic_encoder is None:
            raise UserError(
                "refiner.regenerate.semantic_encoder: set a VLM folder to start a regenerate "
                "refiner from "
                f"{folder} (it has no {PROJECTION_DIR}/ yet)"
            )
        encoder = VLMSemanticEncoder.from_pretrained(rc.regenerate.semantic_encoder)
        projection = SemanticProjection(encoder.dim, inner.transformer.config.joint_attention_dim)
        model = RegenerateRefiner(
            inner, encoder, projection, append_critique=rc.regenerate.append_critique
        )
        model.place_semantic(offload_encoder=rc.offload)
    else:
        model = wrap_refiner(inner, rc, folder)
    if isinstance(model, RegenerateRefiner) and model.projection is not None:
        params += list(model.projection.parameters())
    return model, params


def mode_examples(
    model, pairs: list[tuple[dict, Example]], source: str
) -> tuple[FlowModel, list[Example]]:
    """(the model the loss runs on, the pairs as the refiner's mode sees them): texts composed by
    the mode, and for region mode the focused crops it refines, learnt by the wrapped refiner."""
    from r3rl.modes.regenerate import RegenerateRefiner

    compose = getattr(model, "compose", None)
    examples = []
    for rec, ex in pairs:
        if isinstance(model, RegenerateRefiner) and "prompt" not in rec:
            raise UserError(
                f"{source}: regenerate-mode pairs need a 'prompt' (the target description)"
            )
        text = compose(rec, ex.text) if compose is not None else ex.text
        examples.append(Example(text, ex.input, ex.target, ex.mask))
    if isinstance(model, RegionRefiner):
        return model.inner, [focus(model, e) for e in examples]
    return model, examples


def _frozen_modules(model) -> list[torch.nn.Module]:
    """The refiner's encoders, and the regenerate mode's semantic VLM when it has one."""
    inner = getattr(model, "inner", model)
    encoder = getattr(model, "encoder", None)
    return [*inner.encoders, *([encoder.model] if encoder is not None else [])]


def run_sft(cfg) -> Path:
    """`r3rl sft RECIPE`: fine-tune the recipe's refiner on `refiner.sft.data`; returns the folder
    written (`output_dir/sft/refiner`, loadable as `refiner.model`)."""
    import os
    import shutil

    from r3rl.modes.regenerate import RegenerateRefiner

    sc = cfg.refiner.sft
    if sc.data is None:
        raise UserError(
            "refiner.sft.data is not set; expected a JSONL file of {instruction, target, input?, "
            "mask?} pairs"
        )
    pairs = load_pairs(sc.data)  # a bad line fails before any model is loaded
    torch.manual_seed(cfg.seed)
    model, params = _load(cfg, cfg.world.image_size)
    trained, examples = mode_examples(model, pairs, sc.data)
    encode = partial(encode_condition, trained, cache=False)  # as rollouts condition it
    losses = fit(
        trained,
        examples,
        params,
        encode=encode,
        steps=sc.steps,
        batch_size=sc.batch_size,
        lr=sc.lr,
        boundary_weight=sc.boundary_weight,
        band_px=sc.boundary_band_px,
        cond_dropout=sc.cond_dropout,
        seed=cfg.seed,
    )
    out = Path(cfg.output_dir) / "sft" / "refiner"
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    saved = model if isinstance(model, RegenerateRefiner) else getattr(model, "inner", model)
    for module in _frozen_modules(model):
        onload(module)  # offloaded weights live in their hooks: give them back before saving
    saved.save_pretrained(tmp)
    (tmp / "sft.json").write_text(
        json.dumps(
            {
                "pairs": len(examples),
                "steps": sc.steps,
                "first_loss": losses[0],
                "last_loss": sum(losses[-10:]) / len(losses[-10:]),
            }
        )
    )
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
