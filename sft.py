"""Supervised fine-tuning (SFT), the first stage of the Tülu 3 recipe.

    python sft.py --model_name_or_path .cache/models/SmolLM2-135M-Instruct \
        --dataset_mixer_list data/demo/sft_train.jsonl 1.0 --output_dir output/sft \
        --per_device_train_batch_size 8 --gradient_accumulation_steps 1 --max_seq_length 512 --max_train_steps 20
    torchrun --nproc_per_node 8 sft.py --model_name_or_path meta-llama/Llama-3.1-8B \
        --dataset_mixer_list allenai/tulu-3-sft-mixture 1.0 --chat_template_name tulu \
        --per_device_train_batch_size 1 --gradient_accumulation_steps 16 --output_dir output/sft-8b

The file's sections, top to bottom: arguments; the loss; data (mix, validate, tokenize with the loss only on
assistant turns); training (the loop). The model as the loss sees it lives in modeling.py: the log-prob wrapper
(each label's log-prob from the model's own head, a chunk of tokens at a time, so no [tokens, vocab] logits exist
in full) and the attention for packed rows. What every stage needs to run a model lives in infra.py: distributed
setup (torchrun or plain python), model loading (sharded with FSDP2 per decoder layer, each rank reading only
its own shard of the safetensors files, and checked against plain from_pretrained before the first
update), the Hugging Face save, metrics and the schedule; and in checkpoint.py: the output directory and the
checkpoints that make an interrupted run resume onto the same loss curve.

Loss reduction (--reduce_loss). Every trained token weighs the same. `sum` divides the summed
token losses by the number of sequences in the optimizer batch (Tülu 3); `mean` divides by the
number of trained tokens in the optimizer batch, counted over all ranks before the forward. Either
way the divisor is a property of the whole optimizer batch, so the gradient does not depend on how
the batch is split into micro-batches and ranks (averaging per micro-batch would over-weight short
examples). That is what lets --max_tokens_per_micro_batch regroup each rank's share into a few full rows
(fewer FSDP gathers and reductions per step) without changing the gradient. The logged `loss` is the
NLL per trained token under either reduction (summed NLL / trained tokens of the optimizer batch), so
runs with `sum` and `mean` log comparable curves; only the gradient's scale differs.

Simplified relative to open-instruct: no LoRA, no DeepSpeed; the last partial
optimizer batch of an epoch is dropped.
"""
import argparse
import functools
import math
import os
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
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


# ---------------------------------------------------------------------------------------------
# Arguments

def parse_args(argv=None):
    parser = flags.StageParser(__doc__)
    parser.add_argument("--model_name_or_path", required=True, help="Hugging Face model directory or hub name")
    data_mix.add_data_args(parser, max_seq_length=4096)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--per_device_train_batch_size", type=flags.POSITIVE_INT, default=1,
                        help="sequences per micro-batch")
    parser.add_argument("--gradient_accumulation_steps", type=flags.POSITIVE_INT, default=16)
    parser.add_argument("--learning_rate", type=flags.NON_NEGATIVE, default=5e-6)
    parser.add_argument("--lr_scheduler_type", default="linear", choices=infra.LR_SCHEDULES,
                        help="as transformers' get_scheduler: warmup (--warmup_ratio) from 0, then decay to 0; "
                             "constant: no warmup")
    parser.add_argument("--warmup_ratio", type=flags.FRACTION, default=0.03)
    parser.add_argument("--weight_decay", type=flags.NON_NEGATIVE, default=0.0)
    parser.add_argument("--max_grad_norm", type=flags.bounded(float), default=1.0,
                        help="clip the gradient norm; <= 0 disables")
    parser.add_argument("--num_train_epochs", type=flags.POSITIVE_INT, default=2)
    parser.add_argument("--max_train_steps", type=flags.POSITIVE_INT, default=None,
                        help="overrides --num_train_epochs")
    parser.add_argument("--reduce_loss", default="sum", choices=["sum", "mean"],
                        help="divide the summed token NLL by the optimizer batch's sequences (sum, Tülu 3) or trained "
                             "tokens (mean); the logged loss is NLL per trained token either way")
    parser.add_argument("--load_balancing_loss", action="store_true",
                        help="MoE: add the router's load-balancing loss (a mean over micro-batches)")
    parser.add_argument("--load_balancing_weight", type=flags.NON_NEGATIVE, default=None,
                        help="its weight; default: the model's router_aux_loss_coef")
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
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args(argv)
    if args.max_tokens_per_micro_batch is not None and not args.packing:
        parser.error("--max_tokens_per_micro_batch needs --packing")
    return args


