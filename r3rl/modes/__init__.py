"""Refinement modes (design.md §1): how the refine step turns an image and a reflection into a
new image. `edit` is the refiner itself; `regenerate` and `region` wrap it as FlowModels, so
the rollout, FlowGRPO and the trainer run every mode unchanged. `r3rl.modes.load` loads the
refiner a recipe's `refiner.mode` names.
"""

from __future__ import annotations

from r3rl.modes.region import Box, split_box
from r3rl.modes.region_refiner import record_box


def refiner_texts(refiner, metas: list[dict], instructions: list[str]) -> list[str]:
    """What the refiner is conditioned on: the instruction (edit), or what its mode composes from
    the prompt record and the instruction (a mode wrapper's `compose`)."""
    compose = getattr(refiner, "compose", None)
    if compose is None:
        return list(instructions)
    return [compose(m, i) for m, i in zip(metas, instructions, strict=True)]


def regions(texts: list[str], metas: list[dict]) -> list[Box | None]:
    """The region each refinement applies to: the box in its conditioning text, else the
    record's."""
    return [split_box(t)[1] or record_box(m) for t, m in zip(texts, metas, strict=True)]
