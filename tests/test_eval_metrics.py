"""eval.py's scoring (eval_metrics' rules on hand-checked cases, the log-likelihood scorer) and its generation on a
tiny model."""
import json
import math

import pytest
import torch

import decoding
import eval as evaluation
import eval_metrics as metrics
from conftest import build_tiny_model


def test_pass_at_k_is_the_unbiased_estimator():
    assert metrics.pass_at_k(10, 0, 1) == 0.0
    assert metrics.pass_at_k(10, 10, 5) == 1.0
    assert metrics.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert metrics.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert metrics.pass_at_k(4, 3, 2) == 1.0  # any 2 of 4 include a correct one


def test_humaneval_metric_averages_pass_at_k_over_problems():
    records = [{"passed": [True, False, False, False]}, {"passed": [True, True, True, True]}]
    assert evaluation.aggregate("humaneval", records, {"pass_at_k": [1, 2]}) == {
        "pass@1": pytest.approx((0.25 + 1) / 2), "pass@2": pytest.approx((0.5 + 1) / 2)}


def test_ifeval_prompt_and_instruction_level_strict_and_loose():
    records = [{"strict": [True, True], "loose": [True, True]},
               {"strict": [True, False], "loose": [True, True]},
               {"strict": [False, False, False], "loose": [False, True, False]}]
    assert evaluation.aggregate("ifeval", records, {}) == {
        "prompt_level_strict": pytest.approx(1 / 3), "inst_level_strict": pytest.approx(3 / 7),
        "prompt_level_loose": pytest.approx(2 / 3), "inst_level_loose": pytest.approx(5 / 7)}


