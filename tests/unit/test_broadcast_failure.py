"""A failed weight broadcast, on gloo with the timeouts the NCCL path uses (learner.broadcast_timeout_s): a
receiver that fails before its first collective, or a sender that never sends, frees the waiting side within
the timeout with a named CollectiveError, and the communicator is aborted at once (on NCCL PyTorch's watchdog
would otherwise keep it, or kill the process). The NCCL path itself runs in tools/gpu_check.sh."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from actors.common import free_ports
from r1omni_ray.config import config_from_dict
from r1omni_ray.weight_broadcast import (
    ACTORS,
    BroadcastGroup,
    BucketSender,
    CollectiveError,
    ParamMeta,
    Route,
)

TIMEOUT_S = 2.0


def pair() -> tuple[BroadcastGroup, BroadcastGroup]:
    port = free_ports(1)[0]
    out: dict[int, BroadcastGroup] = {}

    def join(rank: int) -> None:
        out[rank] = BroadcastGroup("gloo", "127.0.0.1", port, rank, 2, TIMEOUT_S, f"rank-{rank}")

    threads = [threading.Thread(target=join, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out[0], out[1]


def test_a_receiver_that_fails_before_its_first_collective_frees_the_sender_within_the_timeout():
    sender, receiver = pair()
    try:
        metas = [ParamMeta("w", (256,), "float32")]
        bs = BucketSender({ACTORS: sender})
        t0 = time.monotonic()
        with pytest.raises(CollectiveError, match=r"rank-0: weight broadcast \(rank 0/2\) failed or timed out after 2s"):
            bs.send(metas, Route((0,), (ACTORS,)), [torch.ones(256)])
            bs.finish()  # the receiver raised before joining the collective: nobody receives
        assert time.monotonic() - t0 < 10 * TIMEOUT_S
        assert sender.pg is None  # aborted at once, not left to a watchdog
        with pytest.raises(CollectiveError, match="aborted after a failed collective"):
            sender.broadcast(torch.ones(4))
    finally:
        sender.close()
        receiver.close()


def test_a_receiver_whose_sender_never_sends_gives_up_within_the_timeout():
    sender, receiver = pair()
    try:
        t0 = time.monotonic()
        with pytest.raises(CollectiveError, match="rank-1: .*timed out after 2s"):
            receiver.broadcast(torch.empty(8))
        assert time.monotonic() - t0 < 10 * TIMEOUT_S and receiver.pg is None
    finally:
        sender.close()
        receiver.close()


def test_the_broadcast_timeout_is_short_by_default():
    lc = config_from_dict({}).learner
    assert lc.broadcast_timeout() == min(lc.dist_timeout_s, 120.0)
    assert config_from_dict({"learner": {"dist_timeout_s": 10}}).learner.broadcast_timeout() == 10
    assert config_from_dict({"learner": {"broadcast_timeout_s": 45}}).learner.broadcast_timeout() == 45
