"""Training-step tokens/s and model FLOPs utilisation (MFU): sft.py and dpo.py against plain transformers.

    python bench/bench_train.py              # CPU: the bundled model's shape, short rows
    python bench/bench_train.py --models llama1b llama3b --gradient_checkpointing     # one GPU
    torchrun --nproc_per_node 1 bench/bench_train.py --models llama1b --compile
    torchrun --nproc_per_node 2 bench/bench_train.py --lengths tulu3 --length_scale 0.25 --num_hidden_layers 2 \
        --max_tokens_per_micro_batch 2048 --steps 2          # CPU: what the token budget changes
    python bench/bench_train.py --lengths tulu3 --plan_ranks 8 --steps 200   # micro-batches at full scale

Per model (random weights in a temporary directory, read by the scripts' own loaders), one process
times each variant in turn on the same random-token examples:
- baseline:   the Hugging Face model and its own loss (model(input_ids, attention_mask, labels)),
              FSDP2-sharded like infra.load_model, padded micro-batches, clipping, AdamW; never compiled.
- sft_padded / sft_packed: infra.load_model + sft.accumulate_gradients (--no-packing / --packing),
              then sft's clipping and AdamW.
- dpo_packed: infra.load_model + dpo.accumulate_gradients on the same tokens (neighbouring examples of
              a row are a chosen/rejected pair, so a micro-batch is again one row), with constant
              reference log-probs in place of dpo.py's cached table.
- sft_budget / dpo_budget: the same with --max_tokens_per_micro_batch (rows of at most that many tokens).
--lengths rows: a row of --row_tokens tokens is split into --examples_per_row examples of random lengths
(weights uniform in [1, 8)); a padded micro-batch is one row's examples padded to the longest, a packed one
is the row itself. --lengths tulu3: the recipe's flags (1 sequence per micro-batch, --gradient_accumulation_steps
16 per rank) on lengths shaped like the Tülu 3 SFT mixture: lognormal, median 470 tokens, sigma 1 (mean 775),
cut at 4096, all times --length_scale. The mean is the dataset card's size (2.91 GB of messages for 939,343
rows, 3.1 kB a row, about 4 bytes a token); the spread is an assumption (a few-hundred-token median with a
long tail of multi-turn and code rows). DPO pairs neighbouring examples, so its step holds half as many
pairs as SFT has sequences, on the same tokens. Labels are on each example's last 70%. A variant that
runs out of memory reads OOM.

Per step and rank (counted on the step's real micro-batches, the ones sft/dpo build): micro-batches run
(with the weight-0 stand-ins that keep ranks in step), real tokens per micro-batch, padding (tokens computed
that train nothing: pad positions and stand-ins, as a fraction), and FSDP collective bytes (what FSDP hands
to all_gather_single and reduce_scatter_single, counted during the timed steps).

Model FLOPs (the work training needs, whatever a variant executes: padding and recompute count 0):
    6 * P_linear * tokens                 P_linear: weights of the decoder layers' nn.Linear modules
  + 6 * vocab * hidden * trained_tokens   output projection, needed only where a label is trained
  + 6 * layers * heads * head_dim * sum(s^2 over examples)   causal attention: QK^T and AV cost
                                          s^2/2 * heads * head_dim multiply-adds each, forward; x3 train
MFU = model FLOPs / (seconds * peak * ranks); peak (dense bf16) 989e12 on H100/H200, 312e12 on A100,
else --peak_flops, else n/a. tokens/s counts real tokens of all ranks. Peak memory: GPU
max_memory_allocated per variant; CPU the process's maximum resident set so far (never decreases).
"""
import argparse
import gc
import json
import os
import resource
import shutil
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data_mix  # noqa: E402
import dpo  # noqa: E402
import infra  # noqa: E402
import modeling  # noqa: E402
import sft  # noqa: E402

BUNDLED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "models",
                       "SmolLM2-135M-Instruct")
