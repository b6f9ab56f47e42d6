"""data_mix: mixing, validation, Tülu masking on both templates, packing."""
import json

import pytest
import torch

import data_mix
import flags
from conftest import build_tiny_model

IGNORE = data_mix.IGNORE_INDEX
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 plus 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "and 3 plus 3?"},
    {"role": "assistant", "content": "It is 6."},
]


def trained_text(tokenizer, example):
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def sft_rows(n, prefix="q"):
    return [{"id": f"{prefix}{i}", "messages": [{"role": "user", "content": f"{prefix} {i}"},
                                                {"role": "assistant", "content": f"answer {i}"}]} for i in range(n)]


@pytest.fixture(params=["own", "tulu"])
def tokenizer(request, tiny_model_dir):
    return data_mix.load_tokenizer(tiny_model_dir, "tulu" if request.param == "tulu" else None)


def test_single_turn_trains_only_assistant_content_and_eos(tokenizer):
    example = data_mix.tokenize_sft(tokenizer, CONVERSATION[1:3], max_seq_length=512)
    assert trained_text(tokenizer, example) == "4" + tokenizer.eos_token


def test_multi_turn_trains_every_assistant_turn(tokenizer):
    example = data_mix.tokenize_sft(tokenizer, CONVERSATION, max_seq_length=512)
    assert trained_text(tokenizer, example) == "4" + tokenizer.eos_token + "It is 6." + tokenizer.eos_token
    assert len(example["input_ids"]) == len(example["labels"])


def test_last_turn_only_masks_earlier_assistant_turns(tokenizer):
    example = data_mix.tokenize_sft(tokenizer, CONVERSATION, max_seq_length=512, last_turn_only=True)
    assert trained_text(tokenizer, example) == "It is 6." + tokenizer.eos_token


def test_tulu_template_renders_the_documented_format(tiny_model_dir):
    tokenizer = data_mix.load_tokenizer(tiny_model_dir, "tulu")
    eos = tokenizer.eos_token
    assert data_mix.render(tokenizer, CONVERSATION) == (
        f"<|system|>\nBe brief.\n<|user|>\nWhat is 2 plus 2?\n<|assistant|>\n4{eos}\n"
        f"<|user|>\nand 3 plus 3?\n<|assistant|>\nIt is 6.{eos}")
    prompt = tokenizer.decode(data_mix.tokenize_prompt(tokenizer, CONVERSATION[:2]))
    assert prompt.endswith("<|user|>\nWhat is 2 plus 2?\n<|assistant|>\n")


def test_truncation_is_on_the_right(tokenizer):
    full = data_mix.tokenize_sft(tokenizer, CONVERSATION, max_seq_length=512)
    cut = data_mix.tokenize_sft(tokenizer, CONVERSATION, max_seq_length=10)
    assert cut["input_ids"] == full["input_ids"][:10] and cut["labels"] == full["labels"][:10]


def test_fully_masked_examples_are_dropped_and_counted(tokenizer, tmp_path):
    import datasets

    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    rows = datasets.Dataset.from_list([{"messages": long_prompt}, {"messages": CONVERSATION}])
    examples, dropped = data_mix.tokenize_sft_dataset(rows, tokenizer, max_seq_length=64)
    assert dropped == 1 and len(examples) == 1


def test_mixture_takes_fractions_counts_and_upsamples(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", sft_rows(10, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", sft_rows(4, "b"))
    mixed, report = data_mix.mix_datasets([a, "0.5", b, "3"], seed=1)
    assert report[a]["rows"] == 5 and report[b]["rows"] == 3
    assert sorted(set(mixed["source"])) == sorted([a, b])
    upsampled, report = data_mix.mix_datasets([b, "2.5"], seed=1)
    ids = upsampled["id"]
    assert len(ids) == 10 and all(ids.count(f"b{i}") >= 2 for i in range(4))  # 2 whole copies + 2 more


