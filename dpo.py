"""Direct preference optimization (DPO), the second stage of the Tülu 3 recipe.

    python dpo.py --model_name_or_path output/sft \
        --dataset_mixer_list data/demo/pref_train.jsonl 1.0 --output_dir output/dpo \
        --per_device_train_batch_size 4 --gradient_accumulation_steps 1 --max_seq_length 512 --max_train_steps 10
    torchrun --nproc_per_node 8 dpo.py --model_name_or_path output/sft-8b \
        --dataset_mixer_list allenai/llama-3.1-tulu-3-8b-preference-mixture 1.0 --chat_template_name tulu \
        --per_device_train_batch_size 1 --gradient_accumulation_steps 16 --output_dir output/dpo-8b

sft.py's story, on modeling.py's log-probs and the machinery of infra.py and checkpoint.py; `diff sft.py dpo.py`
shows what DPO adds: preference pairs (one forward scores a micro-batch's chosen and rejected sequences); dpo_loss (dpo,
dpo_norm as in Tülu 3, simpo, ipo) averaged over the optimizer batch's pairs, whatever its split into
micro-batches and ranks; reference log-probs scored once by the initial model before training, with the
same sharding, and cached on disk under a hash of model files, tokenized data, precision and log-prob kind
(sums for dpo, per-token means for the others); a restart reads them back; no reference model in memory
while training (`--reference live` keeps a frozen one instead); reward and log-prob metrics (chosen
log-probs often fall while the margin grows: DPO moves margins).

Simplified relative to open-instruct: no LoRA, no DeepSpeed; the last partial
optimizer batch of an epoch is dropped.
"""
import argparse
import functools
import hashlib
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import checkpoint
import data_mix
import flags
import infra
import modeling

# Flags that may change when a run is resumed; every other flag must match the run in --output_dir. The two
# batch flags may change, on any number of ranks, as long as the sequences per optimizer step stay the same.
RESUMABLE_FLAGS = {"resume", "checkpointing_steps", "preprocessing_num_workers", "per_device_train_batch_size",
                   "gradient_accumulation_steps", "report_to"}
LOSS_TYPES = ("dpo", "dpo_norm", "simpo", "ipo")


# ---------------------------------------------------------------------------------------------
# Arguments

