"""eval.py end to end: a tiny model on every task, the split across ranks, the real bundled model; results that
survive interruptions and reruns, and data that cannot be had."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import eval as evaluation
from conftest import ROOT

INPUTS = os.path.join(ROOT, "tests", "fixtures", "olmes", "inputs")


@pytest.fixture
def single_process(monkeypatch):
    """A one-rank process group whose environment variables do not leak into other tests."""
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(29500 + os.getpid() % 10000)).items():
        monkeypatch.setenv(name, value)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


@pytest.fixture
def local_benchmarks(benchmarks_dir, tmp_path):
    """A --benchmark_dir with what the hub would give for the hub-only benchmarks: genuine BBH rows and
    stand-in PopQA / TruthfulQA rows (the golden fixtures' inputs), DROP's stand-in train split, and two
    HumanEval problems as HumanEval+ (each with one more, EvalPlus-style, assertion)."""
    local = tmp_path / "benchmarks"
    local.mkdir()
    with open(os.path.join(INPUTS, "bbh.json")) as f:
        bbh = json.load(f)["docs"]
    write_jsonl(local / "bbh.jsonl", [dict(row, subtask=subtask) for subtask in ("snarks", "navigate")
                                      for row in bbh[subtask][:1]])
    for name in ("popqa", "truthfulqa"):
        with open(os.path.join(INPUTS, f"{name}.json")) as f:
            write_jsonl(local / f"{name}.jsonl", json.load(f)["docs"])
    with open(os.path.join(ROOT, "tests", "fixtures", "olmes", "drop.json")) as f:
        write_jsonl(local / "drop_train.jsonl", json.load(f)["tasks"]["drop::llama3"]["standin_train"])
    humaneval = read_jsonl(os.path.join(benchmarks_dir, "humaneval.jsonl"))[:2]
    write_jsonl(local / "humanevalplus.jsonl", [
        dict(row, test=row["test"] + f"    assert candidate is not None  # {i}\n") for i, row in enumerate(humaneval)])
    return str(local)


def test_tiny_model_end_to_end_on_every_task(tiny_model_dir, local_benchmarks, tmp_path, capsys, single_process):
    out = tmp_path / "eval"
    evaluation.main(["--model_name_or_path", tiny_model_dir, tiny_model_dir, "--tasks", ",".join(evaluation.ALL_TASKS),
                     "--limit", "2", "--max_new_tokens", "6", "--humaneval_num_samples", "2", "--pass_at_k", "1,2",
                     "--benchmark_dir", local_benchmarks, "--output_dir", str(out)])
    results = json.loads((out / "results.json").read_text())
    names = list(results)
    assert len(names) == 2 and names[0] != names[1]  # the same directory twice still gets two columns
    for task in evaluation.ALL_TASKS:
        entry = results[names[0]][task]
        assert entry["n"] == 2 and entry["model"] == tiny_model_dir
        assert all(0.0 <= value <= 1.0 for value in entry["metrics"].values())
        assert next(iter(entry["metrics"])) == entry["settings"]["metric"]  # the headline first
        records = read_jsonl(out / "predictions" / names[0] / f"{task}.jsonl")
        assert [r["index"] for r in records] == [0, 1]
        kind = {"prompt_level_loose"} if task == "ifeval" else {"passed"} if task in evaluation.CODE_TASKS else {
            "extracted", "gold", "scores"}
        assert all({"prompt", "response" if "continuations" not in entry["settings"] else "logprobs"} | kind <= set(r)
                   for r in records)
        assert entry["settings"]["olmes"] == evaluation.TASKS[task]["olmes"]
        assert ("subjects" in entry) == ("macro" in evaluation.TASKS[task] or task == "bbh")
    assert "audit-guard" in results[names[0]]["humaneval"]["sandbox"]
    humaneval = results[names[0]]["humaneval"]
    assert humaneval["settings"]["samples"] == 2 and humaneval["settings"]["temperature"] == 0.8
    assert list(humaneval["metrics"]) == ["pass@2", "pass@1"]
    assert set(results[names[0]]["math"]["subjects"]) == {"Algebra"}  # the first 2 problems are algebra
    assert set(results[names[0]]["bbh"]["subjects"]) == {"snarks", "navigate"}
    table = capsys.readouterr().out.splitlines()
    header = next(line for line in table if names[0] in line and names[1] in line)
    assert any(line.startswith("ifeval prompt_level_loose") for line in table[table.index(header):])


def run(model, out, *extra, tasks="gsm8k_0shot,mmlu", benchmarks=None):
    return evaluation.main(["--model_name_or_path", *([model] if isinstance(model, str) else model), "--tasks", tasks,
                            "--limit", "2", "--max_new_tokens", "4", "--output_dir", str(out),
                            *(["--benchmark_dir", benchmarks] if benchmarks else []), *extra])


def test_each_result_is_saved_when_it_finishes_so_an_interruption_keeps_it(tiny_model_dir, tmp_path, monkeypatch,
                                                                           single_process):
    real = evaluation.evaluate_task

    def interrupted_in_mmlu(task, *args, **kwargs):
        if task == "mmlu":
            raise KeyboardInterrupt  # Ctrl-C (or an OOM) in the second task
        return real(task, *args, **kwargs)
    monkeypatch.setattr(evaluation, "evaluate_task", interrupted_in_mmlu)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model_dir, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    [name] = results
    assert list(results[name]) == ["gsm8k_0shot"] and (tmp_path / "predictions" / name / "gsm8k_0shot.jsonl").exists()


def test_a_rerun_skips_what_is_done_and_another_model_adds_its_column(tiny_model_dir, tmp_path, monkeypatch, capsys,
                                                                      single_process):
    run(tiny_model_dir, tmp_path)
    first = json.loads((tmp_path / "results.json").read_text())
    evaluated = []
    real = evaluation.evaluate_task
    monkeypatch.setattr(evaluation, "evaluate_task",
                        lambda task, *a, **k: evaluated.append(task) or real(task, *a, **k))
    run(tiny_model_dir, tmp_path)
    assert evaluated == [] and "2 results already in" in capsys.readouterr().out
    other = tmp_path / "other_model"
    shutil.copytree(tiny_model_dir, other)
    run([tiny_model_dir, str(other)], tmp_path)  # the first model is done; the second is new
    assert evaluated == ["gsm8k_0shot", "mmlu"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results[next(iter(first))] == first[next(iter(first))] and "other_model" in results


def test_other_settings_stop_the_run_before_any_model_loads_unless_overwrite(tiny_model_dir, tmp_path, monkeypatch,
                                                                            capsys, single_process):
    run(tiny_model_dir, tmp_path)
    real = evaluation.load_model_and_tokenizer
    monkeypatch.setattr(evaluation, "load_model_and_tokenizer", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit, match="max_new_tokens 4 there, 6 now") as stop:
        run(tiny_model_dir, tmp_path, "--max_new_tokens", "6")
    assert "--overwrite" in str(stop.value) and "gsm8k_0shot of" in str(stop.value)
    monkeypatch.setattr(evaluation, "load_model_and_tokenizer", real)
    run(tiny_model_dir, tmp_path, "--max_new_tokens", "6", "--overwrite")
    assert "discarded 1 results computed with other settings" in capsys.readouterr().out  # mmlu generates nothing
    results = json.loads((tmp_path / "results.json").read_text())
    assert next(iter(results.values()))["gsm8k_0shot"]["settings"]["max_new_tokens"] == 6


def test_a_benchmark_dir_with_some_files_leaves_the_others_to_the_cache(tmp_path, benchmarks_dir):
    write_jsonl(tmp_path / "humanevalplus.jsonl", read_jsonl(os.path.join(benchmarks_dir, "humaneval.jsonl"))[:3])
    args = evaluation.parse_args(["--model_name_or_path", "m", "--output_dir", "o", "--tasks", "humanevalplus,gsm8k",
                                  "--benchmark_dir", str(tmp_path)])
    data, missing = evaluation.load_task_data(args)
    assert missing == [] and len(data["humanevalplus"][0]) == 3 and len(data["gsm8k"][0]) == 1319


def test_data_no_source_serves_stops_the_run_with_one_line_per_task(tiny_model_dir, tmp_path, monkeypatch, capsys,
                                                                    single_process):
    import datasets

    def offline(path, *args, **kwargs):  # what datasets raises offline
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (OfflineModeIsEnabled)")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(evaluation, "load_model_and_tokenizer", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as stop:
        run(tiny_model_dir, tmp_path, tasks="gsm8k_0shot,humanevalplus,popqa")
    lines = str(stop.value).splitlines()
    assert lines[0].startswith("humanevalplus: the hub's evalplus/humanevalplus (test) could not be loaded "
                               "(ConnectionError: Couldn't reach")
    assert "DIR/humanevalplus.jsonl" in lines[0]
    assert "task_id, prompt, canonical_solution, test, entry_point" in lines[0]
    assert lines[1].startswith("popqa: the hub's akariasai/PopQA (test)") and "--skip_unavailable" in lines[2]
    monkeypatch.undo()
    monkeypatch.setattr(datasets, "load_dataset", offline)
    run(tiny_model_dir, tmp_path, "--skip_unavailable", tasks="gsm8k_0shot,popqa")
    assert "skipped popqa: the hub's akariasai/PopQA" in capsys.readouterr().out
    assert list(next(iter(json.loads((tmp_path / "results.json").read_text()).values()))) == ["gsm8k_0shot"]


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
        assert [(r["index"], r.get("response"), r.get("extracted")) for r in two] == [
            (r["index"], r.get("response"), r.get("extracted")) for r in one]
    assert json.loads((tmp_path / "two" / "results.json").read_text())[name]["mmlu"]["world_size"] == 2


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
    assert sum(r["extracted"] != r["response"] for r in gsm8k) >= 10  # a number was found
    ifeval = results["ifeval"]["metrics"]
    assert ifeval["prompt_level_strict"] <= ifeval["prompt_level_loose"] <= ifeval["inst_level_loose"]


@pytest.mark.parametrize("bad, message", [(["--max_new_tokens", "-1"], "argument --max_new_tokens: -1 must be >= 1"),
                                          (["--tasks", "gsm8k,nope"], "unknown task"),
                                          (["--pass_at_k", "1,5", "--humaneval_num_samples", "2"],
                                           "needs --humaneval_num_samples >= 5"),
                                          (["--humaneval_num_samples", "4", "--temperature", "0", "--pass_at_k", "1"],
                                           "need --temperature > 0")])
def test_bad_arguments_are_refused_by_name(bad, message):
    with pytest.raises(SystemExit) as stopped:  # the one line infra.run prints
        evaluation.parse_args(["--model_name_or_path", "m", "--output_dir", "o", *bad])
    assert message in str(stopped.value)
