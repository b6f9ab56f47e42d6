"""Peak memory (RSS) per rank of infra.load_model: the sharded load against the rank-0 load (its fallback).

    python bench/bench_load.py                      # Llama-3.2-1B shape, 2 gloo ranks (needs ~2.5 GB of /tmp)
    python bench/bench_load.py --num_hidden_layers 2 --vocab_size 32000     # a quick look

A Llama-3.2-1B-shaped model (hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192, vocab 128256, tied
embeddings: 1.24B parameters) with random weights is saved as one bf16 model.safetensors in a temporary
directory, as the hub ships it. Then, per loader, --ranks gloo ranks on the CPU each run only load_model:
- rank0_broadcast: rank 0 reads the whole model with from_pretrained (one full fp32 copy), the weights are
  broadcast and each rank keeps its shard; load_model's fallback, forced here by a plan that says no.
- sharded_dcp: each rank reads the slices of its own shards from the safetensors file (DCP), cast to fp32.
Per rank: RSS before the load (torch, transformers, the empty model), peak RSS during the load (VmHWM, reset
just before it through /proc/self/clear_refs; file pages the rank read count too, as the kernel counts
them), seconds, and a checksum of its shards (sum of every weight in fp64: both loaders must agree).
An fp32 shard of the model is 1.24B x 4 bytes / ranks: 2.48 GB on 2 ranks.
"""
import argparse
import json
import os
import socket
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import infra  # noqa: E402
import modeling  # noqa: E402

LOADERS = ("rank0_broadcast", "sharded_dcp")


def memory_gb(field: str) -> float:
    with open("/proc/self/status") as f:
        kilobytes = next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    return kilobytes / 2**20


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def worker(rank, ranks, port, loader, model_dir, results):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port)
    rank, _, device = infra.init_distributed()
    if loader == "rank0_broadcast":
        infra.sharded_load_plan = lambda *args: (None, "the benchmark asks for the rank-0 load")
    torch.distributed.barrier()
    before = memory_gb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from the current RSS
    started = time.perf_counter()
    model = infra.load_model(model_dir, modeling.CausalLMLogProbs, device=device, rank=rank, max_seq_length=2048)
    torch.distributed.barrier()
    seconds = time.perf_counter() - started
    peak = memory_gb("VmHWM")
    checksum = sum(param.to_local().double().sum().item() for param in model.parameters())
    with open(os.path.join(results, f"{loader}-{rank}.json"), "w") as f:
        json.dump({"before": before, "peak": peak, "seconds": seconds, "checksum": checksum}, f)
    torch.distributed.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--num_hidden_layers", type=int, default=16)
    parser.add_argument("--vocab_size", type=int, default=128256)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=2048, num_hidden_layers=args.num_hidden_layers, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=8192, vocab_size=args.vocab_size, head_dim=64,
                         tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-5)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        parameters = sum(p.numel() for p in model.parameters())
        model.save_pretrained(model_dir)
        del model
        print(f"{parameters / 1e9:.2f}B parameters, model.safetensors "
              f"{os.path.getsize(os.path.join(model_dir, 'model.safetensors')) / 2**30:.2f} GiB (bf16); "
              f"fp32 shard per rank {parameters * 4 / args.ranks / 2**30:.2f} GiB")
        for loader in LOADERS:
            mp.spawn(worker, nprocs=args.ranks, args=(args.ranks, free_port(), loader, model_dir, tmp))
        print(f"{'loader':16} {'rank':>4} {'RSS before GiB':>15} {'peak RSS GiB':>13} {'seconds':>8}  checksum")
        for loader in LOADERS:
            for rank in range(args.ranks):
                with open(os.path.join(tmp, f"{loader}-{rank}.json")) as f:
                    r = json.load(f)
                print(f"{loader:16} {rank:>4} {r['before']:>15.2f} {r['peak']:>13.2f} {r['seconds']:>8.1f}  "
                      f"{r['checksum']:.6e}")


if __name__ == "__main__":
    main()
