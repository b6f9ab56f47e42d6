"""The benchmarks eval.py scores, as rows: offline from .cache/benchmarks (data/fetch_offline.py) or a --benchmark_dir,
else from the hub; and the n-gram decontamination of training prompts against those same rows, so that what the
training data is guarded against is exactly what is evaluated. eval.py loads the rows; sft.py, dpo.py and rlvr.py
decontaminate through data_mix.load_mixture (--decontaminate_against), synth.py each prompt it writes.
"""
import json
import os
import re

from flags import DataError, InvalidRecord


# ---------------------------------------------------------------------------------------------
# Benchmark rows

BENCHMARK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache", "benchmarks")
# benchmark -> (fields every example has, field holding the prompt a training row could leak). A local
# <benchmark>.jsonl holds the hub dataset's rows with these fields (BBH's also name their subtask).
BENCHMARK_FIELDS = {
    "gsm8k": (("question", "answer", "short_answer"), "question"),
    "math": (("problem", "solution", "level", "type"), "problem"),
    "math500": (("problem", "solution", "level", "type"), "problem"),
    "ifeval": (("key", "prompt", "instruction_id_list", "kwargs"), "prompt"),
    "humaneval": (("task_id", "prompt", "canonical_solution", "test", "entry_point"), "prompt"),
    "humanevalplus": (("task_id", "prompt", "canonical_solution", "test", "entry_point"), "prompt"),
    "mmlu": (("question", "subject", "choices", "answer"), "question"),
    "bbh": (("subtask", "input", "target"), "input"),
    "drop": (("query_id", "passage", "question", "answer", "validated_answers"), "question"),
    "drop_train": (("query_id", "passage", "question", "answer", "validated_answers"), "question"),
    "popqa": (("id", "question", "obj", "prop_id", "possible_answers"), "question"),
    "truthfulqa": (("question", "mc1_targets", "mc2_targets"), "question"),
}
# where the hub has each (the dataset, config and split OLMES loads, under its current full name)
HUB_DATASETS = {
    "gsm8k": "openai/gsm8k (main, test)", "math": "EleutherAI/hendrycks_math (7 subjects, test)",
    "math500": "HuggingFaceH4/MATH-500 (test)", "ifeval": "google/IFEval (train)",
    "humaneval": "openai/openai_humaneval (test)", "humanevalplus": "evalplus/humanevalplus (test)",
    "mmlu": "cais/mmlu (all, test)", "bbh": "lukaemon/bbh (27 subtask configs, test)",
    "drop": "EleutherAI/drop (validation)", "drop_train": "EleutherAI/drop (train)",
    "popqa": "akariasai/PopQA (test)", "truthfulqa": "truthfulqa/truthful_qa (multiple_choice, validation)",
}
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                 "number_theory", "prealgebra", "precalculus")
BBH_SUBTASKS = ("boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa", "dyck_languages",
                "formal_fallacies", "geometric_shapes", "hyperbaton", "logical_deduction_five_objects",
                "logical_deduction_seven_objects", "logical_deduction_three_objects", "movie_recommendation",
                "multistep_arithmetic_two", "navigate", "object_counting", "penguins_in_a_table",
                "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
                "sports_understanding", "temporal_sequences", "tracking_shuffled_objects_five_objects",
                "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects", "web_of_lies",
                "word_sorting")


class BenchmarkUnavailable(FileNotFoundError):
    """A benchmark found neither locally nor on the hub; the message says what would serve it."""


def _hub_rows(path: str, config: str | None, split: str) -> list[dict]:
    try:
        import datasets

        return list(datasets.load_dataset(path, config, split=split))
    except Exception as error:  # offline, moved, gated, or a layout `datasets` no longer reads: say which
        raise BenchmarkUnavailable(f"{type(error).__name__}: {error}".splitlines()[0]) from None


