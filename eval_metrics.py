"""How OLMES scores each task of the Tülu 3 dev suite: pure functions of a model's output and the gold answer.

eval.py renders the prompts and runs the model; everything here is a plain function of strings and numbers,
so each rule can be read and tested alone. Each follows the OLMES code that computed the Tülu 3 model card
(allenai/olmes@e2d8670d5b25, and lm-evaluation-harness 0.4.3, which OLMES pins, for MATH):

    gsm8k_answer, exact_match         GSM8K: the last number, compared as Hugging Face evaluate's exact match
    minerva_answer, math_flex_answers  MATH: Minerva's "Final Answer" (exact_match) and OLMES's flex candidates,
    math_equal, hendrycks_equal        compared symbolically or after Hendrycks' normalization
    bbh_answer, bbh_correct            BBH: the per-task answer pattern, tried after "So the answer is", ...
    drop_answers, drop_scores          DROP: the gold answers; the official exact match and bag-of-words F1
    truthfulqa_targets, ..._scores     TruthfulQA: the merged choices; mc1 and mc2 from their log-likelihoods
    popqa_correct                      PopQA: a gold alias inside the output
    mmlu_cot_answer                    MMLU CoT: OLMES's answer patterns in order
    pass_at_k                          HumanEval(+): the unbiased estimator

One deviation, in math_equal: OLMES compares MATH answers with sympy's `parse_latex` and `simplify`, which
need the ANTLR 4.11 runtime; math-verify (which the RLVR verifier already uses) needs 4.13, so the symbolic
step here is verifiers' math-verify comparison in its killable helper process. Answers that normalize to
the same string count as equal without it (OLMES's parse would agree on every answer it can parse).
"""
import itertools
import math
import re
import string

import verifiers

# ---------------------------------------------------------------------------------------------
# Exact match as Hugging Face evaluate computes it (OLMES's ExactMatch metric calls it)

def exact_match(prediction: str, reference: str, ignore: tuple = (), ignore_case: bool = False,
                ignore_punctuation: bool = False) -> bool:
    """Equal after deleting each `ignore` pattern from both, then lower-casing and dropping punctuation if asked."""
    for pattern in ignore:
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    if ignore_punctuation:
        drop = str.maketrans("", "", string.punctuation)
        prediction, reference = prediction.translate(drop), reference.translate(drop)
    return prediction == reference


# ---------------------------------------------------------------------------------------------
# GSM8K (oe_eval/tasks/oe_eval_tasks/gsm8k.py)

GSM8K_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")  # gsm8k's metric_kwargs regexes_to_ignore


def gsm8k_answer(response: str) -> str:
    """The last number once commas between digits are gone; the whole response if it has none. The sign is
    kept only on decimals: `[-+]?` belongs to the first alternative (OLMES's pattern, so "-5" reads "5")."""
    numbers = re.findall(r"[-+]?\d*\.\d+|\d+", re.sub(r"(\d),(\d)", r"\1\2", response))
    return numbers[-1] if numbers else response


def gsm8k_correct(response: str, short_answer: str) -> bool:
    return exact_match(gsm8k_answer(response), gsm8k_answer(short_answer), GSM8K_IGNORE, ignore_case=True)


# ---------------------------------------------------------------------------------------------
# MATH (oe_eval/tasks/oe_eval_tasks/minerva_math.py with lm-eval 0.4.3's minerva_math and hendrycks_math utils)

def last_boxed(text: str) -> str | None:
    """The last `\\boxed{...}` (or `\\fbox{...}`) with its braces matched, or `\\boxed ` and what follows up to
    a `$`; None if there is none or it never closes."""
    if "\\boxed " in text:
        return "\\boxed " + text.split("\\boxed ")[-1].split("$")[0]
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if text[i] == "}" and depth == 0:
            return text[start:i + 1]
    return None


def unbox(boxed: str) -> str | None:
    """The inside of `\\boxed{...}` / after `\\boxed `; None for anything else (an `\\fbox`)."""
    if boxed.startswith("\\boxed "):
        return boxed[len("\\boxed "):]
    if boxed.startswith("\\boxed{") and boxed.endswith("}"):
        return boxed[len("\\boxed{"):-1]
    return None


