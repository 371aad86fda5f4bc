"""The one-GPU readiness checks that tools/gpu_check.sh runs, one per call: ``python -m tools.gpu_checks NAME``.
Each prints one JSON line {"check", "ok", ...} and exits 0 when it passed. They need a CUDA GPU and the GPU
install (make setup-gpu: vLLM 0.33, Ray, DeepSpeed); nothing here runs in the CPU suite.

  nccl        the weight broadcast over NCCL: one bucket through BucketSender, finish, close (abort); a
              two-rank group when two GPUs are visible; a receiver that never joins the collective frees
              the sender within learner.broadcast_timeout_s with a CollectiveError, the communicator aborted
  vllm_actor  a Ray actor builds VLLMEngine (distributed_executor_backend="mp"), takes a weight update, and
              generates greedily; the update changes the output
  train       three RLVR steps: one ZeRO-3 bf16 learner with gradient checkpointing on the GPU (hf rollouts)
  startup_7b  start-up time of a random-weight 7B-shaped VLLMEngine, twice at the same export path: the second
              start finds vLLM's compile cache (the stable path, issue 34)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def emit(check: str, ok: bool, **kw) -> None:
    print(json.dumps({"check": check, "ok": ok} | kw), flush=True)


def check_nccl() -> bool:
    from actors.common import free_ports
    from r1omni_ray.weight_broadcast import (
        ACTORS,
        BroadcastGroup,
        BucketSender,
        CollectiveError,
        ParamMeta,
        Route,
    )

    metas = [ParamMeta("w", (1 << 20,), "bfloat16")]
    port = free_ports(1)[0]
    solo = BroadcastGroup("nccl", "127.0.0.1", port, 0, 1, 30, "learner-0")
    sender = BucketSender({ACTORS: solo}, "cuda")
    sender.send(metas, Route((0,), (ACTORS,)), [torch.ones(1 << 20, dtype=torch.bfloat16, device="cuda")])
    sent = sender.finish()["sent"]
    sender.close()
    result = {"one_rank_bytes": sent, "closed": solo.pg is None}
    if torch.cuda.device_count() >= 2:
        import torch.multiprocessing as mp

        port = free_ports(1)[0]
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=_receiver, args=(port, q, False))
        p.start()
        g = BroadcastGroup("nccl", "127.0.0.1", port, 0, 2, 5, "learner-0")
        t0 = time.monotonic()
        try:
            g.broadcast(torch.ones(1024, device="cuda:0"))
            result["two_rank_timeout"] = "no error: the receiver joined?"
        except CollectiveError as e:
            result["two_rank_timeout_s"] = round(time.monotonic() - t0, 1)
            result["two_rank_error"] = str(e)[:160]
            result["aborted"] = g.pg is None
        p.join(60)
    ok = sent > 0 and result["closed"] and result.get("aborted", True)
    emit("nccl", ok, **result)
    return ok


def _receiver(port: int, q, join_collective: bool) -> None:
    torch.cuda.set_device(1)
    from r1omni_ray.weight_broadcast import BroadcastGroup

    g = BroadcastGroup("nccl", "127.0.0.1", port, 1, 2, 5, "rollout-worker-0")
    if join_collective:
        g.broadcast(torch.empty(1024, device="cuda:1"))
    time.sleep(15)  # raised before its first collective: never joins it
    g.close()


def check_vllm_actor() -> bool:
    import ray

    from r1omni_ray.tiny.model import make_tiny_checkpoint

    ray.init(address="local", include_dashboard=False, log_to_driver=True)
    try:
        from r1omni_ray.tiny.synthetic import SYNTHETIC_VOCAB_TEXTS, make_synthetic_dataset

        work = Path(tempfile.mkdtemp())
        ckpt = make_tiny_checkpoint(work / "ckpt", corpus=tuple(SYNTHETIC_VOCAB_TEXTS))  # as the GPU tests build it
        data = make_synthetic_dataset(work / "data", 2, seed=0, prefix="train")

        @ray.remote(num_gpus=1)
        class EngineActor:
            def run(self, ckpt: str, data: str) -> dict:
                sys.path.insert(0, str(ROOT))
                from r1omni_ray.data.processor import OmniProcessor
                from r1omni_ray.engines.base import SamplingParams
                from r1omni_ray.engines.vllm_engine import VLLMEngine, engine_args
                from r1omni_ray.model.loading import load_policy
                from tests.vllm_support import push_weights

                assert engine_args("x", "cuda", 1, "bfloat16", 0.3, 512, None, None)["distributed_executor_backend"] == "mp"
                proc = OmniProcessor.from_pretrained(ckpt)
                policy = load_policy(ckpt, "bfloat16").cuda()
                t0 = time.perf_counter()
                eng = VLLMEngine(policy, proc.tokenizer, tempfile.mkdtemp(), gpu_memory_utilization=0.3,
                                 max_model_len=1024)
                start_s = time.perf_counter() - t0
                from r1omni_ray.data.records import load_records

                prompt = [proc.process(r) for r in load_records(data).records[:2]]
                params = SamplingParams(greedy=True, max_new_tokens=8)
                before = [g[0].token_ids for g in eng.generate(prompt, params)]
                new = load_policy(ckpt, "bfloat16").cuda()
                with torch.no_grad():
                    for n, p in new.named_parameters():
                        if n.startswith("model.layers."):
                            p.add_(torch.randn_like(p) * 0.5)
                pushed = push_weights(eng, [(n, p.detach()) for n, p in new.named_parameters()], 1 << 20)
                after = [g[0].token_ids for g in eng.generate(prompt, params)]
                eng.close()
                return {"start_s": round(start_s, 1), "before": before, "after": after, "pushed": str(pushed)[:200]}

        out = ray.get(EngineActor.remote().run.remote(str(ckpt), str(data)), timeout=420)
        ok = all(out["before"]) and out["before"] != out["after"]
        emit("vllm_actor", ok, **out)
        return ok
    finally:
        ray.shutdown()


# The train check's run: tiny_cpu.yaml's model and data, one ZeRO-3 bf16 learner on the GPU (checked on CPU by
# tests/unit/test_gpu_check_config.py: every key exists and the combination passes the config's rules).
TRAIN_OVERRIDES = [
    "train.steps=3", "train.prompts_per_step=4", "learner.num_learners=1", "learner.zero_stage=3",
    "learner.gradient_checkpointing=true", "learner.num_gpus_per_learner=1", "learner.micro_batch_size=8",
    "model.dtype=bfloat16", "rollout.engine=hf", "rollout.num_workers=1", "rollout.group_size=4",
    "rollout.max_new_tokens=16", "data.synthetic.num_train=16", "data.synthetic.num_eval=8",
    "data.synthetic.num_sft=8", "wandb.mode=offline",
]


def check_train() -> bool:
    out = Path(tempfile.mkdtemp()) / "rlvr"
    cmd = [sys.executable, "-m", "launch.train_rlvr", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"),
           "--overwrite", f"train.output_dir={out}", *TRAIN_OVERRIDES]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=540)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] if (out / "metrics.jsonl").exists() else []
    ok = r.returncode == 0 and len(rows) == 3
    emit("train", ok, seconds=round(time.monotonic() - t0, 1), steps=len(rows),
         losses=[row.get("learner/loss") for row in rows], error=r.stderr.strip().splitlines()[-1:] if not ok else [])
    return ok


def check_startup_7b() -> bool:
    from bench.memory_model import build_config
    from r1omni_ray.data.processor import OmniProcessor
    from r1omni_ray.engines.vllm_engine import VLLMEngine, export_key
    from r1omni_ray.model.modeling import HumanOmniQwen2ForCausalLM
    from r1omni_ray.tiny.model import make_tiny_checkpoint

    tiny = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tok")
    tok = OmniProcessor.from_pretrained(tiny).tokenizer
    base = Path(tempfile.mkdtemp())
    key = export_key(tiny)  # the same "checkpoint" both times: the same stable export path
    times = []
    for _ in range(2):
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda"):
            model = HumanOmniQwen2ForCausalLM(build_config("7b"))
        torch.set_default_dtype(torch.float32)
        t0 = time.perf_counter()
        eng = VLLMEngine(model, tok, base, gpu_memory_utilization=0.85, max_model_len=2048, export_key=key)
        times.append(round(time.perf_counter() - t0, 1))
        eng.close()
        del eng, model
        torch.cuda.empty_cache()
    emit("startup_7b", True, first_s=times[0], second_s=times[1], second_over_first=round(times[1] / times[0], 3))
    return True


CHECKS = {"nccl": check_nccl, "vllm_actor": check_vllm_actor, "train": check_train, "startup_7b": check_startup_7b}

if __name__ == "__main__":
    name = sys.argv[1]
    if not torch.cuda.is_available():
        emit(name, False, error="no CUDA GPU")
        sys.exit(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        sys.exit(0 if CHECKS[name]() else 1)
    except Exception as e:  # noqa: BLE001 - one line per check, the summary counts it
        emit(name, False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}")
        sys.exit(1)
