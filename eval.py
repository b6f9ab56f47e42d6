"""Evaluation, the last stage of the Tülu 3 recipe: the benchmarks the paper reports, on any model dir.

    python eval.py --model_name_or_path output/sft output/dpo --tasks gsm8k,math500,ifeval --output_dir output/eval
    torchrun --nproc_per_node 8 eval.py --model_name_or_path allenai/Llama-3.1-Tulu-3-8B \
        --tasks gsm8k,math,ifeval,humaneval,mmlu --output_dir output/eval-8b

The story: arguments; distributed init (each rank holds a whole model and takes every world_size-th
example, rank 0 gathers); the tasks (prompts, scoring); a batched sampling loop; HumanEval programs;
the run (results.json, a predictions JSONL per task and model, a table with one column per model).

Task settings (Tülu 3's, as far as one script can):
- gsm8k: 8-shot chain of thought with the 8 standard exemplars of Wei et al. (2022), written as
  chat turns ("Question: ..." / "<reasoning> So the answer is N."); the last number is compared.
  gsm8k_0shot: the bare question as the only user turn.
- math500 / math: 4-shot Minerva prompt (the 4 exemplars of Lewkowycz et al. 2022) as chat turns,
  scored "flex" by verifiers.verify (boxed / Minerva final answer / $..$ / whole output, symbolic).
- ifeval: the prompt as the user turn; prompt- and instruction-level accuracy, strict and loose.
- humaneval: open-instruct's chat prompt ("Complete the following python function." and the answer
  started as a ```python block holding the signature); pass@k from --humaneval_num_samples samples
  with the unbiased estimator; each program runs in verifiers.run_program's sandbox, which counts it
  passed only if its tests ran to the end; where the OS cannot isolate it, eval refuses to run it
  unless --allow_unsandboxed_code.
- mmlu: 0-shot; the answer is the letter (A-D) with the highest log-probability after "Answer:".
Generation is greedy unless --temperature > 0, with the model's own chat template; a batch's shared
few-shot prefix is encoded once and its KV cache copied to every row.

Simplified: no vLLM (a plain KV-cached loop), MMLU without chain of thought, no PopQA, TruthfulQA,
BBH, DROP, AlpacaEval or safety suites.
"""
import argparse
import collections
import datetime
import functools
import inspect
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers.cache_utils import Cache, DynamicLayer

import data_mix
import verifiers

ALL_TASKS = ("gsm8k", "gsm8k_0shot", "math500", "math", "ifeval", "humaneval", "mmlu")


