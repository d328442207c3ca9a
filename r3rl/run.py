"""A recipe's loaded run: its policies (weights, frozen KL references, optimisers), rewards,
prompts and the state a training run carries from step to step (RNG, image buffer, EMA); and
the group of processes a run trains in (`process_group`).

`build_run` loads everything a recipe names; training (`r3rl.trainer`), evaluation
(`r3rl.evaluate`), checkpoints (`r3rl.checkpoint`) and inference (`r3rl.inference`) all work
on the `Run` it returns. Nothing here knows the training algorithm.
"""

from __future__ import annotations

import contextlib
import copy
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from r3rl.algos.ema import EMA
from r3rl.config import Config, adamw_kwargs, warn_low_precision_full_finetuning
from r3rl.data import load_prompts
from r3rl.distributed import (
    Topology,
    barrier,
    deepspeed_config,
    deepspeed_engine,
    init_process_group,
    launcher_env,
    topology_from_env,
    zero_stage,
)
from r3rl.errors import UserError
from r3rl.logger import quiet_libraries
from r3rl.models.flux import FluxModel
from r3rl.models.lora import BaseView, add_lora
from r3rl.models.placement import place_flow_model, place_frozen, resolve_device
from r3rl.models.reflector import HFReflector, lora_kwargs
from r3rl.models.registry import load_flow_model
from r3rl.models.vllm_rollout import RolloutError, VLLMRollout, open_rollout
from r3rl.modes.load import refiner_folder, wrap_refiner
from r3rl.reason import Reasoner, reasoner
from r3rl.rewards import CombinedReward
from r3rl.rollout import ImageBuffer, SamplerSettings, TextSettings
from r3rl.sampling import SDEConfig
from r3rl.shapes.world import SHAPES_MODEL, ensure_world

POLICIES = ("reflector", "generator", "refiner")