LLAMA_SHAPES = {  # Llama-3.2-1B and -3B dimensions
    "llama1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=64),
    "llama3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                    num_key_value_heads=8, head_dim=128),
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def parse_args():
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "llama1b", "llama3b"] if gpu else ["smollm2"],
                        choices=["smollm2", *LLAMA_SHAPES])
    parser.add_argument("--row_tokens", type=int, default=8192 if gpu else 256, help="tokens per packed row")
    parser.add_argument("--examples_per_row", type=int, default=4, help="even: dpo pairs neighbours")
    parser.add_argument("--rows_per_step", type=int, default=4 if gpu else 1, help="micro-batches per step")
    parser.add_argument("--lengths", default="rows", choices=["rows", "tulu3"], help="see the module docstring")
    parser.add_argument("--length_scale", type=float, default=1.0, help="tulu3: multiply every length")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=16, help="tulu3: sequences per rank")
    parser.add_argument("--max_tokens_per_micro_batch", type=int, default=16384, help="the *_budget variants")
    parser.add_argument("--plan_ranks", type=int, default=None,
                        help="tulu3: only count SFT's micro-batches for this many ranks (no model, no timing)")
    parser.add_argument("--warmup_steps", type=int, default=2 if gpu else 1)
    parser.add_argument("--steps", type=int, default=5 if gpu else 1, help="timed steps")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--attn_implementation", default="sdpa")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--num_hidden_layers", type=int, default=None, help="override (smoke tests on small machines)")
    parser.add_argument("--peak_flops", type=float, default=None, help="per device; overrides the detected peak")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    if args.examples_per_row % 2 or args.row_tokens < 4 * args.examples_per_row or args.steps < 1:
        parser.error("--examples_per_row must be even, --row_tokens >= 4 per example, --steps >= 1")
    if args.gradient_accumulation_steps % 2 or not 0 < args.length_scale <= 1:
        parser.error("--gradient_accumulation_steps must be even (dpo pairs neighbours), --length_scale in (0, 1]")
    return args


def model_config(name: str, num_hidden_layers=None):
    if name == "smollm2":
        config = AutoConfig.from_pretrained(BUNDLED)
    else:
        config = LlamaConfig(**LLAMA_SHAPES[name], vocab_size=128256, tie_word_embeddings=True, rms_norm_eps=1e-5,
                             max_position_embeddings=131072, rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 500000.0})
    config.num_hidden_layers = num_hidden_layers or config.num_hidden_layers
    return config


def make_steps(num_steps: int, args, vocab_size: int, world_size: int):
    """Random examples and each step's example indices, ordered so that every micro-batch is one row
    (micro_batches gives rank r the slice batch[r::world_size], in chunks of examples_per_row)."""
    generator = torch.Generator().manual_seed(0)
    per_row, examples, steps = args.examples_per_row, [], []
    for _ in range(num_steps):
        rows = []
        for _ in range(args.rows_per_step):
            weights = torch.rand(per_row, generator=generator) * 7 + 1
            lengths = (weights / weights.sum() * (args.row_tokens - 2 * per_row)).long() + 2
            lengths[-1] += args.row_tokens - lengths.sum()
            rows.append(list(range(len(examples), len(examples) + per_row)))
            for length in lengths.tolist():
                ids = torch.randint(0, vocab_size, (length,), generator=generator).tolist()
                prompt = int(length * 0.3)
                examples.append({"input_ids": ids, "labels": [data_mix.IGNORE_INDEX] * prompt + ids[prompt:]})
        steps.append(interleave([sum(rows[r::world_size], []) for r in range(world_size)]))
    return examples, steps


def tulu3_steps(num_steps: int, args, vocab_size: int, world_size: int):
    """Examples with Tülu 3 SFT-shaped lengths (module docstring); each rank's share of a step is consecutive."""
    generator = torch.Generator().manual_seed(0)
    examples, steps = [], []
    cap = int(4096 * args.length_scale)
    for _ in range(num_steps):
        per_rank = []
        for _ in range(world_size):
            normal = torch.randn(args.gradient_accumulation_steps, generator=generator)
            lengths = (470 * args.length_scale * normal.exp()).long().clamp(4, cap)  # lognormal(log 470, 1)
            per_rank.append(list(range(len(examples), len(examples) + len(lengths))))
            for length in lengths.tolist():
                ids = torch.randint(0, vocab_size, (length,), generator=generator).tolist()
                prompt = int(length * 0.3)
                examples.append({"input_ids": ids, "labels": [data_mix.IGNORE_INDEX] * prompt + ids[prompt:]})
        steps.append(interleave(per_rank))
    return examples, steps


def interleave(per_rank: list[list[int]]) -> list[int]:
    return [index for group in zip(*per_rank) for index in group]  # batch[r::world_size] == per_rank[r]


def model_flops(config, examples, indices) -> float:
    """Model FLOPs of training on these examples (formula in the module docstring)."""
    with torch.device("meta"):
        layers = AutoModelForCausalLM.from_config(config).get_decoder().layers
    p_linear = sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
    lengths = [len(examples[i]["input_ids"]) for i in indices]
    trained = sum(sum(label != data_mix.IGNORE_INDEX for label in examples[i]["labels"][1:]) for i in indices)
    d_attn = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    return (6 * p_linear * sum(lengths) + 6 * config.vocab_size * config.hidden_size * trained
            + 6 * config.num_hidden_layers * d_attn * sum(s * s for s in lengths))


