"""DPO stage of the Tülu 3 recipe (draft: loss and log-prob functions; the training script follows sft.py)."""
import hashlib
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from data_mix import collate_packed, collate_padded

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


def collate_pairs(examples, pad_token_id, packing):
    """Chosen sequences then rejected sequences of a micro-batch in one batch, so one forward scores both.

    Padded: input_ids/labels/attention_mask/position_ids [2B, T]; packed: [1, sum T] with position_ids
    restarting per sequence. `index` [B] names each pair's row in the reference log-prob cache.
    """
    sequences = [{"input_ids": example[f"{side}_input_ids"], "labels": example[f"{side}_labels"]}
                 for side in ("chosen", "rejected") for example in examples]
    if packing:
        batch = collate_packed(sequences)
    else:
        batch = collate_padded(sequences, pad_token_id)
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    batch["index"] = torch.tensor([example["index"] for example in examples])
    return batch


def concatenated_logps(model, batch):
    """Summed label log-probs and label counts of chosen [B] and rejected [B], from one forward."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   position_ids=batch["position_ids"], use_cache=False).logits  # [R, T, V]
    sums, counts = sequence_logps(logits, batch["labels"], batch["position_ids"])  # [2B]
    del logits  # the largest activation: free it before the backward needs memory
    chosen_sums, rejected_sums = sums.chunk(2)
    chosen_counts, rejected_counts = counts.chunk(2)
    return chosen_sums, rejected_sums, chosen_counts, rejected_counts


# ---------------------------------------------------------------------------------------------
# Reference log-probs: computed once with the initial model, cached on disk

TOKEN_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


def model_fingerprint(model_name_or_path):
    """sha256 of the config and weight files: a different model, or the same one retrained, changes it."""
    directory = model_name_or_path
    if not os.path.isdir(directory):  # a hub name: the files are in the local hub cache by now
        from transformers.utils import cached_file
        directory = os.path.dirname(cached_file(model_name_or_path, "config.json"))
    digest = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        if name == "config.json" or name.endswith((".safetensors", ".bin")):
            with open(os.path.join(directory, name), "rb") as f:
                digest.update(name.encode() + hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def data_fingerprint(dataset):
    """sha256 of the tokenized pairs in training order: covers the data, mixing, template and truncation."""
    import pyarrow.compute as pc

    digest = hashlib.sha256()
    table = dataset.with_format("arrow")[:]
    for column in TOKEN_COLUMNS:
        values = table.column(column).combine_chunks()
        digest.update(pc.list_value_length(values).to_numpy().tobytes())
        digest.update(pc.list_flatten(values).to_numpy().tobytes())
    return digest.hexdigest()


def reference_cache_path(cache_dir, model_name_or_path, dataset, dtype):
    """The cache file for this model, data and precision (the key is a hash, so any change misses)."""
    key = hashlib.sha256(json.dumps({"model": model_fingerprint(model_name_or_path), "data": data_fingerprint(dataset),
                                     "dtype": str(dtype)}).encode()).hexdigest()
    return os.path.join(cache_dir, f"reference_logps_{key[:20]}.safetensors")


@torch.no_grad()
def compute_reference_logps(model, dataset, batch_size, pad_token_id, packing, device):
    """Summed log-probs of every pair's chosen and rejected response under `model`: [N], [N].

    Every rank scores its own slice of each group of world_size * batch_size pairs; FSDP needs all
    ranks in every forward, so a rank with nothing left scores a stand-in pair and drops the result.
    Each row is written by exactly one rank, so summing the tables across ranks assembles them exactly.
    """
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    chosen = torch.zeros(len(dataset), dtype=torch.float32, device=device)
    rejected = torch.zeros(len(dataset), dtype=torch.float32, device=device)
    for start in range(0, len(dataset), world_size * batch_size):
        mine = list(range(start + rank * batch_size, min(start + (rank + 1) * batch_size, len(dataset))))
        examples = [dict(dataset[i], index=i) for i in (mine or [0])]
        batch = {k: v.to(device) for k, v in collate_pairs(examples, pad_token_id, packing).items()}
        chosen_sums, rejected_sums, _, _ = concatenated_logps(model, batch)
        if mine:
            chosen[mine], rejected[mine] = chosen_sums, rejected_sums
    if world_size > 1:
        dist.all_reduce(chosen)
        dist.all_reduce(rejected)
    model.train(was_training)
    return chosen, rejected


def load_or_compute_reference(path, model, dataset, batch_size, pad_token_id, packing, device):
    """Reference log-probs from the cache file, or computed with the (initial) model and cached."""
    if os.path.exists(path):
        cached = load_file(path, device=str(device))
        return cached["chosen_logps"], cached["rejected_logps"], True
    chosen, rejected = compute_reference_logps(model, dataset, batch_size, pad_token_id, packing, device)
    if not dist.is_initialized() or dist.get_rank() == 0:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        save_file({"chosen_logps": chosen.cpu(), "rejected_logps": rejected.cpu()}, path + ".tmp")
        os.replace(path + ".tmp", path)  # atomic: a crash never leaves a truncated cache behind
    return chosen, rejected, False