@dataclass
class Policy:
    """A diffusion policy (the generator or the refiner): the model, how it samples in training
    rollouts, whether it trains, its frozen reference (for KL) and its optimiser."""

    name: str  # "generator" | "refiner"
    model: FluxModel
    settings: SamplerSettings
    trainable: bool
    ref_transformer: torch.nn.Module | None = None
    opt: torch.optim.Optimizer | None = None

    def trained_params(self) -> list[torch.nn.Parameter]:
        """What the optimiser updates (its LoRA adapters or every weight), in a fixed order."""
        return [p for p in self.model.transformer.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Inside, the model runs with its frozen reference transformer (for the KL term)."""
        live, self.model.transformer = self.model.transformer, self.ref_transformer
        try:
            yield
        finally:
            self.model.transformer = live


@dataclass
class Run:
    """The loaded recipe and the state training carries between steps (what a checkpoint saves)."""

    cfg: Config
    reflector: (
        HFReflector | None
    )  # None (with the refiner) in a generator-only run, credit=flow_grpo
    ref_reflector: HFReflector | None
    reflector_opt: torch.optim.Optimizer | None
    generator: Policy
    refiner: Policy | None
    reward: CombinedReward
    train_prompts: list[dict]
    eval_prompts: list[dict]
    text: TextSettings
    rng: random.Random
    buffer: ImageBuffer
    nonfinite_in_row: int = 0
    dist: Topology = field(default_factory=Topology)
    engines: dict = field(default_factory=dict)  # policy name -> DeepSpeed engine (when configured)
    hf_zero3: object = None  # keeps transformers' ZeRO-3 flag alive: generate() then syncs ranks
    # policy name -> EMA of its trained weights (trainer.ema)
    ema: dict[str, EMA] = field(default_factory=dict)
    # reflector.rollout=vllm: the server that samples training reflections (its weights synced)
    rollout: VLLMRollout | None = None
    # rollout.reason: how the reflector plans before the generator draws (r3rl.reason)
    reason: Reasoner | None = None
    # the next step's rollout, begun during this one while its judge scored (r3rl.overlap)
    ahead: Any = None

    @property
    def sampler(self) -> HFReflector | VLLMRollout:
        """Who samples the training rollouts' reflections: the vLLM server or the reflector."""
        return self.rollout if self.rollout is not None else self.reflector

    def close(self) -> None:
        """Stop what the run started outside this process (a launched vLLM rollout server)."""
        if self.rollout is not None:
            self.rollout.close()
        if self.ahead is not None:  # its scoring thread
            self.ahead.close()
            self.ahead = None

    @property
    def diffusion_policies(self) -> list[Policy]:
        """The generator, and the refiner when the run has one."""
        return [p for p in (self.generator, self.refiner) if p is not None]

    def policy(self, name: str) -> Policy:
        """The diffusion policy called `name` ("generator" or "refiner")."""
        return {p.name: p for p in self.diffusion_policies}[name]

    def trained_params(self, name: str) -> list[torch.nn.Parameter]:
        """What policy `name`'s optimiser updates (its LoRA adapters or every weight), in a fixed
        order."""
        if name == "reflector":
            return self.reflector.trainable_parameters()
        return self.policy(name).trained_params()

    def sync_rollout(self, row: dict) -> None:
        """After a reflector optimiser step: its weights onto the vLLM rollout server, verified;
        the sync's version, probe log-prob difference and time join the step's row. A failure
        comes after the update: the error carries the row, and the step counts as done."""
        if row.get("train/skipped_nonfinite"):
            return
        try:
            sync = self.rollout.sync()
        except RolloutError as e:
            e.row = row
            raise
        row |= sync
        row["time/train_s"] += sync["rollout/sync_s"]
        row["time/step_s"] += sync["rollout/sync_s"]

    def reference_logprobs(
        self,
        prompts: list[str],
        images: list[Image.Image],
        completions: list[list[int]],
        temperature: float,
    ) -> torch.Tensor:
        """The reflector's frozen reference log-probs of `completions` (for KL): its full copy, or
        with LoRA its base model (adapters off). Unfiltered: a token outside the reference's own
        top-k would make k3 infinite."""
        kw = {"temperature": temperature, "top_k": 0, "top_p": 1.0, "with_grad": False}
        if self.ref_reflector is not None:
            ref, _, _ = self.ref_reflector.completion_logprobs(prompts, images, completions, **kw)
        else:
            ref, _, _ = self.reflector.completion_logprobs(
                prompts, images, completions, disable_adapter=True, **kw
            )
        return ref


@contextlib.contextmanager
def process_group(cfg: Config) -> Iterator[Topology]:
    """This process's place among the run's processes (from the launcher's environment), inside
    their process group while in the block; a recipe they cannot split is refused before any
    model loads."""
    topo = topology_from_env()
    g = cfg.rollout.group_size
    if g % topo.world:
        raise UserError(
            f"rollout.group_size={g} must be divisible by the number of processes ({topo.world})"
        )
    dc = cfg.distributed
    if dc.deepspeed and not topo.distributed:  # DeepSpeed wants a launcher's setup
        launcher_env()
    joined = init_process_group(topo, dc.backend, dc.timeout_s, force=bool(dc.deepspeed))
    try:
        yield topo
    finally:
        if joined:
            torch.distributed.destroy_process_group()


def build_run(
    cfg: Config,
    *,
    eval_prompts: str | None = None,
    for_training: bool = True,
    topo: Topology | None = None,
) -> Run:
    """Load the policies (every rank loads the same weights) and, with `distributed.deepspeed`
    during training, give each trained policy its own DeepSpeed engine."""
    topo = topo or Topology()
    quiet_libraries()
    if cfg.refiner.mode != "edit" and cfg.rollout.credit == "tree":
        raise UserError(
            f"refiner.mode={cfg.refiner.mode!r} needs rollout.credit='r3'; tree credit refines "
            "in 'edit' mode only"
        )
    if cfg.rollout.credit == "tree" and cfg.rollout.scale_rewards == "batch":
        raise UserError(
            "rollout.scale_rewards=batch is not defined for tree credit (its advantages are "
            "relative to siblings, not groups); use 'group' or 'none'"
        )
    if for_training and cfg.reflector.rollout == "vllm":
        _refuse_vllm_rollout(cfg)
    ds = cfg.distributed.deepspeed
    if (
        for_training
        and cfg.trainer.ema is not None
        and ds
        and zero_stage(json.loads(Path(ds).read_text())) == 3
    ):
        raise UserError(
            "trainer.ema is not supported under ZeRO-3 (each rank holds only a shard of the "
            "weights to average); use launch/deepspeed/zero2.json or trainer.ema=null"
        )
    generator_only = cfg.rollout.credit == "flow_grpo"
    if cfg.rollout.reason and cfg.rollout.credit in ("text", "flow_grpo"):
        raise UserError(
            f"rollout.reason=true needs rollout.credit r3 or tree (credit={cfg.rollout.credit} "
            "loads no reflector to plan with)"
        )
    if generator_only and for_training and not cfg.generator.train:
        raise UserError(
            "rollout.credit=flow_grpo trains the generator alone: set generator.train=true"
        )
    if for_training:
        warn_low_precision_full_finetuning(cfg, ("generator",) if generator_only else POLICIES)
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    names = (
        (cfg.generator.model,)
        if generator_only
        else (cfg.reflector.model, cfg.generator.model, cfg.refiner.model)
    )
    world = _shapes_world(cfg, topo) if SHAPES_MODEL in names else None
    device = resolve_device(cfg.device, topo.local_rank)
    reflector, ref_reflector, opt = (
        (None, None, None) if generator_only else _reflector(cfg, world, for_training, device)
    )
    fg = cfg.flow_grpo
    gen_cfg = cfg.generator.model_copy(update={"train": for_training and cfg.generator.train})
    size = cfg.world.image_size
    generator = _diffusion_policy(
        "generator",
        gen_cfg,
        _model_path(cfg.generator.model, world, "flux"),
        size,
        fg,
        max_index=None,
        device=device,
    )
    refiner = None
    if not generator_only:
        ref_cfg = cfg.refiner.model_copy(update={"train": for_training and cfg.refiner.train})
        ref_path = refiner_folder(
            cfg.refiner, _model_path(cfg.refiner.model, world, "flux"), world, size, cfg.seed
        )
        refiner = _diffusion_policy(
            "refiner", ref_cfg, ref_path, size, fg, max_index=fg.refine_max_index, device=device
        )
        refiner.model = wrap_refiner(
            refiner.model, cfg.refiner, ref_path
        )  # refiner.mode: edit | regenerate | region
    rc = cfg.reflector
    fields = (cfg.data.prompt_field, cfg.data.tag_field)
    run = Run(
        cfg=cfg,
        reflector=reflector,
        ref_reflector=ref_reflector,
        reflector_opt=opt,
        generator=generator,
        refiner=refiner,
        reward=CombinedReward(cfg.rewards),
        train_prompts=_prompts(cfg.data.train_prompts, "train", None, *fields),
        eval_prompts=_prompts(
            eval_prompts or cfg.data.eval_prompts, "eval", cfg.data.num_eval_prompts, *fields
        ),
        text=TextSettings(rc.temperature, rc.top_k, rc.top_p, rc.max_new_tokens),
        rng=random.Random(cfg.seed),
        buffer=ImageBuffer(cfg.rollout.buffer_size),
        dist=topo,
        reason=reasoner(cfg),
    )
    if for_training and cfg.distributed.deepspeed:
        _attach_engines(run)
    if (
        cfg.trainer.ema is not None
    ):  # from the weights training starts at (a resume then loads its own)
        e = cfg.trainer.ema
        trained = ["reflector"] if opt is not None else []
        trained += [p.name for p in run.diffusion_policies if p.trainable]
        run.ema = {
            name: EMA(run.trained_params(name), decay=e.decay, every=e.every) for name in trained
        }
    if for_training and rc.rollout == "vllm":  # last: nothing after it can fail and leave it up
        path = _model_path(rc.model, world, "reflector")
        run.rollout = open_rollout(rc.vllm, reflector, path, cfg.output_dir, topo)
        try:
            run.rollout.sync()  # the server holds the trainer's weights, checked, before step 1
        except BaseException:
            run.close()
            raise
    return run


def _refuse_vllm_rollout(cfg: Config) -> None:
    """What `reflector.rollout=vllm` does not support yet, refused before any model loads."""
    why = None
    if cfg.rollout.credit in ("text", "flow_grpo"):
        why = f"rollout.credit={cfg.rollout.credit} (it samples no reflections through R3's loop)"
    elif cfg.distributed.deepspeed:
        why = (
            "distributed.deepspeed (ZeRO shards the weights: the sync saves and probes the "
            "module rank 0 holds); several plain processes share the server"
        )
    if why is not None:
        raise UserError(
            f"reflector.rollout=vllm is not supported with {why}; use reflector.rollout=hf"
        )


def _shapes_world(cfg: Config, topo: Topology) -> Path:
    """The cached shapes world; rank 0 pretrains it while the others wait, then each node's
    first rank (a node-local cache) and then everyone else find it."""
    for turn in (topo.is_main, topo.local_rank == 0 and not topo.is_main, topo.local_rank != 0):
        if turn:
            root = ensure_world(cfg.world, cfg.seed).root
        barrier(topo)
    return root


def _attach_engines(run: Run) -> None:
    """One DeepSpeed engine per trained policy (each its own config copy, learning rate and AdamW
    settings); at ZeRO-3, transformers' flag makes `generate` step every rank until all are done."""
    cfg, tc = run.cfg, run.cfg.trainer
    configs = []
    policies = [
        (
            "reflector",
            run.reflector and run.reflector.model,
            cfg.reflector,
            run.reflector_opt is not None,
        )
    ]
    policies += [
        (p.name, p.model.transformer, getattr(cfg, p.name), p.trainable)
        for p in run.diffusion_policies
    ]
    for name, module, section, trained in policies:
        if not trained:
            continue
        ds = deepspeed_config(
            cfg.distributed.deepspeed,
            adamw=adamw_kwargs(section),
            world=run.dist.world,
            grad_accum=tc.grad_accum,
            max_grad_norm=tc.max_grad_norm,
        )
        run.engines[name] = deepspeed_engine(module, ds)
        configs.append(ds)
    if run.reflector_opt is not None:
        run.reflector_opt = run.engines["reflector"].optimizer
    for pol in run.diffusion_policies:
        if pol.name in run.engines:
            pol.opt = run.engines[pol.name].optimizer
    zero3 = [c for c in configs if zero_stage(c) == 3]
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        run.hf_zero3 = HfDeepSpeedConfig(zero3[0])


# --------------------------------------------------------------------------- loading helpers


def _model_path(name: str, world_dir: Path | None, sub: str) -> Path:
    if name == SHAPES_MODEL:
        return world_dir / sub
    path = Path(name)
    if not path.exists():
        raise UserError(
            f"model path not found: {name!r} (expected '{SHAPES_MODEL}' or a local directory)"
        )
    return path


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    ref = copy.deepcopy(module).eval()
    ref.requires_grad_(False)
    return ref


def _diffusion_policy(
    name: str, cfg_section, path: Path, image_size: int, fg, *, max_index, device: torch.device
) -> Policy:
    """Load on the CPU (a full-copy KL reference is made there), then place on `device`."""
    model = load_flow_model(
        path,
        family=cfg_section.family,
        image_size=image_size,
        dtype=cfg_section.dtype,
        max_text_len=cfg_section.max_text_len,
        guidance_scale=cfg_section.guidance_scale,
        true_cfg_scale=cfg_section.cfg_scale,
    )
    for m in model.encoders:
        m.eval().requires_grad_(False)
    model.transformer.requires_grad_(cfg_section.train)
    lora = cfg_section.train and cfg_section.lora is not None
    if lora:
        add_lora(model.transformer, **cfg_section.lora.model_dump())
    if fg.sde_type == "cps":  # CPS has zero noise on the step that ends at sigma=0: never train it
        max_index = min(max_index or cfg_section.num_steps, cfg_section.num_steps - 1)
    settings = SamplerSettings(
        num_steps=cfg_section.num_steps,
        sde=SDEConfig(
            noise_level=cfg_section.noise_level,
            sde_type=fg.sde_type,
            logprob_reduction=fg.logprob_reduction,
        ),
        strategy=fg.timesteps,
        num_train_timesteps=fg.num_train_timesteps,
        window_size=fg.window_size,
        max_index=max_index,
    )
    policy = Policy(name, model, settings, cfg_section.train)
    if cfg_section.train:
        params = [p for p in model.transformer.parameters() if p.requires_grad]
        policy.opt = torch.optim.AdamW(params, **adamw_kwargs(cfg_section))
        if fg.beta > 0:
            policy.ref_transformer = (
                BaseView(model.transformer) if lora else _frozen(model.transformer)
            )
    place_flow_model(model, device, offload_frozen=cfg_section.offload)
    if policy.ref_transformer is not None and not lora:
        place_frozen(policy.ref_transformer, device, offload_it=cfg_section.offload)
    return policy


def _prompts(
    path: str | None,
    split: str,
    n: int | None,
    prompt_field: str = "prompt",
    tag_field: str = "tag",
) -> list[dict]:
    if path is not None:
        records = load_prompts(path, prompt_field, tag_field)
    else:
        from r3rl.shapes.prompts import split_prompts

        train, evals = split_prompts()
        records = train if split == "train" else evals
    return records[:n] if n else records


def _reflector(cfg: Config, world: Path | None, for_training: bool, device: torch.device):
    """The reflector, its frozen KL reference (full fine-tuning with beta > 0, copied on the CPU
    before the policy moves to `device`) and its optimiser."""
    rc = cfg.reflector
    reflector = HFReflector.from_pretrained(
        _model_path(rc.model, world, "reflector"),
        trust_remote_code=rc.trust_remote_code,
        lora=lora_kwargs(**rc.lora.model_dump()) if rc.lora else None,
        gradient_checkpointing=rc.gradient_checkpointing,
        dtype=rc.dtype,
    )
    if not (for_training and rc.train):
        reflector.model.requires_grad_(False).to(device)
        return reflector, None, None
    ref = reflector.frozen_copy() if rc.beta > 0 and rc.lora is None else None
    reflector.model.to(device)  # before the optimiser, whose state then lives on `device`
    if ref is not None:
        place_frozen(ref.model, device, offload_it=rc.offload)
    opt = torch.optim.AdamW(reflector.trainable_parameters(), **adamw_kwargs(rc))
    return reflector, ref, opt
