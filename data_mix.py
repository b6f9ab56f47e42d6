"""Data shared by every stage: load and mix datasets, validate records, render chats, tokenize, batch. (The flags'
parser is flags.py's; the benchmarks, and the decontamination load_mixture runs against them, are benchmarks.py's;
preference records are dpo.py's own, RLVR records rlvr.py's; the attention for packed rows is model code: modeling.py.)

A mixture is a list of (dataset, amount) pairs, written on the command line as
    --dataset_mixer_list allenai/tulu-3-sft-mixture 1.0 my_data.jsonl 5000
where an amount is a fraction of the dataset (above 1.0 upsamples: whole copies plus a seeded
remainder) or an integer count of rows. Each dataset is shuffled with the run's seed before rows are
taken, and every row keeps a `source` column naming the dataset it came from.

Rendering follows Tülu 3: the loss covers each assistant turn's content plus its EOS token, and
nothing else (system and user turns, the assistant header, the newline after EOS are label -100).
"""
import json
import os

import torch

import benchmarks
import flags
from flags import DataError, InvalidRecord


IGNORE_INDEX = -100  # label of a token that is not trained (torch's cross_entropy default)
ROLES = ("system", "user", "assistant")

# The Tülu chat template (no BOS is added by the template; the last assistant turn has no trailing newline).
TULU_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|assistant|>\n' + message['content'] + eos_token }}{% endif %}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    "{% endfor %}"
)


def add_data_args(parser, max_seq_length: int) -> None:
    """The data flags every stage shares (names as in Tülu 3's open-instruct)."""
    parser.add_argument("--dataset_mixer_list", nargs="+", required=True, metavar="NAME AMOUNT",
                        help="pairs of dataset (hub name or local .jsonl/.json/.parquet) and amount "
                             "(fraction, >1.0 upsamples, or integer row count)")
    parser.add_argument("--max_seq_length", type=flags.POSITIVE_INT, default=max_seq_length,
                        help="right-truncate to this")
    parser.add_argument("--chat_template_name", default=None, choices=["tulu"],
                        help="render with the Tülu template instead of the model's own")
    parser.add_argument("--skip_invalid_rows", action="store_true",
                        help="drop malformed records (counted and reported) instead of stopping")
    parser.add_argument("--preprocessing_num_workers", type=flags.POSITIVE_INT, default=1,
                        help="processes for tokenization")
    parser.add_argument("--decontaminate_against", default=None, metavar="gsm8k,math,ifeval,humaneval,mmlu",
                        help="drop training rows whose prompts share n-grams with these benchmarks' prompts")
    parser.add_argument("--decontaminate_ngram_size", type=flags.POSITIVE_INT, default=8)
    parser.add_argument("--decontaminate_threshold", type=flags.bounded(float, 0.0, 1.0, high_open=True), default=0.5,
                        help="drop a row when more than this fraction of its prompt n-grams are benchmark n-grams")


# ---------------------------------------------------------------------------------------------
# Loading and mixing

def load_rows(name_or_path: str):
    """A hub dataset's train split or a local .parquet file as a datasets.Dataset (with its own types)."""
    import datasets

    looks_local = name_or_path.lower().endswith((".parquet", ".jsonl", ".json")) or name_or_path.startswith((".", "/"))
    if looks_local and not os.path.exists(name_or_path):
        raise FileNotFoundError(f"dataset file not found: {name_or_path}")
    if name_or_path.lower().endswith(".parquet"):
        rows = datasets.load_dataset("parquet", data_files=name_or_path, split="train")
    elif os.path.exists(name_or_path):
        raise DataError(f"dataset {name_or_path}: local datasets must be .jsonl, .json or .parquet files")
    else:
        try:
            rows = datasets.load_dataset(name_or_path, split="train")
        except Exception as error:  # not found, offline, gated, no train split: say which, in one line
            first_line = (str(error).strip().splitlines() or [""])[0]
            raise DataError(f"dataset {name_or_path}: no such local file, and the hub's copy could not be loaded "
                            f"({type(error).__name__}: {first_line})") from None
    return rows


