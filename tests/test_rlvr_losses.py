"""rlvr.py's advantages, KL estimators and losses against values worked out by hand."""
import math

import pytest
import torch

import rlvr


def test_group_advantages_normalize_within_each_prompts_samples():
    # group 1: mean 5, population std 5 -> +-1; group 2: all equal -> std 0 -> advantage 0 (no signal)
    scores = torch.tensor([10.0, 0.0, 0.0, 10.0, 5.0, 5.0, 5.0, 5.0])
    expected = torch.tensor([1.0, -1.0, -1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(rlvr.group_advantages(scores, group_size=4), expected)


def test_group_advantages_of_three_samples():
    # mean 10/3, population std sqrt(200/9) = 4.714
    advantages = rlvr.group_advantages(torch.tensor([10.0, 0.0, 0.0]), group_size=3)
    std = math.sqrt(((10 - 10 / 3) ** 2 + 2 * (10 / 3) ** 2) / 3)
    torch.testing.assert_close(advantages, torch.tensor([20 / 3 / std, -10 / 3 / std, -10 / 3 / std]))


def test_kl_k1_is_the_log_ratio():
    torch.testing.assert_close(rlvr.kl_k1(torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0])),
                               torch.tensor([1.0, -1.0]))


def test_kl_k3_by_hand():
    # log_ratio = ref - logp; k3 = e^lr - lr - 1: lr = -1 -> e^-1; lr = 1 -> e - 2; lr = 0 -> 0
    logps = torch.tensor([-1.0, -2.0, -3.0])
    ref_logps = torch.tensor([-2.0, -1.0, -3.0])
    torch.testing.assert_close(rlvr.kl_k3(logps, ref_logps), torch.tensor([math.exp(-1), math.e - 2, 0.0]))


def test_clipped_policy_loss_takes_the_pessimistic_term():
    ratios = torch.tensor([[1.5, 1.5, 0.5, 0.5]])
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, clipped = rlvr.clipped_policy_loss(ratios.log(), torch.zeros(1, 4), advantages, cliprange=0.2)
    # A>0, rho 1.5: max(-1.5, -1.2) = -1.2 (clipped); A<0, rho 1.5: max(1.5, 1.2) = 1.5
    # A>0, rho 0.5: max(-0.5, -0.8) = -0.5;            A<0, rho 0.5: max(0.5, 0.8) = 0.8 (clipped)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 1.5, -0.5, 0.8]]))
    assert clipped.tolist() == [[True, False, False, True]]


def test_clipped_value_loss_by_hand():
    values = torch.tensor([2.0, 1.5])
    old_values = torch.tensor([1.0, 1.0])
    returns = torch.tensor([0.0, 3.0])
    # row 0: 0.5*(2-0)^2 = 2 vs clipped 1.2 -> 0.72: 2;  row 1: 0.5*1.5^2 = 1.125 vs clipped 1.2 -> 0.5*1.8^2 = 1.62
    torch.testing.assert_close(rlvr.clipped_value_loss(values, old_values, returns, cliprange_value=0.2),
                               torch.tensor([2.0, 1.62]))


def test_grpo_loss_by_hand():
    # rho = 1, A = 2, ref = logp - 1 -> k3 = e^-1 per token; 2 tokens / 2 -> -2 + 0.1 e^-1
    logps = torch.tensor([[-1.0, -2.0]])
    loss, clipped = rlvr.grpo_loss(logps, logps, logps - 1, torch.tensor([2.0]), torch.ones(1, 2),
                                   cliprange=0.2, beta=0.1, num_tokens=2)
    torch.testing.assert_close(loss, torch.tensor(-2 + 0.1 * math.exp(-1)))
    assert not clipped.any()


def test_grpo_loss_ignores_padding_tokens():
    logps = torch.tensor([[-1.0, -2.0]])
    loss, _ = rlvr.grpo_loss(logps, logps, logps - torch.tensor([[1.0, 50.0]]), torch.tensor([2.0]),
                             torch.tensor([[1, 0]]), cliprange=0.2, beta=0.1, num_tokens=1)
    torch.testing.assert_close(loss, torch.tensor(-2 + 0.1 * math.exp(-1)))


