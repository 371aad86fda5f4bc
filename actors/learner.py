"""DeepSpeed learner actor: one data-parallel rank. A thin Ray shell over the plain classes in
r1omni_ray.learner (the DeepSpeed policy, the GRPO and SFT steps, export); it adds the process set-up,
fetching a step's media by reference, and the sending side of the weight broadcast."""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import io
import os
import time
from dataclasses import dataclass
from typing import Any

import ray
import torch

from actors.common import device, free_ports, gpu_ids, node_ip, setup_process
from r1omni_ray.config import RunConfig, config_from_dict
from r1omni_ray.learner import export
from r1omni_ray.learner.grpo_update import GRPOUpdate, StepSpec, TrainBatch
from r1omni_ray.learner.policy import DeepSpeedPolicy, forward_modalities
from r1omni_ray.learner.reference import ParkedWeights, frozen_reference, sharded_reference
from r1omni_ray.learner.sft_trainer import SFTTrainer
from r1omni_ray.model.loading import learner_attention, set_lm_attention
from r1omni_ray.weight_broadcast import BroadcastGroup, BucketSender, ParamMeta, Route, param_metas


@dataclass
class LearnerShard:
    """One rank's share of a GRPO step as the driver sends it: small prompt metadata, and references to
    the media that the rank fetches itself."""

    prompts: list[Any]  # OmniInputs without media tensors
    media_refs: list[Any]  # ObjectRef of each prompt's PromptMedia
    prompt_index: list[int]
    completions: list[list[int]]
    advantages: list[float]
    sampling_logprobs: list[list[float]] | None = None
    weights: list[float] | None = None  # 0.0: a padding copy (fewer samples than learners), see TrainBatch

    def resolve(self) -> TrainBatch:
        refs = [r for r in self.media_refs if r is not None]
        fetched = iter(ray.get(refs) if refs else [])
        media = [next(fetched) if r is not None else None for r in self.media_refs]
        prompts = [p.with_media(m) for p, m in zip(self.prompts, media, strict=True)]
        return TrainBatch(prompts, self.prompt_index, self.completions, self.advantages, self.sampling_logprobs,
                          self.weights)


