"""Synthetic data, the data side of the Tülu 3 recipe: persona-driven prompts, verified responses and on-policy
preference pairs, written in the formats the stages read.

    python synth.py prompts --skill ifeval --num_prompts 1000 \
        --generator http://127.0.0.1:8000/v1#Qwen/Qwen2.5-72B-Instruct --output out/if_prompts.jsonl
    python synth.py responses --prompts out/if_prompts.jsonl --generator MODEL --samples 4 --output out/if_sft.jsonl
    python synth.py preferences --prompts out/if_prompts.jsonl --policy output/sft --pool MODEL [MODEL ...] \
        --judge MODEL --output out/preferences.jsonl
    torchrun --nproc_per_node 8 synth.py responses ...     # each rank generates its share of the prompts
    python dpo.py --dataset_mixer_list out/preferences.jsonl 1.0 ...

The story: arguments; IFEval constraints; the three subcommands; the judge and the binarization; the run. Every
subcommand writes rows the stages read with --dataset_mixer_list. Each MODEL is a local directory or hub id decoded
by decoding.complete, the project's one sampler, or an OpenAI-compatible endpoint written `URL#MODEL_NAME`, reached
with the `openai` client, which times out and retries 429s and 5xx with backoff: chat_models.py holds both, and
`generate`, which answers a list of (model, conversation) requests over them at once.

- prompts: a persona (one per prompt, drawn from --personas) conditions the generator. ifeval: the generator writes
  a request and we append 1-3 constraints drawn from IFEval's 25 types (data/ifeval_constraints.json: the valid
  arguments, our sentence for each type, the pairs never drawn together), so the prompt states exactly the
  constraints of its ground truth ({"instruction_id_list", "kwargs"}: an RLVR row verifiers.py checks). math: the
  generator writes a problem, then solves it --num_samples times; the problem is kept, as an RLVR row with the
  majority answer as its ground truth, only if at least --min_agreement of the samples give that answer
  (self-consistency). code: a request for one Python function (an SFT row once `responses` answers it). Every
  prompt is checked against the benchmarks (benchmarks.py's n-gram decontamination) before it is written.
- responses: --samples responses per prompt; a prompt with a ground truth keeps the first response its verifier
  passes (rejection sampling; the pass rate is in the summary), any other prompt the first response that ended.
- preferences: a completion from --policy and one from each of --models_per_prompt models drawn from --pool; the
  judge rates each completion in a request of its own, answering a JSON object whose keys are exactly
  helpfulness, instruction_following, honesty, truthfulness and whose values are integers 1-5 or "N/A"; the mean
  of the present ratings decides: chosen is the highest rated, rejected is drawn from those rated strictly lower.
  `--judge verifier` rates by the row's verifier instead (exact and free, for rows with a ground truth).
  Unparseable judge replies, prompts with fewer than two rated completions and prompts whose completions all rate
  the same are dropped and counted, never given a default rating.

Lossless and resumable: the prompts are cut into chunks of --batch_size; chunk k always holds the same prompts and
draws from a seed made of (--seed, k), so its rows do not depend on when, or on which rank, it runs. Under
torchrun the ranks take chunks in turn and rank 0 appends their rows (infra.ResumableJsonl): each finished id is
flushed as soon as its chunk is done, a rerun of the same command skips finished ids (a kill loses at most the
chunks in flight) and another command on the same --output is refused. Beside OUTPUT.jsonl, OUTPUT.summary.json
counts what was attempted, kept and dropped (per reason), tokens generated, judge requests and seconds.

Simplified relative to Tülu 3: one bundled persona pool (Persona Hub's from the hub) and prompts of our own; the
judge rates the four aspects in one request per completion; the IF data's "rejected" responses to prompts with a
constraint relaxed are not made; among equally top-rated completions the chosen one is drawn at random (the
original took the first, and drew the rejected from any other completion, ties included).
"""
import collections
import hashlib
import json
import os
import random
import re
import time
from types import SimpleNamespace

import torch.distributed as dist
from tqdm import tqdm

