"""A 32-prompt x 8-frame batch on a GPU at the configured memory utilisation (R1OMNI_GPU_UTIL, 0.6): in a module
of its own, so that test_vllm_gpu.py's engine has been closed (its 0.3 share returned) before this one starts.
Skipped where vllm or CUDA is missing."""

import importlib.util
import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(),
                       reason="needs vllm and a CUDA GPU"),
]


def test_a_32_prompt_8_frame_batch_fits(tiny_ckpt, tmp_path):
    """Evaluation-sized batch at the configured memory utilisation (chunked embedding)."""
    from r1omni_ray.data.processor import OmniProcessor
    from r1omni_ray.data.records import load_records
    from r1omni_ray.engines.base import SamplingParams
    from r1omni_ray.engines.vllm_engine import VLLMEngine
    from r1omni_ray.model.loading import load_policy
    from r1omni_ray.tiny.model import TinySizes, make_tiny_checkpoint
    from r1omni_ray.tiny.synthetic import make_synthetic_dataset

    sizes = TinySizes(image_size=224, patch_size=16, num_mel_bins=128, audio_frames=3000, num_frames=8)
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", sizes=sizes)
    data = make_synthetic_dataset(tmp_path / "d", 32, size=224, audio_seconds=30.0, separate_audio=False)
    proc = OmniProcessor.from_pretrained(ckpt)
    util = float(os.environ.get("R1OMNI_GPU_UTIL", "0.6"))
    engine = VLLMEngine(load_policy(ckpt, "bfloat16").cuda(), proc.tokenizer, tmp_path, gpu_memory_utilization=util)
    try:
        out = engine.generate([proc.process(r) for r in load_records(data).records],
                              SamplingParams(greedy=True, max_new_tokens=8))
    finally:
        engine.close()
    assert len(out) == 32