def synced_clock(device) -> float:
    """The time once every rank's queued device work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()
    return time.perf_counter()


def make_update(model, run_args, device):
    """sft.train's optimizer and what it does after accumulating: clip, step, clear."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=run_args.learning_rate, weight_decay=run_args.weight_decay,
                                  fused=device.type == "cuda")

    def update():
        # --max_grad_norm <= 0 disables clipping, as in sft.train
        torch.nn.utils.clip_grad_norm_(model.parameters(), max(run_args.max_grad_norm, 0) or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return update


def baseline_runner(path, run_args, examples, rank, world_size, device):
    """Plain transformers: the HF model and its own loss, sharded like infra.load_model."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation=run_args.attn_implementation).to(device)
    model.config.use_cache = False
    if run_args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    dtype = torch.bfloat16 if infra.resolve_dtype(run_args.dtype, device) == "bf16" else torch.float32
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in model.get_decoder().layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    update = make_update(model.train(), run_args, device)
    size = run_args.per_device_train_batch_size

    def micro_batches(batch, r):
        mine = batch[r::world_size]
        return [data_mix.collate_padded([examples[i] for i in mine[start:start + size]], pad_token_id=0)
                for start in range(0, len(mine), size)]

    def step(batch):
        for micro in micro_batches(batch, rank):
            micro = {k: v.to(device) for k, v in micro.items()}
            model(**micro).loss.backward()
        update()
    return step, lambda batch: [(micro_batches(batch, r), None) for r in range(world_size)], model  # equal counts


def load_stage_model(path, run_args, device, rank):
    """infra.load_model with the stage's flags, as sft.py and dpo.py call it."""
    return infra.load_model(path, modeling.CausalLMLogProbs, device=device, rank=rank, dtype=run_args.dtype,
                            attn_implementation=run_args.attn_implementation, max_seq_length=run_args.max_seq_length,
                            gradient_checkpointing=run_args.gradient_checkpointing, compile=run_args.compile)


def sft_runner(path, run_args, examples, rank, world_size, device):
    model = load_stage_model(path, run_args, device, rank).train()
    update = make_update(model, run_args, device)

    def plan(batch):
        return [(list(sft.micro_batches(examples, batch, run_args, r, world_size, 0)),
                 next(sft.micro_batches(examples, batch, run_args, r, world_size, 0, stand_in=True)))
                for r in range(world_size)]

    def step(batch):
        sft.accumulate_gradients(model, examples, batch, run_args, rank, world_size, device, pad_token_id=0)
        update()
    return step, plan, model


def dpo_runner(path, run_args, examples, rank, world_size, device):
    """dpo.accumulate_gradients on pairs of neighbouring examples, with cached (constant) reference log-probs."""
    pairs = [{"chosen_input_ids": c["input_ids"], "chosen_labels": c["labels"],
              "rejected_input_ids": r["input_ids"], "rejected_labels": r["labels"]}
             for c, r in zip(examples[0::2], examples[1::2])]
    reference = tuple(torch.full((len(pairs),), -1.0, device=device) for _ in range(2))
    model = load_stage_model(path, run_args, device, rank).train()
    update = make_update(model, run_args, device)

    def pair_batch(batch):  # rank r's examples are batch[r::world_size] in order; examples 2j, 2j+1 are pair j
        return interleave([[i // 2 for i in batch[r::world_size][0::2]] for r in range(world_size)])

    def plan(batch):
        return [(list(dpo.micro_batches(pairs, pair_batch(batch), run_args, r, world_size, 0)),
                 next(dpo.micro_batches(pairs, pair_batch(batch), run_args, r, world_size, 0, stand_in=True)))
                for r in range(world_size)]

    def step(batch):
        dpo.accumulate_gradients(model, reference, pairs, pair_batch(batch), run_args, rank, world_size, device, 0)
        update()
    return step, plan, model


# name: (runner, script whose argparse defaults apply, packing, micro-batches of pairs). A runner returns
# step(batch), plan(batch) (every rank's micro-batches of that step, as the script builds them) and the model.
VARIANTS = {"baseline": (baseline_runner, sft, False, False), "sft_padded": (sft_runner, sft, False, False),
            "sft_packed": (sft_runner, sft, True, False), "sft_budget": (sft_runner, sft, True, False),
            "dpo_packed": (dpo_runner, dpo, True, True), "dpo_budget": (dpo_runner, dpo, True, True)}


def variant_args(name: str, path: str, args):
    """The script's own argparse defaults, with the benchmark's shape and flags."""
    _, module, packing, pairs = VARIANTS[name]
    run_args = module.parse_args(["--model_name_or_path", path, "--dataset_mixer_list", "unused", "1.0",
                                  "--output_dir", os.path.join(path, "unused")])
    run_args.per_device_train_batch_size = 1 if args.lengths == "tulu3" else args.examples_per_row // (1 + pairs)
    if name.endswith("_budget"):
        run_args.max_tokens_per_micro_batch = args.max_tokens_per_micro_batch
    run_args.packing, run_args.attn_implementation = packing, args.attn_implementation
    run_args.gradient_checkpointing, run_args.compile = args.gradient_checkpointing, args.compile
    return run_args


def counting(collective, position: int, keyword: str, total: list):
    """collective, adding the bytes of its argument `keyword` (or args[position]) to total[0]."""
    def counted(*args, **kwargs):
        tensor = kwargs[keyword] if keyword in kwargs else args[position]
        total[0] += tensor.numel() * tensor.element_size()
        return collective(*args, **kwargs)
    return counted


def step_shape(plan, steps) -> dict:
    """What the steps' micro-batches hold, from every rank's plan (the micro-batches sft/dpo build)."""
    runs = real_micro_batches = real_tokens = computed_tokens = 0
    for batch in steps:
        per_rank = plan(batch)
        most = max(len(micros) for micros, _ in per_rank)  # every rank runs this many, the rest weight-0 stand-ins
        runs += most
        for micros, stand_in in per_rank:
            real_micro_batches += len(micros)
            real_tokens += sum(int(m["attention_mask"].sum()) if "attention_mask" in m else m["input_ids"].numel()
                               for m in micros)
            computed_tokens += sum(m["input_ids"].numel() for m in micros)
            computed_tokens += (most - len(micros)) * (stand_in["input_ids"].numel() if stand_in else 0)
    return {"micro_batches_per_step": runs / len(steps), "tokens_per_micro_batch": real_tokens / real_micro_batches,
            "padding": 1 - real_tokens / computed_tokens, "runs": runs}


def measure(name: str, path: str, args, examples, steps, rank, world_size, device) -> dict:
    """Seconds of the timed steps, peak memory (GiB), the steps' shape and FSDP bytes of one variant; its model is
    freed on return."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step, plan, model = VARIANTS[name][0](path, variant_args(name, path, args), examples, rank, world_size, device)
    forwards, collective_bytes = [0], [0]
    model.register_forward_pre_hook(lambda module, inputs: forwards.__setitem__(0, forwards[0] + 1))
    originals = dist.all_gather_single, dist.reduce_scatter_single
    try:
        for index, batch in enumerate(steps):
            if index == args.warmup_steps:  # count the timed steps' (FSDP looks these up at each call)
                started = synced_clock(device)
                forwards[0] = 0
                dist.all_gather_single = counting(originals[0], 0, "output_tensor", collective_bytes)  # gathered
                dist.reduce_scatter_single = counting(originals[1], 1, "input", collective_bytes)     # full grads
            step(batch)
        seconds = synced_clock(device) - started
    finally:
        dist.all_gather_single, dist.reduce_scatter_single = originals
    timed = steps[args.warmup_steps:]
    shape = step_shape(plan, timed)
    if forwards[0] != shape.pop("runs"):  # the shape must describe what really ran
        raise RuntimeError(f"{name}: {forwards[0]} forwards in the timed steps, the plan says otherwise")
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB
    return {"seconds": seconds, "peak_memory_gib": memory, **shape,
            "collective_gb_per_step": collective_bytes[0] / len(timed) / 1e9}


def bench_model(model_name: str, args, rank, world_size, device):
    config = model_config(model_name, args.num_hidden_layers)
    paths = [tempfile.mkdtemp(prefix=f"bench_{model_name}_") if rank == 0 else None]
    dist.broadcast_object_list(paths, src=0)
    if rank == 0:  # random bf16 weights (the loaders read them back as fp32 master weights)
        torch.manual_seed(0)
        with torch.device(device):  # initialising a 3B model is much faster on the GPU
            AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(paths[0])
    dist.barrier()
    path = paths[0]
    make = tulu3_steps if args.lengths == "tulu3" else make_steps
    examples, steps = make(args.warmup_steps + args.steps, args, config.vocab_size, world_size)
    timed = [i for batch in steps[args.warmup_steps:] for i in batch]
    flops, tokens = model_flops(config, examples, timed), sum(len(examples[i]["input_ids"]) for i in timed)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = args.peak_flops or next((v for key, v in PEAK_BF16.items() if key in device_name), None)
    results = []
    for name in args.variants:
        row = {"model": model_name, "variant": name, "tokens_per_s": None, "mfu": None, "peak_memory_gib": None,
               "micro_batches_per_step": None, "tokens_per_micro_batch": None, "padding": None,
               "collective_gb_per_step": None}
        try:
            row.update(measure(name, path, args, examples, steps, rank, world_size, device))
            seconds = row.pop("seconds")
            row.update(tokens_per_s=tokens / seconds, mfu=flops / (seconds * peak * world_size) if peak else None)
        except torch.OutOfMemoryError:
            row["error"] = "OOM"
        results.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
    base = results[0]["tokens_per_s"] if args.variants[0] == "baseline" else None
    for row in results:
        row["ratio_to_baseline"] = row["tokens_per_s"] / base if base and row["tokens_per_s"] else None
    return results


def markdown(rows) -> str:
    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)
    lines = ["| model | variant | tokens/s | MFU | peak memory (GiB) | ratio to baseline | micro-batches/step "
             "| tokens/micro-batch | padding | FSDP GB/step |", "|---" * 10 + "|"]
    for row in rows:
        speed = row["tokens_per_s"]
        cells = [row["model"], row["variant"], row.get("error") or fmt(speed, ",.0f" if (speed or 0) >= 100 else ".3g"),
                 "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%",
                 fmt(row["peak_memory_gib"], ".2f"), fmt(row["ratio_to_baseline"], ".2f"),
                 fmt(row["micro_batches_per_step"], ".1f"), fmt(row["tokens_per_micro_batch"], ",.0f"),
                 "n/a" if row["padding"] is None else f"{100 * row['padding']:.1f}%",
                 fmt(row["collective_gb_per_step"], ".3g")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plan_only(args) -> None:
    """SFT's micro-batches per step for --plan_ranks ranks, with and without the budget: no model, no timing."""
    examples, steps = tulu3_steps(args.steps, args, 1000, args.plan_ranks)
    print(f"{args.plan_ranks} ranks x {args.gradient_accumulation_steps} sequences, {args.steps} steps, "
          f"length_scale={args.length_scale}, max_tokens_per_micro_batch={args.max_tokens_per_micro_batch}")
    for name in ("sft_packed", "sft_budget"):
        run_args = variant_args(name, "unused", args)
        shape = step_shape(lambda batch: [
            (list(sft.micro_batches(examples, batch, run_args, r, args.plan_ranks, 0)),
             next(sft.micro_batches(examples, batch, run_args, r, args.plan_ranks, 0, stand_in=True)))
            for r in range(args.plan_ranks)], steps)
        print(f"{name}: {shape['micro_batches_per_step']:.2f} micro-batches per step and rank, "
              f"{shape['tokens_per_micro_batch']:,.0f} tokens per micro-batch, padding {100 * shape['padding']:.1f}%")


def main():
    args = parse_args()
    if args.plan_ranks:
        return plan_only(args)
    rank, world_size, device = infra.init_distributed()
    modeling.register_packed_attention()  # --attn_implementation packed_varlen
    try:
        if args.lengths == "rows" and args.rows_per_step % world_size:
            raise SystemExit(f"--rows_per_step {args.rows_per_step} must be a multiple of the {world_size} ranks")
        rows = [row for name in args.models for row in bench_model(name, args, rank, world_size, device)]
        if rank == 0:
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
            shown = (("row_tokens", "examples_per_row", "rows_per_step") if args.lengths == "rows" else
                     ("length_scale", "gradient_accumulation_steps")) + (
                "lengths", "max_tokens_per_micro_batch", "warmup_steps", "steps", "compile", "gradient_checkpointing",
                "attn_implementation")
            print(f"\n{name} x{world_size}, {infra.resolve_dtype('auto', device)}, "
                  + ", ".join(f"{key}={getattr(args, key)}" for key in shown) + "\n")
            print(markdown(rows))
            for model in args.models:
                by = {row["variant"]: row["tokens_per_s"] for row in rows if row["model"] == model}
                if by.get("dpo_packed") and by.get("sft_packed"):
                    print(f"{model}: dpo_packed / sft_packed tokens/s = {by['dpo_packed'] / by['sft_packed']:.2f}")
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"device": name, "args": vars(args), "rows": rows}, f, indent=2)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
