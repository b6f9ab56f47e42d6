"""Bad input stops with the place named (dataset file, line or row, field, flag) or, with
--skip_invalid_rows, is a counted skip; JSON strings reach training exactly as written."""
import argparse
import json
import os
import re

import pytest

import data_mix
import dpo
import flags
import rlvr
import verifiers

USER = {"role": "user", "content": "What is 2 plus 3?"}
ANSWER = {"role": "assistant", "content": "5"}
SFT = {"messages": [USER, ANSWER]}
RLVR = {"messages": [USER], "ground_truth": "5", "dataset": "gsm8k"}


def write_lines(path, lines: list) -> str:
    path.write_bytes(b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n"
                              for line in lines))
    return str(path)


def mix(path, validate=data_mix.validate_sft_record, skip=False):
    return data_mix.mix_datasets([path, "1.0"], seed=0, validate=validate, skip_invalid=skip)


# ---- files that do not parse

@pytest.mark.parametrize("bad_line, message", [(b"{not json", r"line 2, column 2: not JSON"),
                                               (b'{"messages": "\xff"}', r"line 2: not UTF-8 text"),
                                               (b"[1, 2]", r"line 2: expected a JSON object, got list")])
def test_a_bad_jsonl_line_is_named_and_can_be_skipped_and_counted(tmp_path, bad_line, message):
    path = write_lines(tmp_path / "d.jsonl", [SFT, bad_line, SFT])
    with pytest.raises(flags.InvalidRecord, match=f"dataset {path}, {message}"):
        mix(path)
    rows, report = mix(path, skip=True)
    assert len(rows) == 2 and report[path]["skipped_invalid"] == 1


def test_a_broken_json_array_names_line_and_column(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"messages": []},\n  {"messages": [}\n]')
    with pytest.raises(flags.InvalidRecord, match=f"dataset {path}, line 3, column 17: not JSON"):
        mix(str(path))


def test_a_json_array_names_its_rows_and_json_lines_in_a_json_file_are_read(tmp_path):
    array = tmp_path / "a.json"
    array.write_text(json.dumps([SFT, {"messages": [USER]}]))
    with pytest.raises(flags.InvalidRecord, match=f"dataset {array}, row 1, field messages.*no assistant turn"):
        mix(str(array))
    lines = write_lines(tmp_path / "l.json", [SFT, SFT])
    assert len(mix(lines)[0]) == 2


def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(SFT).encode() + b"\r\n" + json.dumps(SFT).encode() + b"\r\n")
    assert len(mix(str(path))[0]) == 2


def test_an_empty_file_is_named(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match=f"dataset {path} is empty"):
        mix(str(path))


def test_strings_stay_strings_in_a_column_that_mixes_strings_and_lists(tmp_path):
    texts = ["5", " 5 ", "null", "true", "[1, 2]"]
    rows = [{"prompt": "Say a number.", "chosen": "five", "rejected": text} for text in texts]
    rows.append({"chosen": [USER, ANSWER], "rejected": [USER, {"role": "assistant", "content": "6"}]})
    path = write_lines(tmp_path / "p.jsonl", rows)
    mixed, report = mix(path, dpo.validate_preference_record)
    assert report[path]["skipped_invalid"] == 0
    assert sorted(row["rejected"][-1]["content"] for row in mixed) == sorted(texts + ["6"])


# ---- records that parse but cannot be trained on

def test_chosen_and_rejected_with_different_prompt_turns_are_named(tmp_path):
    other = {"role": "user", "content": "What is 3 plus 3?"}
    path = write_lines(tmp_path / "p.jsonl", [{"chosen": [USER, ANSWER], "rejected": [other, ANSWER]}])
    with pytest.raises(flags.InvalidRecord, match=f"{path}, line 1, field rejected: its prompt turns differ "
                                                  "from chosen's at turn 0"):
        mix(path, dpo.validate_preference_record)


@pytest.mark.parametrize("content", ["", "  \n"])
def test_an_empty_assistant_turn_is_named(tmp_path, content):
    path = write_lines(tmp_path / "s.jsonl", [SFT, {"messages": [USER, {"role": "assistant", "content": content}]}])
    with pytest.raises(flags.InvalidRecord, match=r"line 2, field messages, field messages\[1\].content: empty"):
        mix(path)


