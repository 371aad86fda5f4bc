"""grpo.mini_batches: each optimizer step's global counts, computed by the driver exactly as the learners cut
their micro-batches (every rank runs the same micro-batches per mini-batch, ZeRO-3's requirement)."""

from types import SimpleNamespace

from r1omni_ray.learner.grpo_update import StepSpec, mini_batch_counts
from r1omni_ray.learner.policy import micro_slices


def shard(lens, groups, weights=None):
    return SimpleNamespace(completions=[[1] * n for n in lens], prompt_index=groups, weights=weights)


def test_counts_follow_the_learners_micro_batches_and_skip_padding_copies():
    shards = [shard([3, 0, 5, 1, 2, 4], [0, 0, 1, 1, 2, 2]),
              shard([2, 2, 7], [0, 0, 1]),
              shard([6, 2, 9], [0, 1, 2], weights=[1.0, 1.0, 0.0])]  # the last a padding copy: counts nothing
    num_micro, mbs = 3, 2
    counts = mini_batch_counts(shards, num_micro, mbs, 2)
    # mini-batch 0 = micro-batch 0 and 1 of each rank, mini-batch 1 = micro-batch 2 (split_even(3, 2))
    want = [[0, 0], [0, 0]]
    for sh in shards:
        sl = micro_slices(len(sh.completions), num_micro, sh.prompt_index, mbs)
        w = sh.weights or [1.0] * len(sh.completions)
        for j, ks in enumerate(([0, 1], [2])):
            for k in ks:
                for i in range(sl[k].start, sl[k].stop):
                    want[j][0] += len(sh.completions[i]) * (w[i] > 0)
                    want[j][1] += w[i] > 0
    assert counts == tuple(map(tuple, want))
    assert sum(t for t, _ in counts) == 15 + 11 + 8 and sum(n for _, n in counts) == 11
    spec = StepSpec(num_micro, 34, 11, 8, mini_counts=counts)
    assert [(list(r), t, n) for r, t, n in spec.mini_batches()] == [([0, 1], *counts[0]), ([2], *counts[1])]


def test_one_mini_batch_is_the_whole_step_and_never_more_than_the_micro_batches():
    shards = [shard([1, 2], [0, 1])]
    assert mini_batch_counts(shards, 2, 1, 1) == ()
    assert StepSpec(2, 3, 2, 4).mini_batches() == [(range(2), 3, 2)]
    assert len(mini_batch_counts(shards, 2, 1, 5)) == 2  # at most one per micro-batch
    # a mini-batch of empty completions still divides by something (its loss is 0 anyway)
    assert mini_batch_counts([shard([0, 4], [0, 1])], 2, 1, 2) == ((1, 1), (4, 1))