import benchmarks
import chat_models
import data_mix
import flags
import infra
import rlvr
import verifiers
from flags import POSITIVE_INT, bounded

ROOT = os.path.dirname(os.path.abspath(__file__))
CONSTRAINTS_FILE = os.path.join(ROOT, "data", "ifeval_constraints.json")
PERSONA_HUB = "proj-persona/PersonaHub"
JUDGE_ASPECTS = ("helpfulness", "instruction_following", "honesty", "truthfulness")
JUDGE_TEMPERATURE, JUDGE_MAX_NEW_TOKENS = 0.1, 256  # Tülu 3's judge (GPT-4o) sampled at 0.1
DECONTAMINATION_NGRAM, DECONTAMINATION_THRESHOLD = 8, 0.5  # data_mix's defaults, as the stages use them
RESUMABLE_FLAGS = {"max_concurrency", "request_timeout", "max_retries"}  # a rerun may change these: rows stay the same

# ---------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv=None):
    parser = flags.StageParser(__doc__)
    commands = parser.add_subparsers(dest="command", required=True)  # each subcommand's parser a StageParser too
    prompts = commands.add_parser("prompts", help="persona-driven prompts for one skill")
    prompts.add_argument("--skill", choices=["ifeval", "math", "code"], required=True)
    prompts.add_argument("--personas", default=os.path.join(ROOT, "data", "personas.jsonl"),
                         help=f'a JSONL file of {{"persona": text}} rows, or {PERSONA_HUB} (from the hub)')
    prompts.add_argument("--num_prompts", type=POSITIVE_INT, required=True, help="prompts attempted")
    prompts.add_argument("--generator", required=True, metavar="MODEL")
    prompts.add_argument("--num_samples", type=POSITIVE_INT, default=4, help="math: solutions sampled per problem")
    prompts.add_argument("--min_agreement", type=bounded(float, 0.0, 1.0, low_open=True), default=0.75,
                         help="math: keep a problem when at least this share of its samples give one answer")
    prompts.add_argument("--decontaminate_against", default="gsm8k,math,ifeval,humaneval,mmlu",
                         metavar="gsm8k,math,...", help="benchmarks whose prompts generated prompts must not copy")
    prompts.add_argument("--benchmark_dir", default=None, help="where the benchmarks' <name>.jsonl files are")
    responses = commands.add_parser("responses", help="SFT rows: responses, verified where a ground truth exists")
    responses.add_argument("--prompts", required=True, help="rows with messages (and optionally ground_truth, dataset)")
    responses.add_argument("--generator", required=True, metavar="MODEL")
    responses.add_argument("--samples", type=POSITIVE_INT, default=1, help="responses sampled per prompt")
    preferences = commands.add_parser("preferences", help="on-policy preference pairs rated by a judge")
    preferences.add_argument("--prompts", required=True, help="rows with messages (optionally ground_truth, dataset)")
    preferences.add_argument("--policy", required=True, metavar="MODEL", help="the model being trained (on-policy)")
    preferences.add_argument("--pool", nargs="+", required=True, metavar="MODEL", help="the off-policy models")
    preferences.add_argument("--models_per_prompt", type=POSITIVE_INT, default=4,
                             help="pool models drawn per prompt (Tülu 3: 4)")
    preferences.add_argument("--judge", required=True, metavar="MODEL",
                             help="a MODEL, or `verifier` for rows with a ground truth")
    for command, (max_new_tokens, temperature, top_p) in zip(
            (prompts, responses, preferences), ((1024, 0.7, 0.95), (2048, 0.7, 0.95), (2048, 1.0, 1.0))):
        # Tülu 3: persona prompts at T 0.7, top-p 0.95; on-policy completions at T 1, top-p 1
        command.add_argument("--output", required=True, help="a .jsonl file; rerunning the command continues it")
        command.add_argument("--max_new_tokens", type=POSITIVE_INT, default=max_new_tokens)
        command.add_argument("--temperature", type=flags.NON_NEGATIVE, default=temperature)
        command.add_argument("--top_p", type=bounded(float, 0.0, 1.0, low_open=True), default=top_p)
        command.add_argument("--seed", type=int, default=123)
        command.add_argument("--batch_size", type=POSITIVE_INT, default=16,
                             help="prompts per chunk (the unit of work, of resuming and of a local model's batch)")
        command.add_argument("--max_concurrency", type=POSITIVE_INT, default=16, help="endpoint requests at once")
        command.add_argument("--request_timeout", type=flags.POSITIVE, default=600.0, help="seconds per request")
        command.add_argument("--max_retries", type=int, default=5, help="retries per request on 429, 5xx, timeouts")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Small helpers: a seed every process agrees on, a user turn

