"""Direct preference optimization (DPO), the second stage of the Tülu 3 recipe.

    python dpo.py --model_name_or_path output/sft \
        --dataset_mixer_list data/demo/pref_train.jsonl 1.0 --output_dir output/dpo \
        --per_device_train_batch_size 4 --gradient_accumulation_steps 1 --max_seq_length 512
    torchrun --nproc_per_node 8 dpo.py --model_name_or_path output/sft-8b \
        --dataset_mixer_list allenai/llama-3.1-tulu-3-8b-preference-mixture 1.0 --chat_template_name tulu \
        --per_device_train_batch_size 1 --gradient_accumulation_steps 16 --output_dir output/dpo-8b

sft.py's story and boilerplate; `diff sft.py dpo.py` shows what DPO adds: preference pairs (one
forward scores a micro-batch's chosen and rejected sequences); dpo_loss (dpo, dpo_norm as in Tülu 3,
simpo, ipo) averaged over the optimizer batch's pairs, whatever its split into micro-batches and
ranks; reference log-probs scored once by the initial model before training, with the same sharding,
and cached on disk under a hash of model files, tokenized data and precision (a restart reads them
back; no reference model in memory while training; `--reference live` keeps a frozen one instead);
reward and log-prob metrics (chosen log-probs often fall while the margin grows: DPO moves margins).

Simplified relative to open-instruct: no LoRA, no DeepSpeed, no logging services; the last partial
optimizer batch of an epoch is dropped; a resumed run needs the same number of ranks.
"""
import argparse
import datetime
import hashlib
import json
import math
import os
import shutil
import time

import pyarrow.compute as pc
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm
from transformers.utils import cached_file

import data_mix

# Flags that may change when a run is resumed; every other flag must match the run in --output_dir.
RESUMABLE_FLAGS = {"resume", "checkpointing_steps", "preprocessing_num_workers"}
LOSS_TYPES = ("dpo", "dpo_norm", "simpo", "ipo")


# ---------------------------------------------------------------------------------------------
# Arguments

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="Hugging Face model directory or hub name")
    data_mix.add_data_args(parser, max_seq_length=2048)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--per_device_train_batch_size", type=data_mix.POSITIVE_INT, default=1,
                        help="sequences per micro-batch")
    parser.add_argument("--gradient_accumulation_steps", type=data_mix.POSITIVE_INT, default=16)
    parser.add_argument("--learning_rate", type=data_mix.NON_NEGATIVE, default=5e-7)
    parser.add_argument("--lr_scheduler_type", default="linear", choices=["linear", "constant"])
    parser.add_argument("--warmup_ratio", type=data_mix.FRACTION, default=0.1)
    parser.add_argument("--weight_decay", type=data_mix.NON_NEGATIVE, default=0.0)
    parser.add_argument("--max_grad_norm", type=data_mix.bounded(float), default=1.0,
                        help="clip the gradient norm; <= 0 disables")
    parser.add_argument("--num_train_epochs", type=data_mix.POSITIVE_INT, default=1)
    parser.add_argument("--max_train_steps", type=data_mix.POSITIVE_INT, default=None,
                        help="overrides --num_train_epochs")
    parser.add_argument("--dpo_loss_type", default="dpo_norm", choices=LOSS_TYPES)
    parser.add_argument("--dpo_beta", type=data_mix.POSITIVE, default=5.0)
    parser.add_argument("--dpo_label_smoothing", type=data_mix.bounded(float, 0.0, 0.5, high_open=True), default=0.0)
    parser.add_argument("--dpo_gamma_beta_ratio", type=data_mix.NON_NEGATIVE, default=0.3,
                        help="simpo's margin gamma / beta")
    parser.add_argument("--reference", default="cached", choices=["cached", "live"], help="log-probs or a frozen model")
    parser.add_argument("--reference_cache_dir", default=None, help="default: OUTPUT_DIR/reference_logps")
    parser.add_argument("--last_turn_only", action="store_true", help="score only each side's final assistant turn")
    parser.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True,
                        help="padding-free micro-batches (one row, position_ids restart per example)")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                        help="compute dtype; auto = bf16 on GPU, fp32 on CPU (master weights stay fp32)")
    parser.add_argument("--attn_implementation", default="sdpa")
    parser.add_argument("--checkpointing_steps", type=data_mix.POSITIVE_INT, default=500,
                        help="write a resumable checkpoint every N steps")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output_dir")
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args(argv)
    if args.dpo_loss_type == "ipo" and args.dpo_label_smoothing:
        parser.error("--dpo_label_smoothing has no meaning for --dpo_loss_type ipo (its loss is a square)")
    return args


