"""Run logging: a metrics.jsonl next to the run, and Weights & Biases (offline without an API key)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("r1omni_ray")


def resolve_wandb_mode(mode: str) -> str:
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


class RunLogger:
    def __init__(self, out_dir: str | Path, wandb_cfg: Any, run_config: dict[str, Any], job_type: str = "rlvr",
                 resume_id: str | None = None) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out / "metrics.jsonl"
        self.run = None
        # W&B needs a monotonically increasing step; SFT, RLVR and eval share one run, so W&B gets a
        # running counter and each record carries its own logical step ("step", "sft/step").
        self._wandb_step = 0
        mode = resolve_wandb_mode(wandb_cfg.mode)
        if mode != "disabled":
            import wandb

            self.run = wandb.init(
                project=wandb_cfg.project, name=wandb_cfg.run_name, config=run_config, mode=mode,
                dir=str(Path(wandb_cfg.dir) if wandb_cfg.dir else self.out), job_type=job_type,
                tags=list(wandb_cfg.tags), id=resume_id, resume="allow" if resume_id else None,
                settings=wandb.Settings(console="off", silent=True),
            )
            if mode == "offline":
                log.info("W&B offline run in %s; upload later with `wandb sync %s`", self.run.dir, Path(self.run.dir).parent)

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        clean = {k: v for k, v in metrics.items() if isinstance(v, int | float | str | bool)}
        record = {"step": step, **clean}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.run is not None:
            self.run.log({**metrics, "step": step}, step=self._wandb_step)
            self._wandb_step += 1

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        with (self.out / f"{key.replace('/', '_')}.jsonl").open("a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **dict(zip(columns, r, strict=True))}, default=str) + "\n")
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows), "step": step}, step=self._wandb_step)
            self._wandb_step += 1

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