def read_json_records(path: str) -> list[tuple[str, object]]:
    """(place, record) pairs of a .jsonl file's lines ("line N") or a .json file's array ("row N").

    Parsed with the json module, which keeps every string as written: datasets' JSON loader infers
    column types, so in a column mixing strings and lists "5" became 5 and "null" None. A line that
    does not parse gives an InvalidRecord in place of its record, for --skip_invalid_rows to count.
    Lines are split on "\n" only (str.splitlines would also split inside a string holding U+2028).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    if path.lower().endswith(".json"):
        try:
            records = json.loads(data)
        except UnicodeDecodeError as error:
            raise InvalidRecord(f"dataset {path}: not UTF-8 text (byte {error.start + 1} of the file)") from None
        except json.JSONDecodeError as error:
            if error.msg != "Extra data":  # "Extra data" after the first value: JSON Lines in a .json file
                raise InvalidRecord(f"dataset {path}, line {error.lineno}, column {error.colno}: not JSON "
                                    f"({error.msg})") from None
        else:
            if not isinstance(records, list):
                raise InvalidRecord(f"dataset {path}: a .json dataset must be a JSON array of records (or JSON "
                                    f"Lines), got a {type(records).__name__}")
            return [(f"row {index}", record) for index, record in enumerate(records)]
    pairs = []
    for number, line in enumerate(data.split(b"\n"), 1):
        if line.strip():
            try:
                record = json.loads(line.decode("utf-8-sig"))  # -sig: a byte-order mark is not data
            except UnicodeDecodeError as error:
                record = InvalidRecord(f"dataset {path}, line {number}: not UTF-8 text (byte {error.start + 1} "
                                       f"of the line)")
            except json.JSONDecodeError as error:
                record = InvalidRecord(f"dataset {path}, line {number}, column {error.colno}: not JSON ({error.msg})")
            pairs.append((f"line {number}", record))
    if not pairs:
        raise DataError(f"dataset {path} is empty")
    return pairs


def load_valid_rows(name: str, validate=None, skip_invalid: bool = False):
    """A dataset's rows that `validate(row, where)` accepts, and how many it rejected (skip_invalid) or
    the first InvalidRecord. A JSON file's rows become the records `validate` returns (the fields the
    stage reads, in one shape per field), so that Arrow needs to infer no type."""
    import datasets

    if not name.lower().endswith((".jsonl", ".json")):
        rows, skipped = load_rows(name), []
        for index, row in enumerate(rows if validate is not None else []):
            try:
                validate(row, f"dataset {name}, row {index}")
            except InvalidRecord:
                if not skip_invalid:
                    raise
                skipped.append(index)
        if skipped:
            bad = set(skipped)
            rows = rows.select([i for i in range(len(rows)) if i not in bad])
        return rows, len(skipped)
    kept, skipped = [], 0
    for place, record in read_json_records(name):
        try:
            if isinstance(record, InvalidRecord):
                raise record
            if not isinstance(record, dict):
                raise InvalidRecord(f"dataset {name}, {place}: expected a JSON object, got {type(record).__name__}")
            kept.append(record if validate is None else validate(record, f"dataset {name}, {place}"))
        except InvalidRecord:
            if not skip_invalid:
                raise
            skipped += 1
    return datasets.Dataset.from_list(kept), skipped


def parse_mixer_list(items: list[str]) -> list[tuple[str, float]]:
    """["a.jsonl", "0.5", "b", "100"] -> [("a.jsonl", 0.5), ("b", 100)] with clear errors."""
    if len(items) % 2:
        raise DataError(f"--dataset_mixer_list takes NAME AMOUNT pairs, got {len(items)} values: {items}")
    pairs = []
    for name, amount in zip(items[::2], items[1::2]):
        try:
            value = int(amount) if amount.isdigit() else float(amount)
        except ValueError:
            raise DataError(f"--dataset_mixer_list: amount {amount!r} for {name} is not a number") from None
        if value <= 0:
            raise DataError(f"--dataset_mixer_list: amount for {name} must be positive, got {amount}")
        pairs.append((name, value))
    return pairs


def take_rows(num_rows: int, amount: float, seed: int) -> list[int]:
    """Row indices for one mixture entry: a seeded shuffle, whole repeats for amounts above 1.0."""
    generator = torch.Generator().manual_seed(seed)
    wanted = amount if isinstance(amount, int) else round(amount * num_rows)
    indices = []
    while len(indices) < wanted:  # each repeat is its own shuffle, so the remainder is a random subset
        order = torch.randperm(num_rows, generator=generator).tolist()
        indices.extend(order[: wanted - len(indices)])
    return indices


def mix_datasets(dataset_mixer_list: list[str], seed: int, validate=None, skip_invalid: bool = False):
    """Load, validate, sample and concatenate a mixture.

    `validate(row, where)` raises InvalidRecord for a malformed row; the error names the dataset and
    row (a JSON file's line), or with `skip_invalid` the row is dropped and counted. Returns the mixed dataset (with a
    `source` column) and a report {name: {"rows", "available", "skipped_invalid"}} to save with the run.
    """
    import datasets

    parts, report = [], {}
    for name, amount in parse_mixer_list(dataset_mixer_list):
        rows, skipped = load_valid_rows(name, validate, skip_invalid)
        available = len(rows)
        if available == 0:
            raise DataError(f"dataset {name} has no usable rows")
        if isinstance(amount, int) and amount > len(rows):
            raise DataError(f"dataset {name}: asked for {amount} rows but it has {len(rows)}; ask for at most "
                            f"{len(rows)}, or a fraction (2.0 takes every row twice)")
        rows = rows.select(take_rows(len(rows), amount, seed))
        if "source" in rows.column_names:  # keep the dataset's own provenance column under another name
            rows = rows.rename_column("source", "original_source")
        parts.append(rows.add_column("source", [name] * len(rows)))
        report[name] = {"rows": len(rows), "available": available, "skipped_invalid": skipped}
    columns = set.intersection(*(set(p.column_names) for p in parts))
    parts = [p.select_columns(sorted(columns)) for p in parts]
    # One schema for all: cast each part by column and field name to the first's, so that a parquet file's large_string
    # columns (pandas >= 3, polars and pyarrow write them) and struct fields in another order mix with JSON rows.
    for number, part in enumerate(parts[1:], 1):
        if part.features != parts[0].features:
            try:
                parts[number] = part.cast(parts[0].features)
            except (ValueError, TypeError, NotImplementedError):
                column = next(c for c in sorted(columns) if part.features[c] != parts[0].features[c])
                raise DataError(f"datasets {parts[0]['source'][0]} and {part['source'][0]} hold column {column} in "
                                f"different shapes ({parts[0].features[column]} and {part.features[column]}); "
                                "convert one to the other's") from None
    return datasets.concatenate_datasets(parts), report


def load_mixture(args, validate):
    """The stages' entry point: mix `--dataset_mixer_list`, then decontaminate if asked.

    Returns the rows and a report for <output_dir>/mixture.json. Data that cannot be used stops the run with one line
    (SystemExit) that names the dataset, its line or row and the field.
    """
    try:
        rows, datasets_report = mix_datasets(args.dataset_mixer_list, args.seed, validate, args.skip_invalid_rows)
    except InvalidRecord as error:
        raise SystemExit(f"{error} (--skip_invalid_rows drops such rows and counts them)") from None
    except (DataError, FileNotFoundError) as error:  # (FileNotFoundError: a dataset file)
        raise SystemExit(str(error)) from None
    report = {"datasets": datasets_report}
    if args.decontaminate_against:
        names = [name.strip() for name in args.decontaminate_against.split(",") if name.strip()]
        try:  # a benchmark's bad row is the benchmark file's to fix: --skip_invalid_rows does not apply to it
            rows, report["decontamination"] = benchmarks.decontaminate(rows, names, args.decontaminate_ngram_size,
                                                                       args.decontaminate_threshold)
        except (InvalidRecord, DataError, FileNotFoundError) as error:
            raise SystemExit(f"--decontaminate_against: {error}") from None
        if len(rows) == 0:
            raise SystemExit(f"--decontaminate_against: decontamination against {names} dropped every training row")
    return rows, report


def save_json(path: str, obj) -> None:
    """Write JSON atomically (a crash never leaves a half-written file)."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------
