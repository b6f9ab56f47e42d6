"""Verifiable rewards and benchmark metrics for GSM8K, MATH and IFEval.

RLVR's reward and eval.py's metrics both come from here:

    verify(response, ground_truth, dataset)        -> 1.0 / 0.0 (gsm8k, math); fraction of
                                                      instructions followed, strict (ifeval)
    ifeval_check(response, ids, kwargs_list, loose) -> one bool per instruction
    extract_answer(response, dataset)              -> the answer string that was compared (logs)
    last_boxed(text)                               -> contents of the last \\boxed{...} / \\fbox{...}

Every dataset first drops a leading thinking section (everything up to the last `</think>`) and
`<answer>` tags, so a reasoning model is judged on its answer only.

Time bounds. Responses come from a model under training, so they can be hostile: megabytes of
text, thousands of nested braces, 9^{9^{9^9}}, LaTeX that sends sympy into a hang. All string work
here is linear (no regex that can backtrack over its input, long inputs bounded before the
quadratic-prone steps). The symbolic MATH comparison (math-verify + sympy) runs in a long-lived
helper subprocess, one per calling process and shared by its threads under a lock; if an answer
takes longer than `timeout_s` (1 s by default) the helper is killed, restarted in the background,
and the string comparison's verdict stands. This works from the main thread, worker threads and
worker processes alike, unlike math-verify's own SIGALRM timeouts.

Deviations from the references, all documented where they live:
- IFEval sentences: NLTK's punkt data is not available offline, so `count_sentences` is a small
  rule-based splitter (abbreviations, initials, decimals, ellipses), close to but not punkt.
- IFEval capital words: `treebank_words` approximates NLTK's word_tokenize.
- MATH: the whole output is tried as the last-resort candidate only when it is <= 1,000 chars.
"""
import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from decimal import Decimal, InvalidOperation
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
    try:  # Decimal, not float: exact for long integers, and "5.0" == "5"
        return Decimal(predicted) == Decimal(gold)
    except InvalidOperation:
        return predicted == gold


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
_MINERVA_REMOVED = ["square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units",
                    "\\ldots", "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm",
                    "pounds", "meters", "meals", "edges", "students", "childrentickets", "multiples",
                    "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}",
                    "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"', "\\dots"]
# `[^{}]*` instead of the reference's `.*?`: the same on well-formed input, and linear.
_UNWRAP = re.compile(r"\\(?:text|textbf|overline)\{([^{}]*)\}")


def _minerva_normalize(answer: str) -> str:
    answer = answer.split("=")[-1]
    for before, after in _MINERVA_SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for removed in _MINERVA_REMOVED:
        answer = answer.replace(removed, "")
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
    if any(normalize_math_answer(c) == normalized_gold for c in candidates):
        return True
    symbolic = tuple(c for c in candidates if len(c) <= MAX_SYMBOLIC_CHARS)
    if not symbolic or len(gold) > MAX_SYMBOLIC_CHARS:
        return False
    return _symbolically_equal(gold, symbolic, timeout_s)


# ------------------------------------------------------------------------------------------------
# Symbolic equivalence in a helper process that can be killed when sympy hangs.

class _SymbolicHelper:
    """`python verifiers.py --symbolic-server` children speaking JSON lines over pipes.

    After the first timeout a warm spare is kept, so that the call after a hostile answer does not
    wait for a new child to import sympy (seconds on a loaded machine)."""

    STARTUP_TIMEOUT_S = 120.0  # importing sympy on a loaded machine; not part of any answer's budget

    def __init__(self):
        self.lock = threading.Lock()
        self.process = None  # the child answering requests
        self.spare = None  # a child started in the background after a kill
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


@lru_cache(maxsize=65536)
def _cached_equivalence(gold: str, candidates: tuple, timeout_s: float) -> int | None:
    return _helper.first_equivalent(gold, candidates, timeout_s)


def _symbolically_equal(gold: str, candidates: tuple, timeout_s: float) -> bool:
    index = _cached_equivalence(gold, candidates, timeout_s)
    if index is None:
        _cached_equivalence.cache_clear()  # a timeout under load must not stick as the answer
        return False
    return index >= 0


def _symbolic_server():
    """The helper's loop: read {"gold", "candidates", "budget_s"} lines, answer the index of the
    first equivalent candidate, -1 if none, -2 if the budget ran out."""
    import logging
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
    for gold, candidate in [("\\frac{1}{2}", "0.5"), ("(1, \\pi)", "[1, 2)"), ("x^2", "\\sqrt{x}")]:
        equal(gold, candidate)  # warm math-verify's lazy initialization before the first timed answer
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        request = json.loads(line)
        signal.setitimer(signal.ITIMER_REAL, request["budget_s"])
        try:
            index = next((i for i, c in enumerate(request["candidates"]) if equal(request["gold"], c)), -1)
        except OutOfTime:
            index = -2
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        sys.stdout.write(f"{index}\n")
        sys.stdout.flush()


if __name__ == "__main__" and sys.argv[1:] == ["--symbolic-server"]:
    _symbolic_server()