def stable_seed(*parts) -> int:
    """A 31-bit seed from any values, the same in every process (Python's hash() of a str is salted)."""
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:4], "big") >> 1


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


# ---------------------------------------------------------------------------------------------
# IFEval constraints: drawn with valid arguments and no conflicting pair, stated in the prompt by our own sentence

def load_constraint_table(path: str = CONSTRAINTS_FILE) -> dict:
    with open(path) as f:
        table = json.load(f)
    conflicts = collections.defaultdict(set)  # the file lists each pair once: make it symmetric
    for first, others in table["conflicts"].items():
        for second in others:
            conflicts[first].add(second)
            conflicts[second].add(first)
    table["conflicts"] = conflicts
    return table


def draw_constraints(rng: random.Random, table: dict) -> list[tuple[str, dict]]:
    """1-3 distinct instruction ids, no two in conflict, each with arguments drawn from its valid values.
    combination:repeat_prompt's prompt_to_repeat is left None: it is the request, written later."""
    wanted = rng.randint(1, 3)
    ids = sorted(table["instructions"])
    rng.shuffle(ids)
    chosen = []
    for instruction_id in ids:
        if len(chosen) < wanted and not table["conflicts"][instruction_id] & set(chosen):
            chosen.append(instruction_id)
    return [(instruction_id, draw_arguments(rng, table["instructions"][instruction_id]["args"]))
            for instruction_id in chosen]


def draw_arguments(rng: random.Random, specs: dict) -> dict:
    arguments = {}
    for name, spec in specs.items():  # (in the file's order: `up_to` names an argument drawn before it)
        if spec == "request":
            arguments[name] = None
        elif "choice" in spec:
            arguments[name] = rng.choice(spec["choice"])
        elif "range" in spec:
            arguments[name] = rng.randint(*spec["range"])
        elif "sample" in spec:
            arguments[name] = rng.sample(spec["sample"], rng.randint(*spec["count"]))
        else:
            arguments[name] = rng.randint(1, arguments[spec["up_to"]])
    return arguments


def render_constraint(instruction_id: str, arguments: dict, table: dict) -> str:
    """The sentence that states one constraint, its argument values filled in."""
    values = {name: ", ".join(f'"{word}"' for word in value) if isinstance(value, list)
              else table["language_names"][value] if name == "language" else value
              for name, value in arguments.items()}
    return table["instructions"][instruction_id]["text"].format(**values)


def constrained_prompt(request: str, constraints: list[tuple[str, dict]], table: dict) -> tuple[str, str]:
    """(the prompt: the request, then one sentence per constraint; its ground truth as JSON)."""
    kwargs = [{name: request if value is None else value for name, value in arguments.items()}
              for _, arguments in constraints]
    sentences = [render_constraint(instruction_id, arguments, table) for (instruction_id, _), arguments
                 in zip(constraints, kwargs)]
    ground_truth = json.dumps({"instruction_id_list": [instruction_id for instruction_id, _ in constraints],
                               "kwargs": kwargs})
    verifiers.check_ground_truth(ground_truth, "ifeval")  # our table's values must be ones the checkers accept
    return request + "\n\n" + "\n".join(sentences), ground_truth


# ---------------------------------------------------------------------------------------------
# prompts: persona -> request (ifeval: + constraints; math: + self-consistent answer) -> decontamination

