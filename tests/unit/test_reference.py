"""Where the frozen reference waits between steps (learner.ref_offload below ZeRO-3): its weights in host
memory, device copies for the reference pass only, nothing copied back. The move to a GPU itself is checked
in tests/system/test_gpu_memory.py."""

import torch
from torch import nn

from r1omni_ray.learner.reference import ParkedWeights


def test_parked_weights_live_in_host_tensors_that_stay_put():
    m = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    m.register_buffer("scale", torch.full((3,), 2.0))
    x = torch.randn(2, 4)
    expected = m(x) * m.scale
    parked = ParkedWeights(m)
    tensors = [*m.parameters(), *m.buffers()]
    assert [t.data_ptr() for t in tensors] == [h.data_ptr() for h in parked.host]
    with parked.on("cpu"):  # already home: nothing moves, nothing is copied
        torch.testing.assert_close(m(x) * m.scale, expected, rtol=0, atol=0)
    assert [t.data_ptr() for t in tensors] == [h.data_ptr() for h in parked.host]
