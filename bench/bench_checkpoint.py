"""Peak memory (RSS) per rank of writing and of reading a checkpoint, against the peak of the training before it.

    python bench/bench_checkpoint.py --num_hidden_layers 2                            # 1 rank
    torchrun --nproc_per_node 2 bench/bench_checkpoint.py --num_hidden_layers 2       # 2 gloo ranks on the CPU

A Llama-3.2-1B-shaped model (hidden 2048, MLP 8192, 32 heads, 8 KV heads, vocab 128256, tied embeddings unless
--untied; --num_hidden_layers of its 16) with random weights is built on the meta device and sharded per decoder
layer as infra.load_model shards it, in sft.py's wrapper (modeling.CausalLMLogProbs). It trains --steps AdamW
steps (fp32) on random tokens with sft.py's loss; then checkpoint.save writes a checkpoint and
checkpoint.load reads it back into the same model and optimizer (which still holds its moments, so the read
allocates a second set beside them; a resumed run's optimizer has none).

Per rank: the training peak (VmHWM at the end of the steps: the process's peak so far), the peak while writing
and while reading (VmHWM, reset through /proc/self/clear_refs just before each), the RSS before each, seconds.
The checkpoint's files go to --output_dir (weights and two AdamW moments: parameters x 12 bytes).
"""
import argparse
import gc
import json
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import checkpoint  # noqa: E402
import infra  # noqa: E402
import modeling  # noqa: E402


def memory_gb(field: str) -> float:
    with open("/proc/self/status") as f:
        kilobytes = next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    return kilobytes / 2**20


def reset_peak() -> float:
    """The RSS now, from which the peak (VmHWM) starts again."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return memory_gb("VmRSS")


def build_model(args):
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                         vocab_size=128256, num_hidden_layers=args.num_hidden_layers, max_position_embeddings=8192,
                         tie_word_embeddings=not args.untied, use_cache=False)
    with torch.device("meta"):
        model = modeling.CausalLMLogProbs(AutoModelForCausalLM.from_config(config, dtype=torch.float32))
    for layer in model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.to_local().normal_(0.0, 0.02)
    infra.init_non_persistent_buffers(model.model)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_hidden_layers", type=int, default=2)
    parser.add_argument("--untied", action="store_true", help="separate input and output embeddings")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512, help="tokens per step and rank")
    parser.add_argument("--output_dir", default="/tmp/bench_checkpoint")
    args = parser.parse_args()
    torch.manual_seed(0)
    rank, world_size, device = infra.init_distributed()
    if rank == 0:
        shutil.rmtree(args.output_dir, ignore_errors=True)
        os.makedirs(args.output_dir)
    model = build_model(args)
    parameters = sum(param.numel() for param in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    scheduler = infra.make_scheduler(optimizer, "constant", 0, args.steps)
    started = time.perf_counter()
    for _ in range(args.steps):
        ids = torch.randint(0, 128256, (1, args.tokens))
        (-model(input_ids=ids, labels=ids).mean()).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    result = {"rank": rank, "train_s": time.perf_counter() - started, "train_peak_gb": memory_gb("VmHWM")}

    run_facts = {"optimizer_batch": world_size, "data": "bench", "model": "bench"}
    result["save_rss_before_gb"] = reset_peak()
    started = time.perf_counter()
    checkpoint.save(model, optimizer, scheduler, args.steps, args.output_dir, rank, run_facts)
    result.update(save_s=time.perf_counter() - started, save_peak_gb=memory_gb("VmHWM"))

    resumed = checkpoint.newest(args.output_dir, run_facts, world_size)
    result["load_rss_before_gb"] = reset_peak()
    started = time.perf_counter()
    checkpoint.load(model, optimizer, scheduler, resumed)
    result.update(load_s=time.perf_counter() - started, load_peak_gb=memory_gb("VmHWM"))

    results = [None] * world_size
    dist.all_gather_object(results, result)
    if rank == 0:
        print(json.dumps({"parameters": parameters, "layers": args.num_hidden_layers, "tied": not args.untied,
                          "ranks": world_size, "tokens": args.tokens, "torch": torch.__version__}))
        for each in results:
            each.update(save_vs_train=each["save_peak_gb"] / each["train_peak_gb"],
                        load_vs_train=each["load_peak_gb"] / each["train_peak_gb"])
            print(json.dumps({key: round(value, 3) if isinstance(value, float) else value
                              for key, value in each.items()}))
        shutil.rmtree(args.output_dir, ignore_errors=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