PROMPT_WRITERS = {
    "ifeval": "Here is a person:\n{persona}\n\nWrite one request that this person could send to an AI assistant, "
              "asking it to write something: an email, a short story, a plan, an explanation, a speech, a review. "
              "Do not mention any rule of format, length or style. Reply with the request only.",
    "math": "Here is a person:\n{persona}\n\nWrite one math problem that this person could meet or enjoy, which "
            "takes several steps of reasoning and whose answer is a single number or a short expression. Reply "
            "with the problem only, without its solution.",
    "code": "Here is a person:\n{persona}\n\nWrite one Python programming task that this person could ask an AI "
            "assistant: a single function to write, what it takes, what it returns and an example. Reply with "
            "the task only.",
}
SOLVE = "{problem}\n\nSolve this step by step, and put the final answer within \\boxed{{}}."


def load_personas(name: str) -> list[str]:
    if os.path.exists(name):
        places = data_mix.read_json_records(name)
    elif name == PERSONA_HUB:
        import datasets

        places = [(f"row {i}", row) for i, row in enumerate(datasets.load_dataset(name, "persona", split="train"))]
    else:
        raise SystemExit(f"--personas {name}: no such file (and not {PERSONA_HUB})")
    personas = []
    for place, record in places:
        if not isinstance(record, dict) or not isinstance(record.get("persona"), str) or not record["persona"].strip():
            raise SystemExit(f'--personas {name}, {place}: expected {{"persona": "<non-empty text>"}}, '
                             f"got {str(record)[:100]}")
        personas.append(record["persona"].strip())
    return personas


def written_text(reply: chat_models.Reply) -> tuple[str | None, str | None]:
    """(the generated text, stripped, or None; why not)."""
    if reply.text is None:
        return None, "generation_failed"
    if not reply.finished:
        return None, "truncated"
    return (reply.text.strip(), None) if reply.text.strip() else (None, "empty")


def make_prompts(chunk: list[dict], seed: int, ctx) -> list[tuple]:
    """(outcome, counts, row) per item: each item's persona, request, and for math its solutions' agreement."""
    args = ctx.args
    work = []
    for item in chunk:
        rng = random.Random(stable_seed(args.seed, item["id"]))
        work.append({"item": item, "rng": rng, "persona": ctx.personas[rng.randrange(len(ctx.personas))],
                     "counts": {"tokens": 0}, "outcome": None})
    writers = [(ctx.generator, user(PROMPT_WRITERS[args.skill].format(persona=w["persona"]))) for w in work]
    for w, reply in zip(work, chat_models.generate(writers, ctx.sampling, seed)):
        w["counts"]["tokens"] += reply.tokens
        w["prompt"], w["outcome"] = written_text(reply)
    if args.skill == "ifeval":
        for w in (w for w in work if w["outcome"] is None):
            w["prompt"], w["ground_truth"] = constrained_prompt(w["prompt"], draw_constraints(w["rng"], ctx.table),
                                                                ctx.table)
    if args.skill == "math":  # self-consistency: the problem's answer is trusted only if the samples agree on it
        alive = [w for w in work if w["outcome"] is None]
        solvers = [(ctx.generator, user(SOLVE.format(problem=w["prompt"]))) for w in alive
                   for _ in range(args.num_samples)]
        replies = chat_models.generate(solvers, ctx.sampling, stable_seed(seed, "solve"))
        for j, w in enumerate(alive):
            samples = replies[j * args.num_samples:(j + 1) * args.num_samples]
            w["counts"]["tokens"] += sum(reply.tokens for reply in samples)
            answers = [verifiers.extract_answer(reply.text, "math") for reply in samples if reply.text is not None]
            votes = collections.Counter(answer for answer in answers if answer)
            answer, count = votes.most_common(1)[0] if votes else (None, 0)
            if count < args.min_agreement * args.num_samples:
                w["outcome"] = "no_agreement"
            w["ground_truth"], w["prompt"] = answer, SOLVE.format(problem=w["prompt"])
    results = []
    for w in work:
        if w["outcome"] is None:  # decontamination: a prompt that copies benchmark text is not written
            culprit, _ = benchmarks.benchmark_overlap(w["prompt"], ctx.benchmark_ngrams, ctx.benchmarks,
                                                      DECONTAMINATION_NGRAM, DECONTAMINATION_THRESHOLD)
            if culprit:
                w["outcome"], w["counts"][f"contaminated/{culprit}"] = "contaminated", 1
        if w["outcome"] is not None:
            results.append((w["outcome"], w["counts"], None))
            continue
        row = {"id": w["item"]["id"], "messages": user(w["prompt"])}
        if args.skill != "code":
            row |= {"ground_truth": w["ground_truth"], "dataset": "ifeval" if args.skill == "ifeval" else "MATH"}
        results.append(("kept", w["counts"], row | {"persona": w["persona"]}))
    return results