@ray.remote
class LearnerActor:
    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, cfg: dict, ckpt_dir: str,
                 lr: float, with_reference: bool) -> None:
        self.cfg: RunConfig = config_from_dict(cfg)
        self.ckpt_dir = ckpt_dir
        lc = self.cfg.learner
        setup_process(lc.torch_threads)
        self.rank, self.world_size = rank, world_size
        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
            WORLD_SIZE=str(world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
        )
        import deepspeed

        # The rendezvous waits for every rank to start (imports, model loading on a busy node): at least
        # 5 minutes; the collectives themselves get learner.dist_timeout_s (set_dp_timeouts).
        # DeepSpeed print()s "deepspeed_shm_comm_op built successfully" from every rank while it sets up.
        with contextlib.redirect_stdout(io.StringIO()):
            deepspeed.init_distributed(
                dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                timeout=datetime.timedelta(seconds=max(lc.dist_timeout_s, 300.0)),
            )
        self.device = device()
        mc = self.cfg.model
        fam = mc.policy_family(ckpt_dir)
        model = fam.load_policy(ckpt_dir, mc)
        set_lm_attention(model, learner_attention(lc.attn_implementation, self.device, model.dtype,
                                                  importlib.util.find_spec("flash_attn") is not None))
        fam.freeze(model, mc)
        reference, parked = None, None
        if with_reference:
            # Under ZeRO-3 DeepSpeed places it (partitioned); else on the GPU, or parked in host memory.
            home = torch.device("cpu") if lc.ref_offload or lc.zero_stage == 3 else self.device
            reference = frozen_reference(model, *mc.shipped_tower_features(), home)
        model.every_forward_runs = forward_modalities(self.cfg)  # collective under ZeRO-3: see the reference too
        if lc.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self.policy = DeepSpeedPolicy(model, self.cfg, lr, rank, world_size, self.device)
        if reference is not None and self.policy.zero3:
            reference.every_forward_runs = model.every_forward_runs
            reference = sharded_reference(reference, lc.micro_batch_size, lc.ref_offload, self.policy.bf16)
        elif reference is not None and lc.ref_offload:
            parked = ParkedWeights(reference)
        self.grpo = GRPOUpdate(self.policy, reference, self.cfg, parked)
        self._sft: SFTTrainer | None = None
        self.sender: BucketSender | None = None

    # ---- info ----
    def info(self) -> dict[str, Any]:
        sync_ports = sorted(g.port for g in self.sender.groups.values()) if self.sender is not None else []
        return {"rank": self.rank, "node_ip": node_ip(), "node_id": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid(), "version": self.policy.version, "master_port": int(os.environ["MASTER_PORT"]),
                "sync_ports": sync_ports, "ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
                "gpu_ids": gpu_ids()}

    def sync_metas(self) -> list[ParamMeta]:
        """Layout of the tensors broadcast to rollout workers: every trainable parameter."""
        return param_metas((n, p) for n, p in self.policy.module.named_parameters() if p.requires_grad)

    # ---- training ----
    def train(self, shard: LearnerShard, spec: StepSpec) -> dict[str, float]:
        """One GRPO step: fetch the media, reference (and, off-policy, old) log-probs, update."""
        t0 = time.perf_counter()
        batch = shard.resolve()
        fetch_s = time.perf_counter() - t0
        return self.grpo.train(batch, spec) | {"fetch_media_s": fetch_s}

    def logprobs(self, shard: LearnerShard, num_micro: int) -> list[list[float]]:
        """Completion log-probs under the current weights (no update)."""
        return self.grpo.logprobs(shard.resolve(), num_micro)

    def sft_batch(self, records: list[Any], num_micro: int, use_video: bool = True,
                  use_audio: bool = True) -> dict[str, Any]:
        if self._sft is None:
            mc = self.cfg.model
            proc = mc.policy_family(self.ckpt_dir).load_processor(self.ckpt_dir, mc, self.cfg.data.input_style)
            self._sft = SFTTrainer(self.policy, proc, self.cfg)
        return self._sft.train_records(records, num_micro, use_video, use_audio)

    def debug_inject_nonfinite_grad(self, value: float = float("nan")) -> bool:
        """Test-only fault injection: the next update's gradients on this rank get `value` added."""
        self.policy.inject_nonfinite_grad(value)
        return True

    # ---- weight broadcast (sending side) ----
    def free_ports(self, n: int, port_range: tuple[int, int] | None = None) -> list[int]:
        """Ports free on this node (the one that binds the broadcast groups' stores)."""
        return free_ports(n, port_range)

    def init_sync_group(self, groups: dict[str, tuple[str, str, int, int]], timeout_s: float) -> bool:
        """groups: receiving group -> (backend, host, port, world size); rank 0 is rank 0 of each. Joined one
        after the other in a fixed order (the receivers join all of theirs at once)."""
        if self.rank != 0:
            return True
        if self.sender is not None:  # the membership moved: the old groups go first
            self.sender.close()
            self.sender = None
        joined = {}
        for dest, (backend, host, port, world) in sorted(groups.items()):
            joined[dest] = BroadcastGroup(backend, host, port, 0, world, timeout_s, name=f"learner-0[{dest}]")
        self.sender = BucketSender(joined, self.device)
        return True

    def broadcast_weights(self, version: int, routes: list[Route]) -> dict[str, float]:
        """All learner ranks call this (ZeRO-3 gathers are collective); rank 0 sends each bucket to its
        groups while the ranks gather the next one."""
        import deepspeed

        t0 = time.perf_counter()
        named = [p for _, p in self.policy.module.named_parameters() if p.requires_grad]
        metas = self.sync_metas()
        for r in routes:
            params = [named[i] for i in r.indices]
            gather = (deepspeed.zero.GatheredParameters(params, modifier_rank=None) if self.policy.zero3
                      else contextlib.nullcontext())
            with gather:
                if self.rank == 0:
                    self.sender.send(metas, r, [p.data for p in params])
        sent = self.sender.finish() if self.rank == 0 else {}
        self.policy.version = version
        return {"broadcast_s": time.perf_counter() - t0, "broadcast_bytes": float(sent.get("sent", 0))}

    # ---- weights out ----
    def full_state(self) -> dict[str, torch.Tensor]:
        return export.full_state(self.policy)

    def save_hf(self, out_dir: str) -> str | None:
        return export.save_hf(self.policy, self.ckpt_dir, out_dir)

    def save_checkpoint(self, ckpt_dir: str, tag: str) -> str:
        return export.save_checkpoint(self.policy, ckpt_dir, tag)

    def load_checkpoint(self, ckpt_dir: str, tag: str) -> int:
        return export.load_checkpoint(self.policy, ckpt_dir, tag)

    def weights_checksum(self) -> list[float]:
        return export.weights_checksum(self.policy)