def test_ifeval_scoring_checks_strict_and_loose():
    example = {"instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]}
    # the loose variants drop the first line, so an upper-case title line only fails strict
    record = evaluation.score_example("ifeval", example, "TITLE\nall lowercase here")
    assert record["strict"] == [False] and record["loose"] == [True]
    # the record names both prompt-level verdicts (loose: the headline; strict: the RL reward), no bare "correct"
    assert record["prompt_level_strict"] is False and record["prompt_level_loose"] is True and "correct" not in record


def test_gsm8k_reads_the_last_number_as_olmes_does():
    gsm = {"short_answer": "18", "answer": "... #### 18"}
    assert evaluation.score_example("gsm8k", gsm, "16 - 3 - 4 = 9, 9 * 2 = 18. So the answer is 18.")["scores"] == {
        "exact_match": True}
    wrong = evaluation.score_example("gsm8k", gsm, "So the answer is 17.")
    assert not wrong["scores"]["exact_match"] and wrong["extracted"] == "17"
    assert metrics.gsm8k_answer("It costs $1,018 in all") == "1018"  # thousands separators go
    assert metrics.gsm8k_answer("So the answer is -18.") == "18"  # OLMES keeps a sign on decimals only
    assert metrics.gsm8k_answer("no number") == "no number"  # the whole text, which then matches nothing
    assert not metrics.gsm8k_correct("So the answer is 18.0", "18")  # compared as strings, not values


def test_math_exact_match_is_minervas_final_answer_and_flex_takes_the_boxed_one_too():
    gold = metrics.math_gold(r"So the answer is $\boxed{\frac{1}{2}}$.")
    assert gold == r"\frac{1}{2}"
    minerva = r"Final Answer: The final answer is $\frac12$. I hope it is correct."
    assert metrics.math_scores(minerva, gold) == {"exact_match": True, "exact_match_flex": True}
    boxed = r"so $x = \boxed{0.5}$"  # no Minerva sentence: only flex finds it (symbolically 1/2)
    assert metrics.math_scores(boxed, gold) == {"exact_match": False, "exact_match_flex": True}
    assert metrics.math_scores(r"$\boxed{2}$", gold) == {"exact_match": False, "exact_match_flex": False}
    assert metrics.normalize_final_answer(r"\infty") == r"\iny"  # Minerva's plain replacement of units, kept
    record = evaluation.score_example("math", {"solution": r"$\boxed{3}$", "type": "Algebra"}, "$\boxed{3}$")
    assert record["gold"] == "3" and record["subject"] == "Algebra"


def test_bbh_extraction_reads_every_exemplar_target_as_its_own_gold():
    for subtask, entry in evaluation.exemplar_file("bbh")["subtasks"].items():
        for exemplar in entry["exemplars"]:
            gold = metrics.bbh_gold(exemplar["target"])
            answer = metrics.bbh_answer(subtask, exemplar["target"])
            assert metrics.bbh_correct(subtask, answer, gold), (subtask, answer, gold)
    assert len(evaluation.exemplar_file("bbh")["subtasks"]) == 27


def test_bbh_extraction_cues_and_delimiters():
    assert metrics.bbh_answer("date_understanding", "(A) looks odd. So the answer is (C).") == "(C)"
    assert metrics.bbh_answer("date_understanding", "the answer is **(B)**") == "(B)"
    assert metrics.bbh_answer("date_understanding", "I pick B") == ""  # a bare letter is not read (see BBH_CUES)
    assert metrics.bbh_answer("boolean_expressions", "so the answer is true") == "true"
    assert metrics.bbh_correct("boolean_expressions", "true", "True")  # case is ignored ...
    assert metrics.bbh_answer("dyck_languages", "So the answer is ] ) }.") == "] ) }"
    assert not metrics.bbh_correct("dyck_languages", "] ) }", "]) }")  # ... punctuation only outside dyck
    assert metrics.bbh_answer("object_counting", "no idea") == ""


def test_drop_f1_follows_the_official_definition_on_hand_checked_cases():
    assert metrics.drop_scores("The Eagles", [["Eagles"]]) == {"exact_match": 1.0, "f1": 1.0}  # articles go
    assert metrics.drop_scores("3 touchdowns", [["3"]]) == {"exact_match": 0.0, "f1": 0.67}  # P 1/2, R 1
    assert metrics.drop_scores("4 touchdowns", [["3"]])["f1"] == 0.0  # a gold number must be matched
    assert metrics.drop_scores("Smith", [["Smith", "Jones"]]) == {"exact_match": 0.0, "f1": 0.5}  # 1 of 2 spans
    assert metrics.drop_scores("2", [["two"], ["2.0"]]) == {"exact_match": 1.0, "f1": 1.0}  # best gold; 2 == 2.0
    assert metrics.drop_scores("well-known", [["well known"]])["exact_match"] == 1.0  # hyphens split tokens
    assert metrics.drop_scores("x", [[""]]) == {"exact_match": 0.0, "f1": 0.0}  # a blank gold is skipped
    example = {"answer": {"number": "", "date": {"day": "", "month": "", "year": ""}, "spans": ["Smith", "Jones"]},
               "validated_answers": {"number": ["2", ""], "date": [{"day": "", "month": "", "year": ""}] * 2,
                                     "spans": [[], ["Smith", "Jones"]]}}
    assert metrics.drop_answers(example) == [("Smith", "Jones"), ("2",)]  # numbers first, duplicates dropped


def test_truthfulqa_mc1_and_mc2_on_hand_checked_cases():
    logprobs = [math.log(0.5), math.log(0.25), math.log(0.125), math.log(0.125)]
    scores = metrics.truthfulqa_scores(logprobs, [1, 0, 1, 0], mc1_indices=[0, 1], mc2_indices=[0, 1, 2, 3])
    assert scores["mc1"] == 1.0 and scores["mc2"] == pytest.approx((0.5 + 0.125) / 1.0)
    scores = metrics.truthfulqa_scores(logprobs, [0, 1, 1, 0], mc1_indices=[0, 1], mc2_indices=[1, 2])
    assert scores["mc1"] == 0.0 and scores["mc2"] == 1.0  # only true answers among mc2's: all of the mass
    example = {"question": "q", "mc1_targets": {"choices": ["yes", "no"], "labels": [1, 0]},
               "mc2_targets": {"choices": ["yes", "maybe", "no"], "labels": [1, 1, 0]}}
    assert metrics.truthfulqa_targets(example) == {"choices": ["yes", "no", "maybe"], "labels": [1, 0, 1],
                                                      "mc1": [0, 1], "mc2": [0, 2, 1]}


def test_popqa_accepts_any_alias_as_given_lower_cased_or_capitalized():
    assert metrics.popqa_correct(" She was a Mathematician.", ["mathematician"])
    assert metrics.popqa_correct(" warsaw", ["Warsaw"])
    assert not metrics.popqa_correct(" WARSAW", ["Warsaw"])
    record = evaluation.score_example("popqa", {"possible_answers": json.dumps(["Paris"])}, " paris")
    assert record["scores"] == {"exact_match": True} and record["gold"] == ["Paris"]


def test_math_and_mmlu_headline_is_the_macro_average_over_subjects():
    records = [{"subject": "Algebra", "scores": {"exact_match": True, "exact_match_flex": True}}] * 3 + [
        {"subject": "Geometry", "scores": {"exact_match": False, "exact_match_flex": True}}]
    assert evaluation.aggregate("math", records, {"metric": "exact_match"}) == {
        "exact_match": 0.5, "exact_match_flex": 1.0, "exact_match_micro": 0.75, "exact_match_flex_micro": 1.0}
    assert evaluation.subject_scores(records, "exact_match") == {"Algebra": 1.0, "Geometry": 0.0}
    assert evaluation.aggregate("math500", records, {"metric": "exact_match"})["exact_match"] == 0.75  # micro
    assert evaluation.aggregate("bbh", records, {"metric": "exact_match"})["exact_match"] == 0.75  # micro


class Args:
    per_device_eval_batch_size = 4


def generate(model, tokenizer, prompts, max_new_tokens, stop, temperature=0.0, top_p=1.0, generator=None):
    """eval's generation call, as a task with these settings makes it."""
    settings = {"max_new_tokens": max_new_tokens, "stop": stop, "temperature": temperature, "top_p": top_p}
    return evaluation.complete_prompts(model, tokenizer, prompts, settings, Args, generator)


def greedy_reference(model, prompt: list[int], steps: int) -> list[int]:
    ids = torch.tensor([prompt])
    for _ in range(steps):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


def test_batched_left_padded_generation_matches_one_prompt_at_a_time(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer).eval()
    model.generation_config.eos_token_id = None
    prompts = [tiny_tokenizer(t)["input_ids"] for t in ("hello", "What is 12 plus 30? The answer", "the quick")]
    texts = generate(model, tiny_tokenizer, prompts, 6, [])
    for prompt, text in zip(prompts, texts):
        with torch.no_grad():
            expected = greedy_reference(model, prompt, 6)
        if tiny_tokenizer.eos_token_id in expected:
            expected = expected[:expected.index(tiny_tokenizer.eos_token_id)]
        assert text == tiny_tokenizer.decode(expected, skip_special_tokens=True)


def test_rows_that_finish_early_leave_the_batch_without_changing_the_others(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer).eval()
    prompts = [tiny_tokenizer(t)["input_ids"] for t in ("hello", "What is 12 plus 30? The answer", "the quick")]
    with torch.no_grad():
        references = [greedy_reference(model, p, 8) for p in prompts]
    # make a token that one row produces at step 3 an end-of-sequence token, so rows end at different steps
    stop_id = references[0][2]
    model.generation_config.eos_token_id = stop_id
    expected = [ref[:ref.index(stop_id)] if stop_id in ref else ref for ref in references]
    assert len({len(e) for e in expected}) > 1 and max(len(e) for e in expected) == 8  # the premise
    texts = generate(model, tiny_tokenizer, prompts, 8, [])
    assert texts == [tiny_tokenizer.decode(e, skip_special_tokens=True) for e in expected]


def test_generation_stops_at_stop_strings(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer).eval()
    prompt = [tiny_tokenizer("hello")["input_ids"]]
    full = generate(model, tiny_tokenizer, prompt, 12, [])[0]
    stop = full[len(full) // 2:][:2]
    assert stop and generate(model, tiny_tokenizer, prompt, 12, [stop])[0] == full.split(stop)[0]


def naive_logprob(model, context_ids, continuation_ids) -> float:
    """The continuation's summed log-probability from one plain forward over the whole sequence."""
    ids = torch.tensor([context_ids + continuation_ids])
    logprobs = model(ids).logits[0, :-1].float().log_softmax(-1)
    return sum(logprobs[len(context_ids) - 1 + j, token].item() for j, token in enumerate(continuation_ids))


def test_continuation_log_likelihood_is_the_sum_over_its_tokens_after_the_prompt(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer, seed=3).eval()
    context = "<|im_start|>user\nWhat is 12 plus 30?<|im_end|>\n<|im_start|>assistant\n"
    choices = ["42", "The answer is 42.", "a"]  # one and several tokens: the cached prompt serves them all
    got = evaluation.continuation_logprobs(model, tiny_tokenizer, context, choices)
    with torch.no_grad():
        expected = [naive_logprob(model, *evaluation.split_tokens(tiny_tokenizer, context, c)) for c in choices]
    assert got == pytest.approx(expected, abs=1e-4)


def test_the_prompts_trailing_whitespace_is_scored_with_the_continuation(tiny_tokenizer):
    context_ids, scored = evaluation.split_tokens(tiny_tokenizer, "Answer:\n", "A")
    assert tiny_tokenizer.decode(context_ids) == "Answer:" and tiny_tokenizer.decode(scored) == "\nA"


def test_mmlu_picks_the_likeliest_letter(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer).eval()
    letter_c = tiny_tokenizer("C", add_special_tokens=False)["input_ids"][0]
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.zero_()
        head.bias[letter_c] = 5.0
    model.lm_head = head
    example = {"question": "q", "subject": "s", "choices": ["1", "2", "3", "4"], "answer": 2}
    logprobs = evaluation.continuation_logprobs(model, tiny_tokenizer, "What is 12 plus 30? Answer:",
                                                evaluation.continuations("mmlu_mc", example))
    record = evaluation.score_choices("mmlu_mc", example, logprobs)
    assert record["extracted"] == "C" and record["scores"] == {"accuracy": True}


def test_a_shared_few_shot_prefix_is_encoded_once_with_the_same_result(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer).eval()
    model.generation_config.eos_token_id = None
    exemplars = tiny_tokenizer("The quick brown fox jumps over the lazy dog. " * 4)["input_ids"]
    assert len(exemplars) > decoding.MIN_SHARED_PREFIX
    prompts = [exemplars + tiny_tokenizer(t)["input_ids"] for t in ("hello", "What is 12 plus 30?")]
    assert decoding.shared_prefix_length(prompts) >= len(exemplars)
    texts = generate(model, tiny_tokenizer, prompts, 5, [])
    with torch.no_grad():  # plain full forwards, no cache at all
        expected = [tiny_tokenizer.decode(greedy_reference(model, p, 5), skip_special_tokens=True) for p in prompts]
    assert texts == expected


def test_a_task_without_a_scorer_is_an_error():
    with pytest.raises(ValueError, match="no scorer for task 'nope'"):
        evaluation.score_example("nope", {"question": "q"}, "an answer")


def test_sampled_generation_draws_each_token_with_the_shared_sampler(tiny_tokenizer, monkeypatch):
    model = build_tiny_model(tiny_tokenizer).eval()
    model.generation_config.eos_token_id = None
    calls, real = [], decoding.sample
    monkeypatch.setattr(decoding, "sample", lambda logits, t, p, u: calls.append((len(logits), t, p)) or
                        real(logits, t, p, u))
    prompts = [tiny_tokenizer(t)["input_ids"] for t in ("hello", "the quick")]
    generate(model, tiny_tokenizer, prompts, 3, [], temperature=0.8, top_p=0.95,
             generator=torch.Generator().manual_seed(0))
    assert calls == [(2, 0.8, 0.95)] * 3  # one draw per step for the whole batch, with the task's T and top-p
