"""Decontamination: training rows whose prompts are benchmark text are dropped, the rest are kept."""
import json

import datasets
import pytest

import benchmarks
import flags


def chat(user: str, source: str = "tulu") -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "Sure."}],
            "source": source}


@pytest.fixture
def gsm8k_question(benchmarks_dir):
    with open(f"{benchmarks_dir}/gsm8k.jsonl") as f:
        return json.loads(f.readline())["question"]


CLEAN = ("Write a short poem about autumn leaves falling on a quiet river while the town sleeps "
         "and the bells of the old church ring twice before dawn.")


def test_planted_benchmark_question_is_dropped_and_clean_row_kept(gsm8k_question):
    rows = [chat(CLEAN, "poems"), chat("Please solve: " + gsm8k_question.upper(), "math_sft")]
    kept, report = benchmarks.decontaminate(rows, ["gsm8k", "math500"])
    assert kept == [rows[0]]
    assert report["dropped"] == 1
    assert report["dropped_per_benchmark"] == {"gsm8k": 1, "math500": 0}
    assert report["dropped_per_source"] == {"poems": {"rows": 1, "dropped": 0},
                                            "math_sft": {"rows": 1, "dropped": 1}}
    assert report["dropped_examples"][0]["benchmark"] == "gsm8k"


def test_overlap_must_exceed_threshold(gsm8k_question):
    # about a third of this prompt's 8-grams are benchmark text: kept at 0.5, dropped at threshold 0
    words = CLEAN.split()
    question = " ".join(gsm8k_question.split()[:20])
    row = chat(" ".join(words + words[:4]) + " " + question)
    assert len(benchmarks.decontaminate([row], ["gsm8k"], threshold=0.5)[0]) == 1
    assert len(benchmarks.decontaminate([row], ["gsm8k"], threshold=0.0)[0]) == 0


def test_only_user_turns_are_compared(gsm8k_question):
    row = {"messages": [{"role": "user", "content": CLEAN}, {"role": "assistant", "content": gsm8k_question}]}
    assert len(benchmarks.decontaminate([row], ["gsm8k"], threshold=0.0)[0]) == 1


def test_preference_rows_use_the_chosen_conversation_and_datasets_stay_datasets(gsm8k_question):
    rows = datasets.Dataset.from_list([
        {"chosen": chat(gsm8k_question)["messages"], "rejected": chat(gsm8k_question)["messages"], "source": "p"},
        {"chosen": chat(CLEAN)["messages"], "rejected": chat(CLEAN)["messages"], "source": "p"}])
    kept, report = benchmarks.decontaminate(rows, ["gsm8k"])
    assert isinstance(kept, datasets.Dataset) and kept["chosen"] == [rows[1]["chosen"]]
    assert report["dropped_per_source"] == {"p": {"rows": 2, "dropped": 1}}


def test_row_without_a_prompt_is_a_clear_error():
    with pytest.raises(flags.InvalidRecord, match="row 1 .*no 'messages', 'chosen' or 'prompt'"):
        benchmarks.decontaminate([chat(CLEAN), {"text": "hi"}], ["gsm8k"])


def test_load_benchmark_reads_the_offline_cache_with_its_fields(benchmarks_dir):
    sizes = {"gsm8k": 1319, "math500": 500, "ifeval": 541, "humaneval": 164}
    for name, size in sizes.items():
        examples = benchmarks.load_benchmark(name, benchmarks_dir)
        assert len(examples) == size
        assert all(field in examples[0] for field in benchmarks.BENCHMARK_FIELDS[name][0])


def test_load_benchmark_names_the_bad_line(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text('{"question": "q", "answer": "a #### 1", "short_answer": "1"}\n{"question": "q"}\n')
    with pytest.raises(flags.InvalidRecord, match=r"gsm8k.jsonl, line 2: missing field\(s\) \['answer'"):
        benchmarks.load_benchmark("gsm8k", str(tmp_path))
    with pytest.raises(ValueError, match="unknown benchmark 'gsm9k'"):
        benchmarks.load_benchmark("gsm9k")


def test_preference_rows_with_a_prompt_message_list_are_checked(gsm8k_question):
    row = {"prompt": [{"role": "user", "content": gsm8k_question}],
           "chosen": [{"role": "assistant", "content": "18"}], "rejected": [{"role": "assistant", "content": "17"}]}
    kept, report = benchmarks.decontaminate([row], ["gsm8k"])
    assert kept == [] and report["dropped_per_benchmark"] == {"gsm8k": 1}


def test_a_benchmark_no_source_serves_says_what_would(tmp_path, monkeypatch):
    import datasets

    def offline(path, *args, **kwargs):  # what datasets raises offline
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (OfflineModeIsEnabled)")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match=r"evalplus/humanevalplus \(test\) could not be loaded .*no "
                                                r"humanevalplus.jsonl is in .* DIR/humanevalplus.jsonl"):
        benchmarks.load_benchmark("humanevalplus", str(tmp_path))