def parse_args(argv=None):
    parser = flags.StageParser(__doc__)
    parser.add_argument("--model_name_or_path", required=True, help="Hugging Face model directory or hub name")
    data_mix.add_data_args(parser, max_seq_length=2048)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--per_device_train_batch_size", type=flags.POSITIVE_INT, default=1,
                        help="preference pairs per micro-batch (one forward scores each pair's chosen and rejected)")
    parser.add_argument("--gradient_accumulation_steps", type=flags.POSITIVE_INT, default=16)
    parser.add_argument("--learning_rate", type=flags.NON_NEGATIVE, default=5e-7)
    parser.add_argument("--lr_scheduler_type", default="linear", choices=infra.LR_SCHEDULES,
                        help="as transformers' get_scheduler: warmup (--warmup_ratio) from 0, then decay to 0; "
                             "constant: no warmup")
    parser.add_argument("--warmup_ratio", type=flags.FRACTION, default=0.1)
    parser.add_argument("--weight_decay", type=flags.NON_NEGATIVE, default=0.0)
    parser.add_argument("--max_grad_norm", type=flags.bounded(float), default=1.0,
                        help="clip the gradient norm; <= 0 disables")
    parser.add_argument("--num_train_epochs", type=flags.POSITIVE_INT, default=1)
    parser.add_argument("--max_train_steps", type=flags.POSITIVE_INT, default=None,
                        help="overrides --num_train_epochs")
    parser.add_argument("--dpo_loss_type", default="dpo_norm", choices=LOSS_TYPES)
    parser.add_argument("--dpo_beta", type=flags.POSITIVE, default=5.0)
    parser.add_argument("--dpo_label_smoothing", type=flags.bounded(float, 0.0, 0.5, high_open=True), default=0.0)
    parser.add_argument("--dpo_gamma_beta_ratio", type=flags.NON_NEGATIVE, default=0.3,
                        help="simpo's margin gamma / beta")
    parser.add_argument("--reference", default="cached", choices=["cached", "live"],
                        help="cached: the initial model's log-probs, scored once before training and kept on disk; "
                             "live: a frozen copy of the initial model scores each micro-batch")
    parser.add_argument("--reference_cache_dir", default=None, help="default: OUTPUT_DIR/reference_logps")
    parser.add_argument("--last_turn_only", action="store_true", help="score only each side's final assistant turn")
    parser.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True,
                        help="padding-free micro-batches (one row, position_ids restart per example)")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                        help="compute dtype; auto = bf16 on GPU, fp32 on CPU (master weights stay fp32)")
    parser.add_argument("--attn_implementation", default=None,
                        help=f"e.g. sdpa, eager, or {modeling.PACKED_ATTENTION} (packed rows attend within each "
                             "example without a [T, T] mask); default: that one with --packing where it computes "
                             "exactly what the model's own does, else the model's own (sdpa where it supports it)")
    parser.add_argument("--max_tokens_per_micro_batch", type=flags.POSITIVE_INT, default=None, metavar="N",
                        help="pack each rank's share of the optimizer batch into rows of at most N tokens, first-fit "
                             "decreasing (a longer example: a row of its own); replaces --per_device_train_batch_size "
                             "as the micro-batch (it still sets the optimizer batch); same gradient")
    parser.add_argument("--report_to", default="none", choices=["none", "tensorboard", "wandb"],
                        help="each step's metrics also to TensorBoard (OUTPUT_DIR/runs) or Weights & Biases (their "
                             "packages are optional); metrics.jsonl gets them always")
    parser.add_argument("--checkpointing_steps", type=flags.POSITIVE_INT, default=500,
                        help="write a resumable checkpoint every N steps")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output_dir from its newest checkpoint (or start it, if none)")
    parser.add_argument("--seed", type=int, default=42, help="default 42, as Tülu 3 8B DPO (dpo_tune.py's default)")
    args = parser.parse_args(argv)
    if args.max_tokens_per_micro_batch is not None and not args.packing:
        parser.error("--max_tokens_per_micro_batch needs --packing")
    if args.dpo_loss_type == "ipo" and args.dpo_label_smoothing:
        parser.error("--dpo_label_smoothing has no meaning for --dpo_loss_type ipo (its loss is a square)")
    return args


# ---------------------------------------------------------------------------------------------
# Loss

def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, loss_type: str, beta: float,
             label_smoothing: float = 0.0, gamma_beta_ratio: float = 0.3):
    """Per-pair preference losses and implicit rewards.

    L_c, L_r: policy log-probs of the chosen / rejected responses, R_c, R_r: the reference's, all [N];
    sums over response tokens for `dpo`, per-token means for the others (the caller's job).
        dpo, dpo_norm: z = (L_c - L_r) - (R_c - R_r);  loss = -(1-ε) log σ(βz) - ε log σ(-βz)   ε: smoothing
        simpo:         z = L_c - L_r (no reference);    loss = the same with βz - γ for βz,  γ = ratio·β
        ipo:           z as for dpo;                    loss = (z - 1/(2β))²
    Returns (losses [N], chosen_rewards [N], rejected_rewards [N]); rewards (detached metrics) are β (L - R),
    or β L for simpo, which has no reference (its reference arguments may be None).
    """
    if loss_type not in LOSS_TYPES or (loss_type == "ipo" and label_smoothing):
        raise ValueError(f"loss_type must be one of {LOSS_TYPES} (ipo without label_smoothing), got {loss_type!r}")
    if loss_type == "simpo":
        ref_chosen_logps, ref_rejected_logps = torch.zeros_like(chosen_logps), torch.zeros_like(rejected_logps)
    z = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)  # [N]
    logits = beta * z - (gamma_beta_ratio * beta if loss_type == "simpo" else 0.0)  # [N]
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)                      # [N]
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)                # [N]
    if loss_type == "ipo":
        losses = (z - 1 / (2 * beta)) ** 2                                # [N]
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)  # [N]
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def sequence_logps(label_logprobs, labels, position_ids):
    """Summed label log-probs [N] (fp32) and scored-token counts [N] of the N sequences in a batch, from
    label_logprobs [R, T-1] (modeling.CausalLMLogProbs) and labels, position_ids [R, T]: a row holds one padded
    sequence or several packed ones (position_ids restart at 0)."""
    starts = position_ids == 0                                           # [R, T] first token of a sequence
    sequence_index = (starts.flatten().cumsum(0) - 1).view(starts.shape)[:, 1:].flatten()  # [R*(T-1)]
    # A sequence's first token is predicted from the previous sequence in a packed row: never score it.
    scored = ((labels[:, 1:] != data_mix.IGNORE_INDEX) & ~starts[:, 1:]).flatten()        # [R*(T-1)]
    sums = torch.zeros(int(starts.sum()), device=labels.device).index_add(0, sequence_index,
                                                                           label_logprobs.flatten() * scored)
    counts = torch.zeros_like(sums).index_add(0, sequence_index, scored.float())
    return sums, counts