# ---------------------------------------------------------------------------------------------
# Arguments

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", nargs="+", required=True, help="one or more models to compare")
    parser.add_argument("--tasks", default="gsm8k,math500,ifeval,humaneval,mmlu", help=f"comma list of {ALL_TASKS}")
    parser.add_argument("--limit", type=data_mix.POSITIVE_INT, default=None,
                        help="only the first N examples of each task")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--benchmark_dir", default=None,
                        help="dir of <benchmark>.jsonl (default: .cache/benchmarks or hub)")
    parser.add_argument("--chat_template_name", default=None, choices=["tulu"],
                        help="render with the Tülu template instead of the model's own")
    parser.add_argument("--per_device_eval_batch_size", type=data_mix.POSITIVE_INT, default=16)
    parser.add_argument("--max_new_tokens", type=data_mix.POSITIVE_INT, default=None,
                        help="override every task's default")
    parser.add_argument("--temperature", type=data_mix.NON_NEGATIVE, default=0.0, help="0 = greedy")
    parser.add_argument("--top_p", type=data_mix.bounded(float, 0.0, 1.0, low_open=True), default=1.0)
    parser.add_argument("--humaneval_num_samples", type=data_mix.POSITIVE_INT, default=1,
                        help="n samples per problem for pass@k")
    parser.add_argument("--pass_at_k", default="1", help="comma list of k (each <= --humaneval_num_samples)")
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
    args.tasks = args.tasks.split(",")
    try:
        args.pass_at_k = [data_mix.POSITIVE_INT(k) for k in args.pass_at_k.split(",")]
    except argparse.ArgumentTypeError as error:
        parser.error(f"argument --pass_at_k: {error}")
    unknown = [t for t in args.tasks if t not in ALL_TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; known: {', '.join(ALL_TASKS)}")
    for path in args.model_name_or_path:
        if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
            parser.error(f"--model_name_or_path {path}: not a model directory (it has no config.json)")
    if max(args.pass_at_k) > args.humaneval_num_samples:
        parser.error(f"--pass_at_k {max(args.pass_at_k)} needs --humaneval_num_samples >= {max(args.pass_at_k)}")
    if args.humaneval_num_samples > 1 and args.temperature == 0:
        parser.error("--humaneval_num_samples > 1 needs --temperature > 0 (greedy samples are all the same)")
    return args


# ---------------------------------------------------------------------------------------------
# Distributed init (as in sft.py)

def init_distributed():
    """One process group for torchrun and for plain `python`: NCCL on GPU, gloo on CPU."""
    if "RANK" not in os.environ:  # plain python: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 10000))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(minutes=30))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
    return dist.get_rank(), dist.get_world_size(), device


# ---------------------------------------------------------------------------------------------
# Tasks: prompts

GSM8K_EXEMPLARS = [  # Wei et al. (2022), the 8 chain-of-thought exemplars every GSM8K 8-shot eval uses
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must "
     "have been 21 - 15 = 6.", "6"),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5.", "5"),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating "
     "35, they had 74 - 35 = 39.", "39"),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops "
     "did Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny "
     "20 - 12 = 8.", "8"),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he "
     "have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. "
     "5 + 4 = 9.", "9"),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday "
     "to thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
     "computers were added. 9 + 20 is 29.", "29"),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many "
     "golf balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 "
     "more, he had 35 - 2 = 33 golf balls.", "33"),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 "
     "dollars left. 23 - 15 is 8.", "8"),
]
MINERVA_EXEMPLARS = [  # Lewkowycz et al. (2022), the 4-shot MATH prompt
    (r"Find the domain of the expression  $\frac{\sqrt{x-2}}{\sqrt{5-x}}$.",
     r"The expressions inside each square root must be non-negative. Therefore, $x-2 \ge 0$, so $x\ge2$, and "
     r"$5 - x \ge 0$, so $x \le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which gives "
     r"$x<5$. Therefore, the domain of the expression is $\boxed{[2,5)}$.", "[2,5)"),
    (r"If $\det \mathbf{A} = 2$ and $\det \mathbf{B} = 12,$ then find $\det (\mathbf{A} \mathbf{B}).$",
     r"We have that $\det (\mathbf{A} \mathbf{B}) = (\det \mathbf{A})(\det \mathbf{B}) = (2)(12) = "
     r"\boxed{24}.$", "24"),
    ("Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many "
     "times must Terrell lift them in order to lift the same total weight?",
     r"If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\cdot 12\cdot20=480$ pounds of "
     r"weight.  If he lifts two 15-pound weights instead for $n$ times, he will lift a total of "
     r"$2\cdot15\cdot n=30n$ pounds of weight.  Equating this to 480 pounds, we can solve for $n$: "
     r"\begin{align*} 30n&=480\\ \Rightarrow\qquad n&=480/30=\boxed{16} \end{align*}", "16"),
    (r"If the system of equations \begin{align*} 6x-4y&=a,\\ 6y-9x &=b. \end{align*}has a solution $(x, y)$ "
     r"where $x$ and $y$ are both nonzero, find $\frac{a}{b},$ assuming $b$ is nonzero.",
     r"If we multiply the first equation by $-\frac{3}{2}$, we obtain $$6y-9x=-\frac{3}{2}a.$$Since we also "
     r"know that $6y-9x=b$, we have $$-\frac{3}{2}a=b\Rightarrow\frac{a}{b}=\boxed{-\frac{2}{3}}.$$",
     r"-\frac{2}{3}"),
]
HUMANEVAL_INSTRUCTION = "Complete the following python function.\n\n\n"
HUMANEVAL_ANSWER_START = "Here is the completed function:\n\n\n```python\n"
# task -> (benchmark file, default max_new_tokens, stop strings)
TASK_SETTINGS = {"gsm8k": ("gsm8k", 512, ["Question:"]), "gsm8k_0shot": ("gsm8k", 512, []),
                 "math500": ("math500", 1024, ["Problem:"]), "math": ("math", 1024, ["Problem:"]),
                 "ifeval": ("ifeval", 1024, []), "humaneval": ("humaneval", 512, ["```"]),
                 "mmlu": ("mmlu", 0, [])}