def load_benchmark_from_hub(name: str) -> list[dict]:
    """The test sets Tülu 3 evaluates on, from the Hugging Face hub, in the local cache's fields."""
    if name == "gsm8k":
        return [dict(r, short_answer=r["answer"].split("####")[-1].strip())
                for r in _hub_rows("openai/gsm8k", "main", "test")]
    if name == "math500":
        return [{"problem": r["problem"], "solution": r["solution"], "level": f"Level {r['level']}",
                 "type": r["subject"]} for r in _hub_rows("HuggingFaceH4/MATH-500", None, "test")]
    if name == "math":
        return [{k: r[k] for k in ("problem", "solution", "level", "type")}
                for subject in MATH_SUBJECTS for r in _hub_rows("EleutherAI/hendrycks_math", subject, "test")]
    if name == "ifeval":  # the hub copy pads every kwargs dict with all keys set to null: drop them
        return [dict(r, kwargs=[{k: v for k, v in kw.items() if v is not None} for kw in r["kwargs"]])
                for r in _hub_rows("google/IFEval", None, "train")]
    if name == "humaneval":
        return _hub_rows("openai/openai_humaneval", None, "test")
    if name == "humanevalplus":  # HumanEval with EvalPlus's extra tests in `test` (no PyPI package carries it)
        return _hub_rows("evalplus/humanevalplus", None, "test")
    if name == "mmlu":
        return _hub_rows("cais/mmlu", "all", "test")
    if name == "bbh":  # one config per subtask; the first that fails ends the attempt
        return [dict(r, subtask=subtask) for subtask in BBH_SUBTASKS
                for r in _hub_rows("lukaemon/bbh", subtask, "test")]
    if name in ("drop", "drop_train"):
        return _hub_rows("EleutherAI/drop", None, "validation" if name == "drop" else "train")
    if name == "popqa":
        return _hub_rows("akariasai/PopQA", None, "test")
    if name == "truthfulqa":
        return _hub_rows("truthfulqa/truthful_qa", "multiple_choice", "validation")
    raise ValueError(f"unknown benchmark {name!r} (known: {', '.join(BENCHMARK_FIELDS)})")


def load_benchmark(name: str, path: str | None = None) -> list[dict]:
    """A benchmark's test examples: from `path` if it is a .jsonl file; else the first <name>.jsonl in the
    directory `path`, then in .cache/benchmarks (made by data/fetch_offline.py); else from the hub.
    BenchmarkUnavailable says what would serve it when none of them has it."""
    if name not in BENCHMARK_FIELDS:
        raise DataError(f"unknown benchmark {name!r} (known: {', '.join(BENCHMARK_FIELDS)})")
    if path is not None and not os.path.isdir(path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"benchmark {name}: {path} not found")
        return _read_benchmark_file(name, path)
    directories = [d for d in (path, BENCHMARK_DIR) if d is not None]
    for directory in directories:  # a directory holding some of the files leaves the others to the cache
        if os.path.exists(os.path.join(directory, f"{name}.jsonl")):
            return _read_benchmark_file(name, os.path.join(directory, f"{name}.jsonl"))
    try:
        return load_benchmark_from_hub(name)
    except BenchmarkUnavailable as error:
        raise BenchmarkUnavailable(
            f"the hub's {HUB_DATASETS[name]} could not be loaded ({error}), and no {name}.jsonl is in "
            f"{' or '.join(directories)}; --benchmark_dir DIR serves it from DIR/{name}.jsonl, one JSON row per "
            f"example with the fields {', '.join(BENCHMARK_FIELDS[name][0])}") from None


def _read_benchmark_file(name: str, path: str) -> list[dict]:
    fields = BENCHMARK_FIELDS[name][0]
    examples = []
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as error:
                raise InvalidRecord(f"benchmark {name}, {path}, line {line_number}: not JSON ({error})") from None
            missing = [k for k in fields if k not in example]
            if missing:
                raise InvalidRecord(f"benchmark {name}, {path}, line {line_number}: missing field(s) {missing}")
            examples.append(example)
    return examples


# ---------------------------------------------------------------------------------------------
# Decontamination

WORD = re.compile(r"[a-z0-9]+")


def ngram_hashes(text: str, n: int) -> list[int]:
    """Hashes of the word n-grams of `text` (lowercased; words are runs of letters and digits)."""
    words = WORD.findall(text.lower())
    return list(map(hash, zip(*(words[i:] for i in range(n)))))  # tuple hashing runs in C: ~5x a join


def prompt_text(row: dict, where: str) -> str:
    """What a training row asks: its user turns (SFT/RLVR `messages`, preference `chosen` or `prompt`)."""
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    messages = row.get("messages") or row.get("prompt") or row.get("chosen")  # a prompt list holds the user turns
    if messages is None:
        raise InvalidRecord(f"{where}: no 'messages', 'chosen' or 'prompt' field to decontaminate (has {sorted(row)})")
    if not isinstance(messages, list):
        raise InvalidRecord(f"{where}: expected a list of messages, got {type(messages).__name__}")
    return "\n".join(m["content"] for m in messages if isinstance(m, dict) and m.get("role") == "user")


