"""dpo.py with the cached reference (log-probs scored once, before training) vs a live reference model:
training steps/s and peak memory at the same batch, printed as a table.

    python bench/bench_dpo.py                                   # bundled SmolLM2-135M, CPU or one GPU
    python bench/bench_dpo.py --model_name_or_path output/sft --steps 20 --per_device_train_batch_size 8

Each mode runs dpo.main in a fresh process, so peak memory is that run's own: peak RSS on CPU, peak
allocated CUDA memory on GPU. steps/s times the training loop from the metrics (step 1 left out as
warm-up); "setup s" is everything before it (model load, and for `cached` the one-off reference pass).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(dpo_argv):
    """Run dpo.main here; print wall time and this process's peak memory as JSON."""
    import resource

    import torch

    sys.path.insert(0, ROOT)
    import dpo

    started = time.perf_counter()
    dpo.main(dpo_argv)
    wall = time.perf_counter() - started
    if torch.cuda.is_available():
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print("BENCH " + json.dumps({"wall_s": wall, "peak_mib": peak_mib}))


def run_mode(mode, args, workdir):
    output_dir = os.path.join(workdir, mode)
    dpo_argv = ["--model_name_or_path", args.model_name_or_path,
                "--dataset_mixer_list", args.data, str(args.steps * args.per_device_train_batch_size),
                "--chat_template_name", "tulu", "--max_seq_length", str(args.max_seq_length),
                "--output_dir", output_dir, "--per_device_train_batch_size", str(args.per_device_train_batch_size),
                "--gradient_accumulation_steps", "1", "--reference", mode, "--checkpointing_steps", "1000000"]
    env = dict(os.environ, MASTER_PORT=str(29000 + os.getpid() % 1000 + len(mode)))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, __file__, "worker", *dpo_argv], capture_output=True,
                          text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{done.stderr[-3000:]}")
    measured = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("BENCH "))[6:])
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f]
    step_seconds = [m["input_tokens"] / m["tokens_per_s"] for m in steps]  # each step's own elapsed time
    timed = step_seconds[1:] or step_seconds
    return {"mode": mode, "steps/s": len(timed) / sum(timed), "s/step": sum(timed) / len(timed),
            "setup s": measured["wall_s"] - sum(step_seconds), "peak MiB": measured["peak_mib"],
            "final loss": steps[-1]["loss"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=os.path.join(ROOT, ".cache", "models", "SmolLM2-135M-Instruct"))
    parser.add_argument("--data", default=os.path.join(ROOT, "data", "demo", "pref_train.jsonl"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--per_device_train_batch_size", type=int, default=4, help="pairs per step")
    parser.add_argument("--max_seq_length", type=int, default=256)
    args = parser.parse_args()

    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    with tempfile.TemporaryDirectory() as workdir:
        rows = [run_mode(mode, args, workdir) for mode in ("cached", "live")]
    print(f"\ndpo.py, {os.path.basename(args.model_name_or_path.rstrip('/'))}, {device}: {args.steps} steps of "
          f"{args.per_device_train_batch_size} pairs, max_seq_length {args.max_seq_length}, dpo_norm")
    columns = list(rows[0])
    print(" | ".join(f"{c:>10}" for c in columns))
    for row in rows:
        print(" | ".join(f"{row[c]:>10}" if isinstance(row[c], str) else f"{row[c]:>10.3f}" for c in columns))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2:])
    else:
        main()
