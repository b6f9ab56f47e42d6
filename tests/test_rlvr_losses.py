"""rlvr.py's advantages, KL estimators and losses against values worked out by hand."""
import math
from types import SimpleNamespace

import pytest
import torch

import rlvr


def test_group_advantages_normalize_within_each_prompts_samples():
    # group 1: mean 5, unbiased std sqrt(4 * 25 / 3) = 5.7735 -> +-0.866; group 2: all equal -> std 0 -> A = 0
    scores = torch.tensor([10.0, 0.0, 0.0, 10.0, 5.0, 5.0, 5.0, 5.0])
    a = 5 / math.sqrt(100 / 3)
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(rlvr.group_advantages(scores, group_size=4), expected)


def test_group_advantages_of_three_samples_use_the_unbiased_std():
    # mean 10/3; unbiased std sqrt(((20/3)^2 + 2 (10/3)^2) / 2) = sqrt(100/3) = 5.7735 (Tülu 3.1's torch .std())
    advantages = rlvr.group_advantages(torch.tensor([10.0, 0.0, 0.0]), group_size=3)
    std = math.sqrt(100 / 3)
    torch.testing.assert_close(advantages, torch.tensor([20 / 3 / std, -10 / 3 / std, -10 / 3 / std]))


def test_centered_advantages_only_subtract_the_group_mean():
    advantages = rlvr.group_advantages(torch.tensor([10.0, 0.0, 0.0, 4.0, 4.0, 4.0]), 3, "centered")
    torch.testing.assert_close(advantages, torch.tensor([20 / 3, -10 / 3, -10 / 3, 0.0, 0.0, 0.0]))


def test_trained_rows_drop_truncated_responses_and_groups_that_all_scored_alike():
    scores = torch.tensor([10.0, 0.0, 10.0, 10.0, 0.0, 0.0])  # groups of 2: mixed, all 10, all 0
    stopped = torch.tensor([True, False, True, True, True, False])
    assert rlvr.trained_rows(scores, stopped, 2, False, False).tolist() == [True] * 6
    assert rlvr.trained_rows(scores, stopped, 2, True, False).tolist() == stopped.tolist()
    assert rlvr.trained_rows(scores, stopped, 2, False, True).tolist() == [True, True, False, False, False, False]
    assert rlvr.trained_rows(scores, stopped, 2, True, True).tolist() == [True, False, False, False, False, False]


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
    loss, clipped = rlvr.clipped_policy_loss(ratios.log(), torch.zeros(1, 4), advantages, 0.2, 0.2)
    # A>0, rho 1.5: max(-1.5, -1.2) = -1.2 (clipped); A<0, rho 1.5: max(1.5, 1.2) = 1.5
    # A>0, rho 0.5: max(-0.5, -0.8) = -0.5;            A<0, rho 0.5: max(0.5, 0.8) = 0.8 (clipped)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 1.5, -0.5, 0.8]]))
    assert clipped.tolist() == [[True, False, False, True]]


def test_asymmetric_clip_bounds_the_ratio_at_1_minus_lower_and_1_plus_higher():
    ratios = torch.tensor([[1.5, 1.25, 0.5]])
    advantages = torch.tensor([[1.0, 1.0, -1.0]])
    loss, clipped = rlvr.clipped_policy_loss(ratios.log(), torch.zeros(1, 3), advantages, 0.1, 0.3)
    # A>0, rho 1.5: max(-1.5, -1.3) = -1.3 (clipped at 1 + 0.3); rho 1.25 < 1.3: -1.25, not clipped
    # A<0, rho 0.5: max(0.5, 0.9) = 0.9 (clipped at 1 - 0.1)
    torch.testing.assert_close(loss, torch.tensor([[-1.3, -1.25, 0.9]]))
    assert clipped.tolist() == [[True, False, True]]


def test_loss_divisor_counts_tokens_or_a_constant_per_trained_response():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # 4 tokens, 2 responses trained
    assert rlvr.loss_divisor(mask, "token").item() == 4
    assert rlvr.loss_divisor(mask, 10.0).item() == 20


def test_constant_loss_denominator_weighs_every_token_alike_whatever_its_response_length():
    # Dr. GRPO: A = 1 on both rows, rho = 1: (-3 - 1) / (2 responses x 8) = -0.25; per token the gradient is
    # -1/16 on the long and the short response alike (a token mean per response would give -1/3 and -1)
    logps = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, _ = rlvr.grpo_loss(logps, logps.detach(), None, torch.tensor([1.0, 1.0]), mask, 0.2, 0.2, 0.0,
                             rlvr.loss_divisor(mask, 8.0))
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(-0.25))
    torch.testing.assert_close(logps.grad, -mask / 16)


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
                                   clip_lower=0.2, clip_higher=0.2, beta=0.1, divisor=2)
    torch.testing.assert_close(loss, torch.tensor(-2 + 0.1 * math.exp(-1)))
    assert not clipped.any()


def test_grpo_loss_adds_the_chosen_kl_estimator():
    logps, ref_logps = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])  # k1 = [0.5, -1]
    k3 = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1 - 1]
    for kl, per_token in [(rlvr.KL_ESTIMATORS["kl1"], [0.5, -1.0]), (rlvr.KL_ESTIMATORS["kl3"], k3)]:
        # rho = 1 and A = 0: the loss is the KL term alone, beta * the token mean
        loss, _ = rlvr.grpo_loss(logps, logps, ref_logps, torch.zeros(1), torch.ones(1, 2), 0.2, 0.2, 0.1, 2, kl)
        assert loss.item() == pytest.approx(0.1 * sum(per_token) / 2)


