"""The refiner of a recipe's `refiner.mode`: its weights folder and the wrapper it runs through."""

from __future__ import annotations

from pathlib import Path

from r3rl.config import RefinerConfig
from r3rl.modes.region_refiner import RegionRefiner, RegionSettings


def refiner_folder(
    rc: RefinerConfig, folder: Path, world_root: Path | None, image_size: int, seed: int
) -> Path:
    """The refiner's weights: its own folder, or for the shapes world in regenerate mode the
    cached regenerate stage trained on top of the world."""
    if (
        rc.mode == "regenerate"
        and world_root is not None
        and Path(folder).is_relative_to(world_root)
    ):
        from r3rl.modes.shapes_regenerate import ensure_regenerate_stage

        return ensure_regenerate_stage(world_root, rc.regenerate, image_size, seed)
    return folder


def wrap_refiner(model, rc: RefinerConfig, folder: Path):
    """The loaded FLUX.1-Kontext or Qwen-Image-Edit refiner seen through the recipe's
    `refiner.mode`."""
    if rc.mode == "region":
        r = rc.region
        box = tuple(r.box) if r.box else None
        return RegionRefiner(model, RegionSettings(box, r.margin, r.dilate_px, r.blur_sigma))
    if rc.mode == "regenerate":
        from r3rl.modes.regenerate import RegenerateRefiner

        refiner = RegenerateRefiner.around(
            model,
            folder,
            encoder=rc.regenerate.semantic_encoder,
            append_critique=rc.regenerate.append_critique,
        )
        refiner.place_semantic(offload_encoder=rc.offload)
        return refiner
    return model
