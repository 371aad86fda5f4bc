"""Host memory of checkpoint exports: only the writing rank (0) keeps a gathered host copy of the weights;
under ZeRO-3 the others still take part in every parameter's gather, in the same order (the gathers are
collective). The real 2-rank ZeRO-3 export runs in tests/system (test_zero3_edges, test_rlvr_system)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import deepspeed
import pytest
import torch

from r1omni_ray.learner import export


@pytest.fixture
def gathers(monkeypatch):
    calls: list[list[int]] = []

    @contextlib.contextmanager
    def gathered(params, modifier_rank=None):
        calls.append([id(p) for p in params])
        yield

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", gathered)
    return calls


def policy(rank: int, zero3: bool) -> SimpleNamespace:
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    return SimpleNamespace(module=module, rank=rank, zero3=zero3)


@pytest.mark.parametrize("zero3", [True, False])
def test_only_the_writer_keeps_a_host_copy(gathers, zero3, tmp_path):
    p0, p1 = policy(0, zero3), policy(1, zero3)
    kept = export.full_state(p0, keep=True)
    assert sorted(kept) == sorted(n for n, _ in p0.module.named_parameters())
    dropped = export.full_state(p1, keep=False)
    assert dropped == {}
    if zero3:  # both ranks gathered every parameter, in the same order
        n = len(list(p0.module.parameters()))
        assert len(gathers) == 2 * n
    else:
        assert gathers == []


def test_a_non_writer_save_hf_joins_the_gathers_and_writes_nothing(gathers, tmp_path, monkeypatch):
    called: list[bool] = []
    monkeypatch.setattr(export, "full_state", lambda pol, keep=True: called.append(keep) or {})
    assert export.save_hf(policy(1, zero3=True), str(tmp_path / "src"), str(tmp_path / "out")) is None
    assert called == [False] and not (tmp_path / "out").exists()  # gathered, nothing kept, nothing written
    called.clear()
    assert export.save_hf(policy(1, zero3=False), str(tmp_path / "src"), str(tmp_path / "out")) is None
    assert called == []  # ZeRO-1/2: every rank holds the weights already, no collective to join
