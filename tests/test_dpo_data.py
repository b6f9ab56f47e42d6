"""Preference records (dpo.py, section "Preference records"): the accepted shapes, clear errors
naming dataset / row / field, counted skips, and tokenization with the SFT masking."""
import json

import pytest

from data_mix import IGNORE_INDEX, mix_datasets
from dpo import preference_messages, tokenize_preference, tokenize_preference_dataset, validate_preference_record
from flags import InvalidRecord

USER = {"role": "user", "content": "What is 12 plus 30?"}
GOOD = {"role": "assistant", "content": "The answer is 42."}
BAD = {"role": "assistant", "content": "The answer is 0."}


def test_whole_conversations_are_used_as_they_are_and_a_repeated_prompt_string_is_ignored():
    row = {"prompt": USER["content"], "chosen": [USER, GOOD], "rejected": [USER, BAD]}
    assert preference_messages(row, "here") == ([USER, GOOD], [USER, BAD])


def test_response_strings_are_answers_to_a_prompt_string():
    row = {"prompt": USER["content"], "chosen": GOOD["content"], "rejected": BAD["content"]}
    assert preference_messages(row, "here") == ([USER, GOOD], [USER, BAD])


def test_assistant_message_lists_are_answers_to_a_prompt_conversation():
    system = {"role": "system", "content": "Be brief."}
    row = {"prompt": [system, USER], "chosen": [GOOD], "rejected": [BAD]}
    assert preference_messages(row, "here") == ([system, USER, GOOD], [system, USER, BAD])


@pytest.mark.parametrize("row, message", [
    ({"chosen": [USER, GOOD]}, "dataset d.jsonl, row 3, field rejected: missing"),
    ({"prompt": "hi", "chosen": "  ", "rejected": "no"}, "dataset d.jsonl, row 3, field chosen, field messages[1].content: empty assistant turn"),
    ({"chosen": [USER, GOOD], "rejected": [USER, GOOD]}, "dataset d.jsonl, row 3, field rejected: identical to chosen"),
    ({"chosen": "yes", "rejected": "no"}, "dataset d.jsonl, row 3, field prompt: chosen is a response only"),
    ({"chosen": [USER, {"role": "bot", "content": "x"}], "rejected": [USER, BAD]},
     "dataset d.jsonl, row 3, field chosen, field messages[1].role: 'bot'"),
    ({"chosen": [USER, GOOD, USER], "rejected": [USER, BAD]},
     "dataset d.jsonl, row 3, field chosen: the last turn must be the assistant response"),
    ({"prompt": "hi", "chosen": 42, "rejected": "no"},
     "dataset d.jsonl, row 3, field chosen: expected a response string"),
])
def test_malformed_records_raise_naming_dataset_row_and_field(row, message):
    with pytest.raises(InvalidRecord) as error:
        preference_messages(row, "dataset d.jsonl, row 3")
    assert str(error.value).startswith(message)


def test_mixing_stops_at_a_bad_row_or_skips_and_counts_it(tmp_path):
    path = tmp_path / "prefs.jsonl"
    rows = [{"chosen": [USER, GOOD], "rejected": [USER, BAD]},
            {"chosen": [USER, GOOD], "rejected": [USER, GOOD]},
            {"chosen": [USER, BAD], "rejected": [USER, GOOD]}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(InvalidRecord, match=f"dataset {path}, line 2, field rejected: identical to chosen"):
        mix_datasets([str(path), "1.0"], seed=0, validate=validate_preference_record)
    mixed, report = mix_datasets([str(path), "1.0"], seed=0, validate=validate_preference_record, skip_invalid=True)
    assert len(mixed) == 2
    assert report[str(path)]["skipped_invalid"] == 1


def trained_text(tokenizer, input_ids, labels):
    return tokenizer.decode([token for token, label in zip(input_ids, labels) if label != IGNORE_INDEX])


def test_each_side_is_tokenized_with_sft_masking_on_all_assistant_turns(tiny_tokenizer):
    first = [USER, {"role": "assistant", "content": "42"}, {"role": "user", "content": "And again?"}]
    row = {"chosen": first + [GOOD], "rejected": first + [BAD], "source": "d"}
    tokenized = tokenize_preference(tiny_tokenizer, row, max_seq_length=512)
    assert trained_text(tiny_tokenizer, tokenized["chosen_input_ids"], tokenized["chosen_labels"]) == \
        "42<|im_end|>The answer is 42.<|im_end|>"
    assert trained_text(tiny_tokenizer, tokenized["rejected_input_ids"], tokenized["rejected_labels"]) == \
        "42<|im_end|>The answer is 0.<|im_end|>"
    last_only = tokenize_preference(tiny_tokenizer, row, max_seq_length=512, last_turn_only=True)
    assert trained_text(tiny_tokenizer, last_only["chosen_input_ids"], last_only["chosen_labels"]) == \
        "The answer is 42.<|im_end|>"


def test_pairs_truncated_to_no_trained_token_are_dropped_and_counted(tiny_tokenizer):
    import datasets

    long_prompt = {"role": "user", "content": "hello world, again and again. " * 20}
    dataset = datasets.Dataset.from_list([
        {"chosen": [USER, GOOD], "rejected": [USER, BAD], "source": "d"},
        {"chosen": [long_prompt, GOOD], "rejected": [long_prompt, BAD], "source": "d"},
    ])
    tokenized, dropped = tokenize_preference_dataset(dataset, tiny_tokenizer, max_seq_length=40)
    assert dropped == 1
    assert len(tokenized) == 1
    assert set(tokenized.column_names) == {"source", "chosen_input_ids", "chosen_labels",
                                           "rejected_input_ids", "rejected_labels"}