def few_shot_turns(exemplars, ask, answer) -> list[dict]:
    turns = []
    for question, reasoning, result in exemplars:
        turns += [{"role": "user", "content": ask(question)}, {"role": "assistant", "content": answer(reasoning, result)}]
    return turns


def build_prompt(task: str, example: dict) -> tuple[list[dict], str]:
    """The chat turns for one example, and text that starts the assistant's answer (often empty)."""
    if task == "gsm8k":
        ask = lambda q: f"Question: {q}"  # noqa: E731
        return few_shot_turns(GSM8K_EXEMPLARS, ask, lambda r, a: f"{r} So the answer is {a}.") + [
            {"role": "user", "content": ask(example["question"])}], ""
    if task == "gsm8k_0shot":
        return [{"role": "user", "content": example["question"]}], ""
    if task in ("math500", "math"):
        ask = lambda p: f"Problem:\n{p}"  # noqa: E731
        answer = lambda r, a: f"Solution:\n{r}\nFinal Answer: The final answer is ${a}$. I hope it is correct."  # noqa: E731
        return few_shot_turns(MINERVA_EXEMPLARS, ask, answer) + [
            {"role": "user", "content": ask(example["problem"])}], ""
    if task == "ifeval":
        return [{"role": "user", "content": example["prompt"]}], ""
    if task == "humaneval":
        return ([{"role": "user", "content": HUMANEVAL_INSTRUCTION + example["prompt"]}],
                HUMANEVAL_ANSWER_START + example["prompt"])
    choices = "\n".join(f"{letter}. {choice}" for letter, choice in zip("ABCD", example["choices"]))
    subject = example["subject"].replace("_", " ")
    return [{"role": "user", "content": f"The following is a multiple choice question about {subject}. Answer with "
                                        f"the letter of the correct choice.\n\n{example['question']}\n{choices}"}], "Answer:"


# ---------------------------------------------------------------------------------------------
# Tasks: scoring

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k),
    computed as a product so large n does not overflow."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def score_example(task: str, example: dict, response: str) -> dict:
    """What the prediction log keeps for one generated response: the extracted answer and correctness."""
    if task in ("gsm8k", "gsm8k_0shot"):
        return {"extracted": verifiers.extract_answer(response, "gsm8k"), "gold": example["short_answer"],
                "correct": verifiers.verify(response, example["short_answer"], "gsm8k") == 1.0}
    if task in ("math500", "math"):
        gold = verifiers.last_boxed(example["solution"])
        return {"extracted": verifiers.extract_answer(response, "math"), "gold": gold,
                "correct": verifiers.verify(response, gold, "math") == 1.0}
    ids, kwargs = example["instruction_id_list"], example["kwargs"]
    strict = verifiers.ifeval_check(response, ids, kwargs, loose=False)
    loose = verifiers.ifeval_check(response, ids, kwargs, loose=True)
    return {"strict": strict, "loose": loose, "correct": all(loose)}


