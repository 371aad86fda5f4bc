"""One full RLVR step at R1-Omni-0.5B's published size, on CPU, through the real actors.

The model is built from the published config.json and tower configs (shared/reference/
r1omni_0.5b_checkpoint_keys.json: Qwen2.5-0.5B, SigLIP-base/16 at 224 px, the Whisper-large-v3 encoder,
BERT-base, all_in_one_small projector) with random weights, and saved as a checkpoint in the real layout
(the tokenizers are the locally built tiny ones: no hub here). Then the real role groups run one step: a
rollout worker (transformers engine) samples G=2 completions of 16 new tokens for 1 prompt (8 frames and
30 s of audio: 392 + 500 visual/audio tokens), a reward actor scores them, 1 DeepSpeed learner with a
frozen reference updates, and the new weights are broadcast back. Printed: the peak resident memory of each
actor and of the driver (VmHWM from /proc), the lowest MemAvailable seen during the run, and the time of
each phase. It takes minutes; it is no test.

Run: python -m bench.real_size_step   (needs ../shared/reference beside the repo, or --reference)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray
import torch

from bench.common import BENCH_LABELS, bench_trainer, emit, local_ray, machine_info, role_groups, rounded

DEFAULT_REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "r1omni_0.5b_checkpoint_keys.json"
GIB = 2**30


def build_real_size_checkpoint(out: Path, reference: dict[str, Any], seed: int) -> dict[str, Any]:
    """The published config and tower configs, random weights, tiny tokenizers; the real processors' sizes
    (224 px frames, 128 mel bins over 30 s, 8 frames)."""
    from r1omni_ray.model.loading import load_model_config
    from r1omni_ray.model.modeling import HumanOmniQwen2ForCausalLM
    from r1omni_ray.model.towers import AUDIO_SUBDIR, BERT_SUBDIR, VISION_SUBDIR
    from r1omni_ray.tiny.processor import make_tiny_processor

    towers = reference["tower_configs"]
    vision, audio = towers["siglip-base-patch16-224"], towers["whisper-large-v3"]
    proc = make_tiny_processor(out, image_size=vision["vision_config"]["image_size"] if "vision_config" in vision
                               else vision["image_size"], num_mel_bins=audio["num_mel_bins"], audio_seconds=30,
                               num_frames=reference["config_json"]["num_frames"])
    for sub, name in ((VISION_SUBDIR, "siglip-base-patch16-224"), (AUDIO_SUBDIR, "whisper-large-v3"),
                      (BERT_SUBDIR, "bert-base-uncased")):
        (out / sub / "config.json").write_text(json.dumps(towers[name]))
    tok = proc.tokenizer
    cfg = dict(reference["config_json"], mm_vision_tower=VISION_SUBDIR, mm_audio_tower=AUDIO_SUBDIR,
               text_model_path=BERT_SUBDIR, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    (out / "config.json").write_text(json.dumps(cfg))
    config = load_model_config(out)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = HumanOmniQwen2ForCausalLM(config)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    params = sum(p.numel() for p in model.parameters())
    by_part = {k: sum(p.numel() for n, p in model.named_parameters() if n.startswith(f"model.{k}"))
               for k in ("vision_tower", "audio_tower", "bert_model", "mm_projector", "audio_projector", "layers")}
    model.save_pretrained(out)
    del model
    gc.collect()
    return {"params": params, "params_by_part": by_part, "build_and_save_s": rounded(time.perf_counter() - t0)}


def peak_rss_gib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return rounded(int(line.split()[1]) * 1024 / GIB, 3)
    except OSError:
        return None
    return None


class MemWatch:
    """Lowest MemAvailable over the run (the machine-wide headroom), sampled every 0.2 s."""

    def __init__(self) -> None:
        self.low = float("inf")
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _meminfo() -> dict[str, int]:
        out = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0]) * 1024
        return out

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.low = min(self.low, self._meminfo()["MemAvailable"])

    def __enter__(self) -> MemWatch:
        self.total = self._meminfo()["MemTotal"]
        self._t.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._t.join()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", default=str(DEFAULT_REFERENCE))
    p.add_argument("--group-size", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=16)
    # One rank partitions nothing; ZeRO-1/2 would only add fp32 master copies and flat gradient buffers (the
    # learner peaked at 20.5 GiB with ZeRO-2 and Ray's memory monitor killed it; 13.6 GiB with 0).
    p.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3))
    p.add_argument("--threads", type=int, default=2, help="torch threads of the worker and the learner")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    ref_path = Path(args.reference)
    if not ref_path.is_file():
        raise SystemExit(f"{ref_path}: not found (the shared reference folder beside the repo; or --reference)")
    reference = json.loads(ref_path.read_text())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from r1omni_ray.config import config_from_dict
    from r1omni_ray.data.records import load_records
    from r1omni_ray.tiny.synthetic import make_synthetic_dataset

    tmp = tempfile.TemporaryDirectory(prefix="bench_real_size_")
    work = Path(args.work_dir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "r1omni-0.5b-random"
    ckpt.mkdir(exist_ok=True)
    with MemWatch() as mem:
        built = build_real_size_checkpoint(ckpt, reference, args.seed)
        emit({"bench": "real_size_step", "kind": "config", "machine": machine_info(), "checkpoint": built,
              "checkpoint_bytes": sum(f.stat().st_size for f in ckpt.glob("*.safetensors")),
              "group_size": args.group_size, "new_tokens": args.new_tokens, "zero_stage": args.zero_stage,
              "threads": args.threads})
        data = make_synthetic_dataset(work / "data", 1, labels=BENCH_LABELS, seed=args.seed, audio_seconds=30.0,
                                      size=64, separate_audio=True)
        records = load_records(data).records
        out = work / "run"
        cfg = config_from_dict({
            "model": {"path": str(ckpt)},
            "rollout": {"engine": "hf", "num_workers": 1, "group_size": args.group_size,
                        "max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "num_cpus_per_worker": 1.0,
                        "torch_threads": args.threads, "max_restarts": 0},
            "reward": {"num_actors": 1, "num_cpus_per_actor": 0.25},
            "learner": {"num_learners": 1, "zero_stage": args.zero_stage, "micro_batch_size": args.group_size,
                        "num_cpus_per_learner": 1.0, "torch_threads": args.threads, "dist_timeout_s": 1800},
            "train": {"steps": 1, "prompts_per_step": 1, "seed": args.seed, "output_dir": str(out),
                      "log_samples": 0, "eval_every": 0},
            "wandb": {"mode": "disabled"},
        })
        with local_ray(4):
            t0 = time.perf_counter()
            with role_groups(cfg, str(ckpt), BENCH_LABELS) as groups:
                startup = time.perf_counter() - t0
                with bench_trainer(cfg, groups, records, BENCH_LABELS, out) as trainer:
                    row = trainer.fit()[-1]
                pids = {f"rollout_worker_{i}": ray.get(w.info.remote())["pid"]
                        for i, w in enumerate(groups.rollout.workers)}
                pids |= {f"learner_{i}": ray.get(a.info.remote())["pid"] for i, a in enumerate(groups.learners.actors)}
                pids |= {f"reward_actor_{i}": ray.get(a.__ray_call__.remote(lambda self: os.getpid()))
                         for i, a in enumerate(groups.rewards.actors)}
                peaks = {name: peak_rss_gib(pid) for name, pid in pids.items()} | {"driver": peak_rss_gib(os.getpid())}
    times = {k.removeprefix("time/"): rounded(v) for k, v in row.items() if k.startswith("time/")}
    emit({"bench": "real_size_step", "kind": "result", "actor_startup_s": rounded(startup), "phase_s": times,
          "peak_rss_gib": peaks,
          # The actors run together; the driver's own peak was building the checkpoint, before Ray started.
          "actors_peak_rss_gib_sum": rounded(sum(v for k, v in peaks.items() if v and k != "driver"), 3),
          "min_mem_available_gib": rounded(mem.low / GIB, 3), "mem_total_gib": rounded(mem.total / GIB, 3),
          "peak_used_gib": rounded((mem.total - mem.low) / GIB, 3),
          "reward_mean": row.get("reward/total_mean"), "samples": row.get("samples"),
          "completion_length_mean": row.get("response/length_mean"), "loss": row.get("learner/loss"),
          "weight_version": row.get("weight_version")})
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
