"""A rollout batch's loss: GRPO on its text terms (reflections, plans), FlowGRPO on its image
terms, each weighted by this rank's share so that the ranks' mean gradient is the one-process
gradient. `r3rl.update` backpropagates and steps what `batch_loss` returns.

The loss's forwards (the policies' log-probs with grad, the frozen references') read the rollout
and never its rewards, so the trainer may make them while a slow judge scores the rollout
(`image_forwards`, `text_forwards`, stored on the terms); `batch_loss` makes the ones a term
does not carry. Image forwards made early cover every row of the rollout and the loss takes the
valid ones: the same numbers as forwards on the valid rows when every row is scored (with
unscored rows, up to the float rounding of a larger batch).
"""

from __future__ import annotations

import math

import torch
from PIL import Image

from r3rl.algos.flow_grpo import flow_grpo_loss
from r3rl.algos.grpo import grpo_loss
from r3rl.batch import Batch, ImageForwards, ImageTerm, TextForwards, TextTerm
from r3rl.models.reflector import Reflection
from r3rl.models.vllm_rollout import behaviour_logprobs
from r3rl.rollout import DiffusionRollout
from r3rl.run import Policy, Run
from r3rl.sampling import Trajectory, transition_logprob
from r3rl.update import Loss


def batch_loss(run: Run, batch: Batch) -> Loss:
    """Weighted GRPO + FlowGRPO loss of one rollout batch, the optimisers it touches and each
    policy's part of the loss (one DeepSpeed engine backpropagates each part)."""
    tc = run.cfg.trainer
    loss = Loss(torch.zeros(()), {}, {}, {})
    if run.reflector_opt is not None and batch.text_terms:
        l_text = torch.zeros(())
        for plans in (False, True):  # reflections, then plans (rollout.reason): apart
            terms = [t for t in batch.text_terms if (t.images is None) == plans]
            if terms:
                part, m = _text_loss(run, terms)
                l_text = l_text + part
                loss.metrics.update(m)
        loss.parts["reflector"] = tc.text_loss_weight * l_text
        loss.value = loss.value + loss.parts["reflector"]
        loss.optimizers["reflector"] = (run.reflector_opt, run.trained_params("reflector"))
    terms = [t for t in batch.image_terms if t.policy.trainable and t.policy.opt is not None]
    if terms:
        l_img, m, by_policy = _image_loss(run, terms)
        loss.value = loss.value + tc.image_loss_weight * l_img
        loss.metrics.update(m)
        for p in run.diffusion_policies:
            if p.name in by_policy:
                loss.parts[p.name] = tc.image_loss_weight * by_policy[p.name]
                loss.optimizers[p.name] = (p.opt, p.trained_params())
    return loss


def text_forwards(
    run: Run, prompts: list[str], images: list[Image.Image] | None, reflections: list[Reflection]
) -> TextForwards | None:
    """GRPO's forwards of the reflections (or plans: `images` None) that have tokens: the
    reflector's log-probs with grad and, with KL, the frozen reference's. None when none has
    tokens. They do not read the rewards: the trainer makes them while the judge scores."""
    keep = [i for i, r in enumerate(reflections) if r.token_ids]
    if not keep:
        return None
    text = run.text
    prompts = [prompts[i] for i in keep]
    images = None if images is None else [images[i] for i in keep]
    comp = [reflections[i].token_ids for i in keep]
    kw = {"temperature": text.temperature, "top_k": text.top_k, "top_p": text.top_p}
    # the ratio reads the sampled (filtered) distribution, the KL its unfiltered log-softmax
    logps, mask, entropy, kl_logps = run.reflector.completion_logprobs(
        prompts, images, comp, **kw, with_unfiltered=True
    )
    ref = None
    if run.cfg.reflector.beta > 0:
        ref = run.reference_logprobs(prompts, images, comp, text.temperature)
    return TextForwards(keep, logps, mask, entropy, kl_logps, ref)


