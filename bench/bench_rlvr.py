"""Sampling throughput of decoding.complete (rlvr's rollouts) against model.generate, and one RL step split into
its phases.

    python bench/bench_rlvr.py                          # CPU: the bundled SmolLM2-135M, batch 4, 32 + 32 tokens
    python bench/bench_rlvr.py --model llama1b          # GPU: a random Llama-3.2-1B shape in bf16,
                                                        # batch 64, 128-token prompts, 256 new tokens

1. Sampling. The same model, the same random prompts of --prompt_length tokens and exactly --new_tokens
   new tokens per row (no EOS stop, temperature 1, no top-k/top-p) through
   - model.generate(do_sample=True) with its default (dynamic) KV cache, and
   - decoding.complete, the loop rlvr.py samples with (one batch).
   Each is run once to warm up, then timed over --repeats rounds (the two interleaved in each, so a shared
   machine's load drifts alike over them; the best round counts); new tokens/s = batch * new_tokens / seconds.
2. One RL step (--rl_step). rlvr.main itself, on one process, for two GRPO steps on bundled demo
   prompts (the random llama1b answers nothing correctly, so its rewards are 0 but every phase runs);
   the second step's time/sampling, time/scoring, time/reference (old-policy and reference
   log-probs), time/training (updates) are reported from metrics.jsonl.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import decoding  # noqa: E402
import rlvr  # noqa: E402

BUNDLED = os.path.join(ROOT, ".cache", "models", "SmolLM2-135M-Instruct")
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                max_position_embeddings=131072, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0})


def parse_args():
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama1b" if gpu else "bundled", choices=["bundled", "llama1b"])
    parser.add_argument("--batch_size", type=int, default=64 if gpu else 4)
    parser.add_argument("--prompt_length", type=int, default=128 if gpu else 32)
    parser.add_argument("--new_tokens", type=int, default=256 if gpu else 32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rl_step", action=argparse.BooleanOptionalAction, default=True,
                        help="also time one rlvr.py GRPO step by phase")
    parser.add_argument("--tokenizer", default=BUNDLED,
                        help="saved with the model for the RL step (a folder with the bundled tokenizer's files is enough)")
    parser.add_argument("--num_hidden_layers", type=int, default=None, help="llama1b: override (CPU smoke runs)")
    parser.add_argument("--json", default=None, help="also write the report here")
    return parser.parse_args()


def build_model(name, device, num_hidden_layers=None):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if name == "bundled":
        return AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=dtype).to(device).eval()
    torch.manual_seed(0)
    with torch.device(device):
        config = LlamaConfig(**LLAMA_1B)
        config.num_hidden_layers = num_hidden_layers or config.num_hidden_layers
        return LlamaForCausalLM(config).to(dtype).eval()


def timed(runs, repeats, device):
    """Best seconds of each run over `repeats` rounds, the runs interleaved within each round, so that the load
    of a shared machine drifts alike over all of them."""
    for run in runs:
        run()  # warm-up: the allocator and first-call costs
    seconds = [[] for _ in runs]
    for _ in range(repeats):
        for run, times in zip(runs, seconds):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
    return [min(times) for times in seconds]


class NoStop:
    """A tokenizer as decoding.complete reads one, whose EOS no token has: every row makes exactly new_tokens."""
    eos_token_id, pad_token_id = -1, 0

    @staticmethod
    def decode(ids, skip_special_tokens=False):
        return ""


def bench_sampling(args, model, device):
    vocab = model.config.vocab_size
    prompts = torch.randint(100, min(vocab, 30000), (args.batch_size, args.prompt_length),
                            generator=torch.Generator().manual_seed(0)).tolist()
    ids, mask = torch.tensor(prompts, device=device), torch.ones(args.batch_size, args.prompt_length, device=device)
    model.generation_config.eos_token_id = None

    def hf_generate():
        out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0)
        assert out.shape[1] == args.prompt_length + args.new_tokens

    def ours():
        completions = decoding.complete(model, NoStop, prompts, max_new_tokens=args.new_tokens, temperature=1.0,
                                        batch_size=len(prompts))
        assert all(len(completion.token_ids) == args.new_tokens for completion in completions)

    new_tokens = args.batch_size * args.new_tokens
    with torch.no_grad():
        hf_seconds, our_seconds = timed([hf_generate, ours], args.repeats, device)
    return {"generate_tokens_per_s": new_tokens / hf_seconds, "complete_tokens_per_s": new_tokens / our_seconds,
            "speedup": hf_seconds / our_seconds}


def bench_rl_step(args, model, device, workdir):
    """Two GRPO steps of rlvr.main on this model (saved with the bundled tokenizer); the second step's phases."""
    from transformers import AutoTokenizer

    model_dir, out_dir = os.path.join(workdir, "model"), os.path.join(workdir, "rlvr")
    model.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(args.tokenizer).save_pretrained(model_dir)
    data = os.path.join(ROOT, "data", "demo", "rlvr_train.jsonl")
    prompts = args.batch_size // 4
    argv = ["--model_name_or_path", model_dir, "--dataset_mixer_list", data, "1.0", "--output_dir", out_dir,
            "--num_unique_prompts_rollout", str(prompts), "--num_samples_per_prompt_rollout", "4",
            "--total_episodes", str(2 * prompts * 4), "--response_length", str(args.new_tokens),
            "--max_seq_length", str(args.new_tokens + 256), "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-6"]
    rlvr.main(argv)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        step = [json.loads(line) for line in f][-1]
    return {name: step[name] for name in ("time/sampling", "time/scoring", "time/reference", "time/training",
                                          "sampling_tokens_per_s", "training_tokens_per_s", "response_tokens")}


def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args.model, device, args.num_hidden_layers)
    report = {"model": args.model, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "batch_size": args.batch_size, "prompt_length": args.prompt_length, "new_tokens": args.new_tokens,
              **bench_sampling(args, model, device)}
    print(f"sampling ({args.model}, {report['device']}, batch {args.batch_size}, {args.prompt_length} + "
          f"{args.new_tokens} tokens): model.generate {report['generate_tokens_per_s']:.0f} new tokens/s, "
          f"decoding.complete {report['complete_tokens_per_s']:.0f} new tokens/s ({report['speedup']:.2f}x)")
    if args.rl_step:
        with tempfile.TemporaryDirectory() as workdir:
            report["rl_step"] = bench_rl_step(args, model.float() if device.type == "cpu" else model, device, workdir)
        phases = ", ".join(f"{k.split('/')[1]} {v:.2f}s" for k, v in report["rl_step"].items() if k.startswith("time/"))
        print(f"one GRPO step ({args.batch_size} responses): {phases}")
    print(json.dumps(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