def math_gold(solution: str) -> str:
    """The gold answer OLMES compares against: the solution's last boxed answer, normalized."""
    return normalize_final_answer(unbox(last_boxed(solution)))


MINERVA_SUBSTITUTIONS = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""),
                         ("mbox", "text"), (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}")]
# removed in this order by plain replacement, as Minerva does (so "\infty" loses its "ft")
MINERVA_REMOVED = ["square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots",
                   "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters",
                   "meals", "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}",
                   "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ",
                   "^{\\circ}", "\\;", ",\\!", "{,}", '"', "\\dots"]


def normalize_final_answer(answer: str) -> str:
    """Minerva's normalization (Lewkowycz et al. 2022, appendix D), as lm-eval 0.4.3 has it."""
    answer = answer.split("=")[-1]
    for before, after in MINERVA_SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for removed in MINERVA_REMOVED:
        answer = answer.replace(removed, "")
    # Minerva's re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\3$") keeps, on each line with two `$`, what the first two
    # enclose ('.' stops at newlines); written per line, as that regex is quadratic on a long line without them
    lines = answer.split("\n")
    for i, line in enumerate(lines):
        first = line.find("$")
        second = line.find("$", first + 1) if first >= 0 else -1
        if second >= 0:
            lines[i] = "$" + line[first + 1:second] + "$"
    answer = "\n".join(lines)
    for command in ("text", "textbf", "overline"):
        answer = re.sub(r"(\\" + command + r"\{)(.*?)(\})", r"\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", r"\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", r"frac{\2}{\3}", answer)  # \frac12 -> \frac{1}{2}
    answer = re.sub(r"(sqrt)([^{])", r"sqrt{\2}", answer)  # \sqrt2 -> \sqrt{2}
    answer = answer.replace("$", "")
    return answer.replace(",", "") if answer.replace(",", "").isdigit() else answer


INVALID_ANSWER = "[invalidanswer]"
MATH_TIMEOUT_S = 5.0  # lm-eval's is_equiv gives sympy 5 s, then counts the answer wrong


def minerva_answer(response: str) -> str:
    """X in "Final Answer: The final answer is X. I hope it is correct." (the suffix may be missing), normalized;
    "[invalidanswer]" without that sentence."""
    match = re.search(r"Final Answer: The final answer is(.*?). I hope it is correct.",
                      response + "I hope it is correct.")
    return normalize_final_answer(match.group(1).strip()) if match else INVALID_ANSWER


def math_flex_answers(response: str) -> list[str]:
    """OLMES's flex candidates, normalized: Minerva's answer and the last boxed one; failing both, what the
    last two `$` enclose; failing that, the whole response."""
    candidates = [answer for answer in (minerva_answer(response),) if answer != INVALID_ANSWER]
    boxed = last_boxed(response)
    if boxed is not None and unbox(boxed) is not None:
        candidates.append(normalize_final_answer(unbox(boxed)))
    dollars = [i for i, char in enumerate(response) if char == "$"]
    if not candidates and len(dollars) > 1:
        candidates.append(normalize_final_answer(response[dollars[-2] + 1:dollars[-1]]))
    return candidates or [normalize_final_answer(response)]


def math_equal(answer: str, gold: str) -> bool:
    """Minerva's equivalence of two normalized answers (see the module docstring for the symbolic step)."""
    if answer == INVALID_ANSWER:
        return False
    return answer == gold or verifiers.latex_equivalent(gold, [answer], timeout_s=MATH_TIMEOUT_S)


def hendrycks_equal(answer: str, gold: str) -> bool:
    """Hendrycks et al.'s is_equiv: equal after strip_string; where strip_string fails, equal as given."""
    try:
        return _hendrycks_strip(answer) == _hendrycks_strip(gold)
    except (ValueError, IndexError):
        return answer == gold


