"""dpo_loss and sequence_logps: the preference losses against hand-computed values, and per-sequence
log-probs that do not depend on whether a batch is padded or packed."""
import math

import pytest
import torch

import modeling
from dpo import collate_preference_pairs, concatenated_logps, dpo_loss, sequence_logps
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


def test_sequence_logps_sums_scored_tokens_per_sequence_and_never_scores_a_sequence_first_token():
    labels = torch.tensor([[5, 1, 2, -100, 3, 0, 1]])  # two packed sequences: [5 1 2 -100] and [3 0 1]
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    label_logprobs = torch.tensor([[-1.0, -2.0, 0.0, -8.0, -4.0, -16.0]])  # log p(labels[:, t + 1])
    sums, counts = sequence_logps(label_logprobs, labels, position_ids)
    # first sequence scores 1 and 2; the label 3 starting the second sequence is not scored (-8 dropped)
    assert counts.tolist() == [2, 2]
    assert sums.tolist() == [-3.0, -20.0]


def test_packed_and_padded_pairs_give_the_same_sequence_logps(tiny_tokenizer):
    model = modeling.CausalLMLogProbs(build_tiny_model(tiny_tokenizer)).eval()
    generator = torch.Generator().manual_seed(0)
    examples = []
    for chosen_length, rejected_length in ((9, 4), (13, 6)):
        pair = {}
        for side, length in (("chosen", chosen_length), ("rejected", rejected_length)):
            ids = torch.randint(4, len(tiny_tokenizer), (length,), generator=generator).tolist()
            pair[f"{side}_input_ids"], pair[f"{side}_labels"] = ids, [-100] * 2 + ids[2:]
        examples.append(pair)
    padded = collate_preference_pairs(examples, [0, 1], tiny_tokenizer.pad_token_id, packing=False)
    packed = collate_preference_pairs(examples, [0, 1], tiny_tokenizer.pad_token_id, packing=True)
    assert padded["input_ids"].shape == (4, 13) and packed["input_ids"].shape == (1, 9 + 13 + 4 + 6)

    # the padded sums checked against a plain log-softmax of the Hugging Face model's logits
    with torch.no_grad():
        logits = model.model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    plain = logits[:, :-1].log_softmax(-1).gather(-1, padded["labels"][:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    plain_sums = (plain * (padded["labels"][:, 1:] != -100)).sum(-1)  # rows: chosen 0, chosen 1, rejected 0, 1
    for mean in (False, True):
        with torch.no_grad():
            padded_logps = concatenated_logps(model, padded, mean)
            packed_logps = concatenated_logps(model, packed, mean)
        counts = torch.tensor([7.0, 11.0, 2.0, 4.0])  # scored tokens: length - 2 for each sequence
        torch.testing.assert_close(torch.cat(padded_logps), plain_sums / counts if mean else plain_sums)
        torch.testing.assert_close(torch.cat(packed_logps), torch.cat(padded_logps), atol=1e-5, rtol=1e-5)
