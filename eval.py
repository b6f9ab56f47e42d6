"""Evaluation, the last stage of the Tülu 3 recipe: OLMES's tulu_3_dev suite, prompt for prompt, on any model dir.

    python eval.py --model_name_or_path output/sft output/dpo --tasks gsm8k,ifeval --limit 20 --output_dir output/eval
    torchrun --nproc_per_node 8 eval.py --model_name_or_path allenai/Llama-3.1-Tulu-3-8B \
        --tasks tulu3 --output_dir output/eval-8b

The story: arguments; the tasks (one declarative entry each in data/olmes/tasks.json: the OLMES config it
reproduces, the file and line each setting was read from, the settings; exemplars as data files in
data/olmes/); the prompt (OLMES's fewshot_context, rendered by the model's chat template and followed by the
assistant prefix, as OLMES's convert_chat_instance does); scoring (the rules are eval_metrics.py's); generation
(decoding.complete, the loop rlvr's rollouts use, with its EOS and stop-string rules; a batch's shared few-shot
prefix is prefilled once and its KV cache copied to every row) and scoring by log-likelihood; HumanEval(+)
programs (run in sandbox.py's run_program, which passes a program only if its tests ran to the end; where the
OS cannot isolate it, eval refuses unless --allow_unsandboxed_code); the run.

`--tasks tulu3` is OLMES's tulu_3_dev suite but AlpacaEval (gsm8k, math, ifeval, humaneval, humanevalplus,
mmlu_mc, bbh, drop, popqa, truthfulqa) plus mmlu_cot, the Tülu 3 card's MMLU row. Every task's data is found
before any model loads: a --benchmark_dir file, .cache/benchmarks (data/fetch_offline.py), else the hub; a
task none of them serves stops the run with one line saying what would, or with --skip_unavailable is left
out. Distributed: each rank holds a whole model and takes every world_size-th example; rank 0 gathers them.

Results survive interruptions (eval_results.py): each (model, task) is written to OUTPUT_DIR/results.json
(atomically) and predictions/<model>/<task>.jsonl (each prompt as sent, the raw output, the extracted answer) as
soon as it is done. Running the same command again skips what results.json holds; another model adds its
column. Every setting that changes a task's numbers is stored with it, and a run whose settings differ from those
the output dir holds for a task stops before any model loads (--overwrite discards the old results of that task
instead), so a table never mixes numbers computed differently.

Simplified: no vLLM (a plain KV-cached loop); no AlpacaEval or safety suites (they need an LLM judge); MATH's
symbolic equivalence is math-verify's, not sympy's LaTeX parser (eval_metrics.py says why).
"""
import argparse
import collections
import functools
import json
import os
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
from transformers import DynamicCache

import benchmarks
import data_mix
import flags
import decoding
import eval_metrics as metrics
import eval_results
import infra
import sandbox
import verifiers

# ---------------------------------------------------------------------------------------------
# Arguments