@pytest.mark.parametrize("ground_truth", [5, ["5"], {"answer": "5"}])
def test_a_ground_truth_that_is_not_a_string_is_named(tmp_path, ground_truth):
    path = write_lines(tmp_path / "r.jsonl", [RLVR, {**RLVR, "ground_truth": ground_truth}])
    with pytest.raises(flags.InvalidRecord, match="line 2, field ground_truth: expected a non-empty string"):
        mix(path, rlvr.validate_rlvr_record)


def test_a_gsm8k_ground_truth_without_a_number_is_named():
    with pytest.raises(flags.InvalidRecord, match="row 4, field ground_truth: no number"):
        rlvr.validate_rlvr_record({**RLVR, "ground_truth": "five"}, "dataset d, row 4")


def ifeval(ids, kwargs):
    return json.dumps({"instruction_id_list": ids, "kwargs": kwargs})


@pytest.mark.parametrize("ground_truth, message", [
    (ifeval(["keywords:nonexistent"], [{}]), "unknown IFEval instruction id"),
    (ifeval(["punctuation:no_comma", "change_case:english_lowercase"], [{}]), "lists of one length"),
    (ifeval(["length_constraints:number_words"], [{"relation": "at least"}]), r"missing arguments \['num_words'\]"),
    (ifeval(["punctuation:no_comma"], [{"colour": "red"}]), r"unexpected arguments \['colour'\]"),
    (ifeval(["keywords:existence"], [{"keywords": 7}]), "keywords=7 must be a list of strings"),
    (ifeval(["length_constraints:number_words"], [{"num_words": 5, "relation": "more"}]), "must be 'less than'"),
    ("5", "needs 'instruction_id_list'"),
    ("{}", "needs 'instruction_id_list'"),
    (json.dumps({"func_name": "verify_nothing"}), "unknown Tülu 3 IFEval func_name"),
])
def test_an_ifeval_ground_truth_the_verifier_cannot_check_is_named_at_load(tmp_path, ground_truth, message):
    path = write_lines(tmp_path / "r.jsonl", [RLVR, {**RLVR, "dataset": "ifeval", "ground_truth": ground_truth}])
    with pytest.raises(flags.InvalidRecord, match=f"{path}, line 2, field ground_truth: .*{message}"):
        mix(path, rlvr.validate_rlvr_record)
    assert mix(path, rlvr.validate_rlvr_record, skip=True)[1][path]["skipped_invalid"] == 1


def test_a_quantifier_with_a_trailing_space_is_read_as_meant():
    ground_truth = json.dumps({"func_name": "validate_word_constraint", "N": 3, "quantifier": "at least "})
    rlvr.validate_rlvr_record({**RLVR, "dataset": "ifeval", "ground_truth": ground_truth}, "here")
    assert verifiers.verify("one two three", ground_truth, "ifeval") == 1.0
    assert verifiers.verify("one two", ground_truth, "ifeval") == 0.0
    relation = ifeval(["length_constraints:number_words"], [{"num_words": 2, "relation": " less than"}])
    assert verifiers.verify("one", relation, "ifeval") == 1.0


