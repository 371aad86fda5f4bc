"""tools/gpu_check.sh runs where this suite cannot (a GPU): what can be checked here is that its training run's
overrides are real keys whose combination the config accepts, so the first GPU run does not stop on a typo."""

from pathlib import Path

from r1omni_ray.config import check_rlvr, load_config
from tools.gpu_checks import CHECKS, TRAIN_OVERRIDES

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_train_check_config_loads_and_passes_the_rules():
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", TRAIN_OVERRIDES)
    check_rlvr(cfg)
    assert cfg.learner.zero_stage == 3 and cfg.learner.gradient_checkpointing and cfg.model.dtype == "bfloat16"
    assert cfg.learner.num_gpus_per_learner == 1 and cfg.train.steps == 3


def test_the_script_runs_every_check_module_function():
    script = (ROOT / "tools" / "gpu_check.sh").read_text()
    assert set(CHECKS) == {"nccl", "vllm_actor", "train", "startup_7b"}
    assert all(f"tools.gpu_checks {name}" in script for name in CHECKS) and "pytest -q -m gpu" in script