# ---------------------------------------------------------------------------------------------
# Loss

def sft_loss(label_logprobs, labels, denominator: float):
    """Summed negative log-likelihood of the trained tokens / denominator (a constant of the optimizer batch).

    label_logprobs: [B, T-1] from modeling.chunked_label_logprobs; labels: [B, T] (-100 = not trained).
    """
    trained_mask = labels[:, 1:] != data_mix.IGNORE_INDEX     # [B, T-1]
    return -(label_logprobs * trained_mask).sum() / denominator


# ---------------------------------------------------------------------------------------------
# Data

def load_sft_data(args, tokenizer, rank: int):
    """Mixed, validated, tokenized conversations; rank 0 prepares first so the others reuse its cache."""
    if rank != 0:
        dist.barrier()
    rows, report = data_mix.load_mixture(args, data_mix.validate_sft_record)
    examples, fully_masked = data_mix.tokenize_sft_dataset(rows, tokenizer, args.max_seq_length,
                                                           args.preprocessing_num_workers)
    if rank == 0:
        dist.barrier()
    if len(examples) == 0:
        raise SystemExit(f"no trainable tokens: all {fully_masked} examples lost their assistant tokens "
                         f"(truncated at --max_seq_length {args.max_seq_length}?)")
    report.update(fully_masked_dropped=fully_masked, examples=len(examples))
    return examples, report


def micro_batches(examples, order: list[int], args, rank: int, world_size: int, pad_token_id: int,
                  stand_in: bool = False):
    """This rank's share of one optimizer batch, split into collated micro-batches (stand_in: its shortest
    example alone, the cheapest micro-batch for a rank that must run one that trains nothing)."""
    length = lambda i: len(examples[i]["input_ids"])  # noqa: E731
    mine = order[rank::world_size]
    for indices in [[min(mine, key=length)]] if stand_in else data_mix.micro_batch_indices(
            mine, args.per_device_train_batch_size, args.max_tokens_per_micro_batch, length):
        rows = [examples[i] for i in indices]
        yield data_mix.collate_packed(rows) if args.packing else data_mix.collate_padded(rows, pad_token_id)


# ---------------------------------------------------------------------------------------------
# Training