def concatenated_logps(model, batch, mean: bool):
    """Chosen [B] and rejected [B] log-probs, summed or per-token means, from one forward of both."""
    label_logprobs = model(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                           attention_mask=batch.get("attention_mask"))    # [2B or 1, T-1]
    sums, counts = sequence_logps(label_logprobs, batch["labels"], batch["position_ids"])  # [2B]
    return (sums / counts if mean else sums).chunk(2)


# ---------------------------------------------------------------------------------------------
# Preference records
# DPO trains on pairs of whole conversations that share the prompt turns and differ in the final
# assistant turn. Two record shapes are accepted:
#   {"chosen": [messages], "rejected": [messages]}         (Tülu 3's preference mixture; its
#                                                           "prompt" string repeats the user turn)
#   {"prompt": str | [messages], "chosen": str | [assistant messages], "rejected": ...}
# A side that is a string, or a message list starting with an assistant turn, is a response to
# `prompt`; a side that starts with a system or user turn is already a whole conversation.

def preference_side(row: dict, side: str, where: str) -> list[dict]:
    """One side of a preference record as a whole conversation ending in the assistant response."""
    value = row.get(side)
    if value is None:
        raise flags.InvalidRecord(f"{where}, field {side}: missing (a preference record needs chosen and rejected)")
    if isinstance(value, str):
        response = [{"role": "assistant", "content": value}]
    elif isinstance(value, list):
        response = value
    else:
        raise flags.InvalidRecord(f"{where}, field {side}: expected a response string or a list of messages, "
                                  f"got {type(value).__name__}")
    starts_with_response = not response or (isinstance(response[0], dict) and response[0].get("role") == "assistant")
    if starts_with_response:
        prompt = row.get("prompt")
        if isinstance(prompt, str) and prompt.strip():
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list) or not prompt:
            raise flags.InvalidRecord(f"{where}, field prompt: {side} is a response only, so a non-empty prompt "
                                      f"(string or list of messages) is needed, got {prompt!r}")
        response = prompt + response
    response = data_mix.validate_messages(response, f"{where}, field {side}")
    if response[-1]["role"] != "assistant":
        raise flags.InvalidRecord(f"{where}, field {side}: the last turn must be the assistant response, "
                                  f"got {response[-1]['role']!r}")
    return response


