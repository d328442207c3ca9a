"""Credit assignment: group-relative advantages, R3's reward shaping and tree credit.

NaN is the one spelling of "could not score" (a reward function's `None`): such samples are
masked out of every mean and get advantage 0, never scored as 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IntIds = torch.Tensor | Sequence[int]


def group_advantages(
    rewards: torch.Tensor, group_ids: IntIds, *, scale_std: bool = False, eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Advantage of each sample relative to the valid members of its group.

    `adv = r − mean_group` (divided by `std_group + eps` when `scale_std`; std is the unbiased
    one, as TRL). Groups are arbitrary ids; gather samples that share a prompt across ranks first.
    A group whose valid rewards are all equal (including a group with fewer than two valid
    members) carries no signal: its advantages are 0 and it is counted in `zero_std_groups`
    (TRL's frac_reward_zero_std = zero_std_groups / num_groups). Its members stay valid, so
    a loss over valid samples still applies its KL term to them.

    Returns adv (N,), valid_mask (N,) = reward is not NaN, zero_std_groups, num_groups.
    """
    r = rewards.detach().double()
    valid = ~torch.isnan(r)
    _, inverse = torch.unique(torch.as_tensor(group_ids, device=r.device), return_inverse=True)
    num_groups = int(inverse.max().item()) + 1 if inverse.numel() else 0
    r0 = torch.where(valid, r, torch.zeros_like(r))
    count = torch.zeros(num_groups, dtype=r.dtype, device=r.device).index_add_(
        0, inverse, valid.double()
    )
    mean = torch.zeros_like(count).index_add_(0, inverse, r0) / count.clamp(min=1)
    dev = torch.where(valid, r - mean[inverse], torch.zeros_like(r))
    var = torch.zeros_like(count).index_add_(0, inverse, dev**2) / (count - 1).clamp(min=1)
    big, small = torch.where(valid, r, -torch.inf), torch.where(valid, r, torch.inf)
    hi = torch.full_like(count, -torch.inf).scatter_reduce_(0, inverse, big, "amax")
    lo = torch.full_like(count, torch.inf).scatter_reduce_(0, inverse, small, "amin")
    flat = (count < 2) | (hi == lo)
    adv = dev / (var.sqrt()[inverse] + eps) if scale_std else dev
    adv = torch.where(flat[inverse], torch.zeros_like(adv), adv)
    return adv.to(rewards.dtype), valid, int(flat.sum().item()), num_groups


def batch_std(groups: Sequence[torch.Tensor]) -> float:
    """Unbiased std of every scored reward of a batch of groups (TRL's `scale_rewards='batch'`,
    flow_grpo's `global_std`): dividing group-centred advantages by it keeps the groups' relative
    scale, where each group's own std would blow up a group that barely varies. 0 with < 2 scored.
    """
    r = torch.cat([g.detach().double().flatten() for g in groups]) if groups else torch.zeros(0)
    r = r[~torch.isnan(r)]
    return float(r.std()) if r.numel() > 1 else 0.0


def divide_by_batch_std(
    advantages: Sequence[torch.Tensor], groups: Sequence[torch.Tensor], *, eps: float = 1e-4
) -> list[torch.Tensor]:
    """`scale_rewards: batch`: each group-centred advantage tensor over `batch_std(groups) + eps`
    (the eps of `group_advantages`), `groups` being the rewards of every group of the batch."""
    std = batch_std(groups)
    return [a / (std + eps) for a in advantages]


