"""Verifiable rewards for emotion-recognition RLVR (R1-Omni style).

The two reference rewards reproduce R1-Omni's trainer bit for bit:

* format:   ``re.fullmatch(r"<think>.*?</think>\\s*<answer>.*?</answer>", completion, re.DOTALL)``
* accuracy: ``re.search(r"<answer>(.*?)</answer>", text)`` (no DOTALL) on solution and completion,
  ``group(1).strip()`` or the whole ``text.strip()`` when there is no tag, exact equality.

Both regexes go quadratic on adversarial completions (many ``</think>`` or ``<answer>`` tokens in a
megabyte of text), and a policy under RL will happily find such outputs. So both are implemented
here as linear scans with ``str.find``; tests check them against the reference regexes.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from r1omni_ray.labels import canonical_label

# (completion, solution, **args) -> float; or, registered with context=True, (completion, SampleContext, **args)
RewardFn = Callable[..., float]


@dataclass(frozen=True)
class SampleContext:
    """Everything about one sample a reward may look at besides its text (register_reward(context=True))."""

    solution: str
    label: str | None = None
    record_id: str | None = None
    has_video: bool = False
    has_audio: bool = False
    length: int = 0  # completion tokens
    finish_reason: str | None = None  # "stop" (eos) | "length" (hit the token limit)
    max_new_tokens: int | None = None  # the run's limit (rollout.max_new_tokens)
    metadata: dict[str, Any] = field(default_factory=dict)  # the record's extra fields

# The reference patterns, kept for documentation and for the equivalence tests.
FORMAT_PATTERN = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
ANSWER_PATTERN = re.compile(r"<answer>(.*?)</answer>")

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_ANS_OPEN, _ANS_CLOSE = "<answer>", "</answer>"
# Only reached at a literal "</think>"; "\s*" then "<answer>" cannot backtrack into anything costly
# because "<" is not whitespace.
_THINK_TO_ANSWER = re.compile(r"</think>\s*<answer>")
_ANY_TAG = re.compile(r"</?(?:think|answer)>")

DIAGNOSTIC_KEYS: tuple[str, ...] = (
    "missing_answer_tag",
    "repeated_answer_tag",
    "nested_tags",
    "unknown_label",
    "non_text",
)


def _answer_span(text: str) -> tuple[int, int] | None:
    """Span of group(1) of ``ANSWER_PATTERN.search(text)``, in linear time.

    Without DOTALL, ``.`` matches anything but "\\n", so a match is the leftmost "<answer>" whose
    line (from after the tag) contains a "</answer>"; the lazy group ends at the first such close.
    If the first "<answer>" of a line has no close after it on that line, no later "<answer>" of
    the same line can have one either, so we jump to the next line.
    """
    pos = 0
    n = len(text)
    while True:
        i = text.find(_ANS_OPEN, pos)
        if i < 0:
            return None
        start = i + len(_ANS_OPEN)
        nl = text.find("\n", start)
        line_end = n if nl < 0 else nl
        j = text.find(_ANS_CLOSE, start, line_end)
        if j >= 0:
            return start, j
        if nl < 0:
            return None
        pos = nl + 1


def _raw_answer(text: str) -> str | None:
    span = _answer_span(text)
    return None if span is None else text[span[0] : span[1]]


def extract_answer(text: str) -> str | None:
    """Stripped content of the first ``<answer>…</answer>`` on one line; None if there is none."""
    if not isinstance(text, str):
        return None
    raw = _raw_answer(text)
    return None if raw is None else raw.strip()


def matches_format(completion: str) -> bool:
    """Linear-time equivalent of ``FORMAT_PATTERN.fullmatch(completion) is not None``.

    A full match is "<think>" + A + "</think>" + whitespace + "<answer>" + B + "</answer>" with A
    and B arbitrary. The leftmost "</think>\\s*<answer>" after the opening tag leaves the most room
    for B, so the string matches iff that occurrence ends before the final "</answer>" starts.
    """
    if not (completion.startswith(_THINK_OPEN) and completion.endswith(_ANS_CLOSE)):
        return False
    m = _THINK_TO_ANSWER.search(completion, len(_THINK_OPEN))
    return m is not None and m.end() <= len(completion) - len(_ANS_CLOSE)


# ----------------------------------------------------------------------------- registry

REWARD_REGISTRY: dict[str, RewardFn] = {}
CONTEXT_REWARDS: set[str] = set()  # names whose function takes the SampleContext instead of the solution


def register_reward(name: str, context: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding a reward to ``REWARD_REGISTRY``: ``(completion, solution, **args) -> float``, or with
    ``context=True`` ``(completion, ctx: SampleContext, **args) -> float``; args come from the config
    (``reward.rewards[i].args``)."""

    def deco(fn: RewardFn) -> RewardFn:
        if name in REWARD_REGISTRY and REWARD_REGISTRY[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered")
        REWARD_REGISTRY[name] = fn
        if context:
            CONTEXT_REWARDS.add(name)
        return fn

    return deco


def get_reward(name: str) -> RewardFn:
    try:
        return REWARD_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; known rewards: {sorted(REWARD_REGISTRY)}") from None


@register_reward("format")
def format_reward(completion: str, solution: str) -> float:
    """1.0 iff the completion (as generated, not stripped) is ``<think>…</think> <answer>…</answer>``."""
    if not isinstance(completion, str):
        return 0.0
    return 1.0 if matches_format(completion) else 0.0


@register_reward("accuracy")
def accuracy_reward(completion: str, solution: str) -> float:
    """1.0 iff the (stripped) answers are exactly equal, case-sensitive.

    As in R1-Omni, a text without an answer tag is compared as a whole, so a bare "sad" completion
    is correct for "<answer>sad</answer>".
    """
    if not isinstance(completion, str) or not isinstance(solution, str):
        return 0.0
    truth = _raw_answer(solution)
    truth = solution.strip() if truth is None else truth.strip()
    pred = _raw_answer(completion)
    pred = completion.strip() if pred is None else pred.strip()
    return 1.0 if pred == truth else 0.0


@register_reward("overlong", context=True)
def overlong_reward(completion: str, ctx: SampleContext, buffer: int = 256, max_len: int | None = None) -> float:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13): 0 up to max_len - buffer tokens, then falling
    linearly to -1 at max_len; -1 for a completion cut at the token limit (finish reason "length") or past
    max_len. max_len: default the run's rollout.max_new_tokens. Weight it like any reward."""
    limit = max_len if max_len is not None else ctx.max_new_tokens
    if limit is None:
        raise ValueError("overlong: no max_len argument and no max_new_tokens in the sample's context")
    if not 0 < buffer <= limit:
        raise ValueError(f"overlong: buffer {buffer} must be in (0, max_len={limit}]")
    if ctx.finish_reason == "length" or ctx.length >= limit:
        return -1.0
    return min(0.0, (limit - buffer - ctx.length) / buffer)


