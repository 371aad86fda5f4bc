"""Bytes through the driver per GRPO step at R1-Omni's media shapes, through the real actors.

The checkpoint is tiny in depth but takes R1-Omni's inputs: 8 frames of 224x224 (SigLIP patch 16) and 30 s
of 128-bin Whisper features (3000 frames), i.e. about 6.3 MB of float32 media per prompt, and its towers
have the real widths (SigLIP-base 768, Whisper-large 1280), so their outputs have the real sizes. One
rollout worker, one learner, a few synchronous steps, twice: shipping the raw media, and shipping the
frozen towers' outputs (model.ship_frozen_tower_features, the default: 8 x 196 x 768 SigLIP states and
Whisper's states pooled to 500 x 1280). Each step's `data/driver_bytes` (what the driver received and sent:
prompt metadata, completions, learner shards with media references) is set against `data/media_bytes`
(what the rollout worker produced for the learners, moved by reference).

    python -m bench.data_plane [--prompts 4] [--group-size 4] [--steps 2] [--media raw,features]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from bench.common import bench_trainer, emit, local_ray, machine_info, median, role_groups, rounded


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--media", default="raw,features", help="what the rollout ships: raw media, tower features")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from r1omni_ray.data.records import load_records
    from r1omni_ray.tiny.model import TinySizes, make_tiny_checkpoint
    from r1omni_ray.tiny.synthetic import make_synthetic_dataset

    labels = ["happy", "sad", "angry", "neutral"]
    with tempfile.TemporaryDirectory(prefix="bench_data_plane_") as tmp:
        work = Path(tmp)
        sizes = TinySizes(image_size=224, patch_size=16, num_mel_bins=128, audio_frames=3000, num_frames=8,
                          vision_hidden=768, audio_hidden=1280)
        ckpt = make_tiny_checkpoint(work / "ckpt", sizes=sizes)
        data = make_synthetic_dataset(work / "data", args.prompts, labels=labels, size=224, audio_seconds=30.0,
                                      num_video_frames=8, separate_audio=False)
        records = load_records(data, label_set=labels).records
        with local_ray(4):
            rows = [run(ckpt, records, labels, work / media, args, media == "features")
                    for media in [m.strip() for m in args.media.split(",") if m.strip()]]
    for row in rows:
        emit(row | {"machine": machine_info()})
    if len(rows) == 2:
        emit({"bench": "data_plane", "kind": "summary",
              "media_bytes_features_over_raw": rounded(rows[1]["media_bytes_per_step"] / rows[0]["media_bytes_per_step"], 4)})
    return 0


def run(ckpt, records, labels, work: Path, args: argparse.Namespace, features: bool) -> dict:
    from r1omni_ray.config import config_from_dict

    cfg = config_from_dict({
        "model": {"path": str(ckpt), "ship_frozen_tower_features": features},
        "rollout": {"num_workers": 1, "group_size": args.group_size, "max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens,
                    "num_cpus_per_worker": 1.0},
        "learner": {"num_learners": 1, "zero_stage": 2, "micro_batch_size": 8, "num_cpus_per_learner": 1.0},
        "reward": {"num_actors": 1, "num_cpus_per_actor": 0.25},
        "train": {"steps": args.steps, "prompts_per_step": args.prompts, "output_dir": str(work / "run"),
                  "log_samples": 0},
        "wandb": {"mode": "disabled"},
    })
    with role_groups(cfg, str(ckpt), labels) as groups, \
            bench_trainer(cfg, groups, records, labels, work / "run") as trainer:
        history = trainer.fit()
    driver = median([h["data/driver_bytes"] for h in history])
    media = median([h["data/media_bytes"] for h in history])
    shapes = ({"vision_feats": [8, 196, 768], "audio_feats": [500, 1280]} if features
              else {"frames": [8, 3, 224, 224], "audio": [128, 3000]})
    return {"bench": "data_plane", "media": "tower_features" if features else "raw", "prompts_per_step": args.prompts,
            "group_size": args.group_size, "media_shape": shapes,
            "driver_bytes_per_step": int(driver), "media_bytes_per_step": int(media),
            "driver_to_media_ratio": rounded(driver / media, 6) if media else None,
            "step_s_median": rounded(median([h["time/step"] for h in history]))}


if __name__ == "__main__":
    sys.exit(main())