def parse_args(argv=None):
    parser = flags.StageParser(__doc__)
    parser.add_argument("--model_name_or_path", nargs="+", required=True, help="one or more models to compare")
    parser.add_argument("--tasks", default="gsm8k,math500,ifeval,humaneval,mmlu",
                        help=f"comma list of {ALL_TASKS}, or a suite: {SUITES}")
    parser.add_argument("--limit", type=flags.POSITIVE_INT, default=None,
                        help="only the first N examples of each task")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--benchmark_dir", default=None,
                        help="a dir of <benchmark>.jsonl files; a benchmark not there comes from .cache/benchmarks "
                             "or the hub")
    parser.add_argument("--skip_unavailable", action="store_true",
                        help="leave out the tasks whose data cannot be had (default: stop before any model loads)")
    parser.add_argument("--overwrite", action="store_true",
                        help="evaluate again what results.json holds, and discard its results of a task computed "
                             "with other settings")
    parser.add_argument("--chat_template_name", default=None, choices=["tulu"],
                        help="render with the Tülu template instead of the model's own")
    parser.add_argument("--per_device_eval_batch_size", type=flags.POSITIVE_INT, default=16)
    # the generation flags override every task's own (OLMES) setting; unset, each task keeps its own
    parser.add_argument("--max_new_tokens", type=flags.POSITIVE_INT, default=None)
    parser.add_argument("--temperature", type=flags.NON_NEGATIVE, default=None, help="0 = greedy")
    parser.add_argument("--top_p", type=flags.bounded(float, 0.0, 1.0, low_open=True), default=None)
    parser.add_argument("--humaneval_num_samples", type=flags.POSITIVE_INT, default=None,
                        help="n samples per problem (OLMES: 20)")
    parser.add_argument("--pass_at_k", default=None,
                        help="comma list of k, each <= the samples (OLMES: 10, with 1 beside it); the largest is "
                             "the headline")
    parser.add_argument("--code_timeout_s", type=flags.POSITIVE, default=None,
                        help="wall-clock limit per HumanEval program (OLMES: 3 s, HumanEval+ 20 s)")
    parser.add_argument("--code_memory_mb", type=flags.POSITIVE_INT, default=1024,
                        help="address-space limit per HumanEval program")
    parser.add_argument("--allow_unsandboxed_code", action="store_true",
                        help="run HumanEval's model-written code even where the sandbox's OS isolation is missing")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                        help="auto = bf16 on GPU, fp32 on CPU")
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args(argv)
    args.tasks = list(dict.fromkeys(t for name in args.tasks.split(",") for t in SUITES.get(name, [name])))
    try:
        args.pass_at_k = [flags.POSITIVE_INT(k) for k in args.pass_at_k.split(",")] if args.pass_at_k else None
    except argparse.ArgumentTypeError as error:
        parser.error(f"argument --pass_at_k: {error}")
    unknown = [t for t in args.tasks if t not in ALL_TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; known: {', '.join(ALL_TASKS)} and the suites {', '.join(SUITES)}")
    for task in args.tasks:
        try:
            task_settings(task, args)
        except ValueError as error:
            parser.error(str(error))
    return args


# ---------------------------------------------------------------------------------------------
# Tasks: entries and exemplars
#
# Each task is one entry in data/olmes/tasks.json: its test set, the OLMES config it reproduces, where each
# setting was read (file and line at allenai/olmes@e2d8670d5b25, the commit that set tulu_3_dev's tasks), and
# the settings, prompt layout included. OLMES's exemplars are data files in data/olmes/exemplars (each citing
# its lines in OLMES) and data/olmes/mmlu_dev.jsonl; DROP's are drawn from its train split as OLMES draws them.

PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "olmes")
with open(os.path.join(PROMPTS_DIR, "tasks.json")) as _f:
    TASKS = {name: entry for name, entry in json.load(_f).items() if not name.startswith("_")}
SUITES = {"tulu3": ["gsm8k", "math", "ifeval", "humaneval", "humanevalplus", "mmlu_mc", "mmlu_cot", "bbh", "drop",
                    "popqa", "truthfulqa"]}
CODE_TASKS = ("humaneval", "humanevalplus")  # model-written programs, run in the sandbox
ALL_TASKS = tuple(TASKS)
LETTERS = "ABCDE"  # OLMES labels MMLU's choices with these


@functools.cache
def exemplar_file(name: str) -> dict:
    with open(os.path.join(PROMPTS_DIR, "exemplars", f"{name}.json")) as f:
        return json.load(f)