# Validation

def validate_messages(messages, where: str, needs_assistant: bool = True) -> list[dict]:
    """The turns as [{"content", "role"}] (other keys dropped: templates render role and content), or
    InvalidRecord unless `messages` is a list of such turns whose assistant turns are not blank
    (an empty target trains the EOS alone) and, if `needs_assistant`, hold one to train on."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRecord(f"{where}: expected a non-empty list of messages, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRecord(f"{where}, field messages[{i}]: expected a dict, got {type(message).__name__}")
        if message.get("role") not in ROLES:
            raise InvalidRecord(f"{where}, field messages[{i}].role: {message.get('role')!r} is not one of {ROLES}")
        if not isinstance(message.get("content"), str):
            raise InvalidRecord(f"{where}, field messages[{i}].content: expected a string, "
                                f"got {type(message.get('content')).__name__}")
        if message["role"] == "assistant" and not message["content"].strip():
            raise InvalidRecord(f"{where}, field messages[{i}].content: empty assistant turn")
    if needs_assistant and not any(m["role"] == "assistant" for m in messages):
        raise InvalidRecord(f"{where}, field messages: no assistant turn to train on")
    return [{"content": m["content"], "role": m["role"]} for m in messages]


def validate_sft_record(row: dict, where: str) -> dict:
    if row.get("messages") is None:  # a JSON file whose other rows have the field loads it as None
        raise InvalidRecord(f"{where}: no 'messages' field (has {sorted(k for k, v in row.items() if v is not None)})")
    return {"messages": validate_messages(row["messages"], f"{where}, field messages")}


# ---------------------------------------------------------------------------------------------
# Rendering and tokenization

def load_tokenizer(model_name_or_path: str, chat_template_name: str | None = None):
    """The model's tokenizer with a pad token and a chat template (its own, or Tülu's if asked)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as error:  # files that do not parse, a tokenizer class transformers does not know
        raise SystemExit(f"{model_name_or_path}: its tokenizer cannot be loaded "
                         f"({(str(error).strip().splitlines() or [''])[0]})") from None
    if chat_template_name == "tulu":
        tokenizer.chat_template = TULU_CHAT_TEMPLATE
    elif chat_template_name is not None:
        raise SystemExit(f"unknown --chat_template_name {chat_template_name!r} (known: tulu)")
    if tokenizer.chat_template is None:
        raise SystemExit(f"{model_name_or_path} has no chat template: pass --chat_template_name tulu")
    if not tokenizer.is_fast:
        raise SystemExit(f"{model_name_or_path}: a fast tokenizer is needed (token offsets locate the assistant "
                         "turns): add its tokenizer.json")
    if tokenizer.eos_token is None:
        raise SystemExit(f"{model_name_or_path}: the tokenizer has no EOS token: set eos_token in "
                         "tokenizer_config.json")
    if tokenizer.pad_token is None:  # padding is masked out of attention and labels, so any id will do
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def trained_spans(tokenizer, messages: list[dict], text: str, last_turn_only: bool) -> list[tuple[int, int]]:
    """Character spans of `text` that carry loss: each assistant turn's content plus its EOS.

    A turn starts where the conversation rendered up to it, plus the generation prompt, ends; it
    ends after the last EOS inside the turn's rendering (the template's trailing newline is left out).
    """
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if last_turn_only:
        turns = turns[-1:]
    spans = []
    for i in turns:
        head = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        if i and not text.startswith(head):
            raise ValueError("the chat template renders a conversation prefix differently from the whole "
                             "conversation, so assistant turns cannot be located; use --chat_template_name tulu")
        turn_end = len(render(tokenizer, messages[: i + 1]))
        eos_at = text.rfind(tokenizer.eos_token, len(head), turn_end)
        spans.append((len(head), eos_at + len(tokenizer.eos_token) if eos_at >= 0 else turn_end))
    return spans