def preference_messages(row: dict, where: str) -> tuple[list[dict], list[dict]]:
    """(chosen_messages, rejected_messages) of a record; flags.InvalidRecord names dataset, row and field."""
    chosen = preference_side(row, "chosen", where)
    rejected = preference_side(row, "rejected", where)
    if chosen[:-1] != rejected[:-1]:  # DPO compares two answers to one prompt
        turn = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b),
                    min(len(chosen), len(rejected)) - 1)
        raise flags.InvalidRecord(f"{where}, field rejected: its prompt turns differ from chosen's at turn {turn}")
    if chosen == rejected:  # no preference to learn: the DPO margin is 0 whatever the model does
        raise flags.InvalidRecord(f"{where}, field rejected: identical to chosen")
    return chosen, rejected


def validate_preference_record(row: dict, where: str) -> dict:
    chosen, rejected = preference_messages(row, where)
    return {"chosen": chosen, "rejected": rejected}


def tokenize_preference(tokenizer, row: dict, max_seq_length: int, last_turn_only: bool = False) -> dict:
    """Each side tokenized with the SFT masking: chosen_/rejected_ input_ids and labels."""
    chosen, rejected = preference_messages(row, f"dataset {row.get('source')}")
    tokenized = {}
    for side, messages in (("chosen", chosen), ("rejected", rejected)):
        example = data_mix.tokenize_sft(tokenizer, messages, max_seq_length, last_turn_only)
        tokenized[f"{side}_input_ids"], tokenized[f"{side}_labels"] = example["input_ids"], example["labels"]
    return tokenized


def tokenize_preference_dataset(dataset, tokenizer, max_seq_length: int, num_proc: int = 1,
                                last_turn_only: bool = False):
    """Tokenize every pair; drop (and count) pairs where truncation left a side with no trained token."""
    tokenized = dataset.map(
        lambda row: tokenize_preference(tokenizer, row, max_seq_length, last_turn_only),
        remove_columns=[c for c in dataset.column_names if c != "source"],
        num_proc=num_proc if num_proc > 1 else None, desc="tokenizing preferences")
    trainable = tokenized.filter(
        lambda row: all(any(label != data_mix.IGNORE_INDEX for label in row[f"{side}_labels"])
                        for side in ("chosen", "rejected")),
        num_proc=num_proc if num_proc > 1 else None, desc="dropping fully masked pairs")
    return trainable, len(tokenized) - len(trainable)


def collate_preference_pairs(examples, indices: list[int], pad_token_id: int, packing: bool) -> dict:
    """These pairs' chosen then rejected sequences in one batch, so one forward scores both: [2B, T]
    padded or [1, sum T] packed, with position_ids (they mark where each sequence starts) and `index` [B]."""
    sequences = [{"input_ids": examples[i][f"{side}_input_ids"], "labels": examples[i][f"{side}_labels"]}
                 for side in ("chosen", "rejected") for i in indices]
    batch = data_mix.collate_packed(sequences) if packing else data_mix.collate_padded(sequences, pad_token_id)
    batch.setdefault("position_ids", torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]))
    return {**batch, "index": torch.tensor(indices)}


# ---------------------------------------------------------------------------------------------
# Data

def load_preference_data(args, tokenizer, rank: int):
    """Mixed, validated, tokenized preference pairs; rank 0 prepares first so the others reuse its cache."""
    if rank != 0:
        dist.barrier()
    rows, report = data_mix.load_mixture(args, validate_preference_record)
    examples, fully_masked = tokenize_preference_dataset(rows, tokenizer, args.max_seq_length,
                                                         args.preprocessing_num_workers, args.last_turn_only)
    if rank == 0:
        dist.barrier()
    if len(examples) == 0:
        raise SystemExit(f"no trainable pairs: all {fully_masked} pairs lost a side's assistant tokens "
                         f"(truncated at --max_seq_length {args.max_seq_length}?)")
    report.update(fully_masked_dropped=fully_masked, examples=len(examples))
    return examples, report