# ---------------------------------------------------------------------------------------------
# responses: rejection sampling where a verifier can check the answer

def load_prompt_rows(name: str, flag: str = "--prompts", needs_ground_truth: bool = False) -> list[dict]:
    """A prompts file's (or hub dataset's) rows as {"id", "messages" (the prompt turns), ["ground_truth",
    "dataset"]}, validated as RLVR rows where they have a ground truth; a bad row stops with its place."""
    if name.lower().endswith((".jsonl", ".json")):
        places = data_mix.read_json_records(name)
    else:
        places = [(f"row {i}", row) for i, row in enumerate(data_mix.load_rows(name))]
    rows, ids = [], set()
    for index, (place, record) in enumerate(places):
        where = f"{flag} {name}, {place}"
        try:
            if isinstance(record, flags.InvalidRecord):
                raise record
            if not isinstance(record, dict):
                raise flags.InvalidRecord(f"{where}: expected a JSON object, got {type(record).__name__}")
            if record.get("ground_truth") is not None:
                row = rlvr.validate_rlvr_record(record, where)
            elif needs_ground_truth:
                raise flags.InvalidRecord(f"{where}: no ground_truth, which --judge verifier needs")
            else:
                row = {"messages": rlvr.rlvr_prompt_messages(record, where)}
        except flags.InvalidRecord as error:
            raise SystemExit(str(error)) from None
        row["id"] = str(record["id"]) if record.get("id") is not None else f"row-{index}"
        if row["id"] in ids:
            raise SystemExit(f"{where}: the id {row['id']!r} is used twice (ids name the rows a rerun skips)")
        ids.add(row["id"])
        rows.append(row)
    return rows


def make_responses(chunk: list[dict], seed: int, ctx) -> list[tuple]:
    """(outcome, counts, row) per prompt: --samples responses; the first that passes the verifier, where the
    prompt has a ground truth, else the first that ended."""
    samples = ctx.args.samples
    requests = [(ctx.generator, item["messages"]) for item in chunk for _ in range(samples)]
    replies = chat_models.generate(requests, ctx.sampling, seed)
    results = []
    for j, item in enumerate(chunk):
        mine = replies[j * samples:(j + 1) * samples]
        counts = {"tokens": sum(reply.tokens for reply in mine), "samples": samples,
                  "generation_failed": sum(reply.text is None for reply in mine)}
        answered = [reply for reply in mine if reply.text is not None and reply.text.strip()]
        if "ground_truth" in item:
            passed = [reply for reply in answered if verifiers.verify(reply.text, item["ground_truth"],
                                                                      item["dataset"]) == 1.0]
            counts |= {"verified": len(answered), "passed": len(passed)}
            kept, reason = (passed[0], None) if passed else (None, "no_response_passed")
        else:
            ended = [reply for reply in answered if reply.finished]
            kept, reason = (ended[0], None) if ended else (None, "truncated" if answered else "generation_failed")
        if kept is None:
            results.append((reason, counts, None))
            continue
        row = {"id": item["id"], "messages": item["messages"] + [{"role": "assistant", "content": kept.text}]}
        row |= {key: item[key] for key in ("ground_truth", "dataset") if key in item}
        results.append(("kept", counts, row | {"model": ctx.generator.name}))
    return results


