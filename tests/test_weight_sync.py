"""Bucketed weight broadcast: planning, packing, and a real gloo broadcast across processes."""

import multiprocessing as mp
import socket

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from r1omni_ray.weight_sync import (
    BroadcastGroup,
    CollectiveError,
    ParamMeta,
    param_metas,
    plan_buckets,
    receive_buckets,
    send_buckets,
    unflatten,
)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@given(
    sizes=st.lists(st.tuples(st.integers(1, 300), st.sampled_from(["float32", "bfloat16"])), min_size=1, max_size=30),
    bucket=st.integers(0, 2000),
)
@settings(max_examples=60, deadline=None)
def test_plan_buckets_covers_every_tensor_once_with_one_dtype(sizes, bucket):
    metas = [ParamMeta(f"p{i}", (n,), dt) for i, (n, dt) in enumerate(sizes)]
    buckets = plan_buckets(metas, bucket)
    flat = sorted(i for b in buckets for i in b)
    assert flat == list(range(len(metas)))
    for b in buckets:
        assert len({metas[i].dtype for i in b}) == 1
        if bucket > 0 and len(b) > 1:
            assert sum(metas[i].nbytes for i in b) <= bucket
    if bucket <= 0:
        assert all(len(b) == 1 for b in buckets)


def test_flatten_unflatten_round_trip():
    ts = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 2, 2)]
    metas = param_metas((f"t{i}", t) for i, t in enumerate(ts))
    back = unflatten(torch.cat([t.reshape(-1) for t in ts]), metas)
    assert all(torch.equal(a, b) for a, b in zip(ts, back, strict=True))


def _member(rank, world, port, result_q, bucket_bytes):
    torch.manual_seed(1234)
    src = {f"w{i}": torch.randn(17 * (i + 1), 3) for i in range(6)}
    src["b"] = torch.randn(40).to(torch.bfloat16)
    metas = param_metas(src.items())
    buckets = plan_buckets(metas, bucket_bytes)
    g = BroadcastGroup("gloo", "127.0.0.1", port, rank, world, 30, name=f"member-{rank}")
    if rank == 0:
        names = [m.name for m in metas]
        send_buckets(g, metas, buckets, lambda idx: [src[names[i]] for i in idx])
        result_q.put((rank, len(buckets)))
    else:
        got = {}
        receive_buckets(g, metas, buckets, lambda pairs: got.update({n: t.clone() for n, t in pairs}))
        ok = all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in src.items())
        result_q.put((rank, ok))


@pytest.mark.parametrize("bucket_bytes", [0, 512, 1 << 20])
def test_gloo_broadcast_is_bit_exact(bucket_bytes):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _port()
    procs = [ctx.Process(target=_member, args=(r, 3, port, q, bucket_bytes)) for r in range(3)]
    for p in procs:
        p.start()
    res = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    assert res[1] is True and res[2] is True


def _lonely_receiver(port, q):
    try:
        g = BroadcastGroup("gloo", "127.0.0.1", port, 1, 2, 2, name="rollout-worker-7")
        g.broadcast(torch.zeros(3), 0)
        q.put("no error")
    except CollectiveError as e:
        q.put(str(e))


def test_missing_peer_times_out_with_member_named():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_lonely_receiver, args=(_port(), q))
    p.start()
    msg = q.get(timeout=120)
    p.join(30)
    assert "rollout-worker-7" in msg
