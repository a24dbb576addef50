r"""Answer extraction and grading shared by the evaluators and the testbed.

Grading follows ``reference/landscape.md`` §4.4 (Decision for trl_opd):

1. Only the text after the last ``</think>`` is scored (the whole text when there is none).
2. The answer is the content of the last ``\boxed{...}`` (nested braces kept).
3. A fast path compares the normalised boxed answer with the normalised gold answer: equal strings (numbers
   written canonically) are correct, two different integers are wrong. Anything else goes to Math-Verify.
4. Math-Verify (``parse`` / ``verify``, gold first) runs with its signal-based timeouts switched off, in worker
   *subprocesses* (:class:`GradingPool`) with a wall-clock bound per answer. A worker that overruns is killed and
   replaced and the answer counts as wrong (``timed_out=True``). No signals are used, so grading is safe off the
   main thread, inside daemonic multiprocessing workers (which may not fork multiprocessing children but may
   start subprocesses) and inside DataLoader workers.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def extract_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (or ``\fbox{...}``) in ``text``, nested braces kept; None if absent."""
    best = None
    for command in ("\\boxed", "\\fbox"):
        start = text.rfind(command)
        if start > (best[0] if best else -1):
            best = (start, command)
    if best is None:
        return None
    index = best[0] + len(best[1])
    while index < len(text) and text[index] == " ":
        index += 1
    if index >= len(text) or text[index] != "{":
        return None
    depth, begin = 0, index + 1
    for position in range(index, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:position].strip()
    return None


# --------------------------------------------------------------------------------------------------
# Extraction and normalisation (pure string functions)
# --------------------------------------------------------------------------------------------------

#: Characters of an unboxed final answer handed to Math-Verify: the answer is stated at the end, and a bound
#: keeps megabyte outputs cheap to ship to a worker and to scan.
UNBOXED_TAIL_CHARS = 2000


def final_answer_text(completion: str) -> str:
    """The part of ``completion`` after the last ``</think>`` (the whole text when there is none)."""
    return completion.rsplit("</think>", 1)[-1]


def extract_answer(completion: str) -> str | None:
    r"""The last ``\boxed{}`` content of the final-answer part of ``completion``; None when there is no box."""
    return extract_boxed(final_answer_text(completion))


_LATEX_SPACING = re.compile(r"\\[,;:! ]|\\quad|\\qquad|~")
_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = re.compile(r"([+-]?)(\d*)(?:\.(\d*))?")
_INTEGER = re.compile(r"-?\d+")


def _canonical_number(text: str) -> str | None:
    """``text`` as a canonical decimal string ("+007.50" -> "7.5", "-0" -> "0"), or None if not a plain number."""
    match = _DECIMAL.fullmatch(text)
    if match is None or not (match.group(2) or match.group(3)):
        return None
    sign, whole, fraction = (
        match.group(1),
        match.group(2).lstrip("0") or "0",
        (match.group(3) or "").rstrip("0"),
    )
    digits = whole + ("." + fraction if fraction else "")
    return digits if sign != "-" or digits == "0" else "-" + digits


def answer_to_str(answer: Any) -> str:
    """A gold answer as a stripped string; integral floats (AMC's ``142.0``) become integers (``"142"``)."""
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    return str(answer).strip()


def normalize_answer(answer: Any) -> str:
    r"""A canonical string for an answer, for exact comparison and for grouping majority votes.

    Removes math delimiters, LaTeX spacing, ``\left``/``\right``, whitespace, a trailing period and thousands
    separators (``1,000``, ``1{,}000``); unwraps ``\text{}``-like commands; writes ``\dfrac``/``\tfrac`` as
    ``\frac``; writes plain numbers canonically (``025`` -> ``25``, ``3.50`` -> ``3.5``, ``142.0`` -> ``142``).
    Integral floats and ints become integer strings. Units and other text are kept (Math-Verify handles them).
    """
    text = answer_to_str(answer)
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(text) >= len(left) + len(right) and text.startswith(left) and text.endswith(right):
            text = text[len(left) : len(text) - len(right)]
    text = _LATEX_SPACING.sub("", text).replace("\\left", "").replace("\\right", "")
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("{,}", ",")
    text = _TEXT_WRAPPERS.sub(r"\1", text)
    text = re.sub(r"\s+", "", text).rstrip(".")
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    return _canonical_number(text) or text