def micro_batches(examples, order: list[int], args, rank: int, world_size: int, pad_token_id: int,
                  stand_in: bool = False):
    """This rank's share of one optimizer batch, split into collated micro-batches (stand_in: its shortest
    pair alone, the cheapest micro-batch for a rank that must run one that trains nothing)."""
    length = lambda i: len(examples[i]["chosen_input_ids"]) + len(examples[i]["rejected_input_ids"])  # noqa: E731
    mine = order[rank::world_size]
    for indices in [[min(mine, key=length)]] if stand_in else data_mix.micro_batch_indices(
            mine, args.per_device_train_batch_size, args.max_tokens_per_micro_batch, length):
        yield collate_preference_pairs(examples, indices, pad_token_id, args.packing)


# ---------------------------------------------------------------------------------------------
# Reference log-probs: computed once with the initial model, cached on disk

def reference_cache_path(args, run_facts: dict, device) -> str:
    """Named by a sha256 of the model files' and tokenized pairs' fingerprints, precision and log-prob kind."""
    key = [run_facts["model"], run_facts["data"], infra.resolve_dtype(args.dtype, device), args.dpo_loss_type != "dpo"]
    cache_dir = args.reference_cache_dir or os.path.join(args.output_dir, "reference_logps")
    return os.path.join(cache_dir, f"reference_logps_{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]}"
                                   ".safetensors")


@torch.no_grad()
def cached_reference_logps(model, examples, args, rank: int, world_size: int, device, pad_token_id: int,
                           run_facts: dict):
    """Chosen [N] and rejected [N] log-probs of all pairs under the model as loaded, cached or scored and
    cached. Rank r scores the r-th micro-batch of each group of world_size (FSDP needs all ranks in each
    forward: one with nothing left scores a stand-in); one rank writes each row, so a sum assembles them."""
    path = reference_cache_path(args, run_facts, device)
    if os.path.exists(path):  # checked by every rank before any rank can write (scoring is collective)
        cached = load_file(path, device=str(device))
        if rank == 0:
            print(f"reference log-probs: read from {path}")
        return cached["chosen"], cached["rejected"]
    model.eval()
    chosen, rejected = torch.zeros(len(examples), device=device), torch.zeros(len(examples), device=device)
    size = args.per_device_train_batch_size
    for start in range(0, len(examples), size * world_size):
        mine = list(range(start + rank * size, min(start + (rank + 1) * size, len(examples))))
        batch = collate_preference_pairs(examples, mine or [0], pad_token_id, args.packing)
        batch = {k: v.to(device) for k, v in batch.items()}
        chosen_logps, rejected_logps = concatenated_logps(model, batch, mean=args.dpo_loss_type != "dpo")
        if mine:
            chosen[mine], rejected[mine] = chosen_logps, rejected_logps
    dist.all_reduce(chosen)
    dist.all_reduce(rejected)
    # FSDP keeps the root's weights gathered after a forward without backward: the optimizer needs the shards.
    model.reshard()
    model.train()
    if rank == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file({"chosen": chosen.cpu(), "rejected": rejected.cpu()}, path + ".tmp")
        os.replace(path + ".tmp", path)  # atomic: a crash never leaves a truncated cache behind
        print(f"reference log-probs: computed for {len(examples)} pairs, cached in {path}")
    dist.barrier()
    return chosen, rejected


# ---------------------------------------------------------------------------------------------
# Training

