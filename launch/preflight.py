"""Checks that run before Ray starts: every path the run will read exists, paths mean the same thing inside
a Ray job, and a fresh run does not write into an earlier run's directory. Each failure is one ConfigError
line naming the field; nothing has been started or written when it is raised."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from r1omni_ray.config import ConfigError, RunConfig

log = logging.getLogger("r1omni_ray")

# Set by `ray job submit` in the entrypoint's environment (ray/_private/runtime_env/constants.py).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# What a run writes into train.output_dir (data/ and init_model/ are reproducible inputs, kept).
RUN_OUTPUTS = ("metrics.jsonl", "checkpoints", "final_model", "sft_model", "wandb", "eval")


def in_ray_job() -> bool:
    return RAY_JOB_ENV in os.environ


def run_paths(cfg: RunConfig, init_ckpt: str | None = None) -> dict[str, str]:
    """The configured paths, by the name a user sets them with."""
    paths = {"train.output_dir": cfg.train.output_dir, "model.path": cfg.model.path, "--init-ckpt": init_ckpt,
             "data.train_path": cfg.data.train_path, "data.eval_path": cfg.data.eval_path,
             "data.sft_path": cfg.data.sft_path, "data.root": cfg.data.root, "wandb.dir": cfg.wandb.dir}
    return {k: v for k, v in paths.items() if v}


def check_job_paths(cfg: RunConfig, init_ckpt: str | None = None) -> None:
    """Inside a Ray job the working directory is a temporary copy of the submitter's: a relative path would
    read from (or write into) that copy, so every path must be absolute there."""
    if not in_ray_job():
        return
    for name, value in run_paths(cfg, init_ckpt).items():
        if not Path(value).is_absolute():
            raise ConfigError(f"{name}={value!r} is relative: inside a Ray job it would resolve in the job's "
                              "temporary working dir; give an absolute path (on storage every node shares)")


def check_inputs(cfg: RunConfig, init_ckpt: str | None = None) -> None:
    for name in ("model.path", "--init-ckpt"):
        value = run_paths(cfg, init_ckpt).get(name)
        if value is not None and not (Path(value) / "config.json").is_file():
            what = "does not exist" if not Path(value).exists() else "has no config.json"
            raise ConfigError(f"{name}={value!r}: {what} (a local HF-format checkpoint directory is expected)")
        if value is not None:
            try:
                cfg.model.policy_family(value).check(value)
            except ValueError as e:  # a family/checkpoint mismatch, a Qwen2.5-Omni checkpoint without a thinker
                raise ConfigError(f"{name}={value!r}: {e}") from None
    for name in ("data.train_path", "data.eval_path", "data.sft_path"):
        value = run_paths(cfg).get(name)
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"{name}={value!r}: no such file")
    root = cfg.data.root
    if root is not None and not Path(root).is_dir():
        raise ConfigError(f"data.root={root!r}: no such directory")


def claim_output_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> None:
    """A fresh run into a directory holding another run's outputs is refused (it would append to its
    metrics and mix checkpoints) unless it resumes that run or overwrite clears those outputs."""
    out = Path(cfg.train.output_dir)
    found = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if not found or resume:
        return
    if not overwrite:
        raise ConfigError(f"train.output_dir={str(out)!r} already holds a run ({', '.join(found)}): use --resume to "
                          "continue it, --overwrite to replace it, or another train.output_dir")
    for name in found:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    log.info("--overwrite: removed %s from %s", ", ".join(found), out)


def preflight(cfg: RunConfig, init_ckpt: str | None = None, resume: bool = False, overwrite: bool = False) -> None:
    check_job_paths(cfg, init_ckpt)
    check_inputs(cfg, init_ckpt)
    claim_output_dir(cfg, resume, overwrite)
    for name, value in run_paths(cfg, init_ckpt).items():
        log.info("%s = %s", name, Path(value).resolve())