def test_rlvr_decontaminates_its_prompts(tmp_path, tiny_tokenizer, benchmarks_dir):
    import torch.distributed as dist

    import rlvr
    from conftest import free_port

    with open(os.path.join(benchmarks_dir, "gsm8k.jsonl")) as f:
        question = json.loads(f.readline())["question"]
    path = write_lines(tmp_path / "r.jsonl", [RLVR, {**RLVR, "messages": [{"role": "user", "content": question}]}])
    args = argparse.Namespace(dataset_mixer_list=[path, "1.0"], seed=0, skip_invalid_rows=False,
                              decontaminate_against="gsm8k", decontaminate_ngram_size=8, decontaminate_threshold=0.5,
                              max_seq_length=512, response_length=64, preprocessing_num_workers=1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        prompts, report = rlvr.load_rlvr_data(args, tiny_tokenizer, rank=0)
    finally:
        dist.destroy_process_group()
    assert len(prompts) == 1 and report["decontamination"]["dropped"] == 1


# ---- flags

@pytest.mark.parametrize("stage, flag, value, message", [
    ("sft", "--per_device_train_batch_size", "0", "0 must be >= 1"),
    ("sft", "--gradient_accumulation_steps", "0", "0 must be >= 1"),
    ("sft", "--checkpointing_steps", "0", "0 must be >= 1"),
    ("sft", "--max_seq_length", "-5", "-5 must be >= 1"),
    ("sft", "--learning_rate", "-0.001", "-0.001 must be >= 0.0"),
    ("sft", "--warmup_ratio", "1.5", "1.5 must be >= 0.0 and <= 1.0"),
    ("sft", "--num_train_epochs", "two", "'two' is not an integer"),
    ("dpo", "--dpo_beta", "0", "0 must be > 0.0"),
    ("dpo", "--dpo_label_smoothing", "2", "2 must be >= 0.0 and < 0.5"),
    ("dpo", "--learning_rate", "nan", "nan must be >= 0.0"),
    ("dpo", "--decontaminate_threshold", "1", "1 must be >= 0.0 and < 1.0"),
    ("rlvr", "--num_samples_per_prompt_rollout", "0", "0 must be >= 1"),
    ("rlvr", "--per_device_train_batch_size", "0", "0 must be >= 1"),
    ("rlvr", "--top_p", "0", "0 must be > 0.0 and <= 1.0"),
    ("rlvr", "--temperature", "0", "0 must be > 0.0"),
    ("eval", "--per_device_eval_batch_size", "0", "0 must be >= 1"),
    ("eval", "--code_timeout_s", "-1", "-1 must be > 0.0"),
    ("eval", "--pass_at_k", "1,0", "0 must be >= 1"),
])
def test_a_bad_flag_is_refused_at_parse_time_by_name(stage, flag, value, message):
    import importlib

    module = importlib.import_module(stage)
    required = ["--model_name_or_path", "m", "--output_dir", "o"] + (
        [] if stage == "eval" else ["--dataset_mixer_list", "d.jsonl", "1.0"])
    with pytest.raises(SystemExit, match=f"argument {flag}: {re.escape(message)}$"):
        module.parse_args(required + [flag, value])


def test_ipo_with_label_smoothing_is_refused_at_parse_time():
    import dpo

    with pytest.raises(SystemExit, match="--dpo_label_smoothing has no meaning for --dpo_loss_type ipo"):
        dpo.parse_args(["--model_name_or_path", "m", "--output_dir", "o", "--dataset_mixer_list", "d.jsonl", "1",
                        "--dpo_loss_type", "ipo", "--dpo_label_smoothing", "0.1"])


@pytest.mark.parametrize("stage", ["sft", "dpo", "rlvr"])
def test_a_directory_that_is_not_a_model_is_named(tmp_path, stage):
    import importlib

    from conftest import run_in_process

    argv = ["--model_name_or_path", str(tmp_path / "not-a-model"), "--dataset_mixer_list", "d.jsonl", "1",
            "--output_dir", str(tmp_path / "out")]
    os.makedirs(tmp_path / "not-a-model")
    with pytest.raises(SystemExit, match=f"--model_name_or_path {tmp_path / 'not-a-model'}: not a model directory"):
        run_in_process(importlib.import_module(stage).main, argv)
    assert not os.path.exists(tmp_path / "out")  # stopped before the output directory was made


# ---- a mixture of formats

def test_a_parquet_with_large_string_columns_mixes_with_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    turn = pa.struct([("role", pa.large_string()), ("content", pa.large_string())])  # pandas >= 3, polars, pyarrow
    parquet = str(tmp_path / "large.parquet")
    pq.write_table(pa.table({"messages": pa.array([[USER, ANSWER]] * 3, type=pa.large_list(turn)),
                             "id": pa.array(["a", "b", "c"], type=pa.large_string())}), parquet)
    jsonl = write_lines(tmp_path / "d.jsonl", [SFT, SFT])
    rows, report = data_mix.mix_datasets([parquet, "1.0", jsonl, "1.0"], seed=0, validate=data_mix.validate_sft_record)
    assert len(rows) == 5 and sorted(set(rows["source"])) == sorted([parquet, jsonl])
    assert all(row["messages"] == [USER, ANSWER] for row in rows)


def test_datasets_whose_columns_differ_in_shape_are_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = str(tmp_path / "other.parquet")
    pq.write_table(pa.table({"messages": pa.array(["not a list of turns"])}), parquet)
    jsonl = write_lines(tmp_path / "d.jsonl", [SFT])
    with pytest.raises(flags.DataError, match=f"datasets {re.escape(jsonl)} and {re.escape(parquet)} hold column "
                                              "messages in different shapes"):
        data_mix.mix_datasets([jsonl, "1.0", parquet, "1.0"], seed=0)


# ---- model directories

def test_a_model_directory_without_tokenizer_files_is_named(tmp_path, tiny_model_dir):
    import shutil

    import infra

    bare = tmp_path / "weights-only"
    bare.mkdir()
    shutil.copy(os.path.join(tiny_model_dir, "config.json"), bare)
    with pytest.raises(SystemExit, match=f"--model_name_or_path {bare}: no tokenizer files"):
        infra.check_model_path(str(bare))
    infra.check_model_path(str(bare), tokenizer=False)  # a value model's directory needs none


# ---- flags open-instruct users type

def sft_flags(*extra):
    import sft

    return sft.parse_args(["--model_name_or_path", "m", "--output_dir", "o", "--dataset_mixer_list", "d.jsonl", "1",
                           *extra])


def rlvr_flags(*extra):
    import rlvr

    return rlvr.parse_args(["--model_name_or_path", "m", "--output_dir", "o", "--dataset_mixer_list", "d.jsonl", "1",
                            *extra])


@pytest.mark.parametrize("flags, says", [
    (["--use_flash_attn"], "--attn_implementation flash_attention_2"),
    (["--with_tracking"], "metrics go to OUTPUT_DIR/metrics.jsonl"),
    (["--logging_steps", "10"], "metrics go to OUTPUT_DIR/metrics.jsonl"),
    (["--tokenizer_name", "t"], "the tokenizer is read from --model_name_or_path"),
    (["--num_epochs", "2"], "--num_train_epochs"),
    (["--resume_from_checkpoint", "c"], "pass --resume"),
    (["--use_lora"], "no LoRA"),
])
def test_an_open_instruct_flag_without_a_counterpart_says_what_to_do_instead(flags, says):
    with pytest.raises(SystemExit, match=f"argument {flags[0]} is open-instruct's: .*{re.escape(says)}"):
        sft_flags(*flags)


@pytest.mark.parametrize("flags, says", [
    (["--save_freq", "10"], "--checkpointing_steps"),
    (["--max_prompt_token_length", "512"], "--max_seq_length as max_prompt_token_length + response_length"),
    (["--vllm_num_engines", "1"], "no vLLM"),
])
def test_an_open_instruct_rlvr_flag_without_a_counterpart_says_what_to_do_instead(flags, says):
    with pytest.raises(SystemExit, match=f"argument {flags[0]} is open-instruct's: .*{re.escape(says)}"):
        rlvr_flags(*flags)


def test_open_instruct_spellings_of_the_same_flags_are_accepted():
    import dpo

    assert sft_flags("--clip_grad_norm", "-1").max_grad_norm == -1
    assert rlvr_flags("--num_epochs", "4").ppo_epochs == 4
    assert rlvr_flags("--non_stop_penalty_value", "-5").penalty_reward_value == -5
    assert dpo.parse_args(["--model_name_or_path", "m", "--output_dir", "o", "--dataset_mixer_list", "d.jsonl", "1",
                           "--beta", "0.1", "--loss_type", "dpo"]).dpo_beta == 0.1
    assert rlvr_flags("--beta", "0.2").beta == 0.2  # rlvr's own --beta, the KL coefficient


@pytest.mark.parametrize("flags, value", [
    ([], True), (["--non_stop_penalty"], True), (["--non_stop_penalty", "True"], True),
    (["--non_stop_penalty", "False"], False), (["--no-non_stop_penalty"], False), (["--no_non_stop_penalty"], False)])
def test_a_boolean_flag_takes_open_instruct_true_or_false_and_its_negations(flags, value):
    assert rlvr_flags(*flags).non_stop_penalty is value


def test_a_boolean_flag_refuses_a_value_that_is_not_true_or_false():
    with pytest.raises(SystemExit, match="argument --packing.*: 'maybe' is not true or false"):
        sft_flags("--packing", "maybe")


def test_a_flag_prefix_is_not_read_as_a_longer_flag():
    with pytest.raises(SystemExit, match="unknown flag --num_unique_prompts; did you mean --num_unique_prompts_roll"):
        rlvr_flags("--num_unique_prompts", "48")
    with pytest.raises(SystemExit, match="unknown flag --learning_rat; did you mean --learning_rate"):
        sft_flags("--learning_rat", "1e-5")


def test_cosine_is_a_schedule():
    assert sft_flags("--lr_scheduler_type", "cosine").lr_scheduler_type == "cosine"


# ---- the command line: one line on stderr, a non-zero exit, no traceback; once under torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}  # count errors only


def run_stage(*command) -> tuple[int, list[str]]:
    """(exit status, stderr's non-blank lines) of `python <command>` run from the repository."""
    import subprocess
    import sys

    from conftest import plain_python_environment

    with plain_python_environment():
        result = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=600, cwd=ROOT,
                                env={**os.environ, **QUIET})
    return result.returncode, [line for line in result.stderr.splitlines() if line.strip()]