def test_mixture_is_seeded(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", sft_rows(20))
    first = data_mix.mix_datasets([a, "0.5"], seed=7)[0]["id"]
    assert first == data_mix.mix_datasets([a, "0.5"], seed=7)[0]["id"]
    assert first != data_mix.mix_datasets([a, "0.5"], seed=8)[0]["id"]


@pytest.mark.parametrize("items, message", [
    (["a.jsonl"], "NAME AMOUNT pairs"), (["a.jsonl", "lots"], "not a number"), (["a.jsonl", "-1"], "must be positive"),
    (["a.jsonl", "0"], "must be positive")])
def test_bad_mixer_list_is_a_clear_error(items, message):
    with pytest.raises(ValueError, match=message):
        data_mix.parse_mixer_list(items)


def test_asking_for_more_rows_than_a_dataset_has_is_an_error(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", sft_rows(3))
    with pytest.raises(ValueError, match="asked for 5 rows but it has 3"):
        data_mix.mix_datasets([a, "5"], seed=0)


@pytest.mark.parametrize("record, field", [
    ({"messages": "hello"}, "expected a non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, r"messages\[0\].role"),
    ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\].content"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
    ({"text": "no messages"}, "no 'messages' field"),
])
def test_bad_record_error_names_dataset_row_and_field(tmp_path, record, field):
    path = write_jsonl(tmp_path / "bad.jsonl", sft_rows(2) + [record])
    with pytest.raises(flags.InvalidRecord, match=rf"dataset {path}, line 3.*{field}"):
        data_mix.mix_datasets([path, "1.0"], seed=0, validate=data_mix.validate_sft_record)


def test_skip_flag_drops_bad_records_and_counts_them(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", sft_rows(3) + [{"messages": [{"role": "user", "content": "q"}]}])
    mixed, report = data_mix.mix_datasets([path, "1.0"], seed=0, validate=data_mix.validate_sft_record,
                                          skip_invalid=True)
    assert len(mixed) == 3 and report[path]["skipped_invalid"] == 1


def test_missing_dataset_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        data_mix.load_rows(str(tmp_path / "nope.jsonl"))


def test_packed_rows_restart_positions_and_never_train_across_examples(tokenizer):
    examples = [data_mix.tokenize_sft(tokenizer, CONVERSATION[1:3], 512),
                data_mix.tokenize_sft(tokenizer, CONVERSATION, 512)]
    packed = data_mix.collate_packed(examples)
    first = len(examples[0]["input_ids"])
    assert packed["position_ids"][0, first] == 0 and packed["position_ids"][0, first - 1] == first - 1
    assert packed["labels"][0, first] == IGNORE


def test_packed_forward_matches_separate_forwards(tiny_tokenizer, tokenizer):
    model = build_tiny_model(tiny_tokenizer).eval()
    examples = [data_mix.tokenize_sft(tokenizer, conversation, 512)
                for conversation in (CONVERSATION[1:3], CONVERSATION, CONVERSATION[1:])]
    packed = data_mix.collate_packed(examples)
    with torch.no_grad():
        packed_logprobs = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                               use_cache=False).logits.log_softmax(-1)
        start = 0
        for example in examples:
            ids = torch.tensor([example["input_ids"]])
            alone = model(input_ids=ids).logits.log_softmax(-1)
            torch.testing.assert_close(packed_logprobs[:, start:start + ids.shape[1]], alone, atol=1e-5, rtol=1e-5)
            start += ids.shape[1]


def test_padded_batch_masks_padding(tokenizer):
    examples = [data_mix.tokenize_sft(tokenizer, CONVERSATION[1:3], 512),
                data_mix.tokenize_sft(tokenizer, CONVERSATION, 512)]
    batch = data_mix.collate_padded(examples, tokenizer.pad_token_id)
    short = len(examples[0]["input_ids"])
    assert batch["attention_mask"][0].sum() == short and (batch["labels"][0, short:] == IGNORE).all()


def test_load_mixture_decontaminates_when_asked(tmp_path, benchmarks_dir):
    import argparse

    question = json.loads(open(f"{benchmarks_dir}/gsm8k.jsonl").readline())["question"]
    planted = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "18"}]}
    path = write_jsonl(tmp_path / "mix.jsonl", sft_rows(5) + [planted])
    parser = argparse.ArgumentParser()
    data_mix.add_data_args(parser, max_seq_length=128)
    args = parser.parse_args(["--dataset_mixer_list", path, "1.0", "--decontaminate_against", "gsm8k"])
    args.seed = 0
    rows, report = data_mix.load_mixture(args, data_mix.validate_sft_record)
    assert len(rows) == 5 and question not in [m[0]["content"] for m in rows["messages"]]
    assert report["decontamination"]["dropped_per_benchmark"] == {"gsm8k": 1}
    assert report["datasets"][path]["rows"] == 6


def test_a_bad_benchmark_row_during_decontamination_names_the_file_and_not_skip_invalid_rows(tmp_path, monkeypatch):
    import argparse

    import benchmarks

    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "gsm8k.jsonl").write_text('{"question": "q"}\n')  # no answer: the benchmark file's fault
    monkeypatch.setattr(benchmarks, "BENCHMARK_DIR", str(tmp_path / "bench"))
    parser = argparse.ArgumentParser()
    data_mix.add_data_args(parser, max_seq_length=128)
    args = parser.parse_args(["--dataset_mixer_list", write_jsonl(tmp_path / "mix.jsonl", sft_rows(3)), "1.0",
                              "--decontaminate_against", "gsm8k"])
    args.seed = 0
    with pytest.raises(SystemExit, match=r"^--decontaminate_against: .*gsm8k.jsonl, line 1: missing field") as stop:
        data_mix.load_mixture(args, data_mix.validate_sft_record)
    assert "--skip_invalid_rows" not in str(stop.value)