def tokenize_sft(tokenizer, messages: list[dict], max_seq_length: int, last_turn_only: bool = False) -> dict:
    """input_ids and labels (-100 outside assistant content + EOS), right-truncated to max_seq_length."""
    text = render(tokenizer, messages)
    spans = trained_spans(tokenizer, messages, text, last_turn_only)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoded["input_ids"][:max_seq_length]
    labels = [token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
              for token, (begin, _) in zip(input_ids, encoded["offset_mapping"])]
    return {"input_ids": input_ids, "labels": labels}


def tokenize_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """A conversation rendered up to and including the assistant header, ready for sampling."""
    return tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def tokenize_sft_dataset(dataset, tokenizer, max_seq_length: int, num_proc: int = 1):
    """Tokenize every conversation; drop (and count) examples that have no trained token left."""
    tokenized = dataset.map(
        lambda row: tokenize_sft(tokenizer, row["messages"], max_seq_length),
        remove_columns=[c for c in dataset.column_names if c != "source"],
        num_proc=num_proc if num_proc > 1 else None, desc="tokenizing")
    trainable = tokenized.filter(lambda row: any(label != IGNORE_INDEX for label in row["labels"]),
                                 num_proc=num_proc if num_proc > 1 else None, desc="dropping fully masked")
    return trainable, len(tokenized) - len(trainable)