# ----------------------------------------------------------------------------- batch scoring


@dataclass
class RewardSpec:
    name: str
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the reward function


@dataclass
class RewardBatch:
    total: list[float]
    per_reward: dict[str, list[float]]
    errors: dict[str, int] = field(default_factory=dict)
    diagnostics: dict[str, int] = field(default_factory=dict)
    error_examples: dict[str, str] = field(default_factory=dict)  # first error message per reward, for logs

    def __len__(self) -> int:
        return len(self.total)

    def merge(self, other: RewardBatch) -> RewardBatch:
        """Concatenate two batches (e.g. from several workers); counters are summed."""
        if set(self.per_reward) != set(other.per_reward):
            raise ValueError(
                f"cannot merge reward batches with different rewards: "
                f"{sorted(self.per_reward)} vs {sorted(other.per_reward)}"
            )
        return RewardBatch(
            total=self.total + other.total,
            per_reward={k: v + other.per_reward[k] for k, v in self.per_reward.items()},
            errors=_add_counts(self.errors, other.errors),
            diagnostics=_add_counts(self.diagnostics, other.diagnostics),
            error_examples=other.error_examples | self.error_examples,
        )

    def select(self, indices: list[int]) -> RewardBatch:
        """These samples only, in this order; the failure counters stay the whole batch's."""
        return RewardBatch([self.total[i] for i in indices], {k: [v[i] for i in indices] for k, v in self.per_reward.items()},
                           dict(self.errors), dict(self.diagnostics), dict(self.error_examples))

    def to_dict(self, prefix: str = "reward/") -> dict[str, float]:
        """Flat scalar summary for logging (means of rewards, raw counts)."""
        n = len(self.total)
        out: dict[str, float] = {f"{prefix}n": float(n), f"{prefix}total_mean": _mean(self.total)}
        for k, v in self.per_reward.items():
            out[f"{prefix}{k}_mean"] = _mean(v)
        for k, c in self.errors.items():
            out[f"{prefix}errors/{k}"] = float(c)
        for k, c in self.diagnostics.items():
            out[f"{prefix}diag/{k}"] = float(c)
        return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _add_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