def _hendrycks_strip(text: str) -> str:
    for before, after in [("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                          ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")]:
        text = text.replace(before, after)
    if "\\text{ " in text:  # units on the right
        pieces = text.split("\\text{ ")
        if len(pieces) != 2:
            raise ValueError("more than one unit")
        text = pieces[0]
    text = text.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not text:
        return text
    if text[0] == ".":
        text = "0" + text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "k = 5" -> " 5"
        text = sides[1]
    if "\\sqrt" in text:  # \sqrt3 -> \sqrt{3}
        pieces = text.split("\\sqrt")
        text = pieces[0] + "".join("\\sqrt" + (p if p[0] == "{" else "{" + p[0] + "}" + p[1:]) for p in pieces[1:])
    text = _hendrycks_fix_fracs(text.replace(" ", ""))
    if text == "0.5":
        text = "\\frac{1}{2}"
    if len(text.split("/")) == 2:  # a/b of two integers -> \frac{a}{b}; anything else fails (int() raises)
        a, b = (int(side) for side in text.split("/"))
        if text == f"{a}/{b}":
            text = "\\frac{" + str(a) + "}{" + str(b) + "}"
    return text


def _hendrycks_fix_fracs(text: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{2} -> \\frac{1}{2}; unchanged if a \\frac has fewer than 2 characters."""
    pieces = text.split("\\frac")
    fixed = pieces[0]
    for piece in pieces[1:]:
        fixed += "\\frac"
        if piece[0] == "{":
            fixed += piece
        elif len(piece) < 2:
            return text
        elif piece[1] != "{":
            fixed += "{" + piece[0] + "}{" + piece[1] + "}" + piece[2:]
        else:
            fixed += "{" + piece[0] + "}" + piece[1:]
    return fixed


def math_scores(response: str, gold: str) -> dict:
    """exact_match: Minerva's answer is equivalent to the gold; exact_match_flex: so is any flex candidate,
    symbolically or after Hendrycks' normalization."""
    exact = math_equal(minerva_answer(response), gold)
    flex = exact or any(hendrycks_equal(answer, gold) or math_equal(answer, gold)
                        for answer in math_flex_answers(response))
    return {"exact_match": exact, "exact_match_flex": flex}


# ---------------------------------------------------------------------------------------------
# BBH (oe_eval/tasks/oe_eval_tasks/bbh.py, _extract_answer_regex, the answer_regex of bbh:cot-v1::tulu)

MULTIPLE_CHOICE = r"\([A-Z]\)"
BBH_ANSWER = {
    "boolean_expressions": "[tT]rue|[fF]alse", "causal_judgement": "[yY]es|[nN]o",
    "dyck_languages": "[\\]\\)\\}\\> ]+", "formal_fallacies": "[iI]nvalid|[vV]alid",
    "multistep_arithmetic_two": "-?\\d+", "navigate": "[nN]o|[yY]es", "object_counting": "\\d+",
    "sports_understanding": "[yY]es|[nN]o", "web_of_lies": "[yY]es|[nN]o", "word_sorting": "[a-z ]+",
}  # every other subtask is multiple choice: "(A)" .. "(R)"
BBH_CUES = ["(?i)So the answer is ({})\\.?", "(?i)answer is ({})", "(?i)answer:.*?({})", "(?i)answer\\b.*?({})",
            "({})", "(?i)({})"]
# OLMES also lists "\b([A-Z])\b" for multiple choice, but in a plain string, where \b is a backspace
# character: it never matches model text, so it is left out.
BBH_DELIMITERS = [("$", "$"), ("\\(", "\\)"), ("(", ")"), ("**", "**"), ("***", "***"), ("\\[", "\\]"),
                  ("'", "'"), ("`", "`"), ('"', '"')]


def bbh_answer(subtask: str, response: str) -> str:
    """The last match of the first cue that matches, its delimiters stripped; a lone letter gets its
    parentheses back to read like the gold "(A)". Empty if nothing matches."""
    pattern = BBH_ANSWER.get(subtask, MULTIPLE_CHOICE)
    answer = ""
    for cue in BBH_CUES:
        found = re.findall(cue.format(pattern), response)
        if found:
            answer = found[-1]
            break
    for left, right in BBH_DELIMITERS:
        if not re.match(pattern, left):  # dyck_languages' answers are delimiters
            answer = re.sub(f"^{re.escape(left)}(.*){re.escape(right)}$", r"\1", answer).strip()
    if pattern == MULTIPLE_CHOICE and len(answer) == 1:
        answer = f"({answer})"
    return answer


def bbh_gold(target: str) -> str:
    """A target's answer: what follows "answer is " up to the final character (an exemplar's worked target
    ends "So the answer is (A)."), or the whole target (a test row's is the bare answer)."""
    match = re.search("(?<=answer is )(.*)(?=.)", target)
    return match[0] if match else target


def bbh_correct(subtask: str, answer: str, gold: str) -> bool:
    return exact_match(answer, gold, ignore_case=True, ignore_punctuation=subtask != "dyck_languages")


# ---------------------------------------------------------------------------------------------
# DROP (oe_eval/tasks/oe_eval_tasks/drop.py lines 95-134 for the golds; oe_eval/dependencies/drop/process_results.py,
# the official DROP evaluation of allennlp-reading-comprehension, for the scores)

def drop_answers(example: dict) -> list[tuple[str, ...]]:
    """The distinct gold answers, `answer` first, then the validated ones: each the number, else the spans, else
    the date as "day month year"."""
    def parse(answer):
        if answer["number"] != "":
            return (str(answer["number"]),)
        if answer["spans"]:
            return tuple(answer["spans"])
        return (" ".join([answer["date"]["day"], answer["date"]["month"], answer["date"]["year"]]).strip(),)
    validated = example["validated_answers"]
    others = [{key: validated[key][i] for key in ("number", "date", "spans")} for i in range(len(validated["number"]))]
    return list(dict.fromkeys(parse(answer) for answer in [example["answer"], *others]))


def drop_scores(prediction: str, golds: list[list[str]]) -> dict:
    """Exact match and F1 of one predicted answer string against each gold answer (a list of spans), the best
    over the golds. Blank golds are skipped."""
    scores = [_drop_match([prediction], gold) for gold in golds if gold[0].strip()]
    return {"exact_match": max((em for em, _ in scores), default=0.0), "f1": max((f1 for _, f1 in scores), default=0.0)}


def _drop_match(predicted: list[str], gold: list[str]) -> tuple[float, float]:
    (predicted_spans, predicted_bags), (gold_spans, gold_bags) = _drop_bags(predicted), _drop_bags(gold)
    exact = float(set(predicted_spans) == set(gold_spans) and len(predicted_spans) == len(gold_spans))
    # F1 per gold span under the best one-to-one pairing of predicted and gold spans (the reference solves it
    # with scipy's linear_sum_assignment; answers have a few spans, so trying every pairing is as exact)
    scores = [[_drop_f1(p, g) if _numbers_agree(g, p) else 0.0 for p in predicted_bags] for g in gold_bags]
    if len(gold_bags) <= len(predicted_bags):
        pairings = [list(zip(range(len(gold_bags)), chosen))
                    for chosen in itertools.permutations(range(len(predicted_bags)), len(gold_bags))]
    else:
        pairings = [list(zip(chosen, range(len(predicted_bags))))
                    for chosen in itertools.permutations(range(len(gold_bags)), len(predicted_bags))]
    best = max(pairings, key=lambda pairing: sum(scores[g][p] for g, p in pairing))
    per_gold = [0.0] * max(len(gold_bags), len(predicted_bags))  # extra predicted spans count as misses
    for g, p in best:
        per_gold[g] = scores[g][p]
    return exact, round(sum(per_gold) / len(per_gold), 2)


def _drop_bags(spans: list[str]) -> tuple[list[str], list[set]]:
    normalized = [_drop_normalize(span) for span in spans]
    return normalized, [set(span.split()) for span in normalized]


def _drop_f1(predicted: set, gold: set) -> float:
    overlap = len(gold & predicted)
    precision = overlap / len(predicted) if predicted else 1.0
    recall = overlap / len(gold) if gold else 1.0
    return 0.0 if precision == recall == 0.0 else 2 * precision * recall / (precision + recall)


def _numbers_agree(gold: set, predicted: set) -> bool:
    """A gold bag with numbers matches only a prediction that shares one of them."""
    gold_numbers = {word for word in gold if _is_number(word)}
    return not gold_numbers or bool(gold_numbers & {word for word in predicted if _is_number(word)})


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _drop_normalize(answer: str) -> str:
    """Per token (split at spaces and hyphens): lower-case, punctuation removed unless a number, numbers as
    floats ("2" -> "2.0"), articles removed, whitespace collapsed."""
    tokens = []
    for token in re.split(" |-", answer):
        token = token.lower()
        if not _is_number(token):
            token = "".join(char for char in token if char not in string.punctuation)
        if _is_number(token):
            token = str(float(token))
        tokens.append(" ".join(re.sub(r"\b(a|an|the)\b", " ", token).split()))
    return " ".join(token for token in tokens if token.strip()).strip()


# ---------------------------------------------------------------------------------------------
# TruthfulQA (truthfulqa.py lines 74-98 for the choices, oe_eval/metrics/metric.py MC1MC2Accuracy for the scores)
# and PopQA (oe_eval/tasks/oe_eval_tasks/popqa.py)

def truthfulqa_targets(example: dict) -> dict:
    """mc1's choices (one true, first), then mc2's that mc1 lacks: their labels, and which belong to mc1 / mc2.
    OLMES's exemplars come with `choices` and `labels` already."""
    if "choices" in example:
        return {"choices": example["choices"], "labels": example["labels"]}
    choices, labels = list(example["mc1_targets"]["choices"]), list(example["mc1_targets"]["labels"])
    mc2 = []
    for choice, label in zip(example["mc2_targets"]["choices"], example["mc2_targets"]["labels"]):
        if choice not in choices:
            choices.append(choice)
            labels.append(label)
        elif labels[choices.index(choice)] != label:
            raise ValueError(f"truthfulqa: {example['question']!r} labels {choice!r} differently in mc1 and mc2")
        mc2.append(choices.index(choice))
    mc1 = list(range(len(example["mc1_targets"]["choices"])))
    return {"choices": choices, "labels": labels, "mc1": mc1, "mc2": mc2}


def truthfulqa_scores(logprobs: list[float], labels: list[int], mc1_indices: list[int],
                      mc2_indices: list[int]) -> dict:
    """mc1: whether the likeliest of the mc1 choices (exactly one true) is true; mc2: the probability mass of the
    true mc2 choices, normalized over all mc2 choices (Lin et al. 2021). `logprobs` are each choice's summed
    log-probability after the question."""
    best = max(mc1_indices, key=lambda i: logprobs[i])  # the first of equal ones, as OLMES's strict >
    true_mass = sum(math.exp(logprobs[i]) for i in mc2_indices if labels[i])
    false_mass = sum(math.exp(logprobs[i]) for i in mc2_indices if not labels[i])
    return {"mc1": float(labels[best]), "mc2": true_mass / (true_mass + false_mass)}


def popqa_correct(response: str, aliases: list[str]) -> bool:
    """Some gold alias, as given, lower-cased or capitalized, appears in the response."""
    return any(alias in response or alias.lower() in response or alias.capitalize() in response for alias in aliases)


# ---------------------------------------------------------------------------------------------
# MMLU CoT (oe_eval/tasks/oe_eval_tasks/mmlu.py, GenericMMLU_OneTurnCoT._extract_answer) and HumanEval's pass@k

# mmlu:cot::summarize sets no answer regex, so OLMES takes the first match of these, in this order. Each is
# linear in the response but the last (bounded: 512 tokens).
MMLU_COT_ANSWER = [re.compile(p) for p in (r"(?i)therefore,?\s*the\s*answer\s*is:?\s*\(?([A-D])\b",
                                           r"(?i)answer\s*is:?\s*\(?([A-D])\b", r"(?i)([A-D])\)?\s+is\s+correct",
                                           r"\(([A-D])\)", r".*\b([A-D])\b")]


def mmlu_cot_answer(response: str) -> str | None:
    for pattern in MMLU_COT_ANSWER:
        match = pattern.search(response)
        if match:
            return match.group(1).upper()
    return None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k),
    computed as a product so large n does not overflow."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
