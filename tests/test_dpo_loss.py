"""dpo_loss and sequence_logps: the preference losses against hand-computed values, and per-sequence
log-probs that do not depend on whether a batch is padded or packed."""
import math

import pytest
import torch

from dpo import dpo_loss, sequence_logps
from tests.conftest import build_tiny_model


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_dpo_loss_is_log_sigmoid_of_beta_times_margin_over_reference():
    # z = (-10 - -12) - (-11 - -11) = 2, beta z = 0.2, loss = log(1 + e^-0.2)
    losses, chosen_rewards, rejected_rewards = dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0),
                                                        loss_type="dpo", beta=0.1)
    assert losses.item() == pytest.approx(0.5981388693815918)
    assert chosen_rewards.item() == pytest.approx(0.1)  # 0.1 * (-10 - -11)
    assert rejected_rewards.item() == pytest.approx(-0.1)  # 0.1 * (-12 - -11)


def test_dpo_loss_with_label_smoothing_mixes_in_the_flipped_preference():
    # 0.9 log(1 + e^-0.2) + 0.1 log(1 + e^0.2)
    losses, _, _ = dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), loss_type="dpo", beta=0.1, label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.6181388693815918)


def test_dpo_norm_is_dpo_on_mean_log_probs_with_tulu_beta():
    # mean log-probs: z = (-1.0 - -1.5) - (-1.2 - -1.2) = 0.5, beta z = 2.5, loss = log(1 + e^-2.5)
    losses, chosen_rewards, rejected_rewards = dpo_loss(t(-1.0), t(-1.5), t(-1.2), t(-1.2),
                                                        loss_type="dpo_norm", beta=5.0)
    assert losses.item() == pytest.approx(0.07888973429254963)
    assert chosen_rewards.item() == pytest.approx(1.0)  # 5 * 0.2
    assert rejected_rewards.item() == pytest.approx(-1.5)  # 5 * -0.3


def test_simpo_ignores_the_reference_and_subtracts_the_margin_gamma():
    # z = 0.5, beta 2, gamma = 0.3 * 2 = 0.6: beta z - gamma = 0.4, loss = log(1 + e^-0.4)
    losses, chosen_rewards, rejected_rewards = dpo_loss(t(-1.0), t(-1.5), None, None, loss_type="simpo", beta=2.0)
    assert losses.item() == pytest.approx(0.5130152523999526)
    assert chosen_rewards.item() == pytest.approx(-2.0)  # beta * L_c: no reference
    assert rejected_rewards.item() == pytest.approx(-3.0)


def test_simpo_with_label_smoothing():
    # 0.8 log(1 + e^-0.4) + 0.2 log(1 + e^0.4)
    losses, _, _ = dpo_loss(t(-1.0), t(-1.5), None, None, loss_type="simpo", beta=2.0, label_smoothing=0.2)
    assert losses.item() == pytest.approx(0.5930152523999526)


def test_ipo_is_squared_distance_of_margin_to_one_over_two_beta():
    # z = 0.5, 1 / (2 * 0.5) = 1: (0.5 - 1)^2
    losses, chosen_rewards, _ = dpo_loss(t(-1.0), t(-1.5), t(-1.2), t(-1.2), loss_type="ipo", beta=0.5)
    assert losses.item() == pytest.approx(0.25)
    assert chosen_rewards.item() == pytest.approx(0.1)


def test_losses_are_per_pair_and_rewards_carry_no_gradient():
    chosen = t(-10.0, -3.0).requires_grad_()
    losses, chosen_rewards, _ = dpo_loss(chosen, t(-12.0, -3.0), t(-11.0, -3.0), t(-11.0, -3.0),
                                         loss_type="dpo", beta=0.1)
    assert losses.shape == (2,)
    assert losses[1].item() == pytest.approx(math.log(2))  # no margin: -log sigma(0)
    assert not chosen_rewards.requires_grad
    losses.sum().backward()
    assert chosen.grad[0] < 0  # raising the chosen log-prob lowers the loss


def test_unknown_loss_type_and_smoothed_ipo_are_rejected():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), loss_type="kto", beta=0.1)
    with pytest.raises(ValueError, match="ipo"):
        dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), loss_type="ipo", beta=0.1, label_smoothing=0.1)


def test_sequence_logps_sums_scored_tokens_and_never_scores_a_sequence_first_token():
    # uniform logits over 4 tokens: every scored token has log-prob log(1/4)
    labels = torch.tensor([[5, 1, 2, -100, 3, 0, 1]])  # two packed sequences: [5 1 2 -100] and [3 0 1]
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    logits = torch.zeros(1, 7, 4)
    sums, counts = sequence_logps(logits, labels, position_ids)
    # first sequence scores 1, 2 (5 is its first token); second scores 0, 1 (3 starts it)
    assert counts.tolist() == [2, 2]
    assert sums.tolist() == pytest.approx([2 * math.log(0.25)] * 2)


def padded_and_packed(sequences, pad_token_id):
    """Right-padded [N, T] and packed [1, sum T] batches of (input_ids, labels) pairs."""
    length = max(len(ids) for ids, _ in sequences)
    padded = {
        "input_ids": torch.tensor([ids + [pad_token_id] * (length - len(ids)) for ids, _ in sequences]),
        "labels": torch.tensor([labels + [-100] * (length - len(labels)) for _, labels in sequences]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids, _ in sequences]),
    }
    padded["position_ids"] = torch.arange(length).expand(len(sequences), length)
    packed = {
        "input_ids": torch.tensor([[i for ids, _ in sequences for i in ids]]),
        "labels": torch.tensor([[i for _, labels in sequences for i in labels]]),
        "position_ids": torch.tensor([[p for ids, _ in sequences for p in range(len(ids))]]),
    }
    return padded, packed


def test_packed_and_padded_batches_give_the_same_sequence_logps(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer).eval()
    generator = torch.Generator().manual_seed(0)
    sequences = []
    for length in (9, 4, 13, 6):
        ids = torch.randint(4, len(tiny_tokenizer), (length,), generator=generator).tolist()
        sequences.append((ids, [-100] * 2 + ids[2:]))
    padded, packed = padded_and_packed(sequences, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        padded_logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                              use_cache=False).logits
        packed_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                              use_cache=False).logits
    padded_sums, padded_counts = sequence_logps(padded_logits, padded["labels"], padded["position_ids"])
    packed_sums, packed_counts = sequence_logps(packed_logits, packed["labels"], packed["position_ids"])
    assert padded_counts.tolist() == packed_counts.tolist() == [7, 2, 11, 4]
    torch.testing.assert_close(packed_sums, padded_sums, atol=1e-5, rtol=1e-5)
