"""Bucketed weight broadcast: planning, packing, and a real gloo broadcast across processes."""

import multiprocessing as mp
import socket

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from r1omni_ray.weight_broadcast import (
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


def _reforming_member(rank, ports, q):
    """Round 1: three members. Member 2 then dies without closing; the other two close their group (at once,
    with a dead member) and form a new one for the new membership, as WeightSync does at a step boundary."""
    g = BroadcastGroup("gloo", "127.0.0.1", ports[0], rank, 3, 30, name=f"member-{rank}")
    t = torch.arange(5.0) if rank == 0 else torch.zeros(5)
    g.broadcast(t, 0)
    if rank == 2:
        q.put((rank, t.tolist()))
        return  # dies holding its group
    g.close()
    g.close()  # twice is harmless (a re-form after a failed one)
    g = BroadcastGroup("gloo", "127.0.0.1", ports[1], rank, 2, 30, name=f"member-{rank}")
    t2 = torch.arange(5.0) * 7 if rank == 0 else torch.zeros(5)
    g.broadcast(t2, 0)
    g.close()
    q.put((rank, t.tolist() + t2.tolist()))


def test_group_closed_and_reformed_for_a_new_membership_after_a_member_died():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ports = [_port(), _port()]
    procs = [ctx.Process(target=_reforming_member, args=(r, ports, q)) for r in range(3)]
    for p in procs:
        p.start()
    res = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    assert res[2] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert res[1] == res[0] == [0.0, 1.0, 2.0, 3.0, 4.0, 0.0, 7.0, 14.0, 21.0, 28.0]


LM_AND_FRONT = [("model.embed_tokens.weight", (50, 8)), ("model.layers.0.mlp.up_proj.weight", (16, 8)),
                ("model.layers.0.input_layernorm.weight", (8,)), ("model.norm.weight", (8,)),
                ("model.mm_projector.0.weight", (8, 12)), ("model.audio_projector.0.weight", (8, 6)),
                ("lm_head.weight", (50, 8))]


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_routes_send_every_tensor_once_to_the_groups_that_hold_it(engine):
    from r1omni_ray.engines.base import TOKEN_EMBEDDING, is_lm_param, sync_destinations
    from r1omni_ray.weight_broadcast import ACTORS, ENGINES, buckets_for, plan_routes, route_bytes

    metas = [ParamMeta(n, s, "float32") for n, s in LM_AND_FRONT]
    routes = plan_routes(metas, 600, lambda n: sync_destinations(n, engine))
    assert sorted(i for r in routes for i in r.indices) == list(range(len(metas)))
    nb = {m.name: m.nbytes for m in metas}
    got = route_bytes(metas, routes)
    if engine == "hf":  # the rollout actor holds the whole model
        assert {r.dests for r in routes} == {(ACTORS,)} and got == {ACTORS: sum(nb.values()), "sent": sum(nb.values())}
        return
    lm = sum(v for n, v in nb.items() if is_lm_param(n))
    front = sum(v for n, v in nb.items() if not is_lm_param(n)) + nb[TOKEN_EMBEDDING]
    assert got == {ENGINES: lm, ACTORS: front, "sent": lm + front}
    to_actors = {metas[i].name for b in buckets_for(routes, ACTORS) for i in b}
    assert to_actors == {n for n in nb if not is_lm_param(n)} | {TOKEN_EMBEDDING}
    assert {metas[i].name for b in buckets_for(routes, ENGINES) for i in b} == {n for n in nb if is_lm_param(n)}


RECEIVER_DELAY_S = 3.0


def _routed_member(rank, dest, ports, worlds, q):
    """Rank 0 sends in two groups with two staging slots; each receiver takes its group's buckets, after a
    delay: the first two sends must not wait for it, the third (a reused slot) must."""
    import time

    from r1omni_ray.weight_broadcast import ACTORS, ENGINES, BucketSender, Route, buckets_for

    src = {f"w{i}": torch.full((64,), float(i)) for i in range(6)}
    metas = param_metas(src.items())
    routes = [Route((0, 1), (ACTORS,)), Route((2,), (ACTORS, ENGINES)), Route((3, 4), (ENGINES,)),
              Route((5,), (ACTORS,))]
    if rank == 0:
        groups = {d: BroadcastGroup("gloo", "127.0.0.1", ports[d], 0, worlds[d], 60, name=f"sender[{d}]")
                  for d in (ACTORS, ENGINES)}
        sender = BucketSender(groups, slots=2)
        times = []
        for r in routes:
            t0 = time.monotonic()
            sender.send(metas, r, [src[metas[i].name] for i in r.indices])
            times.append(time.monotonic() - t0)
        q.put((dest, rank, {"times": times, "sent": sender.finish()}))
        return
    g = BroadcastGroup("gloo", "127.0.0.1", ports[dest], rank, worlds[dest], 60, name=f"receiver[{dest}]-{rank}")
    time.sleep(RECEIVER_DELAY_S)
    got: dict = {}
    n = receive_buckets(g, metas, buckets_for(routes, dest), lambda pairs: got.update({k: t.clone() for k, t in pairs}))
    q.put((dest, rank, {"bytes": n, "ok": all(torch.equal(t, src[k]) for k, t in got.items()), "names": sorted(got)}))


def test_bucket_sender_pipelines_two_groups_and_each_receiver_gets_its_part_exactly():
    from r1omni_ray.weight_broadcast import ACTORS, ENGINES

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ports, worlds = {ACTORS: _port(), ENGINES: _port()}, {ACTORS: 3, ENGINES: 2}
    members = [(0, None), (1, ACTORS), (2, ACTORS), (1, ENGINES)]
    procs = [ctx.Process(target=_routed_member, args=(r, d, ports, worlds, q)) for r, d in members]
    for p in procs:
        p.start()
    res = {(d, r): v for d, r, v in (q.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(30)
    for r in (1, 2):
        assert res[(ACTORS, r)] == {"bytes": 4 * 64 * 4, "ok": True, "names": ["w0", "w1", "w2", "w5"]}
    assert res[(ENGINES, 1)] == {"bytes": 3 * 64 * 4, "ok": True, "names": ["w2", "w3", "w4"]}
    sender = res[(None, 0)]
    assert sender["sent"] == {ACTORS: 4 * 256, ENGINES: 3 * 256, "sent": 7 * 256}
    # Two buckets in flight without waiting for the receivers; the third reuses the first slot and waits.
    assert sender["times"][0] + sender["times"][1] < RECEIVER_DELAY_S / 2, sender["times"]
    assert sender["times"][2] > RECEIVER_DELAY_S / 2, sender["times"]
