"""eval.py end to end: a tiny model on every task, the split across ranks, the real bundled model."""
import json
import os
import subprocess
import sys

import pytest

import eval as evaluation
from conftest import ROOT


@pytest.fixture
def single_process(monkeypatch):
    """A one-rank process group whose environment variables do not leak into other tests."""
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(29500 + os.getpid() % 10000)).items():
        monkeypatch.setenv(name, value)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_tiny_model_end_to_end_on_every_task(tiny_model_dir, benchmarks_dir, tmp_path, capsys, single_process):
    out, local = tmp_path / "eval", tmp_path / "benchmarks"
    local.mkdir()
    for name in os.listdir(benchmarks_dir):
        os.symlink(os.path.join(benchmarks_dir, name), local / name)
    # HumanEval+ is on the hub only: two HumanEval problems stand in, each with one more (EvalPlus-style) assertion
    humaneval = read_jsonl(os.path.join(benchmarks_dir, "humaneval.jsonl"))[:2]
    plus = [dict(row, test=row["test"] + f"    assert candidate is not None  # plus {i}\n")
            for i, row in enumerate(humaneval)]
    (local / "humanevalplus.jsonl").write_text("".join(json.dumps(row) + "\n" for row in plus))
    evaluation.main(["--model_name_or_path", tiny_model_dir, tiny_model_dir, "--tasks", ",".join(evaluation.ALL_TASKS),
                     "--limit", "2", "--max_new_tokens", "6", "--humaneval_num_samples", "2", "--pass_at_k", "1,2",
                     "--benchmark_dir", str(local), "--output_dir", str(out)])
    results = json.loads((out / "results.json").read_text())
    names = list(results)
    assert len(names) == 2 and names[0] != names[1]  # the same directory twice still gets two columns
    for task in evaluation.ALL_TASKS:
        entry = results[names[0]][task]
        assert entry["n"] == 2 and entry["model"] == tiny_model_dir
        assert all(0.0 <= value <= 1.0 for value in entry["metrics"].values())
        records = read_jsonl(out / "predictions" / names[0] / f"{task}.jsonl")
        assert [r["index"] for r in records] == [0, 1]
        verdict = {"prompt_level_strict", "prompt_level_loose"} if task == "ifeval" else {"correct"}
        assert all({"prompt", "response"} | verdict <= set(r) for r in records)
        assert entry["settings"]["olmes"] == evaluation.TASKS[task]["olmes"]
        assert ("subjects" in entry) == ("macro" in evaluation.TASKS[task])
    assert set(results[names[0]]["ifeval"]["metrics"]) == {"prompt_level_strict", "inst_level_strict",
                                                          "prompt_level_loose", "inst_level_loose"}
    assert "audit-guard" in results[names[0]]["humaneval"]["settings"]["sandbox"]
    humaneval = results[names[0]]["humaneval"]
    assert humaneval["settings"]["samples"] == 2 and humaneval["settings"]["temperature"] == 0.8
    assert set(humaneval["metrics"]) == {"pass@1", "pass@2"}
    assert set(results[names[0]]["math"]["subjects"]) == {"Algebra"}  # the first 2 problems are algebra
    table = capsys.readouterr().out.splitlines()
    header = next(line for line in table if names[0] in line and names[1] in line)
    assert any(line.startswith("ifeval prompt_level_loose") for line in table[table.index(header):])


def test_ranks_split_the_examples_and_rank_0_gathers_them_all(tiny_model_dir, benchmarks_dir, tmp_path,
                                                               single_process):
    args = ["--model_name_or_path", tiny_model_dir, "--tasks", "gsm8k_0shot,mmlu", "--limit", "5",
            "--max_new_tokens", "4", "--benchmark_dir", benchmarks_dir]
    evaluation.main(args + ["--output_dir", str(tmp_path / "one")])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(29400 + os.getpid() % 1000), "eval.py", *args, "--output_dir", str(tmp_path / "two")],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    name = os.path.basename(tiny_model_dir)
    for task in ("gsm8k_0shot", "mmlu"):
        one = read_jsonl(tmp_path / "one" / "predictions" / name / f"{task}.jsonl")
        two = read_jsonl(tmp_path / "two" / "predictions" / name / f"{task}.jsonl")
        assert [(r["index"], r["response"]) for r in two] == [(r["index"], r["response"]) for r in one]
    assert json.loads((tmp_path / "two" / "results.json").read_text())[name]["mmlu"]["settings"]["world_size"] == 2


def test_bundled_model_on_20_gsm8k_and_20_ifeval(bundled_model_dir, benchmarks_dir, tmp_path, single_process):
    """The real SmolLM2-135M-Instruct: it runs and writes sane results (its score is not the point).
    GSM8K 0-shot: the 8-shot prompt is ~880 tokens, 20 of them take minutes of CPU to prefill."""
    out = tmp_path / "eval"
    evaluation.main(["--model_name_or_path", bundled_model_dir, "--tasks", "gsm8k_0shot,ifeval", "--limit", "20",
                     "--max_new_tokens", "48", "--per_device_eval_batch_size", "20", "--benchmark_dir", benchmarks_dir,
                     "--output_dir", str(out)])
    results = json.loads((out / "results.json").read_text())["SmolLM2-135M-Instruct"]
    assert results["gsm8k_0shot"]["n"] == 20 and results["ifeval"]["n"] == 20
    gsm8k = read_jsonl(out / "predictions" / "SmolLM2-135M-Instruct" / "gsm8k_0shot.jsonl")
    assert sum(bool(r["response"].strip()) for r in gsm8k) >= 15  # a real model answers, in English
    assert sum(r["extracted"] is not None for r in gsm8k) >= 10
    ifeval = results["ifeval"]["metrics"]
    assert ifeval["prompt_level_strict"] <= ifeval["prompt_level_loose"] <= ifeval["inst_level_loose"]


@pytest.mark.parametrize("bad, message", [(["--max_new_tokens", "-1"], "argument --max_new_tokens: -1 must be >= 1"),
                                          (["--tasks", "gsm8k,bbh"], "unknown task"),
                                          (["--pass_at_k", "1,5", "--humaneval_num_samples", "2"],
                                           "needs --humaneval_num_samples >= 5"),
                                          (["--humaneval_num_samples", "4", "--temperature", "0", "--pass_at_k", "1"],
                                           "need --temperature > 0")])
def test_bad_arguments_are_refused_by_name(bad, message, capsys):
    with pytest.raises(SystemExit):
        evaluation.parse_args(["--model_name_or_path", "m", "--output_dir", "o", *bad])
    assert message in capsys.readouterr().err