# ---------------------------------------------------------------------------------------------
# preferences: on-policy and pool completions, one judge request per completion, binarized

JUDGE_PROMPT = """You rate an AI assistant's response to a conversation. Rate four aspects, each with an integer \
from 1 (poor) to 5 (excellent), or "N/A" where the aspect does not apply:
- helpfulness: does the response do what the user needs, fully and usefully?
- instruction_following: does it follow every instruction in the user's request, including rules of format?
- honesty: does it state its uncertainty and limits, rather than sound more confident than it should?
- truthfulness: is what it states correct, with nothing made up?

Answer with a JSON object and nothing else, whose keys are exactly "helpfulness", "instruction_following", \
"honesty" and "truthfulness", for example {{"helpfulness": 4, "instruction_following": 5, "honesty": 3, \
"truthfulness": "N/A"}}.

[Conversation]
{conversation}

[Response]
{response}"""


def parse_judge_reply(text: str) -> dict | None:
    """The four ratings of a judge reply, or None unless it is a JSON object (a ```json fence around it allowed)
    with exactly the four keys, each an integer 1-5 or "N/A"."""
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    try:
        ratings = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(ratings, dict) or set(ratings) != set(JUDGE_ASPECTS):
        return None
    valid = all(value == "N/A" or type(value) is int and 1 <= value <= 5 for value in ratings.values())
    return ratings if valid else None


def mean_rating(ratings: dict) -> float | None:
    """The mean of the present ratings ("N/A" is missing, never a number); None if all are missing."""
    present = [value for value in ratings.values() if value != "N/A"]
    return sum(present) / len(present) if present else None


def binarize(rated: list[tuple[dict, float]], rng: random.Random) -> tuple:
    """((chosen, rating), (rejected, rating)) from (completion, rating) pairs, or (None, why not): chosen is a
    highest-rated completion (drawn among equals), rejected is drawn from those rated strictly lower."""
    if len(rated) < 2:
        return None, "fewer_than_two_rated"
    top = max(rating for _, rating in rated)
    chosen = rng.choice([pair for pair in rated if pair[1] == top])
    lower = [pair for pair in rated if pair[1] < top and pair[0]["text"] != chosen[0]["text"]]
    if not lower:
        return None, "tie"
    return (chosen, rng.choice(lower)), None


def make_preferences(chunk: list[dict], seed: int, ctx) -> list[tuple]:
    """(outcome, counts, row) per prompt: its completions, their ratings, the pair."""
    args = ctx.args
    rngs = [random.Random(stable_seed(args.seed, item["id"])) for item in chunk]
    lineups = [[ctx.policy] + rng.sample(ctx.pool, min(args.models_per_prompt, len(ctx.pool))) for rng in rngs]
    completion_requests = [(model, item["messages"]) for item, models in zip(chunk, lineups) for model in models]
    replies = iter(chat_models.generate(completion_requests, ctx.sampling, seed))
    work = []
    for item, models in zip(chunk, lineups):
        counts = {"tokens": 0, "completions": len(models), "generation_failed": 0, "judge_requests": 0}
        completions = []
        for model, reply in zip(models, replies):
            counts["tokens"] += reply.tokens
            if reply.text is None or not reply.text.strip():
                counts["generation_failed"] += 1
            else:
                completions.append({"model": model.name, "text": reply.text})
        work.append((item, counts, completions))
    if ctx.judge is None:  # --judge verifier: the verifier's score is the rating
        ratings = [[verifiers.verify(c["text"], item["ground_truth"], item["dataset"]) for c in completions]
                   for item, _, completions in work]
    else:
        requests = [(ctx.judge, user(JUDGE_PROMPT.format(conversation=conversation_text(item["messages"]),
                                                         response=c["text"])))
                    for item, _, completions in work for c in completions]
        judging = chat_models.Sampling(JUDGE_MAX_NEW_TOKENS, JUDGE_TEMPERATURE, 1.0)
        judged = iter(chat_models.generate(requests, judging, stable_seed(seed, "judge")))
        ratings = []
        for _, counts, completions in work:
            counts["judge_requests"] = len(completions)
            ratings.append([judge_rating(next(judged), counts) for _ in completions])
    results = []
    for (item, counts, completions), scores, rng in zip(work, ratings, rngs):
        rated = [(c, score) for c, score in zip(completions, scores) if score is not None]
        pair, reason = binarize(rated, rng)
        if pair is None:
            results.append((reason, counts, None))
            continue
        (chosen, chosen_rating), (rejected, rejected_rating) = pair
        row = {"id": item["id"], "prompt": item["messages"][-1]["content"],
               "chosen": item["messages"] + [{"role": "assistant", "content": chosen["text"]}],
               "rejected": item["messages"] + [{"role": "assistant", "content": rejected["text"]}],
               "chosen_rating": chosen_rating, "rejected_rating": rejected_rating,
               "chosen_model": chosen["model"], "rejected_model": rejected["model"]}
        results.append(("kept", counts, row))
    return results