def test_grpo_loss_is_an_exact_token_mean_however_the_batch_is_split():
    torch.manual_seed(0)
    logps, old_logps, ref_logps = -torch.rand(3, 6, 5)
    advantages = torch.randn(6)
    mask = (torch.rand(6, 5) > 0.3).long()
    num_tokens = mask.sum()
    whole, _ = rlvr.grpo_loss(logps, old_logps, ref_logps, advantages, mask, 0.2, 0.05, num_tokens)
    parts = sum(rlvr.grpo_loss(logps[s], old_logps[s], ref_logps[s], advantages[s], mask[s], 0.2, 0.05,
                               num_tokens)[0] for s in (slice(0, 1), slice(1, 4), slice(4, 6)))
    torch.testing.assert_close(parts, whole)
    per_token = rlvr.clipped_policy_loss(logps, old_logps, advantages[:, None], 0.2)[0] + \
        0.05 * rlvr.kl_k3(logps, ref_logps)
    torch.testing.assert_close(whole, per_token[mask.bool()].mean())


def test_first_grpo_step_has_zero_loss_but_a_gradient():
    # rho = 1 and centred advantages -> the policy term averages to ~0, yet its gradient does not vanish
    logps = torch.tensor([[-1.0, -1.0], [-2.0, -2.0]], requires_grad=True)
    advantages = rlvr.group_advantages(torch.tensor([10.0, 0.0]), group_size=2)
    loss, _ = rlvr.grpo_loss(logps, logps.detach(), logps.detach(), advantages, torch.ones(2, 2), 0.2, 0.01, 4)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.25, -0.25], [0.25, 0.25]]))


def test_ppo_token_rewards_put_the_score_on_the_last_response_token():
    logps = torch.tensor([[-1.0, -1.0, -1.0]])
    ref_logps = torch.tensor([[-1.5, -1.0, -0.5]])  # k1 = [0.5, 0, -0.5]
    rewards = rlvr.ppo_token_rewards(torch.tensor([10.0]), logps, ref_logps, torch.tensor([[1, 1, 0]]), beta=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 10.0, 0.0]]))


def test_gae_with_gamma_1_lambda_095():
    advantages, returns = rlvr.gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.5]]),
                                   torch.ones(1, 3), gamma=1.0, lam=0.95)
    # t2: delta 1 - 0.5 = 0.5; t1: delta 0, A = 0.95 * 0.5; t0: A = 0.95^2 * 0.5
    torch.testing.assert_close(advantages, torch.tensor([[0.45125, 0.475, 0.5]]))
    torch.testing.assert_close(returns, torch.tensor([[0.95125, 0.975, 1.0]]))


def test_gae_stops_at_the_end_of_a_padded_response():
    # the value after the last real token is 0, whatever sits in the padding
    advantages, returns = rlvr.gae(torch.tensor([[0.0, 2.0, 7.0]]), torch.tensor([[1.0, 1.0, 9.0]]),
                                   torch.tensor([[1, 1, 0]]), gamma=0.9, lam=0.5)
    # t1: delta 2 - 1 = 1; t0: delta 0.9 * 1 - 1 = -0.1, A = -0.1 + 0.45 * 1 = 0.35
    torch.testing.assert_close(advantages, torch.tensor([[0.35, 1.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[1.35, 2.0, 0.0]]))


def test_whiten_uses_only_masked_entries():
    whitened = rlvr.whiten(torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1, 1, 1, 0]))
    # mean 2, population variance 2/3
    torch.testing.assert_close(whitened, torch.tensor([-math.sqrt(1.5), 0.0, math.sqrt(1.5), 0.0]))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_token_logprobs_divide_logits_by_the_temperature(temperature):
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    p1 = 3 ** (1 / temperature) / (1 + 3 ** (1 / temperature))
    torch.testing.assert_close(rlvr.token_logprobs(logits, torch.tensor([[1]]), temperature),
                               torch.tensor([[math.log(p1)]]))


def test_entropy_of_a_uniform_distribution_is_log_v():
    torch.testing.assert_close(rlvr.entropy(torch.zeros(1, 1, 4), 1.0), torch.tensor([[math.log(4)]]))