def accumulate_gradients(model, examples, batch_indices: list[int], args, rank: int, world_size: int, device,
                         pad_token_id: int):
    """Forward and backward over this rank's micro-batches of one optimizer batch.

    Returns (summed token NLL over all ranks, trained tokens over all ranks, input tokens over all ranks, the
    router loss averaged over micro-batches and ranks: 0 without --load_balancing_loss).
    """
    # The loss divisor belongs to the whole optimizer batch, so it is known before any forward: each rank
    # counts the trained tokens of its collated micro-batches (packing's boundary labels are already -100).
    micros = [{k: v.to(device) for k, v in micro.items()}  # input_ids, labels, position_ids: [R, T] (R rows)
              for micro in micro_batches(examples, batch_indices, args, rank, world_size, pad_token_id)]
    trained_tokens = sum(((micro["labels"][:, 1:] != data_mix.IGNORE_INDEX).sum() for micro in micros),
                         torch.zeros((), dtype=torch.long, device=device))
    dist.all_reduce(trained_tokens)
    denominator = len(batch_indices) if args.reduce_loss == "sum" else trained_tokens
    summed_nll = torch.zeros((), device=device)
    input_tokens = torch.zeros((), device=device)
    # FSDP's collectives pair up across ranks, so every rank runs as many micro-batches as the busiest one
    # (token budgets pack ranks unevenly): a rank with fewer adds stand-ins with weight 0.
    most = torch.tensor(len(micros), device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    stand_ins = [{k: v.to(device) for k, v in micro.items()} for micro in micro_batches(
        examples, batch_indices, args, rank, world_size, pad_token_id, stand_in=True)]
    router_loss = torch.zeros((), device=device)
    for number, micro in enumerate(micros + stand_ins * (int(most) - len(micros))):
        weight = float(number < len(micros))
        if args.load_balancing_loss:
            label_logprobs, aux_loss = model(**micro, load_balancing=True)  # [R, T-1], a scalar
        else:
            label_logprobs, aux_loss = model(**micro), None  # [R, T-1]
        # FSDP averages gradients over ranks; multiplying by world_size turns that average into a sum.
        loss = sft_loss(label_logprobs, micro["labels"], denominator) * world_size * weight
        summed_nll += loss.detach() * denominator / world_size
        if aux_loss is not None:  # a per-micro-batch statistic, not a token sum: averaged over micro-batches
            aux_loss = aux_loss * weight / len(micros)  # (and over ranks, by FSDP)
            loss = loss + args.load_balancing_weight * aux_loss
            router_loss += aux_loss.detach() / world_size
        loss.backward()
        input_tokens += weight * (micro["attention_mask"].sum() if "attention_mask" in micro
                                  else micro["input_ids"].numel())
    for total in (summed_nll, input_tokens, router_loss):
        dist.all_reduce(total)
    return summed_nll, trained_tokens, input_tokens, router_loss


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
    examples, data_report = load_sft_data(args, tokenizer, rank)

    batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
    steps_per_epoch = len(examples) // batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(examples)} examples are fewer than one optimizer batch of {batch_size} "
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
    first_ids = torch.tensor([first_example["input_ids"][:64]], device=device)
    infra.check_loaded_model(model, args.model_name_or_path, first_ids,
                             lambda ids, positions: model(input_ids=ids, labels=ids, position_ids=positions),
                             infra.resolve_dtype(args.dtype, device), rank)
    if args.load_balancing_loss:  # Mixtral, OLMoE, Qwen-MoE, ...: their configs carry the router loss's weight
        text_config = model.model.config.get_text_config()
        if not hasattr(text_config, "router_aux_loss_coef"):
            raise SystemExit(f"--load_balancing_loss: {text_config.model_type} has no router (no router_aux_loss_coef)")
        if args.load_balancing_weight is None:
            args.load_balancing_weight = text_config.router_aux_loss_coef
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
    progress = tqdm(total=total_steps, initial=start_step, desc="sft", disable=rank != 0)
    for step in range(start_step, total_steps):
        # the global RNG (dropout) is a function of the step
        torch.manual_seed(args.seed + infra.STEP_SEED_STRIDE * step + rank)
        epoch, index = divmod(step, steps_per_epoch)
        # The data order is a function of (seed, epoch): a resumed run sees the same batches.
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
        batch_indices = order[index * batch_size:(index + 1) * batch_size]
        started = time.perf_counter()

        summed_nll, trained_tokens, input_tokens, router_loss = accumulate_gradients(
            model, examples, batch_indices, args, rank, world_size, device, tokenizer.pad_token_id)

        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm if args.max_grad_norm > 0
                                                   else float("inf"))
        grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
        mean_loss = (summed_nll / trained_tokens).item()
        if not math.isfinite(mean_loss) or not math.isfinite(grad_norm.item()):
            raise FloatingPointError(f"step {step + 1}: loss {mean_loss}, grad norm {grad_norm.item()}; stopped "
                                     "before the update, the last checkpoint in --output_dir is intact")
        lr = optimizer.param_groups[0]["lr"]  # the rate this update really uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        elapsed = time.perf_counter() - started
        metrics = {"step": step + 1, "epoch": epoch, "loss": mean_loss, "lr": lr, "grad_norm": grad_norm.item(),
                   "tokens": int(trained_tokens.item()), "input_tokens": int(input_tokens.item()),
                   **({"router_loss": router_loss.item()} if args.load_balancing_loss else {}),
                   "tokens_per_s": input_tokens.item() / elapsed}
        if rank == 0:
            infra.append_metrics(metrics_path, metrics)
            report(metrics)
            progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            progress.update()
        if (step + 1) % args.checkpointing_steps == 0 and step + 1 < total_steps:
            checkpoint.save(model, optimizer, scheduler, step + 1, args.output_dir, rank, run_facts)
    progress.close()
    report.close()
    infra.save_hf_model(model, tokenizer, args.model_name_or_path, args.output_dir, rank)


if __name__ == "__main__":
    infra.run(main)