def fast_verdict(predicted: str | None, gold: Any) -> bool | None:
    """Decide without Math-Verify where that is safe; None when Math-Verify must decide.

    True when the normalised strings are equal; False when both are (different) integers.
    """
    if predicted is None:
        return None
    predicted_key, gold_key = normalize_answer(predicted), normalize_answer(gold)
    if predicted_key and predicted_key == gold_key:
        return True
    if _INTEGER.fullmatch(predicted_key) and _INTEGER.fullmatch(gold_key):
        return False
    return None


# --------------------------------------------------------------------------------------------------
# Math-Verify tasks (run inside the worker subprocesses)
# --------------------------------------------------------------------------------------------------


class _DropTimeoutWarning(logging.Filter):
    """Math-Verify warns once that its timeout is off; we enforce our own, so the warning is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


def _quiet_math_verify() -> None:
    for name in ("math_verify.parser", "math_verify.grader", "math_verify.utils"):
        logging.getLogger(name).addFilter(_DropTimeoutWarning())


def _boxed(answer: str) -> str:
    return f"\\boxed{{{answer}}}"


def math_verify_equal(gold: str, prediction: str) -> bool:
    r"""Math-Verify's verdict, gold first, without its signal-based timeouts. Call it only in a bounded worker.

    ``gold`` is a bare answer (wrapped in ``\boxed{}`` before parsing); ``prediction`` is text to extract from.
    """
    from math_verify import parse, verify

    gold_parsed = parse(_boxed(gold), parsing_timeout=None)
    predicted_parsed = parse(prediction, parsing_timeout=None)
    return bool(verify(gold_parsed, predicted_parsed, timeout_seconds=None))


def math_verify_classes(answers: Sequence[str]) -> list[int]:
    """Equivalence-class index of each answer: an answer joins the first earlier class Math-Verify equates it with."""
    from math_verify import parse, verify

    parsed = [parse(_boxed(answer), parsing_timeout=None) for answer in answers]
    representatives: list[int] = []
    classes: list[int] = []
    for index, candidate in enumerate(parsed):
        for class_id, representative in enumerate(representatives):
            if verify(parsed[representative], candidate, timeout_seconds=None):
                classes.append(class_id)
                break
        else:
            classes.append(len(representatives))
            representatives.append(index)
    return classes


WORKER_TASKS = {"verify": math_verify_equal, "classes": math_verify_classes}
WORKER_MODULE = "trl_opd.eval._grading_worker"


# --------------------------------------------------------------------------------------------------
# Bounded worker pool
# --------------------------------------------------------------------------------------------------


@dataclass
class TaskOutcome:
    """Result of one pool task: ``value`` when it finished, else ``timed_out`` or ``error`` says why not."""

    value: Any = None
    timed_out: bool = False
    error: str | None = None


class _Worker:
    """One grading subprocess speaking JSON lines over its stdin/stdout."""

    def __init__(self) -> None:
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [sys.executable, "-m", WORKER_MODULE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self.ready = False
        self.task: int | None = None
        self.deadline = float("inf")
        self._buffer = b""

    def fileno(self) -> int:
        return self.process.stdout.fileno()

    def send(self, message: dict) -> None:
        try:
            self.process.stdin.write(json.dumps(message).encode() + b"\n")
            self.process.stdin.flush()
        except OSError:  # the worker died; its end-of-file on stdout is handled like any other exit
            pass

    def read_messages(self) -> list[dict]:
        """Complete messages available now; raises EOFError when the worker has exited."""
        chunk = os.read(self.fileno(), 1 << 16)
        if not chunk:
            raise EOFError
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass


def _default_worker_count() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class GradingPool:
    """Worker subprocesses that run Math-Verify tasks, each bounded by a wall-clock ``timeout`` (seconds).

    Thread-safe (calls are serialised by a lock); use as a context manager or call :meth:`close`.
    Startup of a worker (~0.5 s: Python plus Math-Verify imports) does not count against the timeout.
    """

    _MAX_START_FAILURES = 3
    _START_TIMEOUT = 120.0

    def __init__(self, num_workers: int | None = None, timeout: float = 5.0) -> None:
        if timeout is None or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}.")
        num_workers = _default_worker_count() if num_workers is None else num_workers
        if num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}.")
        self.num_workers = num_workers
        self.timeout = float(timeout)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._owner_pid = os.getpid()

    def __enter__(self) -> GradingPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        with self._lock:
            if os.getpid() == self._owner_pid:
                for worker in self._workers:
                    worker.kill()
            self._workers = []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing useful to do
            pass

    def run(self, tasks: Sequence[tuple[str, list]]) -> list[TaskOutcome]:
        """Run ``(task_name, args)`` pairs (names from ``WORKER_TASKS``); one outcome per task, in order."""
        for name, _ in tasks:
            if name not in WORKER_TASKS:
                raise ValueError(f"Unknown grading task {name!r}; expected one of {sorted(WORKER_TASKS)}.")
        if not tasks:
            return []
        with self._lock:
            if os.getpid() != self._owner_pid:  # forked copy: the workers belong to the parent
                self._workers, self._owner_pid = [], os.getpid()
            return self._run_locked(tasks)

    def _run_locked(self, tasks: Sequence[tuple[str, list]]) -> list[TaskOutcome]:
        outcomes: list[TaskOutcome | None] = [None] * len(tasks)
        pending = list(range(len(tasks)))[::-1]  # a stack: pop() takes the lowest index first
        wanted = min(self.num_workers, len(tasks))
        while len(self._workers) < wanted:
            self._workers.append(_Worker())
        start_failures, started_at = 0, time.monotonic()
        with selectors.DefaultSelector() as selector:
            for worker in self._workers:
                selector.register(worker, selectors.EVENT_READ)
            while pending or any(worker.task is not None for worker in self._workers):
                self._dispatch(tasks, pending)
                for key, _ in selector.select(self._wait_seconds(started_at)):
                    start_failures += self._read(key.fileobj, selector, outcomes)
                    if start_failures >= self._MAX_START_FAILURES:
                        raise RuntimeError(
                            "The Math-Verify grading worker could not start; run "
                            f"`python -m {WORKER_MODULE} < /dev/null` to see the error."
                        )
                self._expire(selector, outcomes, started_at)
        return outcomes  # type: ignore[return-value]

    def _read(self, worker: _Worker, selector, outcomes: list) -> int:
        """Handle what ``worker`` sent; a worker that exited is replaced. Returns 1 if it died before ready."""
        try:
            messages = worker.read_messages()
        except (EOFError, ValueError):
            died_starting = not worker.ready
            self._replace(worker, selector, outcomes, TaskOutcome(error="worker exited"))
            return int(died_starting)
        for message in messages:
            if message.get("ready"):
                worker.ready = True
            elif message.get("id") == worker.task:
                outcomes[worker.task] = TaskOutcome(value=message.get("result"), error=message.get("error"))
                worker.task, worker.deadline = None, float("inf")
        return 0

    def _dispatch(self, tasks, pending: list[int]) -> None:
        for worker in self._workers:
            if pending and worker.ready and worker.task is None:
                index = pending.pop()
                name, args = tasks[index]
                worker.task, worker.deadline = index, time.monotonic() + self.timeout
                worker.send({"id": index, "task": name, "args": list(args)})

    def _wait_seconds(self, started_at: float) -> float:
        deadlines = [worker.deadline for worker in self._workers if worker.task is not None]
        if not deadlines:  # waiting for workers to start
            return max(0.01, started_at + self._START_TIMEOUT - time.monotonic())
        return max(0.0, min(deadlines) - time.monotonic())

    def _expire(self, selector, outcomes: list, started_at: float) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.task is not None and now >= worker.deadline:
                self._replace(worker, selector, outcomes, TaskOutcome(timed_out=True))
        if all(not worker.ready for worker in self._workers) and now - started_at > self._START_TIMEOUT:
            raise RuntimeError(f"No grading worker became ready within {self._START_TIMEOUT:.0f} s.")

    def _replace(self, worker: _Worker, selector, outcomes: list, outcome: TaskOutcome) -> None:
        """Kill ``worker`` (its task gets ``outcome``) and start a fresh one in its place."""
        if worker.task is not None:
            outcomes[worker.task] = outcome
        selector.unregister(worker)
        worker.kill()
        fresh = _Worker()
        self._workers[self._workers.index(worker)] = fresh
        selector.register(fresh, selectors.EVENT_READ)


_DEFAULT_POOLS: dict[tuple[float, int], GradingPool] = {}
_DEFAULT_POOLS_LOCK = threading.Lock()


def default_pool(timeout: float = 5.0, num_workers: int | None = 1) -> GradingPool:
    """A process-wide pool per (timeout, workers), kept warm between calls and stopped at exit.

    Reusing it saves the ~0.5 s start of each worker in repeated evaluations (callbacks, notebooks). Idle workers
    wait on a pipe (no CPU) until the process exits or ``default_pool(...).close()``.
    """
    workers = _default_worker_count() if num_workers is None else num_workers
    with _DEFAULT_POOLS_LOCK:
        pool = _DEFAULT_POOLS.get((timeout, workers))
        if pool is None:
            pool = _DEFAULT_POOLS[(timeout, workers)] = GradingPool(num_workers=workers, timeout=timeout)
        return pool


@atexit.register
def _close_default_pools() -> None:
    for pool in list(_DEFAULT_POOLS.values()):
        pool.close()


# --------------------------------------------------------------------------------------------------
# Public grading API
# --------------------------------------------------------------------------------------------------


@dataclass
class GradeResult:
    """Verdict on one completion.

    Attributes:
        correct: the completion's answer equals the gold answer.
        predicted: the last boxed answer of the final-answer part (None without a box).
        method: ``"fast"`` (string/number fast path), ``"math_verify"``, ``"timeout"``, ``"error"`` (the worker
            died) or ``"no_answer"`` (``require_boxed`` and no box).
    """

    correct: bool
    predicted: str | None
    method: str

    @property
    def timed_out(self) -> bool:
        return self.method == "timeout"


def _math_verify_input(completion: str, predicted: str | None) -> str:
    if predicted is not None:
        return _boxed(predicted)
    return final_answer_text(completion)[-UNBOXED_TAIL_CHARS:]


def grade_many(
    completions: Sequence[str],
    answers: Sequence[Any],
    *,
    timeout: float = 5.0,
    require_boxed: bool = False,
    pool: GradingPool | None = None,
    num_workers: int | None = None,
) -> list[GradeResult]:
    r"""Grade ``completions[i]`` against ``answers[i]``; the Math-Verify calls run in a :class:`GradingPool`.

    Args:
        completions: model outputs (reasoning, then a final answer in ``\boxed{}``).
        answers: gold answers (str, or int/float: integral floats count as integers).
        timeout: seconds allowed per Math-Verify call; an overrun counts as wrong (``method="timeout"``).
        require_boxed: count a completion without ``\boxed{}`` as wrong instead of letting Math-Verify search
            the end of its final-answer part for an answer.
        pool: the pool to use (its own timeout applies); by default the warm :func:`default_pool` for
            ``timeout`` with ``num_workers`` workers (default min(4, CPUs)).
    """
    if len(completions) != len(answers):
        raise ValueError(
            f"Got {len(completions)} completions but {len(answers)} answers; pass one answer each."
        )
    results: list[GradeResult | None] = [None] * len(completions)
    predictions = [extract_answer(completion) for completion in completions]
    deferred: list[int] = []
    for index, (predicted, answer) in enumerate(zip(predictions, answers)):
        verdict = fast_verdict(predicted, answer)
        if verdict is not None:
            results[index] = GradeResult(verdict, predicted, "fast")
        elif predicted is None and require_boxed:
            results[index] = GradeResult(False, None, "no_answer")
        else:
            deferred.append(index)
    tasks = [
        ("verify", [answer_to_str(answers[i]), _math_verify_input(completions[i], predictions[i])])
        for i in deferred
    ]
    for index, outcome in zip(deferred, _run_tasks(tasks, pool, timeout, num_workers)):
        results[index] = _result_from_outcome(outcome, predictions[index])
    return results  # type: ignore[return-value]


def _result_from_outcome(outcome: TaskOutcome, predicted: str | None) -> GradeResult:
    if outcome.timed_out:
        return GradeResult(False, predicted, "timeout")
    if outcome.error is not None:
        return GradeResult(False, predicted, "error")
    return GradeResult(bool(outcome.value), predicted, "math_verify")


def _run_tasks(tasks, pool: GradingPool | None, timeout: float, num_workers: int | None) -> list[TaskOutcome]:
    if not tasks:
        return []
    if pool is None:
        pool = default_pool(timeout, 1 if len(tasks) == 1 else num_workers)
    return pool.run(tasks)


def grade(completion: str, answer: Any, timeout: float = 5.0, *, require_boxed: bool = False) -> bool:
    r"""True when ``completion``'s final answer equals ``answer``.

    The last ``\boxed{}`` after the last ``</think>`` is compared with the fast path, then with Math-Verify in a
    worker subprocess bounded by ``timeout`` seconds (an overrun is wrong). Safe in any thread or process.
    See :func:`grade_many` for many completions at once and the meaning of ``require_boxed``.
    """
    return grade_many([completion], [answer], timeout=timeout, require_boxed=require_boxed)[0].correct


def answer_classes_many(
    answer_lists: Sequence[Sequence[str | None]], *, pool: GradingPool | None = None, timeout: float = 5.0
) -> list[list[int | None]]:
    """Equivalence class of each answer, per problem, for majority voting (None: no answer, does not vote).

    Answers are first grouped by :func:`normalize_answer`; each problem's groups are then merged by Math-Verify
    equivalence in one bounded worker task. Where that task times out, the string groups are kept as they are.
    """
    keyed = [[normalize_answer(a) if a is not None else "" for a in answers] for answers in answer_lists]
    spellings = []  # per problem: normalised key -> its first raw spelling (what Math-Verify parses)
    for keys, answers in zip(keyed, answer_lists):
        first: dict[str, str] = {}
        for key, answer in zip(keys, answers):
            if key:
                first.setdefault(key, answer)
        spellings.append(first)
    # distinct canonical numbers are never equivalent: only problems with other answers need Math-Verify
    needs_merge = [
        index
        for index, first in enumerate(spellings)
        if len(first) > 1 and not all(_canonical_number(key) == key for key in first)
    ]
    tasks = [("classes", [list(spellings[index].values())]) for index in needs_merge]
    merged = {index: list(range(len(first))) for index, first in enumerate(spellings)}
    for index, outcome in zip(needs_merge, _run_tasks(tasks, pool, timeout, None)):
        if outcome.error is None and not outcome.timed_out:
            merged[index] = outcome.value
    classes = []
    for index, keys in enumerate(keyed):
        class_of = dict(zip(spellings[index], merged[index]))
        classes.append([class_of[key] if key else None for key in keys])
    return classes


def answer_classes(
    answers: Sequence[str | None], *, pool: GradingPool | None = None, timeout: float = 5.0
) -> list[int | None]:
    """:func:`answer_classes_many` for the samples of a single problem."""
    return answer_classes_many([answers], pool=pool, timeout=timeout)[0]