def aggregate(task: str, records: list[dict], ks: list[int]) -> dict:
    """Per-task metrics from the per-example records (rank 0, after the gather)."""
    if task == "ifeval":
        mean = lambda values: sum(values) / max(len(values), 1)  # noqa: E731
        return {"prompt_level_strict": mean([all(r["strict"]) for r in records]),
                "inst_level_strict": mean([x for r in records for x in r["strict"]]),
                "prompt_level_loose": mean([all(r["loose"]) for r in records]),
                "inst_level_loose": mean([x for r in records for x in r["loose"]])}
    if task == "humaneval":
        return {f"pass@{k}": sum(pass_at_k(len(r["passed"]), sum(r["passed"]), k) for r in records) / len(records)
                for k in ks}
    name = {"gsm8k": "exact_match", "gsm8k_0shot": "exact_match", "mmlu": "accuracy"}.get(task, "flex_accuracy")
    return {name: sum(r["correct"] for r in records) / len(records)}


# ---------------------------------------------------------------------------------------------
# Generation: a plain batched sampling loop with a KV cache

def sample_next(logits, temperature: float, top_p: float, generator):
    """Greedy at temperature 0; else sample from softmax(logits / T) restricted to the top-p nucleus."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)  # [B, V]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # tokens after the nucleus is full
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts: list[list[int]], pad_token_id: int, device):
    """Prompts right-aligned, so every row's next token lands in the same (last) column."""
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, length - len(prompt):] = 1
    return input_ids.to(device), attention_mask.to(device)


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
    # the KV cache argument was renamed past_key_values -> cache in transformers 5.2x; accept both
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    prompts = [prompt + partial for prompt, partial in zip(prompts, partials)]
    shared = shared_prefix_length(prompts)
    shared = shared if shared >= MIN_SHARED_PREFIX else 0
    # rows are right-aligned, so the cache grows from the longest prompt for as many steps as the row with the
    # shortest partial response can still take
    capacity = max(len(p) for p in prompts) + max_new_tokens - min(len(partial) for partial in partials)
    cache = Cache(layer_class_to_replicate=functools.partial(GrowingLayer, capacity=capacity))
    if shared:  # few-shot exemplars: encode them once, then copy their cache to every row
        model(input_ids=torch.tensor([prompts[0][:shared]], device=device), use_cache=True, logits_to_keep=1,
              **{cache_name: cache})
        cache.batch_repeat_interleave(len(prompts))
    # rows: [shared prefix | padding | own tokens]; masked padding may sit in the middle
    input_ids, own_mask = left_pad([p[shared:] for p in prompts], tokenizer.pad_token_id, device)
    attention_mask = torch.cat([own_mask.new_ones(len(prompts), shared), own_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]  # padding does not shift positions
    eos_ids = torch.tensor(sorted(eos_token_ids(model, tokenizer)), device=device)
    # A finished row leaves the batch (and its cache) at once: small models often ramble to max_new_tokens
    # in a few rows, and without this every finished row would be recomputed until the last one stops.
    rows = list(range(len(prompts)))  # rows still in the batch (a requeued row's partial is never complete)
    outputs, ended = [list(partial) for partial in partials], [False] * len(prompts)
    while len(rows) > leave_at:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=True, logits_to_keep=1, **{cache_name: cache})  # logits of the last position only
        token = sample_next(out.logits[:, -1].float(), args.temperature, args.top_p, generator)  # [B]
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
        input_ids, attention_mask = left_pad(prompts[start:start + args.per_device_eval_batch_size],
                                             tokenizer.pad_token_id, device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       logits_to_keep=1).logits
        choices += logits[:, -1].float().log_softmax(-1)[:, letter_ids.to(device)].argmax(-1).tolist()  # [B]
    return choices


# ---------------------------------------------------------------------------------------------
# HumanEval programs (each runs in verifiers.run_program's sandbox)