# ---------------------------------------------------------------------------------------------
# Loss

def chunked_label_logprobs(hidden, weight, labels, chunk_tokens: int = 4096):
    """log p(labels[:, t+1] | tokens <= t), shape [B, T-1], fp32, 0 where the label is -100.

    Only the trained positions go through the output projection, a chunk of tokens at a time under
    activation checkpointing, so the [tokens, vocab] logits never exist in full, in forward or in
    backward (backward recomputes one chunk's logits at a time). log p = logit[label] - logsumexp,
    in fp32.
    """
    batch, length, width = hidden.shape
    targets = labels[:, 1:].reshape(-1)                      # [N] next-token labels
    trained = (targets != data_mix.IGNORE_INDEX).nonzero().squeeze(-1)
    states = hidden[:, :-1].reshape(-1, width)[trained]      # [n, H] only the positions that carry loss
    pieces = [checkpoint(chunk_logprobs, states[i:i + chunk_tokens], weight, targets[trained[i:i + chunk_tokens]],
                         use_reentrant=False) for i in range(0, len(trained), chunk_tokens)]
    logprobs = torch.zeros(batch, length - 1, dtype=torch.float32, device=hidden.device)
    if pieces:  # scatter back to [B, T-1] (a new tensor, not a view: FSDP hooks the forward's output)
        logprobs = logprobs.index_put((trained // (length - 1), trained % (length - 1)), torch.cat(pieces))
    return logprobs


def chunk_logprobs(states, weight, targets):
    logits = (states @ weight.T).float()                     # [n, V] fp32 for the softmax
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


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
    label_logprobs [R, T-1] (CausalLMLogProbs) and labels, position_ids [R, T]: a row holds one padded
    sequence or several packed ones (position_ids restart at 0)."""
    starts = position_ids == 0                                           # [R, T] first token of a sequence
    sequence_index = (starts.flatten().cumsum(0) - 1).view(starts.shape)[:, 1:].flatten()  # [R*(T-1)]
    # A sequence's first token is predicted from the previous sequence in a packed row: never score it.
    scored = ((labels[:, 1:] != data_mix.IGNORE_INDEX) & ~starts[:, 1:]).flatten()        # [R*(T-1)]
    sums = torch.zeros(int(starts.sum()), device=labels.device).index_add(0, sequence_index,
                                                                           label_logprobs.flatten() * scored)
    counts = torch.zeros_like(sums).index_add(0, sequence_index, scored.float())
    return sums, counts


class CausalLMLogProbs(torch.nn.Module):
    """The model as FSDP sees it: token ids in, the log-prob of each label out.

    Wrapping the Hugging Face model puts the decoder and the chunked output projection in one
    forward, so FSDP gathers the output-embedding weight for the loss like any other parameter.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, position_ids=None, attention_mask=None):
        hidden = self.model.get_decoder()(input_ids=input_ids, position_ids=position_ids,
                                          attention_mask=attention_mask, use_cache=False).last_hidden_state
        return chunked_label_logprobs(hidden, self.model.get_output_embeddings().weight, labels)


def concatenated_logps(model, batch, mean: bool):
    """Chosen [B] and rejected [B] log-probs, summed or per-token means, from one forward of both."""
    label_logprobs = model(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                           attention_mask=batch.get("attention_mask"))    # [2B or 1, T-1]
    sums, counts = sequence_logps(label_logprobs, batch["labels"], batch["position_ids"])  # [2B]
    return (sums / counts if mean else sums).chunk(2)


# ---------------------------------------------------------------------------------------------
# Distributed setup, model loading and saving (kept identical in dpo.py and rlvr.py)

def init_distributed():
    """One process group for torchrun and for plain `python`: NCCL on GPU, gloo on CPU."""
    if "RANK" not in os.environ:  # plain python: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 10000))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(minutes=30))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
    return dist.get_rank(), dist.get_world_size(), device


def check_model_path(path: str) -> None:
    looks_local = os.path.isabs(path) or path.startswith(".") or path.count("/") != 1
    if not os.path.isdir(path) and looks_local:
        raise SystemExit(f"--model_name_or_path {path}: no such directory (and not an org/name hub id)")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise SystemExit(f"--model_name_or_path {path}: not a model directory (it has no config.json)")


def load_model(path: str, args, device, rank: int):
    """An FSDP2-sharded model: built empty on the meta device everywhere, weights read on rank 0 only.

    Memory: rank 0 holds one full fp32 copy of the weights in CPU RAM while loading; every rank
    holds only its 1/world shard on the device. Each decoder layer is its own FSDP unit (gathered
    just before use, freed after), the root unit holds the embeddings, final norm and head.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    config.use_cache = False
    full_state = {}
    if rank == 0:
        loaded = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)
        full_state = {f"model.{k}": v for k, v in loaded.state_dict().items()}
    with torch.device("meta"):
        model = CausalLMLogProbs(AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation=args.attn_implementation))
    if args.gradient_checkpointing:
        model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compute_dtype = torch.bfloat16 if resolve_dtype(args.dtype, device) == "bf16" else torch.float32
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in model.model.get_decoder().layers:
        if args.compile:  # fuses each layer's elementwise ops; compiled once, reused by every layer
            layer.compile()
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    model.to_empty(device=device)
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    init_rotary_buffers(model.model, device)
    return model


def init_rotary_buffers(model, device) -> None:
    """Rotary inverse frequencies are buffers outside the state dict: to_empty left them garbage."""
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "config"):
            fresh = type(module)(module.config)
            module.inv_freq = fresh.inv_freq.to(device)
            if hasattr(module, "original_inv_freq"):
                module.original_inv_freq = fresh.original_inv_freq.to(device)


def resolve_dtype(dtype: str, device) -> str:
    return ("bf16" if device.type == "cuda" else "fp32") if dtype == "auto" else dtype


def save_hf_model(model, tokenizer, source: str, output_dir: str, rank: int) -> None:
    """Gather the full weights to rank 0 and write a plain Hugging Face directory (safetensors).

    Files are written to a temporary directory and moved in with config.json last, so a crash never
    leaves a loadable but incomplete model.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        state = {k.removeprefix("model."): v for k, v in full_state.items()}
        with torch.device("meta"):  # a plain (non-FSDP) model object to drive save_pretrained
            plain = AutoModelForCausalLM.from_config(model.model.config)
        plain.config.use_cache = True
        try:  # keep the source's sampling defaults (eos ids, temperature) when it has them
            plain.generation_config = GenerationConfig.from_pretrained(source)
        except OSError:
            pass
        tmp = os.path.join(output_dir, "model.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        plain.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        names = sorted(os.listdir(tmp), key=lambda name: name == "config.json")
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
        os.rmdir(tmp)
    dist.barrier()


# ---------------------------------------------------------------------------------------------
# Checkpoints: each rank saves its own shards as plain tensors (loaded with weights_only=True)

def save_checkpoint(model, optimizer, scheduler, step: int, output_dir: str, rank: int, world_size: int) -> None:
    """Write output_dir/checkpoint atomically: a new one fully replaces the old, or the old stays."""
    final, tmp = os.path.join(output_dir, "checkpoint"), os.path.join(output_dir, "checkpoint.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    shards, moments = {}, {}
    for name, param in model.named_parameters():
        shards[name] = param.detach().to_local().cpu()
        state = optimizer.state.get(param, {})
        if state:
            moments[name] = {k: (v.to_local() if isinstance(v, DTensor) else v).cpu() for k, v in state.items()}
    torch.save({"model": shards, "optimizer": moments, "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
               os.path.join(tmp, f"rank{rank}.pt"))
    dist.barrier()
    if rank == 0:
        torch.save({"step": step, "world_size": world_size, "scheduler": scheduler.state_dict()},
                   os.path.join(tmp, "trainer_state.pt"))
        shutil.rmtree(final + ".old", ignore_errors=True)
        if os.path.exists(final):
            os.replace(final, final + ".old")
        os.replace(tmp, final)
        shutil.rmtree(final + ".old", ignore_errors=True)
    dist.barrier()


def load_checkpoint(model, optimizer, scheduler, output_dir: str, rank: int, world_size: int) -> int:
    """Restore weights, optimizer moments, scheduler and RNG; return the step to continue from."""
    path = os.path.join(output_dir, "checkpoint")
    trainer_state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True)
    if trainer_state["world_size"] != world_size:
        raise SystemExit(f"{path} was written by {trainer_state['world_size']} ranks; resume with the same number")
    saved = torch.load(os.path.join(path, f"rank{rank}.pt"), weights_only=True)
    for name, param in model.named_parameters():
        param.detach().to_local().copy_(saved["model"][name])
        if name in saved["optimizer"]:
            optimizer.state[param] = {
                k: (DTensor.from_local(v.to(param.device), param.device_mesh, param.placements,
                                       shape=param.shape, stride=param.stride()) if v.dim()
                    else v.to(param.device) if optimizer.defaults.get("fused") else v)  # fused keeps `step` on device
                for k, v in saved["optimizer"][name].items()}
    scheduler.load_state_dict(trainer_state["scheduler"])
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):  # the scheduler state alone
        group["lr"] = lr                                                    # does not reach the optimizer
    torch.set_rng_state(saved["rng"])
    if saved["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["cuda_rng"])
    return trainer_state["step"]


def prepare_output_dir(args, rank: int) -> None:
    """Refuse to mix two runs in one directory; remember this run's flags for --resume.

    Every rank checks (so every rank stops on the same error); rank 0 writes after a barrier.
    """
    run_config = {k: v for k, v in vars(args).items() if k not in RESUMABLE_FLAGS}
    path = os.path.join(args.output_dir, "run_config.json")
    if os.path.abspath(args.output_dir) == os.path.abspath(args.model_name_or_path):
        raise SystemExit("--output_dir must differ from --model_name_or_path")
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        changed = sorted(k for k in run_config.keys() | previous.keys() if run_config.get(k) != previous.get(k))
        if changed:
            raise SystemExit(f"{args.output_dir} holds a different run (flags differ: {', '.join(changed)}); "
                             "choose another --output_dir")
        if not args.resume:
            raise SystemExit(f"{args.output_dir} already holds this run; pass --resume to continue it")
    elif args.resume:
        raise SystemExit(f"--resume: {args.output_dir} holds no run to resume")
    elif os.path.isdir(args.output_dir) and os.listdir(args.output_dir):
        raise SystemExit(f"{args.output_dir} is not empty and holds no run of this script; choose another --output_dir")
    dist.barrier()
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        data_mix.save_json(path, run_config)
    dist.barrier()


def append_metrics(path: str, metrics: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(metrics) + "\n")


def truncate_metrics(path: str, step: int) -> None:
    """On resume, forget steps logged after the checkpoint so the curve has no duplicates."""
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= step]
        with open(path, "w") as f:
            f.writelines(kept)


def make_scheduler(optimizer, kind: str, warmup_steps: int, total_steps: int):
    """Linear warmup, then linear decay to 0 (or constant)."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------
# Data

def load_preference_data(args, tokenizer, rank: int):
    """Mixed, validated, tokenized preference pairs; rank 0 prepares first so the others reuse its cache."""
    if rank != 0:
        dist.barrier()
    rows, report = data_mix.load_mixture(args, data_mix.validate_preference_record)
    examples, fully_masked = data_mix.tokenize_preference_dataset(rows, tokenizer, args.max_seq_length,
                                                                  args.preprocessing_num_workers, args.last_turn_only)
    if rank == 0:
        dist.barrier()
    if len(examples) == 0:
        raise SystemExit(f"no trainable pairs: all {fully_masked} pairs lost a side's assistant tokens "
                         f"(truncated at --max_seq_length {args.max_seq_length}?)")
    report.update(fully_masked_dropped=fully_masked, examples=len(examples))
    return examples, report


def micro_batches(examples, order: list[int], args, rank: int, world_size: int, pad_token_id: int):
    """This rank's share of one optimizer batch, split into collated micro-batches."""
    mine = order[rank::world_size]
    size = args.per_device_train_batch_size
    for start in range(0, len(mine), size):
        yield data_mix.collate_preference_pairs(examples, mine[start:start + size], pad_token_id, args.packing)


# ---------------------------------------------------------------------------------------------
# Reference log-probs: computed once with the initial model, cached on disk

def reference_cache_path(args, examples, device, rank: int) -> str:
    """Named by a sha256 of model files, tokenized pairs, precision and log-prob kind; rank 0 hashes."""
    path = [None]
    if rank == 0:
        digest = hashlib.sha256(json.dumps([resolve_dtype(args.dtype, device), args.dpo_loss_type != "dpo"]).encode())
        model_dir = args.model_name_or_path if os.path.isdir(args.model_name_or_path) else os.path.dirname(
            cached_file(args.model_name_or_path, "config.json"))  # a hub name: the files are in the hub cache
        for name in sorted(os.listdir(model_dir)):
            if name == "config.json" or name.endswith((".safetensors", ".bin")):
                digest.update(name.encode())
                with open(os.path.join(model_dir, name), "rb") as f:
                    for block in iter(lambda: f.read(1 << 24), b""):
                        digest.update(block)
        table = examples.with_format("arrow")[:]
        for column in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
            values = table.column(column).combine_chunks()
            digest.update(pc.list_value_length(values).to_numpy().tobytes())
            digest.update(pc.list_flatten(values).to_numpy().tobytes())
        cache_dir = args.reference_cache_dir or os.path.join(args.output_dir, "reference_logps")
        path = [os.path.join(cache_dir, f"reference_logps_{digest.hexdigest()[:20]}.safetensors")]
    dist.broadcast_object_list(path, src=0)
    return path[0]


@torch.no_grad()
def cached_reference_logps(model, examples, args, rank: int, world_size: int, device, pad_token_id: int):
    """Chosen [N] and rejected [N] log-probs of all pairs under the model as loaded, cached or scored and
    cached. Rank r scores the r-th micro-batch of each group of world_size (FSDP needs all ranks in each
    forward: one with nothing left scores a stand-in); one rank writes each row, so a sum assembles them."""
    path = reference_cache_path(args, examples, device, rank)
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
        batch = data_mix.collate_preference_pairs(examples, mine or [0], pad_token_id, args.packing)
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

def accumulate_gradients(model, reference, examples, batch: list[int], args, rank: int, world_size: int, device,
                         pad_token_id: int):
    """Forward and backward over this rank's micro-batches of one optimizer batch. `reference`: a frozen model,
    the cached (chosen, rejected) tables, or None (simpo). Returns sums over all ranks' pairs of (loss, rewards
    chosen, rejected, correct orderings, logps chosen, rejected) [6], and input tokens over all ranks."""
    mean = args.dpo_loss_type != "dpo"  # dpo_norm, simpo and ipo compare mean per-token log-probs
    totals = torch.zeros(6, device=device)
    input_tokens = torch.zeros((), device=device)
    for micro in micro_batches(examples, batch, args, rank, world_size, pad_token_id):
        micro = {k: v.to(device) for k, v in micro.items()}
        chosen_logps, rejected_logps = concatenated_logps(model, micro, mean)
        ref_chosen_logps, ref_rejected_logps = None, None  # simpo
        if isinstance(reference, torch.nn.Module):
            with torch.no_grad():
                ref_chosen_logps, ref_rejected_logps = concatenated_logps(reference, micro, mean)
        elif reference is not None:
            ref_chosen_logps, ref_rejected_logps = (table[micro["index"]] for table in reference)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, loss_type=args.dpo_loss_type,
            beta=args.dpo_beta, label_smoothing=args.dpo_label_smoothing, gamma_beta_ratio=args.dpo_gamma_beta_ratio)
        # The mean over the optimizer batch's pairs: a divisor known before any forward.
        # FSDP averages gradients over ranks; multiplying by world_size turns that average into a sum.
        loss = losses.sum() / len(batch) * world_size
        loss.backward()
        totals += torch.stack([losses.sum(), chosen_rewards.sum(), rejected_rewards.sum(),
                               (chosen_rewards > rejected_rewards).sum(), chosen_logps.sum(), rejected_logps.sum()]
                              ).detach()
        input_tokens += micro["attention_mask"].sum() if "attention_mask" in micro else micro["input_ids"].numel()
    dist.all_reduce(totals)
    dist.all_reduce(input_tokens)
    return totals, input_tokens


def main(argv=None):
    args = parse_args(argv)
    rank, world_size, device = init_distributed()
    try:
        train(args, rank, world_size, device)
    finally:
        dist.destroy_process_group()


def train(args, rank: int, world_size: int, device) -> None:
    torch.manual_seed(args.seed)
    check_model_path(args.model_name_or_path)
    prepare_output_dir(args, rank)
    tokenizer = data_mix.load_tokenizer(args.model_name_or_path, args.chat_template_name)
    examples, data_report = load_preference_data(args, tokenizer, rank)

    batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
    steps_per_epoch = len(examples) // batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(examples)} pairs are fewer than one optimizer batch of {batch_size} "
                         "(per_device_train_batch_size x gradient_accumulation_steps x ranks)")
    total_steps = args.max_train_steps or steps_per_epoch * args.num_train_epochs
    if rank == 0:
        data_mix.save_json(os.path.join(args.output_dir, "mixture.json"), data_report)

    model = load_model(args.model_name_or_path, args, device, rank)
    # The reference is the initial model: scored before any update (and before a resume loads trained weights).
    reference = None  # simpo has none
    if args.dpo_loss_type != "simpo" and args.reference == "live":
        reference = load_model(args.model_name_or_path, args, device, rank).eval().requires_grad_(False)
    elif args.dpo_loss_type != "simpo":
        reference = cached_reference_logps(model, examples, args, rank, world_size, device, tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = make_scheduler(optimizer, args.lr_scheduler_type, math.ceil(args.warmup_ratio * total_steps),
                               total_steps)
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    start_step = 0
    if args.resume and os.path.exists(os.path.join(args.output_dir, "checkpoint")):
        start_step = load_checkpoint(model, optimizer, scheduler, args.output_dir, rank, world_size)
        if rank == 0:
            truncate_metrics(metrics_path, start_step)
    elif args.resume and rank == 0:  # interrupted before its first checkpoint: start over cleanly
        truncate_metrics(metrics_path, 0)

    model.train()
    progress = tqdm(total=total_steps, initial=start_step, desc="dpo", disable=rank != 0)
    for step in range(start_step, total_steps):
        epoch, index = divmod(step, steps_per_epoch)
        # The data order is a function of (seed, epoch): a resumed run sees the same batches.
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
        batch = order[index * batch_size:(index + 1) * batch_size]
        started = time.perf_counter()

        totals, input_tokens = accumulate_gradients(
            model, reference, examples, batch, args, rank, world_size, device, tokenizer.pad_token_id)

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
            append_metrics(metrics_path, metrics)
            progress.set_postfix(loss=f"{mean_loss:.4f}", margin=f"{chosen_reward - rejected_reward:.3f}")
            progress.update()
        if (step + 1) % args.checkpointing_steps == 0 and step + 1 < total_steps:
            save_checkpoint(model, optimizer, scheduler, step + 1, args.output_dir, rank, world_size)
    progress.close()
    save_hf_model(model, tokenizer, args.model_name_or_path, args.output_dir, rank)


if __name__ == "__main__":
    main()
