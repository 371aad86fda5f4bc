"""Bytes through the driver per GRPO step at R1-Omni's media shapes, through the real actors.

The checkpoint is tiny in width but takes R1-Omni's inputs: 8 frames of 224x224 (SigLIP patch 16) and 30 s
of 128-bin Whisper features (3000 frames), i.e. about 6.3 MB of float32 media per prompt. One rollout
worker, one learner, a few synchronous steps. Each step's `data/driver_bytes` (what the driver received
and sent: prompt metadata, completions, learner shards with media references) is set against
`data/media_bytes` (what the rollout worker produced for the learners, moved by reference).

    python -m bench.data_plane [--prompts 4] [--group-size 4] [--steps 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import ray

from bench.common import emit, machine_info, median, rounded


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from actors.groups import RLVRGroups
    from launch.train_rlvr import RLVRTrainer
    from r1omni_ray.config import WandbConfig, config_from_dict
    from r1omni_ray.data.records import load_records
    from r1omni_ray.data.synthetic import make_synthetic_dataset
    from r1omni_ray.model.loading import make_tiny_checkpoint
    from r1omni_ray.model.tiny import TinySizes
    from r1omni_ray.tracking import RunLogger

    labels = ["happy", "sad", "angry", "neutral"]
    with tempfile.TemporaryDirectory(prefix="bench_data_plane_") as tmp:
        work = Path(tmp)
        sizes = TinySizes(image_size=224, patch_size=16, num_mel_bins=128, audio_frames=3000, num_frames=8)
        ckpt = make_tiny_checkpoint(work / "ckpt", sizes=sizes)
        data = make_synthetic_dataset(work / "data", args.prompts, labels=labels, size=224, audio_seconds=30.0,
                                      num_video_frames=8, separate_audio=False)
        records = load_records(data, label_set=labels).records
        cfg = config_from_dict({
            "model": {"path": str(ckpt)},
            "rollout": {"num_workers": 1, "group_size": args.group_size, "max_new_tokens": args.new_tokens,
                        "num_cpus_per_worker": 1.0},
            "learner": {"num_learners": 1, "zero_stage": 2, "micro_batch_size": 8, "num_cpus_per_learner": 1.0},
            "reward": {"num_actors": 1, "num_cpus_per_actor": 0.25},
            "train": {"steps": args.steps, "prompts_per_step": args.prompts, "output_dir": str(work / "run"),
                      "log_samples": 0},
            "wandb": {"mode": "disabled"},
        })
        started = not ray.is_initialized()
        if started:
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        groups = RLVRGroups.build(cfg, str(ckpt), str(work / "run"), labels)
        try:
            logger = RunLogger(work / "run", WandbConfig(mode="disabled"), {})
            history = RLVRTrainer(cfg, groups, records, None, labels, logger).fit()
            logger.finish()
        finally:
            groups.shutdown()
            if started:
                ray.shutdown()
    driver = median([h["data/driver_bytes"] for h in history])
    media = median([h["data/media_bytes"] for h in history])
    emit({"bench": "data_plane", "machine": machine_info(), "prompts_per_step": args.prompts,
          "group_size": args.group_size, "media_shape": {"frames": [8, 3, 224, 224], "audio": [128, 3000]},
          "driver_bytes_per_step": int(driver), "media_bytes_per_step": int(media),
          "driver_to_media_ratio": rounded(driver / media, 6) if media else None,
          "step_s_median": rounded(median([h["time/step"] for h in history]))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