def _text_loss(run: Run, terms: list[TextTerm]) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO on the reflections of the text terms, weighted by this rank's share of them; plan
    terms (`images` None) log as `loss/grpo_reason` and `reason/*`."""
    rc = run.cfg.reflector
    adv = torch.cat([t.adv for t in terms])
    valid = torch.cat([t.valid for t in terms])
    reflections = [r for t in terms for r in t.reflections]
    if len(terms) == 1 and terms[0].forwards is not None:  # made while the judge scored
        fwd = terms[0].forwards
    else:
        prompts = [p for t in terms for p in t.prompts]
        images = None if terms[0].images is None else [im for t in terms for im in t.images]
        fwd = text_forwards(run, prompts, images, reflections)
    if fwd is None:
        return torch.zeros(()), {}
    keep, images = fwd.keep, terms[0].images
    refl = [reflections[i] for i in keep]
    adv, valid = adv[keep], valid[keep]
    logps, entropy, kl_logps, ref = fwd.logps, fwd.entropy, fwd.kl_logps, fwd.ref
    mask = fwd.mask & valid[:, None].to(fwd.mask.device)  # rewards and advantages live on the CPU
    vllm = run.rollout is not None and images is not None  # plans: the reflector sampled them
    old, mask, is_weights, is_metrics = behaviour_logprobs(
        refl, logps, mask, from_vllm=vllm, cap=rc.vllm.is_cap
    )
    budget = rc.max_new_tokens if images is not None else run.reason.max_new_tokens  # dr_grpo
    loss, m = grpo_loss(
        logps,
        old,
        torch.nan_to_num(adv).to(logps.device),
        mask,
        ref_logps=ref,
        kl_logps=kl_logps,
        epsilon_low=rc.epsilon_low,
        epsilon_high=rc.epsilon_high,
        beta=rc.beta,
        loss_type=rc.loss_type,
        max_completion_length=budget,
        is_weights=is_weights,
    )
    # this rank's share of the rows (grpo, dr_grpo: their normalisers count rows) or, for dapo, of
    # the valid tokens on all ranks, so the ranks' mean loss and gradient are the one-process ones
    totals, tokens = [t.total for t in terms], [t.tokens for t in terms]
    share = 1.0 if None in totals else len(keep) * run.dist.world / sum(totals)
    loss_share = share
    if rc.loss_type == "dapo" and None not in tokens:
        loss_share = float(mask.sum()) * run.dist.world / max(1, sum(tokens))
    loss = loss * loss_share
    # completion_length weighted alike averages to the group's; mean_metrics weighs token means by
    # it
    out = {
        "loss/grpo": loss.item(),
        "entropy": entropy.detach()[mask].mean().item() if mask.any() else math.nan,
        "completion_length": float(mask.sum(1).float().mean()) * share,
        "clip_ratio": m.get("clip_ratio/region_mean", math.nan),
    }
    if "kl" in m:
        out["kl/text"] = m["kl"]
    if images is None:  # plans: loss/grpo_reason, reason/entropy, reason/completion_length, ...
        out = {
            "loss/grpo_reason" if k == "loss/grpo" else "reason/" + k.replace("/", "_"): v
            for k, v in out.items()
        }
    return loss, out | is_metrics


def image_forwards(
    run: Run, policy: Policy, rollout: DiffusionRollout, rows: torch.Tensor | None = None
) -> ImageForwards:
    """FlowGRPO's forwards of `rows` (default: all) of a rollout at each trained step: the
    policy's (log-prob, mean, std) with grad and, with KL, the frozen reference's mean. They do
    not read the rewards: the trainer makes them while the judge scores."""
    rows = torch.arange(rollout.traj.states.shape[0]) if rows is None else rows
    traj: Trajectory = rollout.traj.index(rows)
    cond = rollout.cond.index(rows)
    ref_lat = rollout.ref[rows] if rollout.ref is not None else None
    sde, kl = policy.settings.sde, run.cfg.flow_grpo.beta > 0 and policy.ref_transformer is not None
    steps = []
    for k in range(traj.states.shape[1]):
        logp, mean, std = transition_logprob(policy.model, traj, k, cond, ref_lat, sde)
        ref_mean = None
        if kl:
            with torch.no_grad(), policy.reference():
                _, ref_mean, _ = transition_logprob(policy.model, traj, k, cond, ref_lat, sde)
        steps.append((logp, mean, std, ref_mean))
    return ImageForwards(steps)


def _image_loss(
    run: Run, terms: list[ImageTerm]
) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
    """FlowGRPO loss over the image terms, also split by policy name.

    With several processes a term is weighted by its whole group's size and the rank count,
    so the mean of the ranks' gradients is the one-process gradient; a rank without a valid
    sample still runs the forwards at weight 0, as ZeRO needs every rank in step.
    """
    fg, dist = run.cfg.flow_grpo, run.dist
    total = torch.zeros(())
    by_policy: dict[str, torch.Tensor] = {}
    kls, clips, losses = [], [], []
    for t in terms:
        live = bool(t.valid.any())
        if (not live and not dist.distributed) or t.rollout.traj.states.shape[1] == 0:
            continue
        pol, ro = t.policy, t.rollout
        idx = torch.nonzero(t.valid).flatten() if live else torch.zeros(1, dtype=torch.long)
        scale = len(idx) / max(1, t.size) * dist.world if live else 0.0
        traj = ro.traj.index(idx)
        adv = torch.nan_to_num(t.adv[idx])
        sde = pol.settings.sde
        k_steps = traj.states.shape[1]
        # made while the judge scored (every row: the valid ones are taken), or here
        fwd = t.forwards.rows(idx) if t.forwards is not None else image_forwards(run, pol, ro, idx)
        for k in range(k_steps):
            logp, mean, std, ref_mean = fwd.steps[k]
            kl = ref_mean is not None
            loss, m = flow_grpo_loss(
                logp,
                traj.logps[:, k],
                adv.to(logp.device),
                clip_range=fg.clip_range,
                adv_clip_max=fg.adv_clip_max,
                prev_mean=mean if kl else None,
                ref_prev_mean=ref_mean,
                std=std if kl else None,
                beta=fg.beta if kl else 0.0,
                reduction=fg.logprob_reduction,
                sigma=traj.sigmas[:, k].to(logp.device),
                sigma_next=traj.sigmas_next[:, k].to(logp.device),
                sde_type=sde.sde_type,
            )
            part = loss * scale / k_steps
            total = total + part
            by_policy[pol.name] = by_policy[pol.name] + part if pol.name in by_policy else part
            # several processes: a rank's metrics weighted like its gradient (stand-ins at 0), so
            # the ranks' mean is the one-process mean even for uneven shards (exact when all are
            # scored)
            w = scale if dist.distributed else 1.0
            losses.append(loss.item() * w)
            clips.append(m["clip_ratio"] * w)
            if "kl" in m:
                kls.append(m["kl"] * w)
    out = {
        "loss/flow_grpo": sum(losses) / len(losses) if losses else math.nan,
        "clip_ratio/image": sum(clips) / len(clips) if clips else math.nan,
    }
    if kls:
        out["kl/image"] = sum(kls) / len(kls)
    n_terms = max(1, len(terms))
    return total / n_terms, out, {name: part / n_terms for name, part in by_policy.items()}