@functools.cache
def mmlu_dev() -> dict[str, list[dict]]:
    """The 5 dev questions of each subject, in file order (OLMES takes dev[:5] without sampling)."""
    shots = collections.defaultdict(list)
    with open(os.path.join(PROMPTS_DIR, "mmlu_dev.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            shots[row["subject"]].append(row)
    return shots


def exemplars(task: str, example: dict, train: list[dict] | None = None) -> list[dict]:
    """The exemplars OLMES shows before `example`, in its order. `train`: DROP's train split (its pool)."""
    source, shots = TASKS[task].get("exemplars"), TASKS[task]["shots"]
    if shots == 0:
        return []
    if source == "mmlu_dev":
        dev = mmlu_dev().get(example["subject"], [])
        if len(dev) < shots:
            raise ValueError(f"mmlu: data/olmes/mmlu_dev.jsonl has {len(dev)} dev questions for subject "
                             f"{example['subject']!r}, {shots} needed")
        return dev[:shots]
    if source == "bbh":
        return [dict(shot, subtask=example["subtask"])
                for shot in exemplar_file("bbh")["subtasks"][example["subtask"]]["exemplars"][:shots]]
    if source == "drop_train":  # OLMES seeds a fresh random.Random(1234) per question: the same draw for all
        return random.Random(1234).sample(train, shots)
    return exemplar_file(source)["exemplars"][:shots]


# ---------------------------------------------------------------------------------------------
# Tasks: prompts (OLMES's fewshot_context, oe_eval/tasks/base_task.py lines 366-483, and its chat conversion)

def doc_fields(task: str, example: dict) -> dict:
    """The example's fields and those the task's templates derive from them (OLMES's _process_doc)."""
    fields = dict(example)
    if task in ("mmlu_mc", "mmlu_cot", "mmlu"):
        letters = LETTERS[:len(example["choices"])]
        fields.update(subject_name=example["subject"].replace("_", " "), letter=letters[example["answer"]],
                      choices_text="\n".join(f" {k}. {choice}" for k, choice in zip(letters, example["choices"])),
                      choices_plain="\n".join(f"{k}. {choice}" for k, choice in zip(letters, example["choices"])))
    elif task == "bbh":
        fields.update(description=exemplar_file("bbh")["subtasks"][example["subtask"]]["description"],
                      solution=re.sub("^Let's think step by step.", "", example["target"]))
    elif task == "drop":
        fields["first_answer"] = ", ".join(metrics.drop_answers(example)[0])
    elif task == "truthfulqa":
        fields["first_choice"] = metrics.truthfulqa_targets(example)["choices"][0]
    return fields


def build_prompt(task: str, example: dict, shots: list[dict]) -> tuple[list[dict] | None, str]:
    """The chat turns and the assistant prefix; for a task that is not chat, (None, the whole prompt)."""
    entry = TASKS[task]
    text = lambda doc: entry["text"].format(**doc_fields(task, doc))  # noqa: E731
    target = lambda doc: entry["target"].format(**doc_fields(task, doc))  # noqa: E731
    description, prefix = entry["description"].format(**doc_fields(task, example)), entry["assistant_prefix"]
    solved = "".join(text(shot) + target(shot) + "\n\n" for shot in shots)  # exemplars in one turn / plain text
    if not entry["chat"]:
        return None, description + solved + text(example) + prefix
    if not shots:  # (the prefix stays in a 0-shot user turn: HumanEval's repeats it)
        return [{"role": "user", "content": description + text(example)}], prefix
    # with exemplars, an answer cue the user text ends with moves to the start of the answer
    ask = lambda message: re.sub(r"\s*" + re.escape(prefix) + r"\s*$", "", message) if prefix else message  # noqa: E731
    if not entry["multiturn"]:
        return [{"role": "user", "content": ask(description + solved + text(example))}], prefix
    turns = []
    for i, shot in enumerate(shots):
        answer = " ".join(part for part in (prefix.strip(), target(shot).strip()) if part)  # concat_with_space
        turns += [{"role": "user", "content": ask((description if i == 0 else "") + text(shot))},
                  {"role": "assistant", "content": answer}]
    return turns + [{"role": "user", "content": ask(text(example))}], prefix


def prompt_text(task: str, example: dict, shots: list[dict], tokenizer) -> str:
    """The prompt exactly as sent: the turns rendered by the chat template with its generation prompt, then the
    assistant prefix (OLMES's convert_chat_instance); plain text as is."""
    messages, text = build_prompt(task, example, shots)
    return text if messages is None else data_mix.render(tokenizer, messages, add_generation_prompt=True) + text


def continuations(task: str, example: dict) -> list[str]:
    """What a log-likelihood task scores after the prompt: ' <choice>' for each choice, its space stripped in a
    chat prompt without an assistant prefix (OLMES's convert_chat_instance), so MMLU scores 'A', not ' A'."""
    entry = TASKS[task]
    choices = (LETTERS[:len(example["choices"])] if task != "truthfulqa"
               else metrics.truthfulqa_targets(example)["choices"])
    texts = [entry["continuations"].format(choice=choice) for choice in choices]
    return [t.lstrip() for t in texts] if entry["chat"] and not entry["assistant_prefix"] else texts


# ---------------------------------------------------------------------------------------------
# Tasks: scoring (the rules are eval_metrics.py's)

def score_example(task: str, example: dict, response: str) -> dict:
    """What the prediction log keeps for one generated response: the extracted answer, the gold and the scores
    (the task's metrics for this example)."""
    if task in ("gsm8k", "gsm8k_0shot"):
        short_answer = example.get("short_answer") or example["answer"].split("####")[-1].strip()  # as OLMES
        return {"extracted": metrics.gsm8k_answer(response), "gold": metrics.gsm8k_answer(short_answer),
                "scores": {"exact_match": metrics.gsm8k_correct(response, short_answer)}}
    if task in ("math500", "math"):
        gold = metrics.math_gold(example["solution"])
        return {"extracted": metrics.minerva_answer(response), "flex_extracted": metrics.math_flex_answers(response),
                "gold": gold, "scores": metrics.math_scores(response, gold), "subject": example["type"]}
    if task == "mmlu_cot":
        extracted, gold = metrics.mmlu_cot_answer(response), LETTERS[example["answer"]]
        return {"extracted": extracted, "gold": gold, "scores": {"accuracy": extracted == gold},
                "subject": example["subject"]}
    if task == "bbh":
        extracted, gold = metrics.bbh_answer(example["subtask"], response), metrics.bbh_gold(example["target"])
        return {"extracted": extracted, "gold": gold, "subject": example["subtask"],
                "scores": {"exact_match": metrics.bbh_correct(example["subtask"], extracted, gold)}}
    if task == "drop":  # the whole output is the answer
        gold = metrics.drop_answers(example)
        return {"extracted": response, "gold": gold, "scores": metrics.drop_scores(response, gold)}
    if task == "popqa":
        gold = json.loads(example["possible_answers"])
        return {"extracted": response, "gold": gold, "scores": {"exact_match": metrics.popqa_correct(response, gold)}}
    if task == "ifeval":  # the verdicts under both names of the metrics: loose is the headline, strict the RL reward
        ids, kwargs = example["instruction_id_list"], example["kwargs"]
        strict = verifiers.ifeval_check(response, ids, kwargs, loose=False)
        loose = verifiers.ifeval_check(response, ids, kwargs, loose=True)
        return {"strict": strict, "loose": loose, "prompt_level_strict": all(strict), "prompt_level_loose": all(loose)}
    raise ValueError(f"score_example: no scorer for task {task!r}")


def score_choices(task: str, example: dict, logprobs: list[float]) -> dict:
    """A log-likelihood task's record: the likeliest choice and the scores."""
    chosen = max(range(len(logprobs)), key=lambda i: logprobs[i])  # the first of equal ones
    if task == "truthfulqa":
        targets = metrics.truthfulqa_targets(example)
        return {"extracted": targets["choices"][chosen], "gold": targets["choices"][0],
                "scores": metrics.truthfulqa_scores(logprobs, targets["labels"], targets["mc1"], targets["mc2"])}
    return {"extracted": LETTERS[chosen], "gold": LETTERS[example["answer"]], "subject": example["subject"],
            "scores": {"accuracy": chosen == example["answer"]}}


def aggregate(task: str, records: list[dict], settings: dict) -> dict:
    """Per-task metrics from the per-example records (rank 0, after the gather), the headline first. Tasks with
    a `macro` field report the mean over subjects (OLMES's suite average), then the mean over examples."""
    mean = lambda values: sum(values) / max(len(values), 1)  # noqa: E731
    if task == "ifeval":
        return {"prompt_level_loose": mean([all(r["loose"]) for r in records]),
                "inst_level_loose": mean([x for r in records for x in r["loose"]]),
                "prompt_level_strict": mean([all(r["strict"]) for r in records]),
                "inst_level_strict": mean([x for r in records for x in r["strict"]])}
    if task in CODE_TASKS:
        return {f"pass@{k}": mean([metrics.pass_at_k(len(r["passed"]), sum(r["passed"]), k) for r in records])
                for k in sorted(settings["pass_at_k"], reverse=True)}
    names = sorted(records[0]["scores"], key=lambda name: name != settings["metric"])
    micro = {name: mean([float(r["scores"][name]) for r in records]) for name in names}
    if "macro" not in TASKS[task]:
        return micro
    subjects = collections.defaultdict(list)
    for record in records:
        subjects[record["subject"]].append(record)
    macro = {name: mean([mean([float(r["scores"][name]) for r in rows]) for rows in subjects.values()])
             for name in names}
    return {**macro, **{f"{name}_micro": value for name, value in micro.items()}}


def subject_scores(records: list[dict], metric: str) -> dict[str, float]:
    subjects = collections.defaultdict(list)
    for record in records:
        subjects[record["subject"]].append(float(record["scores"][metric]))
    return {subject: sum(values) / len(values) for subject, values in sorted(subjects.items())}


def task_settings(task: str, args) -> dict:
    """The task's settings (OLMES's), with those a flag sets overridden, as results.json records them."""
    settings = {key: value for key, value in TASKS[task].items() if key not in ("macro", "subjects", "source")}
    flags = {"max_new_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p"}
    if task in CODE_TASKS:
        flags.update(samples="humaneval_num_samples", pass_at_k="pass_at_k", timeout_s="code_timeout_s")
        settings["memory_mb"] = args.code_memory_mb
    settings.update({key: getattr(args, flag) for key, flag in flags.items()
                     if key in settings and getattr(args, flag) is not None})
    if task in CODE_TASKS:  # the headline is the largest k asked for (OLMES: pass@10)
        settings["metric"] = f"pass@{max(settings['pass_at_k'])}"
        if max(settings["pass_at_k"]) > settings["samples"]:
            raise ValueError(f"{task}: --pass_at_k {max(settings['pass_at_k'])} needs --humaneval_num_samples >= "
                             f"{max(settings['pass_at_k'])} (it has {settings['samples']})")
        if settings["samples"] > 1 and settings["temperature"] == 0:
            raise ValueError(f"{task}: {settings['samples']} samples need --temperature > 0 (greedy samples are all "
                             "the same)")
    if "macro" in TASKS[task]:
        settings["average"] = f"macro over {TASKS[task]['macro']} (the headline), micro as *_micro"
    if "subjects" in TASKS[task]:
        settings["average"] = f"micro (OLMES's suite average), per {TASKS[task]['subjects']} under subjects"
    return settings


# ---------------------------------------------------------------------------------------------
# Generation: decoding.py's loop, with each batch's shared few-shot prefix prefilled once

def complete_prompts(model, tokenizer, prompts: list[list[int]], settings: dict, args, generator) -> list[str]:
    """Each prompt's response under the task's generation settings: eval's one call into the decoding loop."""
    completions = decoding.complete(model, tokenizer, prompts, max_new_tokens=settings["max_new_tokens"],
                                    temperature=settings["temperature"], top_p=settings["top_p"], generator=generator,
                                    stop_strings=settings["stop"], batch_size=args.per_device_eval_batch_size,
                                    shared_prefix=True)
    return [completion.text for completion in completions]


# ---------------------------------------------------------------------------------------------
# Scoring by log-likelihood (MMLU, TruthfulQA): how likely the model finds each choice after the prompt

def split_tokens(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The context's tokens and the continuation's, as lm-eval (which OLMES uses) splits them: trailing
    whitespace of the context moves to the continuation, the context is encoded alone, and the continuation's
    tokens are those that encoding the whole text adds after it."""
    stripped = context.rstrip()
    continuation, context = context[len(stripped):] + continuation, stripped
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def continuation_logprobs(model, tokenizer, context: str, continuations: list[str]) -> list[float]:
    """The summed log-probability of each continuation's tokens after the context. The context is encoded once;
    its KV cache is copied to one row per continuation, so the choices of a question cost one prompt, not N."""
    device = next(model.parameters()).device
    pieces = [split_tokens(tokenizer, context, continuation) for continuation in continuations]
    context_ids = pieces[0][0]  # the same for every continuation: the context is encoded alone
    choice_ids = [ids for _, ids in pieces]
    if any(not ids for ids in choice_ids):
        raise ValueError(f"a continuation adds no token to the context: {continuations}")
    width = max(len(ids) for ids in choice_ids)
    tokens = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in choice_ids],
                          device=device)  # [N, L], right-padded: padding follows every real token, so causal
    real = torch.tensor([[1.0] * len(ids) + [0.0] * (width - len(ids)) for ids in choice_ids], device=device)
    cache, keyword = DynamicCache(config=model.config), decoding.cache_keyword(model)
    first = model(input_ids=torch.tensor([context_ids], device=device), use_cache=True, logits_to_keep=1,
                  **{keyword: cache}).logits[:, -1].float().log_softmax(-1)  # [1, V]: each first token's odds
    logprobs = first.expand(len(choice_ids), -1).gather(1, tokens[:, :1])  # [N, 1]
    if width > 1:  # the later tokens, each predicted from the ones before it
        cache.batch_repeat_interleave(len(choice_ids))
        later = model(input_ids=tokens[:, :-1], use_cache=True, **{keyword: cache}).logits.float().log_softmax(-1)
        logprobs = torch.cat([logprobs, later.gather(2, tokens[:, 1:, None])[..., 0]], dim=1)  # [N, L]
    return (logprobs * real).sum(1).tolist()


# ---------------------------------------------------------------------------------------------
# HumanEval programs (each runs in sandbox.run_program)

def humaneval_program(example: dict, response: str) -> str:
    """OLMES's program: the prompt (signature + docstring), the model's completion, the tests and the call that
    runs them (the assistant prefix opened the code fence, so the completion is code; the fence's end stops it)."""
    return f"{example['prompt']}{response}\n{example['test']}\ncheck({example['entry_point']})"


# ---------------------------------------------------------------------------------------------
# The run

def load_model_and_tokenizer(path: str, args, device):
    """A whole model on every rank (evaluation has no gradients, so data parallelism suffices)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=model_dtype(args, device)).to(device).eval()
    return model, data_mix.load_tokenizer(path, args.chat_template_name)


def model_dtype(args, device) -> torch.dtype:
    return torch.bfloat16 if args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda") else torch.float32


def load_task_data(args) -> tuple[dict, list[str]]:
    """Every task's examples (and DROP's train split, its exemplar pool), before any model loads; and a line
    for each task whose data neither a local file nor the hub could give."""
    data, missing = {}, []
    for task in args.tasks:
        try:
            examples = benchmarks.load_benchmark(TASKS[task]["benchmark"], args.benchmark_dir)
            train = benchmarks.load_benchmark("drop_train", args.benchmark_dir) if task == "drop" else None
        except benchmarks.BenchmarkUnavailable as error:
            exemplars_too = " (its exemplars: 3 rows of the train split)" if "drop_train" in str(error) else ""
            missing.append(f"{task}{exemplars_too}: {error}")
            continue
        except (flags.InvalidRecord, flags.DataError, FileNotFoundError) as error:  # a --benchmark_dir file
            raise SystemExit(f"{task}: {error}") from None
        data[task] = (examples[: args.limit] if args.limit else examples, train)
    return data, missing


def evaluate_task(task: str, model, tokenizer, examples: list[dict], train, settings: dict, args, rank: int,
                  world_size: int, generator) -> list[dict]:
    """This rank's share of one task (every world_size-th example), scored, then gathered on rank 0."""
    mine = list(range(rank, len(examples), world_size))
    texts = [prompt_text(task, examples[i], exemplars(task, examples[i], train), tokenizer) for i in mine]
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]  # as OLMES encodes them
    records = []
    if "continuations" in settings:
        for i, text in zip(mine, texts):
            choices = continuations(task, examples[i])
            logprobs = continuation_logprobs(model, tokenizer, text, choices)
            records.append({"index": i, "prompt": text, "continuations": choices, "logprobs": logprobs,
                            **score_choices(task, examples[i], logprobs)})
    elif task in CODE_TASKS:
        n = settings["samples"]
        samples = complete_prompts(model, tokenizer, [p for p in prompts for _ in range(n)], settings, args, generator)
        programs = [humaneval_program(examples[i], s) for j, i in enumerate(mine) for s in samples[j * n:(j + 1) * n]]
        with ThreadPoolExecutor(max(1, (os.cpu_count() or 1) // world_size)) as pool:  # each waits on a process
            runs = list(pool.map(lambda p: sandbox.run_program(p, settings["timeout_s"], settings["memory_mb"],
                                                               allow_unisolated=args.allow_unsandboxed_code),
                                 programs))
        for j, (i, text) in enumerate(zip(mine, texts)):
            mine_runs = runs[j * n:(j + 1) * n]
            records.append({"index": i, "prompt": text, "response": samples[j * n:(j + 1) * n],
                            "passed": [r["passed"] for r in mine_runs], "status": [r["status"] for r in mine_runs],
                            "sandbox": mine_runs[0]["layers"], "sandbox_output": mine_runs[0]["output"][:2000]})
    else:
        responses = complete_prompts(model, tokenizer, prompts, settings, args, generator)
        for i, text, response in zip(mine, texts, responses):
            records.append({"index": i, "prompt": text, "response": response,
                            **score_example(task, examples[i], response)})
    gathered = [None] * world_size
    dist.all_gather_object(gathered, records)
    return sorted((r for part in gathered for r in part), key=lambda r: r["index"])


def evaluate(args, rank: int, world_size: int, device) -> dict:
    data, missing = load_task_data(args)
    if missing and not args.skip_unavailable:
        raise SystemExit("\n".join(missing + ["(--skip_unavailable runs the other tasks)"]))
    for line in missing:
        print(f"skipped {line}", flush=True)
    tasks = [task for task in args.tasks if task in data]
    settings = {}  # each task's settings, with what else changes its numbers: compared with results.json's
    for task in tasks:
        settings[task] = {**task_settings(task, args), "n": len(data[task][0]), "limit": args.limit,
                          "chat_template_name": args.chat_template_name, "dtype": str(model_dtype(args, device))}
        if settings[task].get("temperature", 0) > 0:  # sampled: the draws depend on the seed and the ranks
            settings[task].update(seed=args.seed, world_size=world_size)
    plan = [eval_results.plan_run(args.output_dir, args.model_name_or_path, settings, args.overwrite)
            if rank == 0 else None]
    dist.broadcast_object_list(plan, src=0)  # every rank follows rank 0's plan
    names, todo, error = plan[0]
    if error:
        raise SystemExit(error)
    for name, path in zip(names, args.model_name_or_path):
        model_tasks = [task for task in tasks if (name, task) in todo]
        if not model_tasks:
            continue
        model, tokenizer = load_model_and_tokenizer(path, args, device)
        generator = torch.Generator(device).manual_seed(args.seed + rank)  # distinct samples on each rank
        for task in model_tasks:
            start = time.time()
            examples, train = data[task]
            records = evaluate_task(task, model, tokenizer, examples, train, settings[task], args, rank, world_size,
                                    generator)
            seconds = time.time() - start
            if rank != 0:
                continue
            entry = {"metrics": aggregate(task, records, settings[task]), "n": len(records), "model": path,
                     "seconds": round(seconds, 2), "examples_per_second": round(len(records) / seconds, 3),
                     "settings": settings[task], "world_size": world_size,
                     "per_device_eval_batch_size": args.per_device_eval_batch_size}
            if task in CODE_TASKS:
                entry["sandbox"] = records[0]["sandbox"]
            if "macro" in TASKS[task] or "subjects" in TASKS[task]:
                entry["subjects"] = subject_scores(records, settings[task]["metric"])
            eval_results.save_result(args.output_dir, name, task, entry, records)
            print(f"{name} {task}: {entry['metrics']} ({len(records)} in {seconds:.0f}s)", flush=True)
        del model
    results = eval_results.read_results(args.output_dir) if rank == 0 else {}
    if rank == 0:
        eval_results.print_table(results, names)
    return results


def main(argv=None):
    args = parse_args(argv)
    for path in args.model_name_or_path:  # before the process group, the sandbox check and any data
        infra.check_model_path(path)
    missing = sandbox.missing_isolation() if set(CODE_TASKS) & set(args.tasks) else []
    if missing and not args.allow_unsandboxed_code:  # before any model loads: say it now, not hours in
        raise SystemExit(f"humaneval runs model-written code, but the sandbox cannot isolate it here (missing: "
                         f"{', '.join(missing)}; namespaces need root or user namespaces). Pass "
                         f"--allow_unsandboxed_code to run it anyway, at your own risk.")
    with infra.process_group() as (rank, world_size, device):
        if rank == 0:
            try:
                os.makedirs(args.output_dir, exist_ok=True)
            except OSError as error:  # a file of that name, no permission, a read-only disk
                raise SystemExit(f"--output_dir {args.output_dir}: cannot write there ({error.strerror}: "
                                 f"{error.filename}); choose another") from None
        return evaluate(args, rank, world_size, device)


if __name__ == "__main__":
    infra.run(main)
