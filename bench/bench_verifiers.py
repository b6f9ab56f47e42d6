"""Verifications per second per dataset, on one CPU core, on the genuine benchmark files.

    python bench/bench_verifiers.py [--benchmarks_dir .cache/benchmarks] [--repeats 3]

Rows:
- gsm8k:               every GSM8K test solution ("... #### N") against its own answer.
- math (string path):  every MATH-500 reference solution against its own last \\boxed{} answer;
                       the normalized strings already match, so no symbolic work is done.
- math (symbolic path): every MATH-500 solution against the NEXT problem's answer; the strings
                       differ, so each call goes to math-verify in the helper process (the cost of
                       a wrong answer, the common case early in RLVR). Each repeat starts a fresh
                       helper, so neither verdicts nor parsed LaTeX are cached.
- ifeval strict/loose: the 541 IFEval prompts, each prompt used as its own response, all of its
                       instructions checked (loose = 8 candidates).
The process and its math-verify helper are pinned to one core (sched_setaffinity), so the figures
are per core; the helper's start-up (importing sympy) happens before timing.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import verifiers  # noqa: E402


def rows(benchmarks_dir, name):
    with open(os.path.join(benchmarks_dir, name)) as f:
        return [json.loads(line) for line in f]


def rate(calls, repeats, before_each=lambda: None):
    """Best-of-`repeats` throughput of running every call once."""
    best = float("inf")
    for _ in range(repeats):
        before_each()
        start = time.perf_counter()
        for call in calls:
            call()
        best = min(best, time.perf_counter() - start)
    return len(calls), best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--benchmarks_dir", default=".cache/benchmarks")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # the helper inherits this core

    gsm8k = rows(args.benchmarks_dir, "gsm8k.jsonl")
    math500 = rows(args.benchmarks_dir, "math500.jsonl")
    ifeval = rows(args.benchmarks_dir, "ifeval.jsonl")
    golds = [verifiers.last_boxed(r["solution"]) for r in math500]
    verifiers.verify(r"\boxed{\sqrt{12}}", r"2\sqrt{3}", "math")  # start the helper, untimed
    verifiers.ifeval_check("Warm up langdetect's profiles.", ["language:response_language"], [{"language": "en"}])

    def fresh_helper():
        """Cold caches for the symbolic row: no cached verdicts, a new helper with no parsed LaTeX."""
        verifiers._equivalence_cache.clear()
        verifiers._helper.close()
        verifiers.verify(r"\boxed{\sqrt{12}}", r"2\sqrt{3}", "math")  # its start-up, untimed

    def call(*arguments, **keywords):
        return lambda: arguments[0](*arguments[1:], **keywords)

    benchmarks = {
        "gsm8k": ([call(verifiers.verify, r["answer"], r["short_answer"], "gsm8k") for r in gsm8k], None),
        "math (string path)": ([call(verifiers.verify, r["solution"], g, "math") for r, g in zip(math500, golds)], None),
        "math (symbolic path)": ([call(verifiers.verify, r["solution"], g, "math")
                                  for r, g in zip(math500, golds[1:] + golds[:1])],
                                 fresh_helper),
        "ifeval strict": ([call(verifiers.ifeval_check, r["prompt"], r["instruction_id_list"], r["kwargs"])
                           for r in ifeval], None),
        "ifeval loose": ([call(verifiers.ifeval_check, r["prompt"], r["instruction_id_list"], r["kwargs"], loose=True)
                          for r in ifeval], None),
    }
    print(f"{'dataset':<22}{'calls':>7}{'seconds':>10}{'verifications/s':>18}")
    for name, (calls, before_each) in benchmarks.items():
        count, seconds = rate(calls, args.repeats, before_each or (lambda: None))
        print(f"{name:<22}{count:>7}{seconds:>10.2f}{count / seconds:>18.1f}")


if __name__ == "__main__":
    main()
