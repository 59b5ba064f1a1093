import math

import msgspec
import pytest
import torch

from async_rl.trainer.config import LossConfig
from async_rl.trainer.loss import (
    aggregate_loss,
    behavior_weight,
    group_advantages,
    kl_k1,
    kl_k3,
    policy_token_loss,
    ppo_clip_token_loss,
)


def _loss_and_grad(config, cur_values, behav, advantages, mask, prox=None):
    cur = torch.tensor(cur_values, requires_grad=True)
    token_loss, diagnostics = policy_token_loss(cur, behav, advantages, config, prox=prox)
    loss = aggregate_loss(token_loss, mask, config.aggregation)
    loss.backward()
    return loss.detach(), cur.grad, diagnostics


LOGPROBS = [[-0.5, -1.2, -0.1, 0.0], [-2.0, -0.3, -0.7, -0.9]]
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
ADV = torch.tensor([1.5, -0.5])


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_decoupled_ppo_equals_on_policy_ppo_when_all_three_policies_agree(aggregation):
    same = torch.tensor(LOGPROBS)
    on_policy = _loss_and_grad(LossConfig(correction="none", aggregation=aggregation), LOGPROBS, same, ADV, MASK)
    decoupled = _loss_and_grad(
        LossConfig(correction="decoupled_ppo", aggregation=aggregation), LOGPROBS, same, ADV, MASK, prox=same
    )
    assert torch.equal(on_policy[0], decoupled[0])
    assert torch.equal(on_policy[1], decoupled[1])
    # at ratio 1 the PPO loss is -mean(A) and the gradient -A / N on every valid token
    if aggregation == "token_mean":
        assert on_policy[0].item() == pytest.approx(-(3 * 1.5 + 3 * -0.5) / 6)
        expected = torch.where(MASK, -ADV[:, None] / 6, torch.zeros(2, 4))
        assert torch.allclose(on_policy[1], expected)


def test_tis_with_unit_weights_is_plain_policy_gradient():
    same = torch.tensor(LOGPROBS)
    loss, grad, diagnostics = _loss_and_grad(LossConfig(correction="tis"), LOGPROBS, same, ADV, MASK, prox=same)
    # REINFORCE: gradient of -mean(A * log pi) is -A / N per valid token
    assert torch.all(diagnostics["is_weight"] == 1)
    assert torch.allclose(grad, torch.where(MASK, -ADV[:, None] / 6, torch.zeros(2, 4)))
    assert loss.item() == pytest.approx(-(3 * 1.5 - 3 * 0.5) / 6)


def test_ppo_clip_hand_computed():
    log_ratio = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5, 1.0]))
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])
    loss, clipped = ppo_clip_token_loss(log_ratio, advantages, clip_eps=0.2)
    # A>0, r>1+eps: capped at 1.2; A<0, r>1: unclipped 1.5 is worse; A>0, r<1: 0.5 is worse; A<0, r<0.8: 0.8
    assert torch.allclose(loss, torch.tensor([-1.2, 1.5, -0.5, 0.8, -2.0]))
    assert clipped.tolist() == [True, False, False, True, False]


def test_clip_higher_and_dual_clip():
    log_ratio = torch.log(torch.tensor([1.5, 10.0]))
    advantages = torch.tensor([1.0, -1.0])
    loss, _ = ppo_clip_token_loss(log_ratio, advantages, clip_eps=0.2, clip_eps_high=0.28)
    assert torch.allclose(loss, torch.tensor([-1.28, 10.0]))
    loss, clipped = ppo_clip_token_loss(log_ratio, advantages, clip_eps=0.2, dual_clip_c=3.0)
    assert torch.allclose(loss, torch.tensor([-1.2, 3.0]))  # negative advantage: loss bounded by c * |A|
    assert clipped.tolist() == [True, True]


def test_behavior_weight_truncates_or_masks_at_the_cap():
    prox = torch.log(torch.tensor([0.5, 0.9, 0.9]))
    behav = torch.log(torch.tensor([0.5, 0.3, 0.01]))  # weights 1, 3, 90
    weight, capped = behavior_weight(prox, behav, cap=5.0)
    assert torch.allclose(weight, torch.tensor([1.0, 3.0, 5.0]))
    assert capped.tolist() == [False, False, True]
    weight, _ = behavior_weight(prox, behav, cap=5.0, mode="mask")
    assert torch.allclose(weight, torch.tensor([1.0, 3.0, 0.0]))


def test_decoupled_weight_scales_loss_and_gradient_but_is_not_differentiated():
    cur = torch.tensor([[-1.0]], requires_grad=True)
    behav = torch.tensor([[math.log(0.25)]])
    prox = torch.tensor([[-1.0]])  # w = e^-1 / 0.25
    token_loss, diagnostics = policy_token_loss(cur, behav, torch.tensor([2.0]), LossConfig(), prox=prox)
    token_loss.sum().backward()
    w = math.exp(-1.0) / 0.25
    assert diagnostics["is_weight"].item() == pytest.approx(w)
    assert token_loss.item() == pytest.approx(-2.0 * w)
    assert cur.grad.item() == pytest.approx(-2.0 * w)


def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 1.0, 5.0, 5.0, 3.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    adv = group_advantages(rewards, groups, eps=0.0)
    std0 = math.sqrt(((1 / 3) ** 2 * 2 + (2 / 3) ** 2) / 2)  # unbiased
    assert torch.allclose(adv, torch.tensor([(1 / 3) / std0, -(2 / 3) / std0, (1 / 3) / std0, 0.0, 0.0, 0.0]))
    centered = group_advantages(rewards, groups, std_norm=False)
    assert torch.allclose(centered, torch.tensor([1 / 3, -2 / 3, 1 / 3, 0.0, 0.0, 0.0]))
    assert torch.isfinite(group_advantages(torch.tensor([2.0, 2.0]), torch.tensor([0, 0]))).all()  # zero std


def test_aggregation_modes_and_microbatch_normaliser():
    token_loss = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 0.0, 0.0]])  # nan under the mask must not leak
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert aggregate_loss(token_loss, mask, "token_mean").item() == pytest.approx(7 / 3)
    assert aggregate_loss(token_loss, mask, "seq_mean_token_mean").item() == pytest.approx((1.5 + 4) / 2)
    parts = sum(aggregate_loss(token_loss[i : i + 1], mask[i : i + 1], "token_mean", num_tokens=3) for i in range(2))
    assert parts.item() == pytest.approx(7 / 3)


def test_kl_estimators():
    logp = torch.log(torch.tensor([0.5, 0.2]))
    logq = torch.log(torch.tensor([0.25, 0.2]))
    assert torch.allclose(kl_k1(logp, logq), torch.tensor([math.log(2), 0.0]))
    assert torch.allclose(kl_k3(logp, logq), torch.tensor([0.5 - 1 + math.log(2), 0.0]))


def test_loss_config_rejects_bad_values_with_the_field_name():
    with pytest.raises(ValueError, match="clip_eps"):
        LossConfig(clip_eps=0)
    with pytest.raises(msgspec.ValidationError, match="correction"):
        msgspec.convert({"correction": "magic"}, LossConfig)
    with pytest.raises(msgspec.ValidationError, match="is_cap"):
        msgspec.convert({"is_cap": 0.5}, LossConfig)
