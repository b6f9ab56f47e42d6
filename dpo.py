"""DPO stage of the Tülu 3 recipe (draft: loss and log-prob functions; the training script follows sft.py)."""
import torch
import torch.nn.functional as F

LOSS_TYPES = ("dpo", "dpo_norm", "simpo", "ipo")


def uses_mean_logps(loss_type):
    """dpo compares summed response log-probs; the other variants compare mean per-token log-probs."""
    return loss_type != "dpo"


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, loss_type, beta,
             label_smoothing=0.0, gamma_beta_ratio=0.3):
    """Per-pair preference losses and implicit rewards.

    L_c, L_r: policy log-probs of the chosen/rejected responses; R_c, R_r: the reference's. All [N].
    The caller passes sums over response tokens for `dpo` and per-token means for the others.

        dpo, dpo_norm: z = (L_c - L_r) - (R_c - R_r)
                       loss = -(1 - ε) log σ(β z) - ε log σ(-β z)          (ε = label_smoothing)
        simpo:         z = L_c - L_r                                         (no reference)
                       loss = -(1 - ε) log σ(β z - γ) - ε log σ(-(β z - γ)),  γ = gamma_beta_ratio · β
        ipo:           loss = (z - 1 / (2β))²,  z as for dpo

    Rewards are the implicit rewards β (L - R) per side; simpo has no reference, so its rewards are
    β L (the reference arguments are ignored and may be None). Rewards are detached: they are metrics.
    Returns (losses [N], chosen_rewards [N], rejected_rewards [N]).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("label_smoothing applies to the logistic losses (dpo, dpo_norm, simpo), not to ipo")
    if loss_type == "simpo":
        z = chosen_logps - rejected_logps  # [N]
        logits = beta * z - gamma_beta_ratio * beta  # [N]
        chosen_rewards, rejected_rewards = beta * chosen_logps, beta * rejected_logps
    else:
        z = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)  # [N]
        logits = beta * z  # [N]
        chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
        rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    if loss_type == "ipo":
        losses = (z - 1 / (2 * beta)) ** 2  # [N]
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)  # [N]
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def sequence_logps(logits, labels, position_ids):
    """Summed log-probs of the label tokens of every sequence, and their counts.

    A row of logits/labels/position_ids [R, T(, V)] holds one right-padded sequence (position_ids
    0..T-1), or several packed sequences (R = 1, position_ids restart at 0 at each sequence).
    Label -100 marks tokens that are not scored. Returns, for the N sequences in order of
    appearance, sum log p(label) [N] (fp32) and the number of scored tokens [N]; the mean per-token
    log-prob is sum / count.
    """
    rows, length = labels.shape
    starts = position_ids == 0  # [R, T] first token of each sequence
    sequence_index = starts.flatten().cumsum(0).view(rows, length) - 1  # [R, T] which sequence a token is in
    num_sequences = int(starts.sum())
    # Token t is predicted by the logits at t - 1. A sequence's first token has no prediction inside its
    # own sequence (in a packed row the logits before it belong to the previous sequence): never score it.
    targets = labels[:, 1:].masked_fill(starts[:, 1:], -100)  # [R, T-1]
    scored = targets != -100  # [R, T-1]
    # log-softmax in fp32: bf16 logits lose the small differences DPO's margins are made of.
    log_probs = logits[:, :-1].float().log_softmax(-1)  # [R, T-1, V]
    token_logps = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [R, T-1]
    token_logps = token_logps.masked_fill(~scored, 0.0)
    index = sequence_index[:, 1:].flatten()  # [R * (T-1)]
    sums = token_logps.new_zeros(num_sequences).index_add(0, index, token_logps.flatten())  # [N]
    counts = torch.zeros(num_sequences, dtype=torch.long, device=labels.device).index_add(
        0, index, scored.flatten().long())  # [N]
    return sums, counts
