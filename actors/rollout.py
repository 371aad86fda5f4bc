"""Rollout worker actor: turns records into multimodal prompts and samples G completions per prompt.

A rollout call returns one small object (``PromptSamples`` per prompt: ids, completions, text, weight
version) and, as separate return values, each prompt's media tensors. The caller owns all of them, so the
media outlive a worker that dies afterwards, and only the small one is ever fetched by the driver: the
learners fetch the media themselves.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray
import torch

from actors.common import device, gpu_ids, node_ip, setup_process
from actors.load_progress import LoadProgress
from r1omni_ray.config import RunConfig, config_from_dict
from r1omni_ray.data.errors import DataError
from r1omni_ray.data.media_decoder import MediaDecoder
from r1omni_ray.data.processor import PromptMedia, prompt_modalities
from r1omni_ray.engines.base import Completion, RolloutEngine, SamplingParams
from r1omni_ray.engines.vllm_engine import VLLMEngine, export_key  # imports vllm only when one starts
from r1omni_ray.weight_broadcast import (
    ACTORS,
    ENGINES,
    BroadcastGroup,
    ParamMeta,
    Route,
    buckets_for,
    receive_buckets,
)

log = logging.getLogger("r1omni_ray")
TOWER_CHUNK = 8  # prompts per tower forward: bounds the activations of Whisper-large over 30 s clips


@dataclass
class PromptSamples:
    """One prompt of a step and the G completions sampled for it."""

    uid: int  # index of the prompt in the driver's step batch
    record_id: str
    inputs: Any | None  # OmniInputs without media tensors (None when the record could not be processed)
    completions: list[Completion] = field(default_factory=list)
    weight_version: int = -1
    worker: int = -1
    error: str | None = None
    media_bytes: int = 0
    media_ref: Any = None  # ObjectRef of its PromptMedia, attached by the caller

    def modalities(self) -> tuple[bool, bool]:
        """(video, audio): which media the prompt carries."""
        return prompt_modalities(self.inputs) if self.inputs is not None else (False, False)


def usable_samples(samples: list[PromptSamples], on_error: str) -> tuple[list[PromptSamples], list[PromptSamples]]:
    """Split a step's prompts into trainable ones and records that failed to load (bad media). With
    data.on_error=raise the first bad record stops the run (a DataError naming the record and its file);
    with skip the caller names, counts and remembers them (BatchPipeline.remember). Learners only ever see
    the trainable ones."""
    bad = [g for g in samples if g.error is not None or not g.completions]
    for g in bad:
        reason = g.error or "the rollout returned no completions"
        if on_error == "raise":
            raise DataError(f"record {g.record_id!r} (rollout worker {g.worker}): {reason} "
                            "[data.on_error=raise; data.on_error=skip skips such records]")
    return [g for g in samples if g.error is None and g.completions], bad


# Rollout calls run one at a time in the default group. Weights arrive on a thread of their own ("weights"), so
# an update waits only for the generate call under way, never for the rollouts queued behind it; pings and
# stats ("control") answer while a rollout runs. self.lock keeps the engine to one user at a time; the weight
# sync takes it on every worker (pause_for_weights) before the collective starts, so no rank waits inside a
# collective for another worker's generate call.
@ray.remote(concurrency_groups={"weights": 1, "control": 1})
class RolloutWorker:
    def __init__(self, index: int, ckpt_dir: str, cfg: dict) -> None:
        self.cfg: RunConfig = config_from_dict(cfg)
        rc = self.cfg.rollout
        setup_process(rc.torch_threads)
        self.index = index
        mc = self.cfg.model
        # Each phase of the start is reported as it begins (RolloutGroup names the one that holds a slow start).
        progress = LoadProgress(f"rollout-worker-{index}")
        with progress.phase("policy load"):
            fam = mc.policy_family(ckpt_dir)
            self.processor = fam.load_processor(ckpt_dir, mc, self.cfg.data.input_style)
            model = fam.load_policy(ckpt_dir, mc).to(device())
        self.model = model  # the engine's front end: its frozen towers give the features shipped to learners
        self.ship_vision, self.ship_audio = mc.shipped_tower_features()
        self.engine: RolloutEngine
        if rc.engine == "vllm":
            self.engine = VLLMEngine(
                model, self.processor.tokenizer, rc.export_dir, rc.tensor_parallel_size, rc.gpu_memory_utilization,
                dtype=str(model.dtype).removeprefix("torch."), max_model_len=rc.max_model_len,
                stop_on_checkpoint_eos=rc.stop_on_checkpoint_eos, kv_cache_gib=rc.kv_cache_gib,
                enforce_eager=rc.enforce_eager, threads=rc.torch_threads, on_phase=progress.callback(),
                export_key=export_key(ckpt_dir),
            )
        else:
            from r1omni_ray.engines.hf_engine import HFEngine

            with progress.phase("hf engine"):
                self.engine = HFEngine(model, self.processor.tokenizer, shared_prefix=rc.shared_prefix,
                                     stop_on_checkpoint_eos=rc.stop_on_checkpoint_eos)
        self.load_s = dict(progress.done)
        if torch.cuda.is_available():
            self.processor.feature_device = "cuda"  # the Whisper features' STFT beside the towers
        self.decoder = MediaDecoder(
            lambda rec, v, a: self.processor.process(rec, use_video=v, use_audio=a), rc.decode_threads)
        self.version = 0
        self.sync_group: BroadcastGroup | None = None
        self.busy_s = 0.0
        self.lock = threading.Lock()
        self.paused = False  # the lock is held for a weight update (pause_for_weights -> receive_weights)

    @ray.method(concurrency_group="control")
    def info(self) -> dict[str, Any]:
        return {"index": self.index, "node_ip": node_ip(), "node_id": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid(), "version": self.version, "engine": type(self.engine).__name__,
                "ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
                "gpu_ids": gpu_ids(), "load_s": self.load_s}

    def rollout(
        self, items: list[tuple[int, Any]], params: SamplingParams, use_video: bool = True, use_audio: bool = True,
        prefetch: list[Any] | None = None,
    ) -> tuple[Any, ...]:
        """items: (uid, OmniRecord). Call with ``num_returns=1 + len(items)``: returns the list of
        PromptSamples, then each item's PromptMedia (None for a record whose media failed to load, which
        comes back as a PromptSamples with ``error`` set, never an exception). prefetch: records of the next
        call (OmniRecords), decoded on the decode threads while this one generates."""
        t0 = time.perf_counter()
        samples: list[PromptSamples] = []
        media: list[PromptMedia | None] = []
        full_inputs = []
        decoded = self.decoder.decode([rec for _, rec in items], use_video, use_audio)
        if prefetch:
            self.decoder.prefetch(prefetch, use_video, use_audio)
        for (uid, rec), inp in zip(items, decoded, strict=True):
            if isinstance(inp, DataError):
                samples.append(PromptSamples(uid, rec.id, None, error=str(inp), worker=self.index))
                media.append(None)
                continue
            samples.append(PromptSamples(uid, rec.id, None, worker=self.index))
            media.append(None)
            full_inputs.append((len(samples) - 1, inp))
        with self.lock:  # one weight version for the whole call: updates wait for its end
            full_inputs = self._with_tower_features(full_inputs)
            for k, inp in full_inputs:
                samples[k].inputs, media[k] = inp.split_media()
                samples[k].media_bytes = media[k].nbytes
                samples[k].weight_version = self.version
            if full_inputs:
                outs = self.engine.generate([inp for _, inp in full_inputs], params,
                                            [samples[k].uid for k, _ in full_inputs])
                for (k, _), comps in zip(full_inputs, outs, strict=True):
                    samples[k].completions = comps
        self.busy_s += time.perf_counter() - t0
        return (samples, *media)

    def _with_tower_features(self, inputs: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
        """Frozen towers run here, once per prompt: their outputs replace the raw media, both for this
        worker's own generation and for what the learners fetch (on the CPU, for the object store)."""
        if not (self.ship_vision or self.ship_audio) or not inputs:
            return inputs
        out = []
        for start in range(0, len(inputs), TOWER_CHUNK):
            chunk = inputs[start : start + TOWER_CHUNK]
            feats = self.model.tower_features([inp for _, inp in chunk], self.ship_vision, self.ship_audio)
            for (k, inp), (v, a) in zip(chunk, feats, strict=True):
                out.append((k, inp.with_tower_features(None if v is None else v.cpu(), None if a is None else a.cpu())))
        return out

    # ---- weights ----
    @ray.method(concurrency_group="control")
    def sync_ranks(self) -> dict[str, int]:
        """This worker's ranks in each weight-broadcast group: the actor itself in ACTORS, and with vLLM one
        per vLLM worker process in ENGINES."""
        return {ACTORS: 1} | ({ENGINES: self.engine.engine_ranks()} if isinstance(self.engine, VLLMEngine) else {})

    @ray.method(concurrency_group="weights")
    def init_sync_group(self, joins: dict[str, tuple[str, str, int, int, int]], timeout_s: float) -> bool:
        """joins: group -> (backend, host, port, this worker's first rank, world size). The actor joins ACTORS
        while its vLLM workers join ENGINES (learner-0 joins them in turn: neither side may wait for the other)."""
        with self.lock:
            return self._init_sync_group(joins, timeout_s)

    def _init_sync_group(self, joins: dict[str, tuple[str, str, int, int, int]], timeout_s: float) -> bool:
        if self.sync_group is not None:  # the membership moved: the old group goes first
            self.sync_group.close()
            self.sync_group = None
        backend, host, port, rank, world = joins[ACTORS]

        def join_own() -> None:
            self.sync_group = BroadcastGroup(backend, host, port, rank, world, timeout_s,
                                             name=f"rollout-worker-{self.index}")

        if ENGINES in joins:
            self.engine.join_sync(join_own, *joins[ENGINES], timeout_s)
        else:
            join_own()
        return True

    @ray.method(concurrency_group="weights")
    def pause_for_weights(self) -> int:
        """Returns once the generate call under way (if any) has ended; no other starts until receive_weights
        has run. Idempotent (a retried broadcast pauses again)."""
        if not self.paused:
            self.lock.acquire()
            self.paused = True
        return self.version

    @ray.method(concurrency_group="weights")
    def receive_weights(self, version: int, metas: list[ParamMeta], routes: list[Route]) -> int:
        """One update, between two generate calls: the actor receives its buckets (ACTORS) while the vLLM workers
        receive theirs (ENGINES). Ends the pause, whether it succeeds or raises."""
        assert self.sync_group is not None, "init_sync_group first"
        self.pause_for_weights()
        try:
            return self._receive_weights(version, metas, routes)
        finally:
            self.paused = False
            self.lock.release()

    def _receive_weights(self, version: int, metas: list[ParamMeta], routes: list[Route]) -> int:

        def receive_own() -> None:
            receive_buckets(self.sync_group, metas, buckets_for(routes, ACTORS), self.engine.load_weights, device())

        if isinstance(self.engine, VLLMEngine):
            self.engine.receive(receive_own, metas, buckets_for(routes, ENGINES))
        else:
            receive_own()
        self.version = version
        return version

    def named_tensors(self) -> dict[str, torch.Tensor]:
        with self.lock:
            return {k: v.cpu() for k, v in self.engine.named_tensors().items()}

    @ray.method(concurrency_group="control")
    def stats(self) -> dict[str, float]:
        return {"busy_s": self.busy_s}
