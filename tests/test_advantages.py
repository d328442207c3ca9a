"""Credit assignment worked by hand: group advantages, R3 shaping, tree credit."""

import math

import pytest
import torch

from r3rl.algos.advantages import (
    batch_std,
    group_advantages,
    r3_generate_rewards,
    r3_refine_rewards,
    tree_advantages,
)

NAN = float("nan")


def test_group_advantages_mask_nan_and_count_zero_std_groups():
    # group 7: valid {1, 3} → mean 2 → adv -1, +1, NaN member 0 and invalid
    # group 3: {2, 2} all equal → 0; group 5: one valid member → 0; group 9: none valid → 0
    rewards = torch.tensor([1.0, 3.0, NAN, 2.0, 2.0, 5.0, NAN, NAN])
    groups = torch.tensor([7, 7, 7, 3, 3, 5, 5, 9])
    adv, valid, zero_std, num = group_advantages(rewards, groups)
    assert adv.tolist() == [-1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert valid.tolist() == [True, True, False, True, True, True, False, False]
    assert (zero_std, num) == (3, 4)


def test_group_advantages_nan_is_not_counted_as_zero():
    # if the NaN were scored 0 the mean of {0, 4, NaN} would be 4/3; masked it is 2
    adv, _, _, _ = group_advantages(torch.tensor([0.0, 4.0, NAN]), [0, 0, 0])
    assert adv.tolist() == [-2.0, 2.0, 0.0]


def test_group_advantages_std_scaling():
    # {1, 3}: unbiased std = sqrt((1 + 1) / 1) = sqrt(2)
    adv, _, _, _ = group_advantages(
        torch.tensor([1.0, 3.0, 5.0, 5.0]), [0, 0, 1, 1], scale_std=True, eps=1e-4
    )
    d = 1 / (math.sqrt(2) + 1e-4)
    assert adv.tolist() == pytest.approx([-d, d, 0.0, 0.0], rel=1e-6)


def test_batch_scaling_divides_group_centred_advantages_by_the_std_of_all_groups():
    """TRL's scale_rewards='batch' / flow_grpo's global_std, over the groups of two rollouts of one
    step: group {1, 3} (mean 2), group {5, 9, NaN} (mean 7); all scored rewards {1, 3, 5, 9} have
    mean 4.5 and unbiased std sqrt((12.25 + 2.25 + 0.25 + 20.25) / 3) = sqrt(35 / 3)."""
    from r3rl.batch import Batch, ImageTerm, scale_by_batch_std

    groups = [torch.tensor([1.0, 3.0]), torch.tensor([5.0, 9.0, NAN])]
    assert batch_std(groups) == pytest.approx(math.sqrt(35 / 3), rel=1e-12)
    assert batch_std([torch.tensor([2.0, NAN])]) == 0.0  # fewer than two scored: no spread
    batches = []
    for r in groups:
        adv, valid, _, _ = group_advantages(r, torch.zeros(len(r)))
        batches.append(Batch(metrics={}, image_terms=[ImageTerm(None, None, adv, valid, pool=r)]))
    batches[1].image_terms.append(ImageTerm(None, None, torch.zeros(1), torch.zeros(1, dtype=torch.bool)))  # stand-in
    scale_by_batch_std(batches)
    d = math.sqrt(35 / 3) + 1e-4
    assert batches[0].image_terms[0].adv.tolist() == pytest.approx([-1 / d, 1 / d], rel=1e-6)
    assert batches[1].image_terms[0].adv.tolist() == pytest.approx([-2 / d, 2 / d, 0.0], rel=1e-6)
    assert batches[1].image_terms[1].adv.tolist() == [0.0]


def test_r3_generate_rewards():
    # text = r·f + w·f with w = 0.5; f = 0 gives 0 even for an unscored image
    r = torch.tensor([0.5, 1.0, NAN, NAN])
    f = torch.tensor([1.0, 0.0, 1.0, 0.0])
    text, image = r3_generate_rewards(r, f, format_weight=0.5)
    assert text[[0, 1, 3]].tolist() == [1.0, 0.0, 0.0] and math.isnan(text[2])
    assert image is r


def test_r3_refine_rewards_improvement_and_stop_mask():
    # input 0.6, not perfect; samples: edit→0.8, edit→0.4, stop (new reward ignored), edit→unscored
    new = torch.tensor([0.8, 0.4, 0.9, NAN])
    stopped = torch.tensor([False, False, True, False])
    f = torch.ones(4)
    text, image, mask = r3_refine_rewards(new, torch.tensor(0.6), stopped, f, input_perfect=False)
    assert image[:3].tolist() == pytest.approx([0.2, -0.2, 0.0]) and math.isnan(image[3])
    assert text[:3].tolist() == pytest.approx([1.2, 0.8, 1.0]) and math.isnan(text[3])
    assert mask.tolist() == [True, True, False, True]


def test_r3_refine_rewards_perfect_and_stopped_bonus():
    # input perfect (1.0): edit→0.5 (-0.5), edit→1.0 (0), stop → bonus 1 for text only, stop with f=0
    new = torch.tensor([0.5, 1.0, 0.2, 0.2])
    stopped = torch.tensor([False, False, True, True])
    f = torch.tensor([1.0, 1.0, 1.0, 0.0])
    text, image, mask = r3_refine_rewards(
        new, torch.tensor(1.0), stopped, f, input_perfect=True, format_weight=1.0
    )
    assert text.tolist() == pytest.approx([0.5, 1.0, 2.0, 0.0])
    assert image.tolist() == pytest.approx([-0.5, 0.0, 0.0, 0.0])
    assert mask.tolist() == [True, True, False, False]


def test_r3_refine_rewards_unscored_input_masks_every_improvement():
    text, image, _ = r3_refine_rewards(
        torch.tensor([0.5, 0.7]),
        torch.tensor(NAN),
        torch.tensor([False, True]),
        torch.ones(2),
        input_perfect=False,
    )
    assert torch.isnan(image).all() and torch.isnan(text).all()


# Two initial images (roots 0, 1) of one prompt. Root 0 gets two reflections: node 2 is refined
# twice (leaves 4: 1.0, 5: 0.6); node 3 says "no refinement needed", a leaf carrying root 0's
# image reward 0.4. Root 1 gets one reflection (6) refined once (leaf 7: 0.2).
PARENT = [-1, -1, 0, 0, 2, 2, 1, 6]
REWARD = torch.tensor([NAN, NAN, NAN, 0.4, 1.0, 0.6, NAN, 0.2])


def test_tree_two_levels_by_hand():
    values, adv, zero_std, num_sets = tree_advantages(PARENT, REWARD)
    # values: leaves as given; 2 = (1+.6)/2 = .8; 0 = mean of leaves {4,5,3} = 2/3 (not (.8+.4)/2); 6 = 1 = .2
    assert values.tolist() == pytest.approx([2 / 3, 0.2, 0.8, 0.4, 1.0, 0.6, 0.2, 0.2])
    # roots: mean (2/3 + .2)/2 = 13/30 → ±7/30; {2,3}: mean .6 → ±.2; {4,5}: mean .8 → ±.2
    # 6 and 7 are only children: they inherit root 1's advantage
    r = 7 / 30
    assert adv.tolist() == pytest.approx([r, -r, 0.2, -0.2, 0.2, -0.2, -r, -r])
    assert (zero_std, num_sets) == (0, 3)


def test_tree_nan_leaf_is_ignored_and_zero_std_sets_counted():
    reward = REWARD.clone()
    reward[5] = NAN
    values, adv, zero_std, num_sets = tree_advantages(PARENT, reward)
    # 2 = 1.0 (leaf 5 ignored); 0 = mean{1.0, .4} = .7; {4,5} has one valid member → flat
    assert values[[0, 2]].tolist() == pytest.approx([0.7, 1.0]) and math.isnan(values[5])
    assert adv[4].item() == 0.0 and adv[5].item() == 0.0
    assert adv[2].item() == pytest.approx(0.3)  # {1.0, .4}: mean .7
    assert (zero_std, num_sets) == (1, 3)


def test_tree_root_groups_and_std_scaling():
    # roots 0, 1 in prompt 10, root 2 alone in prompt 11; root 2 has children 3, 4
    parent = [-1, -1, -1, 2, 2]
    reward = torch.tensor([1.0, 0.0, NAN, 0.3, 0.7])
    _, adv, zero_std, num_sets = tree_advantages(
        parent, reward, root_group=[10, 10, 11, 0, 0], scale_std=True
    )
    d1 = 0.5 / (math.sqrt(0.5) + 1e-4)  # {1, 0}: std sqrt((.25+.25)/1)
    d2 = 0.2 / (math.sqrt(0.08) + 1e-4)  # {.3, .7}: std sqrt((.04+.04)/1)
    assert adv.tolist() == pytest.approx([d1, -d1, 0.0, -d2, d2], rel=1e-6)
    assert (zero_std, num_sets) == (1, 3)  # the lone root is a flat set


def test_tree_with_one_refinement_per_reflection_is_r3_refine_step():
    # one input image, G=3 reflections, one refinement each (the first "stops": reward of input .5)
    parent = [-1, 0, 0, 0, 2, 3]
    reward = torch.tensor([NAN, 0.5, NAN, NAN, 0.8, 0.2])
    _, adv, _, _ = tree_advantages(parent, reward)
    # reflections: r_new − mean(.5, .8, .2) = 0, .3, −.3; refinements inherit
    assert adv[1:].tolist() == pytest.approx([0.0, 0.3, -0.3, 0.3, -0.3], abs=1e-6)


def test_tree_rejects_cycles():
    with pytest.raises(ValueError):
        tree_advantages([1, 0], torch.tensor([1.0, 0.0]))