# ---------------------------------------------------------------------------------------------
# Batching

def collate_padded(examples: list[dict], pad_token_id: int) -> dict:
    """Right-pad to the longest example: input_ids, labels, attention_mask [B, T]."""
    length = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def collate_packed(examples: list[dict]) -> dict:
    """Padding-free: concatenate examples into one row [1, sum T].

    position_ids restart at 0 for each example; with no attention_mask, transformers reads the
    restarts as sequence boundaries and builds a block-diagonal causal mask, so no token attends
    across examples. The first label of each example is -100 so that no loss links two examples.
    """
    input_ids, labels, position_ids = [], [], []
    for example in examples:
        input_ids += example["input_ids"]
        labels += [IGNORE_INDEX] + list(example["labels"][1:])
        position_ids += range(len(example["input_ids"]))
    as_row = lambda values: torch.tensor(values, dtype=torch.long).unsqueeze(0)  # noqa: E731
    return {"input_ids": as_row(input_ids), "labels": as_row(labels), "position_ids": as_row(position_ids)}


def micro_batch_indices(mine: list[int], size: int, max_tokens: int | None, length) -> list[list[int]]:
    """A rank's example indices of one optimizer batch, grouped into micro-batches: `size` at a time, or, with
    max_tokens, first-fit decreasing by length(index) into as few groups of at most max_tokens as it finds
    (an example longer than max_tokens gets a group of its own)."""
    if max_tokens is None:
        return [mine[start:start + size] for start in range(0, len(mine), size)]
    lengths = {index: length(index) for index in mine}
    groups, loads = [], []
    for index in sorted(mine, key=lengths.get, reverse=True):
        fits = next((g for g, load in enumerate(loads) if load + lengths[index] <= max_tokens), len(groups))
        if fits == len(groups):
            groups.append([])
            loads.append(0)
        groups[fits].append(index)
        loads[fits] += lengths[index]
    return groups