def judge_rating(reply: chat_models.Reply, counts: dict) -> float | None:
    """A completion's mean rating, or None, counting why: the request failed, the reply did not parse, all N/A."""
    ratings = parse_judge_reply(reply.text) if reply.text is not None else None
    rating = mean_rating(ratings) if ratings is not None else None
    counts["tokens"] += reply.tokens
    if rating is None:
        reason = "judge_failed" if reply.text is None else "judge_unparseable" if ratings is None else "judge_all_na"
        counts[reason] = counts.get(reason, 0) + 1
    return rating


def conversation_text(messages: list[dict]) -> str:
    return "\n\n".join(f"{message['role'].upper()}: {message['content']}" for message in messages)


# ---------------------------------------------------------------------------------------------
# The run: chunks over ranks, rank 0 appends every finished id, the summary

def plan(args) -> tuple[list[dict], dict]:
    """The items to make, each with its stable id, and the MODEL flags to open ({flag: [spec, ...]})."""
    if args.command == "prompts":
        return [{"id": f"{args.skill}-{i:07d}"} for i in range(args.num_prompts)], {"generator": [args.generator]}
    if args.command == "responses":
        return load_prompt_rows(args.prompts), {"generator": [args.generator]}
    if args.judge == "verifier":
        return load_prompt_rows(args.prompts, needs_ground_truth=True), {"policy": [args.policy], "pool": args.pool}
    return load_prompt_rows(args.prompts), {"policy": [args.policy], "pool": args.pool, "judge": [args.judge]}


def build_context(args, model_flags: dict, device) -> SimpleNamespace:
    if args.command == "prompts" and args.skill == "math" and args.temperature == 0:
        raise SystemExit("--temperature 0 makes every math sample the same: self-consistency needs sampling")
    ctx = SimpleNamespace(args=args, sampling=chat_models.Sampling(args.max_new_tokens, args.temperature, args.top_p))
    if args.command == "prompts":
        ctx.personas, ctx.table = load_personas(args.personas), load_constraint_table()
        ctx.benchmarks = tuple(name.strip() for name in args.decontaminate_against.split(",") if name.strip())
        try:
            ctx.benchmark_ngrams = benchmarks.benchmark_ngrams(ctx.benchmarks, DECONTAMINATION_NGRAM,
                                                               args.benchmark_dir)
        except (FileNotFoundError, ValueError) as error:  # (no --benchmark_dir, a benchmark unavailable, a bad row)
            raise SystemExit(f"--decontaminate_against {args.decontaminate_against}: {error}") from None
    models = chat_models.open_models(model_flags, device, batch_size=args.batch_size,
                                     max_concurrency=args.max_concurrency, request_timeout=args.request_timeout,
                                     max_retries=args.max_retries)
    ctx.generator = models.get(getattr(args, "generator", None))
    if args.command == "preferences":
        ctx.policy, ctx.pool = models[args.policy], [models[spec] for spec in args.pool]
        ctx.judge = models.get(args.judge)  # None: --judge verifier
    return ctx


