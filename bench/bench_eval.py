"""Evaluation throughput (examples/s per task) and decontamination throughput (rows/s).

    python bench/bench_eval.py [--model_name_or_path .cache/models/SmolLM2-135M-Instruct] [--limit 16]
        [--max_new_tokens 128] [--decontamination_rows 100000]

Eval: eval.py on the first --limit examples of each task, one process, greedy, batch
--per_device_eval_batch_size, every response capped at --max_new_tokens (the task defaults, 512-1024,
make a small model ramble for minutes on CPU). examples/s includes prompt encoding, generation,
scoring and, for HumanEval, running each program in the sandbox.

Decontamination: benchmarks.decontaminate against gsm8k, math, ifeval, humaneval and mmlu (their
n-gram index is built first, untimed) on synthetic rows shaped like the 939k-row Tülu 3 SFT mixture:
1 to 3 user turns of lognormal length (median ~90 words, mean ~150, capped at 4000) drawn from a
30k-word vocabulary, 5 sources; once as a Python list and once as a datasets.Dataset.
"""
import argparse
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import benchmarks  # noqa: E402
import eval as evaluation  # noqa: E402

BENCHMARKS = ["gsm8k", "math", "ifeval", "humaneval", "mmlu"]


def bench_eval(args) -> None:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29611")
    with tempfile.TemporaryDirectory() as output_dir:
        results = evaluation.main([
            "--model_name_or_path", args.model_name_or_path, "--tasks", args.tasks, "--limit", str(args.limit),
            "--max_new_tokens", str(args.max_new_tokens), "--output_dir", output_dir,
            "--temperature", "0", "--humaneval_num_samples", "1", "--pass_at_k", "1",  # greedy, not OLMES's 20 samples
            "--per_device_eval_batch_size", str(args.per_device_eval_batch_size)])
    print(f"\n{'task':<14}{'examples':>9}{'seconds':>10}{'examples/s':>12}")
    for task, entry in next(iter(results.values())).items():
        print(f"{task:<14}{entry['n']:>9}{entry['seconds']:>10.1f}{entry['examples_per_second']:>12.3f}")


def synthetic_tulu_rows(num_rows: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    vocabulary = [f"w{i}" for i in range(30000)]
    rows = []
    for i in range(num_rows):
        messages = []
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            words = min(int(rng.lognormvariate(4.5, 1.0)), 4000)
            messages += [{"role": "user", "content": " ".join(rng.choices(vocabulary, k=words))},
                         {"role": "assistant", "content": "A reply."}]
        rows.append({"messages": messages, "source": f"source_{i % 5}"})
    return rows


def bench_decontamination(args) -> None:
    import datasets

    rows = synthetic_tulu_rows(args.decontamination_rows)
    start, cpu_start = time.perf_counter(), time.process_time()
    benchmarks.decontaminate(rows[:1], BENCHMARKS)  # the benchmark n-gram index alone
    index_seconds, index_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    print(f"\nbenchmark n-gram index ({', '.join(BENCHMARKS)}): {index_seconds:.1f}s")
    for kind, dataset in (("list", rows), ("datasets.Dataset", datasets.Dataset.from_list(rows))):
        start, cpu_start = time.perf_counter(), time.process_time()
        kept, report = benchmarks.decontaminate(dataset, BENCHMARKS)
        seconds = time.perf_counter() - start - index_seconds
        cpu_seconds = time.process_time() - cpu_start - index_cpu  # what one free core would take
        print(f"decontaminate {kind:<17} {len(rows)} rows, {report['dropped']} dropped: {len(rows) / seconds:,.0f} "
              f"rows/s wall, {len(rows) / cpu_seconds:,.0f} rows per CPU-second "
              f"(939,344 rows: {939344 / (len(rows) / cpu_seconds) / 60:.1f} CPU-minutes)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_name_or_path", default=os.path.join(ROOT, ".cache", "models", "SmolLM2-135M-Instruct"))
    parser.add_argument("--tasks", default="gsm8k,gsm8k_0shot,math500,ifeval,humaneval,mmlu")
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=16)
    parser.add_argument("--decontamination_rows", type=int, default=100000, help="0 skips this part")
    args = parser.parse_args()
    if args.limit > 0:
        bench_eval(args)
    if args.decontamination_rows > 0:
        bench_decontamination(args)


if __name__ == "__main__":
    main()
