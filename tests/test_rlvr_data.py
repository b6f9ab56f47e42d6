"""rlvr.py's RLVR records: {messages, ground_truth, dataset} validated with named errors, prompts tokenized."""
import json

import datasets
import pytest

import data_mix
import flags
import rlvr

GOOD = {"messages": [{"role": "user", "content": "What is 2 plus 3?"}], "ground_truth": "5", "dataset": "gsm8k"}


def test_a_good_record_passes_and_the_dataset_name_is_matched_in_any_case():
    rlvr.validate_rlvr_record(GOOD, "dataset d.jsonl, row 0")
    rlvr.validate_rlvr_record({**GOOD, "dataset": "MATH", "ground_truth": "\\frac{1}{2}"}, "dataset d, row 1")
    rlvr.validate_rlvr_record({**GOOD, "dataset": "IFEval", "ground_truth": json.dumps(
        {"instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]})}, "dataset d, row 2")


@pytest.mark.parametrize("change, field", [
    ({"dataset": "trivia"}, "field dataset"),
    ({"dataset": None}, "field dataset"),
    ({"ground_truth": ""}, "field ground_truth"),
    ({"ground_truth": None}, "field ground_truth"),
    ({"dataset": "ifeval", "ground_truth": "{not json"}, "field ground_truth"),
    ({"messages": []}, "field messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "field messages[0].role"),
])
def test_a_bad_record_names_dataset_row_and_field(change, field):
    with pytest.raises(flags.InvalidRecord, match=rf"dataset d.jsonl, row 7.*{field.replace('[', '.').replace(']', '.')}"):
        rlvr.validate_rlvr_record({**GOOD, **change}, "dataset d.jsonl, row 7")


def test_a_final_assistant_turn_is_a_reference_answer_not_part_of_the_prompt():
    row = {**GOOD, "messages": GOOD["messages"] + [{"role": "assistant", "content": "5"}]}
    assert rlvr.rlvr_prompt_messages(row, "here") == GOOD["messages"]


def test_prompts_end_in_the_assistant_header_and_long_ones_are_dropped(tiny_tokenizer):
    rows = datasets.Dataset.from_list([{**GOOD, "source": "d"},
                                       {**GOOD, "messages": [{"role": "user", "content": "word " * 200}],
                                        "dataset": "GSM8K", "source": "d"}])
    tokenized, dropped = rlvr.tokenize_rlvr_dataset(rows, tiny_tokenizer, max_prompt_token_length=64)
    assert dropped == 1 and len(tokenized) == 1
    row = tokenized[0]
    assert row["input_ids"] == data_mix.tokenize_prompt(tiny_tokenizer, GOOD["messages"])
    assert tiny_tokenizer.decode(row["input_ids"]).endswith("<|im_start|>assistant\n")
    assert (row["ground_truth"], row["dataset"], row["source"]) == ("5", "gsm8k", "d")


def test_invalid_rows_are_counted_when_skipping(tmp_path):
    path = tmp_path / "rlvr.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [GOOD, {**GOOD, "dataset": "trivia"}, GOOD]) + "\n")
    mixed, report = data_mix.mix_datasets([str(path), "1.0"], seed=0, validate=rlvr.validate_rlvr_record,
                                          skip_invalid=True)
    assert len(mixed) == 2 and report[str(path)]["skipped_invalid"] == 1
    with pytest.raises(flags.InvalidRecord, match="line 2, field dataset"):
        data_mix.mix_datasets([str(path), "1.0"], seed=0, validate=rlvr.validate_rlvr_record)
