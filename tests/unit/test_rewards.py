"""Reward rules (R1-Omni format/accuracy), the registry and batch scoring."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r1omni_ray import rewards as R
from r1omni_ray.labels import DFEW_LABELS, RAVDESS_LABELS
from r1omni_ray.rewards import (
    REWARD_REGISTRY,
    RewardBatch,
    RewardSpec,
    accuracy_reward,
    extract_answer,
    format_reward,
    get_reward,
    register_reward,
    score_completions,
)

# The patterns exactly as R1-Omni's trainer writes them, as the independent oracle.
REF_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
REF_ANSWER = re.compile(r"<answer>(.*?)</answer>")


def ref_format(c: str) -> float:
    return 1.0 if REF_FORMAT.fullmatch(c) else 0.0


def ref_accuracy(c: str, sol: str) -> float:
    m = REF_ANSWER.search(sol)
    truth = m.group(1).strip() if m else sol.strip()
    m = REF_ANSWER.search(c)
    pred = m.group(1).strip() if m else c.strip()
    return 1.0 if pred == truth else 0.0


SOL = "<answer>sad</answer>"

# (completion, format reward, accuracy reward vs SOL)
TABLE = [
    ("<think>x</think><answer>sad</answer>", 1.0, 1.0),
    ("<think>x</think> <answer>sad</answer>", 1.0, 1.0),
    ("<think>x</think>\n\n<answer>sad</answer>", 1.0, 1.0),  # newline between tags
    ("<think>line1\nline2</think>\n<answer>sad</answer>", 1.0, 1.0),  # multiline think
    ("<think></think><answer>sad</answer>", 1.0, 1.0),  # empty think
    (" <think>x</think><answer>sad</answer>", 0.0, 1.0),  # leading whitespace: no strip
    ("\n<think>x</think><answer>sad</answer>", 0.0, 1.0),
    ("<think>x</think><answer>sad</answer>\n", 0.0, 1.0),  # trailing newline
    ("<think>x</think><answer>sad</answer>extra", 0.0, 1.0),
    ("<think>x</think>so<answer>sad</answer>", 0.0, 1.0),  # text between the blocks
    ("<answer>sad</answer>", 0.0, 1.0),  # missing think
    ("<think>sad</think>", 0.0, 0.0),  # missing answer
    ("sad", 0.0, 1.0),  # bare text equals the label: R1-Omni counts it correct
    ("  sad \n", 0.0, 1.0),
    ("Sad", 0.0, 0.0),
    ("<think>x</think><answer>Sad</answer>", 1.0, 0.0),  # case-sensitive
    ("<think>x</think><answer>SAD</answer>", 1.0, 0.0),
    ("<think>x</think><answer> sad </answer>", 1.0, 1.0),
    ("<think>x</think><answer>\tsad\u3000</answer>", 1.0, 1.0),  # unicode whitespace stripped
    ("<think>x</think><answer>\nsad\n</answer>", 1.0, 0.0),  # multiline answer: no DOTALL
    ("<think>x</think><answer></answer>", 1.0, 0.0),  # empty answer
    ("<think>x</think><answer>happy</answer><answer>sad</answer>", 1.0, 0.0),  # first answer wins
    ("<think>x</think><answer>sad</answer><answer>happy</answer>", 1.0, 1.0),
    ("<think>x</think><answer><answer>sad</answer></answer>", 1.0, 0.0),  # nested answer
    ("<think><think>x</think></think><answer>sad</answer>", 1.0, 1.0),  # nested think
    ("<think>x<answer>sad</answer></think><answer>happy</answer>", 1.0, 1.0),  # answer in think
    ("<THINK>x</THINK><answer>sad</answer>", 0.0, 1.0),
    ("<think>x</think><Answer>sad</Answer>", 0.0, 0.0),
    ("<think>x</think><answer>sad</answer >", 0.0, 0.0),
    ("<think>x<answer>sad</answer>", 0.0, 1.0),  # unclosed think
    ("<think>x</think><answer>sad", 0.0, 0.0),  # unclosed answer
    ("<think>x</think><answer>sad\n</answer>", 1.0, 0.0),
    ("<think>x</think><answer>bad\n<answer>sad</answer>", 1.0, 1.0),  # first tag has no close on its line
    ("", 0.0, 0.0),
    ("<think>\ud800</think><answer>sad</answer>", 1.0, 1.0),  # lone surrogate
    ("<think>😢 Traurig</think><answer>sad</answer>", 1.0, 1.0),
]


@pytest.mark.parametrize(("completion", "fmt", "acc"), TABLE)
def test_reward_table(completion: str, fmt: float, acc: float) -> None:
    assert format_reward(completion, SOL) == fmt
    assert accuracy_reward(completion, SOL) == acc
    assert accuracy_reward(completion, "<answer> sad </answer>") == acc
    # The table itself agrees with R1-Omni's regexes.
    assert ref_format(completion) == fmt
    assert ref_accuracy(completion, SOL) == acc


@pytest.mark.parametrize(
    ("solution", "completion", "acc"),
    [
        ("sad", "<answer>sad</answer>", 1.0),  # untagged solution is used whole
        (" sad\n", "<think>x</think><answer>sad</answer>", 1.0),
        ("<answer>happy</answer>", "<answer>sad</answer>", 0.0),
        ("<answer></answer>", "<think>x</think><answer></answer>", 1.0),
        ("<answer></answer>", "", 1.0),
    ],
)
def test_accuracy_solution_forms(solution: str, completion: str, acc: float) -> None:
    assert accuracy_reward(completion, solution) == acc == ref_accuracy(completion, solution)


def test_extract_answer() -> None:
    assert extract_answer("<answer> sad </answer>") == "sad"
    assert extract_answer("<think>a</think><answer>happy</answer><answer>sad</answer>") == "happy"
    assert extract_answer("<answer></answer>") == ""
    assert extract_answer("<answer>\nsad</answer>") is None
    assert extract_answer("no tags") is None
    assert extract_answer(None) is None  # type: ignore[arg-type]


# Small alphabets of tag fragments make collisions (repeated/nested/partial tags) likely.
FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "\t", "a", "<", "/", ">",
             "answer>", "</", "\u2028", "\x0b"]
tagged_text = st.lists(st.sampled_from(FRAGMENTS), max_size=14).map("".join)


@settings(max_examples=400, deadline=None)
@given(st.one_of(tagged_text, st.text(max_size=40)))
def test_linear_scans_equal_reference_regexes(text: str) -> None:
    assert R.matches_format(text) == (REF_FORMAT.fullmatch(text) is not None)
    m = REF_ANSWER.search(text)
    assert extract_answer(text) == (m.group(1).strip() if m else None)
    assert accuracy_reward(text, SOL) == ref_accuracy(text, SOL)


@settings(max_examples=200, deadline=None)
@given(tagged_text, tagged_text)
def test_format_framing_equals_reference(think: str, answer: str) -> None:
    c = f"<think>{think}</think>\n<answer>{answer}</answer>"
    assert format_reward(c, SOL) == ref_format(c) == 1.0


MB = 1 << 20
HUGE = [
    "x" * MB,
    "<think>" + "</think><answer>" * (MB // 16) + "x",  # quadratic for the lazy fullmatch regex
    "<think>" + "</think> " * (MB // 9) + "<answer>sad</answer>",
    "<answer>" * (MB // 8),  # quadratic for re.search without a close tag
    "<think>" + " " * MB + "</think>" + " " * MB + "<answer>sad</answer>",
    "<think>" + "a" * MB + "</think><answer>sad</answer>",
]


@pytest.mark.parametrize("text", HUGE, ids=range(len(HUGE)))
def test_huge_inputs_do_not_hang_or_raise(text: str) -> None:
    f = format_reward(text, SOL)
    a = accuracy_reward(text, SOL)
    assert f in (0.0, 1.0) and a in (0.0, 1.0)
    batch = score_completions([text], [SOL], [RewardSpec("format"), RewardSpec("accuracy")], DFEW_LABELS)
    assert batch.total == [f + a]


def test_huge_expected_values() -> None:
    assert format_reward(HUGE[2], SOL) == 1.0 and accuracy_reward(HUGE[2], SOL) == 1.0
    assert format_reward(HUGE[1], SOL) == 0.0
    assert format_reward(HUGE[4], SOL) == 1.0
    assert extract_answer(HUGE[3]) is None


# ----------------------------------------------------------------------------- registry


@pytest.fixture
def clean_registry():
    saved = dict(REWARD_REGISTRY)
    yield
    REWARD_REGISTRY.clear()
    REWARD_REGISTRY.update(saved)


def test_registry_defaults() -> None:
    assert REWARD_REGISTRY["accuracy"] is accuracy_reward
    assert REWARD_REGISTRY["format"] is format_reward
    assert get_reward("format") is format_reward


def test_get_reward_unknown_names_known() -> None:
    with pytest.raises(ValueError, match="bogus") as exc:
        get_reward("bogus")
    assert "accuracy" in str(exc.value) and "format" in str(exc.value)


def test_register_reward(clean_registry) -> None:
    @register_reward("length_test")
    def length(completion: str, solution: str) -> float:
        return float(len(completion))

    assert get_reward("length_test") is length
    with pytest.raises(ValueError, match="already registered"):
        register_reward("length_test")(lambda c, s: 0.0)


# ----------------------------------------------------------------------------- batch scoring

SPECS = [RewardSpec("accuracy", 1.0), RewardSpec("format", 0.5)]


def test_score_completions_weighted_totals() -> None:
    comps = ["<think>x</think><answer>sad</answer>", "<answer>sad</answer>", "<think>x</think><answer>happy</answer>"]
    sols = [SOL, "<answer> sad </answer>", SOL]
    b = score_completions(comps, sols, SPECS)
    assert b.per_reward == {"accuracy": [1.0, 1.0, 0.0], "format": [1.0, 0.0, 1.0]}
    assert b.total == [1.5, 1.0, 0.5]
    assert b.errors == {"accuracy": 0, "format": 0}
    assert len(b) == 3


def test_score_completions_diagnostics() -> None:
    comps = [
        "<think>x</think><answer>sad</answer>",  # clean
        "<think>x</think>",  # missing
        "<think>x</think><answer>sad</answer><answer>happy</answer>",  # repeated
        "<think>x</think><answer><answer>sad</answer></answer>",  # nested + repeated + unknown
        "<think>x</think><answer>banana</answer>",  # unknown
        "<think>x</think><answer> SAD </answer>",  # canonical_label makes it known
        None,  # non-text
        12345,  # non-text
    ]
    b = score_completions(comps, [SOL] * len(comps), SPECS, label_set=DFEW_LABELS)  # type: ignore[arg-type]
    assert b.diagnostics == {
        "missing_answer_tag": 1,
        "repeated_answer_tag": 2,
        "nested_tags": 1,
        "unknown_label": 2,
        "non_text": 2,
    }
    assert b.total[-2:] == [0.0, 0.0]
    assert b.per_reward["accuracy"][-2:] == [0.0, 0.0]


def test_unknown_label_uses_canonical_aliases() -> None:
    b = score_completions(["<answer>fear</answer>", "<answer>Fearful</answer>"], [SOL, SOL],
                          [RewardSpec("accuracy")], label_set=RAVDESS_LABELS)
    assert b.diagnostics["unknown_label"] == 0
    b = score_completions(["<answer>fear</answer>"], [SOL], [RewardSpec("accuracy")])
    assert b.diagnostics["unknown_label"] == 0  # no label set: nothing to check


def test_score_completions_errors_and_nonfinite(clean_registry) -> None:
    @register_reward("boom")
    def boom(completion: str, solution: str) -> float:
        if "boom" in completion:
            raise RuntimeError("reward crashed")
        return 2.0

    @register_reward("nan")
    def nan(completion: str, solution: str) -> float:
        return math.nan

    b = score_completions(["boom", "ok"], [SOL, SOL], [RewardSpec("boom", 1.0), RewardSpec("nan", 3.0)])
    assert b.per_reward == {"boom": [0.0, 2.0], "nan": [0.0, 0.0]}
    assert b.errors == {"boom": 1, "nan": 2}
    assert b.total == [0.0, 2.0]


def test_score_completions_non_text_solution_and_weird_unicode() -> None:
    comps = ["\ud800\udfff\ud800", "\x00<answer>sad</answer>", "<answer>sad</answer>"]
    sols = [SOL, SOL, None]
    b = score_completions(comps, sols, SPECS, DFEW_LABELS)  # type: ignore[arg-type]
    assert b.per_reward["accuracy"] == [0.0, 1.0, 0.0]
    assert b.diagnostics["non_text"] == 1
    # Reward functions called directly on junk do not raise either.
    assert format_reward(None, SOL) == 0.0  # type: ignore[arg-type]
    assert accuracy_reward(b"<answer>sad</answer>", SOL) == 0.0  # type: ignore[arg-type]


def test_score_completions_caller_errors() -> None:
    with pytest.raises(ValueError, match="2 completions but 1 solutions"):
        score_completions(["a", "b"], [SOL], SPECS)
    with pytest.raises(ValueError, match="at least one"):
        score_completions(["a"], [SOL], [])
    with pytest.raises(ValueError, match="duplicate"):
        score_completions(["a"], [SOL], [RewardSpec("format"), RewardSpec("format")])
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        score_completions(["a"], [SOL], [RewardSpec("nope")])


def test_empty_batch() -> None:
    b = score_completions([], [], SPECS)
    assert b.total == [] and b.per_reward == {"accuracy": [], "format": []}
    assert b.to_dict()["reward/total_mean"] == 0.0


def test_merge_and_to_dict() -> None:
    a = score_completions(["<think>x</think><answer>sad</answer>", None], [SOL, SOL], SPECS)  # type: ignore[list-item]
    b = score_completions(["<answer>sad</answer>"], [SOL], SPECS)
    m = a.merge(b)
    assert m.total == a.total + b.total
    assert m.per_reward["format"] == [1.0, 0.0, 0.0]
    assert m.diagnostics["non_text"] == 1 and m.diagnostics["missing_answer_tag"] == 0
    d = m.to_dict()
    assert d["reward/n"] == 3.0
    assert d["reward/total_mean"] == pytest.approx((1.5 + 0.0 + 1.0) / 3)
    assert d["reward/accuracy_mean"] == pytest.approx(2 / 3)
    assert d["reward/diag/non_text"] == 1.0 and d["reward/errors/format"] == 0.0
    assert all(isinstance(v, float) for v in d.values())
    with pytest.raises(ValueError, match="different rewards"):
        m.merge(RewardBatch(total=[], per_reward={"format": []}))