def training_flags(model_dir, data, output_dir):
    return ["--model_name_or_path", str(model_dir), "--dataset_mixer_list", str(data), "1.0", "--output_dir",
            str(output_dir), "--max_seq_length", "64", "--per_device_train_batch_size", "1"]


@pytest.mark.parametrize("case", ["bad jsonl line"] + [pytest.param(case, marks=pytest.mark.full) for case in [
    "open-instruct flag", "flag prefix", "model without tokenizer", "foreign output dir", "odd mixer list",
    "missing dataset", "resume another run", "eval without model"]])
def test_a_user_error_on_the_command_line_is_one_line_and_a_failed_exit(case, tmp_path, tiny_model_dir):
    good = write_lines(tmp_path / "good.jsonl", [SFT] * 4)
    bad = write_lines(tmp_path / "bad.jsonl", [SFT, b"{not json", SFT])
    out = tmp_path / "out"
    if case == "bad jsonl line":
        command, says = ["sft.py", *training_flags(tiny_model_dir, bad, out)], f"dataset {bad}, line 2, column 2"
    elif case == "open-instruct flag":
        command = ["sft.py", *training_flags(tiny_model_dir, good, out), "--use_flash_attn"]
        says = "argument --use_flash_attn is open-instruct's"
    elif case == "flag prefix":
        command = ["rlvr.py", *training_flags(tiny_model_dir, good, out), "--num_unique_prompts", "48"]
        says = "unknown flag --num_unique_prompts"
    elif case == "model without tokenizer":
        bare = tmp_path / "weights-only"
        bare.mkdir()
        for name in ("config.json", "model.safetensors"):
            os.link(os.path.join(tiny_model_dir, name), bare / name)
        command, says = ["dpo.py", *training_flags(bare, good, out)], f"{bare}: no tokenizer files"
    elif case == "foreign output dir":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        command, says = ["sft.py", *training_flags(tiny_model_dir, good, out)], f"{out} holds no run of this script"
    elif case == "odd mixer list":
        command = ["sft.py", *training_flags(tiny_model_dir, good, out)[:-2], "--dataset_mixer_list", str(good)]
        says = "--dataset_mixer_list takes NAME AMOUNT pairs"
    elif case == "missing dataset":
        command = ["sft.py", *training_flags(tiny_model_dir, tmp_path / "nope.jsonl", out)]
        says = f"dataset file not found: {tmp_path / 'nope.jsonl'}"
    elif case == "resume another run":  # a run that stopped on its data leaves its flags in the directory
        assert run_stage("sft.py", *training_flags(tiny_model_dir, bad, out))[0] != 0
        command = ["sft.py", *training_flags(tiny_model_dir, bad, out), "--learning_rate", "1e-5", "--resume"]
        says = f"{out} holds a different run (flags differ: learning_rate)"
    else:
        command = ["eval.py", "--model_name_or_path", str(tmp_path / "no-model"), "--output_dir", str(out)]
        says = f"--model_name_or_path {tmp_path / 'no-model'}: no such directory"
    status, lines = run_stage(*command)
    assert status != 0 and len(lines) == 1 and says in lines[0], lines


@pytest.mark.parametrize("case", [pytest.param("found by every rank before the process group", marks=pytest.mark.full),
                                  "found by rank 0 in the data"])
def test_a_user_error_under_torchrun_is_said_once(case, tmp_path, tiny_model_dir):
    from conftest import free_port

    bad = write_lines(tmp_path / "bad.jsonl", [SFT, b"{not json", SFT])
    flags = training_flags(tiny_model_dir, bad, tmp_path / "out")
    flags, says = ((flags + ["--with_tracking"], "argument --with_tracking is open-instruct's")
                   if case.startswith("found by every rank") else (flags, f"dataset {bad}, line 2, column 2"))
    status, lines = run_stage("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
                              "sft.py", *flags)
    assert status != 0 and sum(says in line for line in lines) == 1, lines
    assert not any(line.startswith("[rank") for line in lines), lines  # no worker's traceback