def humaneval_program(example: dict, response: str) -> str:
    """The prompt (signature + docstring), the model's body, the tests and the call that runs them."""
    return f"{example['prompt']}{response}\n\n{example['test']}\n\ncheck({example['entry_point']})\n"


# ---------------------------------------------------------------------------------------------
# The run

def load_model(path: str, args, device):
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
    _, default_tokens, stop_strings = TASK_SETTINGS[task]
    max_new_tokens, records = args.max_new_tokens or default_tokens, []
    if task == "mmlu":
        for i, text, choice in zip(mine, texts, choose_letters(model, tokenizer, prompts, args)):
            records.append({"index": i, "prompt": text, "response": "ABCD"[choice], "extracted": "ABCD"[choice],
                            "gold": "ABCD"[examples[i]["answer"]], "correct": choice == examples[i]["answer"]})
    elif task == "humaneval":
        n = args.humaneval_num_samples
        samples = generate(model, tokenizer, [p for p in prompts for _ in range(n)], max_new_tokens, stop_strings,
                           args, generator)
        programs = [humaneval_program(examples[i], s) for j, i in enumerate(mine) for s in samples[j * n:(j + 1) * n]]
        with ThreadPoolExecutor(max(1, (os.cpu_count() or 1) // world_size)) as pool:  # each waits on a process
            runs = list(pool.map(lambda p: verifiers.run_program(p, args.code_timeout_s, args.code_memory_mb,
                                                                 allow_unisolated=args.allow_unsandboxed_code), programs))
        for j, (i, text) in enumerate(zip(mine, texts)):
            mine_runs = runs[j * n:(j + 1) * n]
            records.append({"index": i, "prompt": text, "response": samples[j * n:(j + 1) * n],
                            "passed": [r["passed"] for r in mine_runs], "status": [r["status"] for r in mine_runs],
                            "correct": mine_runs[0]["passed"], "sandbox": mine_runs[0]["layers"],
                            "sandbox_output": mine_runs[0]["output"][:2000]})
    else:
        responses = generate(model, tokenizer, prompts, max_new_tokens, stop_strings, args, generator)
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
        examples = data_mix.load_benchmark(TASK_SETTINGS[task][0], args.benchmark_dir)
        benchmarks[task] = examples[: args.limit] if args.limit else examples
    results = {}
    for name, path in zip(names, args.model_name_or_path):
        model, tokenizer = load_model(path, args, device)
        generator = torch.Generator(device).manual_seed(args.seed + rank)  # distinct samples on each rank
        results[name] = {}
        for task in args.tasks:
            start = time.time()
            records = evaluate_task(task, model, tokenizer, benchmarks[task], args, rank, world_size, generator)
            seconds = time.time() - start
            if rank != 0:
                continue
            _, default_tokens, stop_strings = TASK_SETTINGS[task]
            results[name][task] = {
                "metrics": aggregate(task, records, args.pass_at_k), "n": len(records), "model": path,
                "seconds": round(seconds, 2), "examples_per_second": round(len(records) / seconds, 3),
                "settings": {"max_new_tokens": args.max_new_tokens or default_tokens, "stop": stop_strings,
                             "temperature": args.temperature, "top_p": args.top_p, "world_size": world_size,
                             **({"samples": args.humaneval_num_samples, "sandbox": records[0]["sandbox"]}
                                if task == "humaneval" else {})}}
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
    missing = verifiers.missing_isolation() if "humaneval" in args.tasks else []
    if missing and not args.allow_unsandboxed_code:  # before any model loads: say it now, not hours in
        raise SystemExit(f"humaneval runs model-written code, but the sandbox cannot isolate it here (missing: "
                         f"{', '.join(missing)}; namespaces need root or user namespaces). Pass "
                         f"--allow_unsandboxed_code to run it anyway, at your own risk.")
    rank, world_size, device = init_distributed()
    try:
        if rank == 0:
            os.makedirs(args.output_dir, exist_ok=True)
        return evaluate(args, rank, world_size, device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