def decontaminate(dataset, benchmarks: list[str], ngram_size: int = 8, threshold: float = 0.5,
                  benchmark_dir: str | None = None):
    """Drop training rows whose prompts overlap a benchmark prompt.

    A row's overlap is the fraction of its prompt's word `ngram_size`-grams that occur in any prompt of
    the benchmarks; the row is dropped when the overlap is above `threshold` (with threshold 0, on any
    shared n-gram). Tülu 3 matched 8-grams with an overlap threshold; 0.5 means "most of this prompt is
    benchmark text", which catches copied and lightly edited test questions while keeping rows that
    merely quote a common phrase. Prompts shorter than `ngram_size` words have no n-gram and are kept.

    `dataset` is a datasets.Dataset or a list of rows (a `source` column, if present, groups the report).
    Returns the kept rows (same type) and a report: rows in/dropped, dropped per source and per
    benchmark (each dropped row is charged to the benchmark it shares most n-grams with).
    """
    if not 0 <= threshold < 1:
        raise ValueError(f"decontamination threshold must be in [0, 1), got {threshold}")
    owner = benchmark_ngrams(tuple(benchmarks), ngram_size, benchmark_dir)
    per_benchmark = dict.fromkeys(benchmarks, 0)
    per_source, keep, dropped_examples = {}, [], []
    rows = dataset if isinstance(dataset, list) else _iter_rows(dataset)
    for index, row in enumerate(rows):
        source = row.get("source", "dataset")
        counts = per_source.setdefault(source, {"rows": 0, "dropped": 0})
        counts["rows"] += 1
        culprit, overlap = benchmark_overlap(prompt_text(row, f"row {index} (source {source})"), owner, benchmarks,
                                             ngram_size, threshold)
        if culprit is None:
            keep.append(index)
            continue
        counts["dropped"] += 1
        per_benchmark[culprit] += 1
        if len(dropped_examples) < 20:  # a sample, so users can see what was matched
            dropped_examples.append({"row": index, "source": source, "benchmark": culprit,
                                     "overlap": round(overlap, 3)})
    kept = [dataset[i] for i in keep] if isinstance(dataset, list) else dataset.select(keep)
    report = {"benchmarks": benchmarks, "ngram_size": ngram_size, "threshold": threshold,
              "rows": len(dataset), "dropped": sum(per_benchmark.values()),
              "dropped_per_source": per_source, "dropped_per_benchmark": per_benchmark,
              "dropped_examples": dropped_examples}
    return kept, report


def benchmark_ngrams(benchmarks: tuple, ngram_size: int, benchmark_dir: str | None = None) -> dict:
    """{n-gram hash: index in `benchmarks` of the first benchmark whose prompts contain it}."""
    owner = {}
    for index, name in enumerate(benchmarks):
        for example in load_benchmark(name, benchmark_dir):
            for h in ngram_hashes(example[BENCHMARK_FIELDS[name][1]], ngram_size):
                owner.setdefault(h, index)
    return owner


def benchmark_overlap(text: str, owner: dict, benchmarks, ngram_size: int, threshold: float) -> tuple:
    """(the benchmark that `text` overlaps, the fraction of its n-grams found in any benchmark) when that fraction
    is above `threshold` (each overlapping text is charged to the benchmark it shares most n-grams with), else
    (None, the fraction)."""
    hashes = ngram_hashes(text, ngram_size)
    matched = [owner[h] for h in hashes if h in owner]
    overlap = len(matched) / len(hashes) if hashes else 0.0
    if not matched or len(matched) <= threshold * len(hashes):
        return None, overlap
    return benchmarks[max(set(matched), key=matched.count)], overlap


def _iter_rows(dataset, batch_size: int = 4096):
    """Rows of a datasets.Dataset, read a column batch at a time (row-by-row access is ~10x slower)."""
    columns = [c for c in ("messages", "chosen", "prompt", "source") if c in dataset.column_names]
    for batch in dataset.select_columns(columns).iter(batch_size=batch_size):
        for i in range(len(batch[columns[0]])):
            yield {c: batch[c][i] for c in columns}