def _diagnose(completion: str, canon_labels: frozenset[str] | None, diag: dict[str, int]) -> None:
    answer = extract_answer(completion)
    if answer is None:
        diag["missing_answer_tag"] += 1
    elif canon_labels is not None and canonical_label(answer) not in canon_labels:
        diag["unknown_label"] += 1
    if completion.count(_ANS_OPEN) > 1:
        diag["repeated_answer_tag"] += 1
    # A tag opened while another is still open (either kind); one linear pass over the tags.
    depth = 0
    for m in _ANY_TAG.finditer(completion):
        if m.group().startswith("</"):
            depth = max(depth - 1, 0)
        else:
            depth += 1
            if depth > 1:
                diag["nested_tags"] += 1
                break


def _safe_call(fn: RewardFn, completion: Any, second: Any, args: dict[str, Any]) -> tuple[float | None, str | None]:
    """(the reward as a finite float, None), or (None, what went wrong) when the function raised or
    returned junk."""
    try:
        value = float(fn(completion, second, **args))
    except Exception as e:
        return None, f"{type(e).__name__}: {str(e)[:200]}"
    return (value, None) if math.isfinite(value) else (None, f"non-finite value {value}")


def import_reward_modules(modules: Sequence[str]) -> None:
    """Import the modules that register custom rewards (``reward.modules``); a clear error if one fails."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:
            raise ValueError(f"reward.modules: cannot import {name!r} ({type(e).__name__}: {e})") from e


def check_reward_specs(specs: Sequence[RewardSpec], modules: Sequence[str] = ()) -> None:
    """Fail at start-up, not in a reward actor mid-run, on a reward name nobody registered."""
    import_reward_modules(modules)
    for i, s in enumerate(specs):
        if s.name not in REWARD_REGISTRY:
            raise ValueError(f"reward.rewards[{i}].name: unknown reward {s.name!r}; known rewards: "
                             f"{sorted(REWARD_REGISTRY)} (custom ones: register them in a reward.modules module)")
        try:
            inspect.signature(REWARD_REGISTRY[s.name]).bind("", None, **s.args)
        except TypeError as e:
            raise ValueError(f"reward.rewards[{i}].args: {s.name!r} does not take {sorted(s.args)} ({e})") from None


def score_completions(
    completions: list[str],
    solutions: Sequence[str | SampleContext],
    specs: list[RewardSpec],
    label_set: Sequence[str] | None = None,
) -> RewardBatch:
    """Score completions with several weighted rewards; robust to any completion content. ``solutions``: each
    sample's solution string, or its SampleContext (what context rewards read; the others get its solution).

    Raises ValueError only for caller bugs (length mismatch, unknown/duplicate reward names, no
    specs). A reward that raises or returns a non-finite value scores 0.0 and is counted in
    ``errors[name]``. A completion or solution that is not a ``str`` scores 0.0 on every reward
    and is counted in ``diagnostics["non_text"]``. ``unknown_label`` counts tagged answers outside
    ``label_set`` (missing tags are counted only as ``missing_answer_tag``).
    """
    if len(completions) != len(solutions):
        raise ValueError(f"got {len(completions)} completions but {len(solutions)} solutions")
    if not specs:
        raise ValueError("score_completions needs at least one RewardSpec")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate reward names in specs: {names}")
    fns = [get_reward(s.name) for s in specs]
    with_ctx = [s.name in CONTEXT_REWARDS for s in specs]
    weights = [float(s.weight) for s in specs]
    canon = None if label_set is None else frozenset(canonical_label(x) for x in label_set)

    per_reward: dict[str, list[float]] = {name: [] for name in names}
    errors = {name: 0 for name in names}
    examples: dict[str, str] = {}
    diag = {k: 0 for k in DIAGNOSTIC_KEYS}
    total: list[float] = []
    for completion, given in zip(completions, solutions, strict=True):
        ctx = given if isinstance(given, SampleContext) else None
        solution = ctx.solution if ctx is not None else given
        if not isinstance(completion, str) or not isinstance(solution, str):
            diag["non_text"] += 1
            for name in names:
                per_reward[name].append(0.0)
            total.append(0.0)
            continue
        _diagnose(completion, canon, diag)
        row_total = 0.0
        for spec, fn, w, wants_ctx in zip(specs, fns, weights, with_ctx, strict=True):
            name = spec.name
            second = (ctx or SampleContext(solution)) if wants_ctx else solution
            value, err = _safe_call(fn, completion, second, spec.args)
            if value is None:
                errors[name] += 1
                examples.setdefault(name, err or "")
                value = 0.0
            per_reward[name].append(value)
            row_total += w * value
        total.append(row_total)
    return RewardBatch(total=total, per_reward=per_reward, errors=errors, diagnostics=diag, error_examples=examples)