def summarize(args, output, items: list[dict], run_seconds: float, run_items: int, run_tokens: int) -> dict:
    """Counts over every finished id (this run's and earlier runs'), and this run's throughput."""
    records = [output.done[item["id"]] for item in items if item["id"] in output.done]
    counts = collections.Counter()
    for record in records:
        counts.update(record["counts"])
    path = args.output.removesuffix(".jsonl") + ".summary.json"
    earlier = 0.0
    if os.path.exists(path):
        with open(path) as f:
            earlier = json.load(f)["seconds"]
    summary = {"command": args.command, "attempted": len(records),
               "kept": sum(record["outcome"] == "kept" for record in records),
               "dropped": dict(sorted(collections.Counter(r["outcome"] for r in records if r["outcome"] != "kept")
                                      .items())),
               "tokens_generated": counts.pop("tokens", 0), "judge_requests": counts.pop("judge_requests", 0),
               "counts": dict(sorted(counts.items())), "seconds": round(earlier + run_seconds, 1),
               "this_run": {"prompts": run_items, "seconds": round(run_seconds, 1),
                            "prompts_per_second": round(run_items / max(run_seconds, 1e-9), 3),
                            "tokens_per_second": round(run_tokens / max(run_seconds, 1e-9), 1)}}
    if counts.get("verified"):
        summary["pass_rate"] = round(counts["passed"] / counts["verified"], 4)
    infra.write_durably(path, json.dumps(summary, indent=2))
    return summary


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    with infra.process_group() as (rank, world_size, device):
        return make(args, rank, world_size, device)


def make(args, rank: int, world_size: int, device) -> dict | None:
    """The run: claim --output, then every chunk not yet finished, each rank a chunk at a time."""
    output = None
    try:
        items, model_flags = plan(args)
        verdict = [""]
        if rank == 0:  # claim --output before any model loads; every rank stops on rank 0's verdict
            try:
                output = infra.ResumableJsonl(args.output, {k: v for k, v in vars(args).items()
                                                            if k not in RESUMABLE_FLAGS})
                verdict = [sorted(output.done)]
            except SystemExit as error:
                verdict = [str(error)]
        dist.broadcast_object_list(verdict, src=0)
        if isinstance(verdict[0], str):
            raise SystemExit(verdict[0])
        finished = set(verdict[0])
        ctx = build_context(args, model_flags, device)
        chunks = [items[i:i + args.batch_size] for i in range(0, len(items), args.batch_size)]
        todo = [k for k, chunk in enumerate(chunks) if any(item["id"] not in finished for item in chunk)]
        process = {"prompts": make_prompts, "responses": make_responses, "preferences": make_preferences}[args.command]
        start, run_items, run_tokens = time.time(), 0, 0
        with tqdm(total=sum(len(chunks[k]) for k in todo), desc=args.command, unit="prompt", disable=rank > 0) as bar:
            for first in range(0, len(todo), world_size):  # a round: one chunk per rank
                mine = todo[first + rank] if first + rank < len(todo) else None
                results = process(chunks[mine], stable_seed(args.seed, "chunk", mine), ctx) if mine is not None else []
                gathered = [None] * world_size if rank == 0 else None
                dist.gather_object((mine, results), gathered, dst=0)
                for k, chunk_results in gathered or []:  # rank order is todo order: rows are written in order
                    for item, (outcome, counts, row) in zip(chunks[k] if k is not None else [], chunk_results):
                        if item["id"] not in output.done:  # (a chunk redone after a kill: its written ids stay)
                            output.write({"id": item["id"], "outcome": outcome, "counts": counts}, row)
                            run_items, run_tokens = run_items + 1, run_tokens + counts.get("tokens", 0)
                    bar.update(len(chunks[k]) if k is not None else 0)
        if rank == 0:
            summary = summarize(args, output, items, time.time() - start, run_items, run_tokens)
            print(json.dumps(summary, indent=2))
            return summary
    finally:
        if output is not None:
            output.close()  # (and its lock)


if __name__ == "__main__":
    infra.run(main)
