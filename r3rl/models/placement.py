"""Where models live: the run's device, and CPU offloading of the modules RL never trains.

A 7B reflector and a 12B refiner in bf16 fill most of an 80 GB GPU before activations and
optimiser state; their frozen parts (text encoders, VAE, a full-copy KL reference) are only
read. `offload` keeps such a module's weights in host memory and copies each layer to the GPU
just for its own forward (accelerate's sequential CPU offload, as diffusers'
`enable_sequential_cpu_offload`), so it costs one layer of GPU memory and a host-to-device copy
per use instead of the whole module.
"""

from __future__ import annotations

import torch

from r3rl.errors import UserError
from r3rl.models.base import FlowModel


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`config.device` as a torch device: 'auto' is this rank's GPU when CUDA is available."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(
            f"device={name!r} but torch sees no CUDA GPU (torch {torch.__version__}); "
            "use device=auto or device=cpu"
        )
    return torch.device("cuda", local_rank)


def offload(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Keep `module`'s weights on the CPU; each layer runs on `device` with its weights copied in
    for that forward only. The module's own parameters become `meta` placeholders, so code must
    ask `execution_device` where it runs."""
    from accelerate import cpu_offload

    module.to("cpu")
    return cpu_offload(module, execution_device=device)


def onload(module: torch.nn.Module) -> None:
    """Undo `offload`: the module owns its weights again (in host memory), e.g. to be saved."""
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(module, recurse=True)


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where `module` computes: its layers' offload-hook device, else the device of its
    parameters."""
    if not hasattr(module, "_hf_hook"):  # not offloaded (`offload` hooks the module itself too)
        return next(module.parameters()).device
    for sub in module.modules():
        device = getattr(getattr(sub, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device)
    return next(module.parameters()).device


def place_frozen(module: torch.nn.Module, device: torch.device, *, offload_it: bool) -> None:
    """A frozen module (e.g. a full-copy KL reference) goes to `device`, or is offloaded."""
    if offload_it:
        offload(module, device)
    else:
        module.to(device)


def place_flow_model(model: FlowModel, device: torch.device, *, offload_frozen: bool) -> None:
    """Move a diffusion model to `device`; with `offload_frozen` its encoders (text encoders,
    VAE) stay in host memory and run layer by layer on `device`."""
    model.transformer.to(device)
    for module in model.encoders:
        place_frozen(module, device, offload_it=offload_frozen)