def r3_generate_rewards(
    image_reward: torch.Tensor, format_reward: torch.Tensor, format_weight: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """R3's generate step: text reward `r·f + w·f`, image reward `r`.

    A text with format reward 0 gets text reward 0 even when its image could not be scored
    (the value doesn't depend on it); otherwise NaN propagates and is masked downstream.
    """
    text = _gate_by_format(format_reward * (image_reward + format_weight), format_reward)
    return text, image_reward


def r3_refine_rewards(
    new_reward: torch.Tensor,
    input_reward: torch.Tensor,
    stopped: torch.Tensor,
    format_reward: torch.Tensor,
    *,
    input_perfect: torch.Tensor | bool,
    format_weight: float = 1.0,
    perfect_stop_bonus: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """R3's reflect-refine step: every sample of the group refined the same input image.

    improvement = r_new − r_input. A stopped sample ("no further edit needed") left the image
    unchanged, so its improvement is 0 (its `new_reward` is ignored: no re-scoring noise), or
    `perfect_stop_bonus` when the input was already perfect. Text reward = `w·f + improvement·f`
    (0 when f = 0, as in `r3_generate_rewards`). Image reward = improvement without the bonus:
    the bonus rewards the decision to stop, which is the reflector's; R3 ranks raw r_new, which
    differs only by the shared r_input. Stopped samples stay in the image group's mean (their
    unchanged image is a legitimate outcome) but `image_adv_mask` excludes them from the loss.

    Returns text_reward, image_reward, image_adv_mask (N,).
    """
    stopped = stopped.bool()
    perfect = torch.as_tensor(input_perfect, dtype=torch.bool, device=stopped.device)
    input_reward = torch.as_tensor(input_reward, dtype=new_reward.dtype, device=new_reward.device)
    # input·0 is 0, or NaN when the input is unscored: then no improvement is known.
    improvement = torch.where(stopped, input_reward * 0.0, new_reward - input_reward)
    shaped = torch.where(
        stopped & perfect, torch.full_like(improvement, perfect_stop_bonus), improvement
    )
    text = _gate_by_format(format_reward * (shaped + format_weight), format_reward)
    return text, improvement, ~stopped


def _gate_by_format(text_reward: torch.Tensor, format_reward: torch.Tensor) -> torch.Tensor:
    """Exactly 0 where the format reward is 0, whatever NaN the other factor held."""
    return torch.where(format_reward == 0, torch.zeros_like(text_reward), text_reward)


def tree_advantages(
    parent: IntIds,
    leaf_reward: torch.Tensor,
    *,
    root_group: IntIds | None = None,
    scale_std: bool = False,
    eps: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Advantages on a rollout tree whose nodes are actions (generate, reflect, refine).

    Representation: node i has `parent[i]` (-1 for a root: a generated image); a reflection's
    parent is the node that produced the image it reflects on, a refinement's parent is its
    reflection. `leaf_reward[i]` is read only at leaves (nodes without children): the reward of
    the image the leaf's action ends on (NaN: unscored). "No refinement needed" is a reflection
    node with no children whose reward is the reward of the unchanged input image.
    Roots are siblings when they share `root_group[i]` (e.g. a prompt id; only roots' entries
    are read; default: all roots are siblings).

    value = mean reward of the valid leaves under a node (a leaf's own reward); advantage =
    value − mean of its sibling set's values (÷ std + eps when `scale_std`), via
    `group_advantages`. An only child has no sibling baseline and inherits its parent's
    advantage (so a single refinement per reflection gets the reflection's advantage, which is
    R3's refine step with K=G, M=1); it is not a sibling set. A lone root gets 0.
    NaN-valued nodes get 0.

    Returns values (n,), advantages (n,), zero_std_sets, num_sets (sibling sets counted).
    """
    parents = [int(p) for p in parent]
    n = len(parents)
    children: list[list[int]] = [[] for _ in range(n)]
    for i, p in enumerate(parents):
        if p >= 0:
            children[p].append(i)
    order = _topological(parents, children)
    values = _leaf_means(order, parents, children, leaf_reward.detach().double())

    groups = [0] * n if root_group is None else [int(g) for g in root_group]
    key = [("root", groups[i]) if p < 0 else ("child", p) for i, p in enumerate(parents)]
    inherits = [p >= 0 and len(children[p]) == 1 for p in parents]
    ranked = [i for i in range(n) if not inherits[i]]
    set_ids = {k: j for j, k in enumerate(dict.fromkeys(key[i] for i in ranked))}
    adv = torch.zeros(n, dtype=torch.float64)
    zero_std, num_sets = 0, 0
    if ranked:
        idx = torch.tensor(ranked)
        a, _, zero_std, num_sets = group_advantages(
            values[idx],
            torch.tensor([set_ids[key[i]] for i in ranked]),
            scale_std=scale_std,
            eps=eps,
        )
        adv[idx] = a
    for i in order:  # parents before children
        if inherits[i]:
            adv[i] = adv[parents[i]]
    return values.to(leaf_reward.dtype), adv.to(leaf_reward.dtype), zero_std, num_sets


def _topological(parents: list[int], children: list[list[int]]) -> list[int]:
    """Nodes ordered parents-first; rejects cycles and out-of-range parents."""
    n = len(parents)
    if any(p < -1 or p >= n for p in parents):
        raise ValueError(f"parent indices must be -1 or in [0, {n}), got {parents}")
    order = [i for i, p in enumerate(parents) if p < 0]
    for i in order:  # grows while iterating: breadth-first
        order.extend(children[i])
    if len(order) != n:
        raise ValueError("parent links contain a cycle")
    return order


def _leaf_means(
    order: list[int], parents: list[int], children: list[list[int]], reward: torch.Tensor
) -> torch.Tensor:
    """Mean of the non-NaN leaf rewards under each node (NaN when it has none)."""
    total = torch.zeros(len(parents), dtype=torch.float64)
    count = torch.zeros(len(parents), dtype=torch.float64)
    for i in reversed(order):  # children before parents
        if not children[i] and not torch.isnan(reward[i]):
            total[i] += reward[i]
            count[i] += 1
        if parents[i] >= 0:
            total[parents[i]] += total[i]
            count[parents[i]] += count[i]
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))