def test_grpo_loss_ignores_padding_tokens():
    logps = torch.tensor([[-1.0, -2.0]])
    loss, _ = rlvr.grpo_loss(logps, logps, logps - torch.tensor([[1.0, 50.0]]), torch.tensor([2.0]),
                             torch.tensor([[1, 0]]), clip_lower=0.2, clip_higher=0.2, beta=0.1, divisor=1)
    torch.testing.assert_close(loss, torch.tensor(-2 + 0.1 * math.exp(-1)))


def test_grpo_loss_is_an_exact_token_mean_however_the_batch_is_split():
    torch.manual_seed(0)
    logps, old_logps, ref_logps = -torch.rand(3, 6, 5)
    advantages = torch.randn(6)
    mask = (torch.rand(6, 5) > 0.3).long()
    num_tokens = mask.sum()
    whole, _ = rlvr.grpo_loss(logps, old_logps, ref_logps, advantages, mask, 0.2, 0.2, 0.05, num_tokens)
    parts = sum(rlvr.grpo_loss(logps[s], old_logps[s], ref_logps[s], advantages[s], mask[s], 0.2, 0.2, 0.05,
                               num_tokens)[0] for s in (slice(0, 1), slice(1, 4), slice(4, 6)))
    torch.testing.assert_close(parts, whole)
    per_token = rlvr.clipped_policy_loss(logps, old_logps, advantages[:, None], 0.2, 0.2)[0] + \
        0.05 * rlvr.kl_k3(logps, ref_logps)
    torch.testing.assert_close(whole, per_token[mask.bool()].mean())


def test_first_grpo_step_has_zero_loss_but_a_gradient():
    # rho = 1 and centred advantages -> the policy term averages to ~0, yet its gradient does not vanish
    logps = torch.tensor([[-1.0, -1.0], [-2.0, -2.0]], requires_grad=True)
    advantages = rlvr.group_advantages(torch.tensor([10.0, 0.0]), group_size=2)
    loss, _ = rlvr.grpo_loss(logps, logps.detach(), logps.detach(), advantages, torch.ones(2, 2), 0.2, 0.2, 0.01, 4)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    # advantages +-1/sqrt(2) (unbiased std of {10, 0}: 7.07), each / 4 tokens
    torch.testing.assert_close(logps.grad, torch.tensor([[-1.0, -1.0], [1.0, 1.0]]) / (4 * math.sqrt(2)))


def test_score_positions_are_one_past_the_response_or_its_last_token_at_the_length_limit():
    # Tülu 3's PPO: the index after EOS while it is < response_length, else the last token (a cut response)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert rlvr.score_positions(mask, response_length=4).tolist() == [2, 3, 1]
    # a rollout that stopped before the limit (N = 2 < 6): the score sits in the column after the last token
    assert rlvr.score_positions(torch.tensor([[1, 1]]), response_length=6).tolist() == [2]


def test_ppo_token_rewards_add_the_score_at_its_position_and_a_column_for_the_state_after_the_last_token():
    logps = torch.tensor([[-1.0, -1.0, -1.0]] * 2)
    ref_logps = torch.tensor([[-1.5, -1.0, -0.5]] * 2)  # k1 = [0.5, 0, -0.5]
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])  # ended with EOS at index 1; cut at the limit of 3
    rewards = rlvr.ppo_token_rewards(torch.tensor([10.0, -10.0]), logps, ref_logps, mask, 0.1,
                                     rlvr.score_positions(mask, 3))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 10.0, 0.0], [-0.05, 0.0, -9.95, 0.0]]))


def test_response_values_read_the_state_before_each_response_token_and_after_the_last():
    # a stand-in critic whose value at each position is that position: P = 3 prompt tokens, N = 2 response tokens
    def critic(input_ids, attention_mask, position_ids):
        return torch.arange(input_ids.shape[1], dtype=torch.float).expand(input_ids.shape)
    values = rlvr.response_values(critic, torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 5), response_length=2)
    assert values.tolist() == [[2.0, 3.0, 4.0]]  # after the prompt, after token 0, after token 1 (the score's state)


def test_ppo_critic_is_trained_one_state_past_eos_whose_return_is_the_score():
    rollout = SimpleNamespace(response_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]), stopped=torch.tensor([True, False]))
    args = SimpleNamespace(algo="ppo", num_samples_per_prompt_rollout=1, mask_truncated_completions=False,
                           filter_zero_std_samples=False, response_length=3, beta=0.0, kl_estimator="kl1",
                           gamma=1.0, lam=1.0)
    old = {"old_logps": torch.zeros(2, 3), "old_values": torch.tensor([[1.0, 2.0, 3.0, 9.0], [1.0, 2.0, 3.0, 9.0]])}
    rlvr.compute_advantages(old, torch.tensor([10.0, -10.0]), rollout, args)
    # the EOS row's critic also learns the state after EOS (index 2); the cut row's ends at its last token
    assert old["value_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 0]]
    assert old["loss_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    # gamma = lambda = 1, no KL: every state's return is the score; the state after the last one counts as 0
    torch.testing.assert_close(old["returns"], torch.tensor([[10.0, 10.0, 10.0, 0.0], [-10.0, -10.0, -10.0, 0.0]]))
    assert old["advantages"].shape == (2, 3)


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


def test_entropy_of_a_uniform_distribution_is_log_v():
    torch.testing.assert_close(rlvr.entropy(torch.zeros(1, 1, 4), 1.0), torch.tensor([[math.log(4)]]))