def accumulate_gradients(model, reference, examples, batch_indices: list[int], args, rank: int, world_size: int, device,
                         pad_token_id: int):
    """Forward and backward over this rank's micro-batches of one optimizer batch. `reference`: a frozen model,
    the cached (chosen, rejected) tables, or None (simpo). Returns sums over all ranks' pairs of (loss, rewards
    chosen, rejected, correct orderings, logps chosen, rejected) [6], and input tokens over all ranks."""
    mean = args.dpo_loss_type != "dpo"  # dpo_norm, simpo and ipo compare mean per-token log-probs
    micros = [{k: v.to(device) for k, v in micro.items()}  # input_ids, labels, position_ids: [R, T] (R rows)
              for micro in micro_batches(examples, batch_indices, args, rank, world_size, pad_token_id)]
    totals = torch.zeros(6, device=device)
    input_tokens = torch.zeros((), device=device)
    # FSDP's collectives pair up across ranks, so every rank runs as many micro-batches as the busiest one
    # (token budgets pack ranks unevenly): a rank with fewer adds stand-ins with weight 0.
    most = torch.tensor(len(micros), device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    stand_ins = [{k: v.to(device) for k, v in micro.items()} for micro in micro_batches(
        examples, batch_indices, args, rank, world_size, pad_token_id, stand_in=True)]
    for number, micro in enumerate(micros + stand_ins * (int(most) - len(micros))):
        weight = float(number < len(micros))
        chosen_logps, rejected_logps = concatenated_logps(model, micro, mean)  # [B] each, B pairs
        ref_chosen_logps, ref_rejected_logps = None, None  # simpo
        if isinstance(reference, torch.nn.Module):
            with torch.no_grad():
                ref_chosen_logps, ref_rejected_logps = concatenated_logps(reference, micro, mean)
        elif reference is not None:
            ref_chosen_logps, ref_rejected_logps = (table[micro["index"]] for table in reference)  # [N] -> [B]
        losses, chosen_rewards, rejected_rewards = dpo_loss(  # [B] each
            chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, loss_type=args.dpo_loss_type,
            beta=args.dpo_beta, label_smoothing=args.dpo_label_smoothing, gamma_beta_ratio=args.dpo_gamma_beta_ratio)
        # The mean over the optimizer batch's pairs: a divisor known before any forward.
        # FSDP averages gradients over ranks; multiplying by world_size turns that average into a sum.
        loss = losses.sum() / len(batch_indices) * world_size * weight
        totals += weight * torch.stack([losses.sum(), chosen_rewards.sum(), rejected_rewards.sum(),
                                        (chosen_rewards > rejected_rewards).sum(), chosen_logps.sum(),
                                        rejected_logps.sum()]).detach()
        loss.backward()
        input_tokens += weight * (micro["attention_mask"].sum() if "attention_mask" in micro
                                  else micro["input_ids"].numel())
    for total in (totals, input_tokens):
        dist.all_reduce(total)
    return totals, input_tokens


def main(argv=None):
    args = parse_args(argv)
    with infra.process_group() as (rank, world_size, device):
        run_config = {name: value for name, value in vars(args).items() if name not in RESUMABLE_FLAGS}
        with checkpoint.claimed_output_dir(args.output_dir, model_path=args.model_name_or_path, run_config=run_config,
                                           resume=args.resume, rank=rank):
            train(args, rank, world_size, device)


def train(args, rank: int, world_size: int, device) -> None:
    torch.manual_seed(args.seed)
    if infra.final_model_saved(args.output_dir, rank):
        return
    tokenizer = data_mix.load_tokenizer(args.model_name_or_path, args.chat_template_name)
    examples, data_report = load_preference_data(args, tokenizer, rank)

    batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
    steps_per_epoch = len(examples) // batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(examples)} pairs are fewer than one optimizer batch of {batch_size} "
                         "(per_device_train_batch_size x gradient_accumulation_steps x ranks)")
    total_steps = args.max_train_steps or steps_per_epoch * args.num_train_epochs
    run_facts = {"optimizer_batch": batch_size, **checkpoint.run_fingerprints(examples, args.model_name_or_path, rank)}
    resumed = checkpoint.newest(args.output_dir, run_facts, world_size)
    if rank == 0:
        data_mix.save_json(os.path.join(args.output_dir, "mixture.json"), data_report)

    args.attn_implementation = modeling.choose_attention(args.model_name_or_path, args.attn_implementation,
                                                         args.packing, args.max_seq_length, rank)
    load_model = functools.partial(infra.load_model, device=device, rank=rank, dtype=args.dtype,
                                   attn_implementation=args.attn_implementation, max_seq_length=args.max_seq_length,
                                   gradient_checkpointing=args.gradient_checkpointing, compile=args.compile)
    model = load_model(args.model_name_or_path, modeling.CausalLMLogProbs)
    first = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.seed))[0].item()
    first_example = examples[first]
    first_ids = torch.tensor([first_example["chosen_input_ids"][:64]], device=device)
    infra.check_loaded_model(model, args.model_name_or_path, first_ids,
                             lambda ids, positions: model(input_ids=ids, labels=ids, position_ids=positions),
                             infra.resolve_dtype(args.dtype, device), rank)
    # The reference is the initial model: scored before any update (and before a resume loads trained weights).
    reference = None  # simpo has none
    if args.dpo_loss_type != "simpo" and args.reference == "live":
        reference = load_model(args.model_name_or_path, modeling.CausalLMLogProbs).eval().requires_grad_(False)
    elif args.dpo_loss_type != "simpo":
        reference = cached_reference_logps(model, examples, args, rank, world_size, device, tokenizer.pad_token_id,
                                           run_facts)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = infra.make_scheduler(optimizer, args.lr_scheduler_type, int(args.warmup_ratio * total_steps),
                                     total_steps)
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    start_step = checkpoint.load(model, optimizer, scheduler, resumed) if resumed else 0
    if rank == 0:  # forget what the checkpoint does not cover: later steps' metrics, incomplete checkpoints
        infra.truncate_metrics(metrics_path, start_step)
        checkpoint.remove_others(args.output_dir, keep=resumed.path if resumed else None)
    report = infra.MetricsReport(args.report_to if rank == 0 else "none", args.output_dir, start_step, vars(args))

    model.train()
    progress = tqdm(total=total_steps, initial=start_step, desc="dpo", disable=rank != 0)
    for step in range(start_step, total_steps):
        # the global RNG (dropout) is a function of the step
        torch.manual_seed(args.seed + infra.STEP_SEED_STRIDE * step + rank)
        epoch, index = divmod(step, steps_per_epoch)
        # The data order is a function of (seed, epoch): a resumed run sees the same batches.
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
        batch_indices = order[index * batch_size:(index + 1) * batch_size]
        started = time.perf_counter()

        totals, input_tokens = accumulate_gradients(
            model, reference, examples, batch_indices, args, rank, world_size, device, tokenizer.pad_token_id)

        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm if args.max_grad_norm > 0
                                                   else float("inf"))
        grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
        mean_loss, chosen_reward, rejected_reward, accuracy, chosen_logp, rejected_logp = (totals / batch_size).tolist()
        if not math.isfinite(mean_loss) or not math.isfinite(grad_norm.item()):
            raise FloatingPointError(f"step {step + 1}: loss {mean_loss}, grad norm {grad_norm.item()}; stopped "
                                     "before the update, the last checkpoint in --output_dir is intact")
        lr = optimizer.param_groups[0]["lr"]  # the rate this update really uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        elapsed = time.perf_counter() - started
        metrics = {"step": step + 1, "epoch": epoch, "loss": mean_loss, "lr": lr, "grad_norm": grad_norm.item(),
                   "rewards/chosen": chosen_reward, "rewards/rejected": rejected_reward,
                   "rewards/margin": chosen_reward - rejected_reward, "rewards/accuracy": accuracy,
                   "logps/chosen": chosen_logp, "logps/rejected": rejected_logp,
                   "input_tokens": int(input_tokens.item()), "tokens_per_s": input_tokens.item() / elapsed}
        if rank == 0:
            infra.append_metrics(metrics_path, metrics)
            report(metrics)
            progress.set_postfix(loss=f"{mean_loss:.4f}", margin=f"{chosen_reward - rejected_reward:.3f}")
            progress.update()
        if (step + 1) % args.checkpointing_steps == 0 and step + 1 < total_steps:
            checkpoint.save(model, optimizer, scheduler, step + 1, args.output_dir, rank, run_facts)
    progress.close()
    report.close()
    infra.save_hf_model(model, tokenizer, args.model_name_or_path, args.output_dir, rank)


if __name__ == "__main__":
    infra.run(main)
