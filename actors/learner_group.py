"""The DeepSpeed learner ranks as one group: placement, rendezvous, and one call per step for every rank,
with the first failure raised at once naming its rank."""

from __future__ import annotations

from typing import Any

import ray
from ray.exceptions import RayActorError

from actors.calls import wait_named
from actors.learner import LearnerActor, LearnerShard
from actors.placement import (
    actor_options,
    address_of_bundle,
    bundles,
    create_placement_group,
    in_bundle,
    release,
)
from actors.rollout import PromptSamples
from r1omni_ray.config import RunConfig
from r1omni_ray.data.sampler import plan_learner_shards
from r1omni_ray.learner.grpo_update import StepSpec
from r1omni_ray.step_metrics import reduce_learner_metrics


class LearnerGroup:
    def __init__(self, cfg: RunConfig, ckpt_dir: str, lr: float | None = None,
                 with_reference: bool | None = None) -> None:
        """lr defaults to learner.lr; with_reference (a frozen copy for the KL term) to
        learner.use_reference when grpo.beta > 0."""
        lc = cfg.learner
        self.cfg = cfg
        self.pg = create_placement_group(
            bundles(lc.num_learners, lc.num_cpus_per_learner, lc.num_gpus_per_learner, lc.node_resource), cfg,
            "learner group (learner.num_learners x num_cpus/gpus_per_learner)")
        master_addr, (master_port,) = address_of_bundle(self.pg, 0, 1, cfg.ray.port_range)
        ref = lc.use_reference and cfg.grpo.beta > 0 if with_reference is None else with_reference
        self.actors = [
            LearnerActor.options(**actor_options(
                cfg, num_cpus=lc.num_cpus_per_learner, num_gpus=lc.num_gpus_per_learner,
                scheduling_strategy=in_bundle(self.pg, r))).remote(r, lc.num_learners, master_addr, master_port, cfg.to_dict(), ckpt_dir,
                     lc.lr if lr is None else lr, ref)
            for r in range(lc.num_learners)
        ]
        wait_named([(f"learner-{r}", "__init__", a.info.remote()) for r, a in enumerate(self.actors)])

    def _all(self, method: str, *args: Any) -> list[Any]:
        return wait_named([(f"learner-{r}", method, getattr(a, method).remote(*args)) for r, a in enumerate(self.actors)])

    def train(self, shards: list[LearnerShard], spec: StepSpec) -> dict[str, float]:
        """One GRPO step on every rank; the ranks' metrics reduced to one value each."""
        return reduce_learner_metrics(self.train_per_rank(shards, spec))

    def train_per_rank(self, shards: list[LearnerShard], spec: StepSpec) -> list[dict[str, float]]:
        calls = [(f"learner-{r}", "train", a.train.remote(s, spec))
                 for r, (a, s) in enumerate(zip(self.actors, shards, strict=True))]
        return wait_named(calls)

    def logprobs(self, shards: list[LearnerShard], num_micro: int) -> list[list[list[float]]]:
        """Each rank's completion log-probs under its current weights (no update): checks and diagnostics."""
        calls = [(f"learner-{r}", "logprobs", a.logprobs.remote(s, num_micro))
                 for r, (a, s) in enumerate(zip(self.actors, shards, strict=True))]
        return wait_named(calls)

    def sft(self, parts: list[list[Any]], num_micro: int, use_video: bool, use_audio: bool) -> list[dict[str, Any]]:
        calls = [(f"learner-{r}", "sft_batch", a.sft_batch.remote(p, num_micro, use_video, use_audio))
                 for r, (a, p) in enumerate(zip(self.actors, parts, strict=True))]
        return wait_named(calls)

    def save_checkpoint(self, ckpt_dir: str, tag: str) -> list[str]:
        return self._all("save_checkpoint", ckpt_dir, tag)

    def load_checkpoint(self, ckpt_dir: str, tag: str) -> list[int]:
        return self._all("load_checkpoint", ckpt_dir, tag)

    def checksums(self) -> list[list[float]]:
        return self._all("weights_checksum")

    def full_states(self) -> list[dict[str, Any]]:
        return self._all("full_state")

    def save_hf(self, out_dir: str) -> None:
        self._all("save_hf", out_dir)

    def shutdown(self) -> None:
        release(self.actors, self.pg)


def lost_learners(group: LearnerGroup, timeout_s: float = 10.0) -> list[int]:
    """Ranks whose actor is dead. A dead actor answers at once; a live one stuck in a collective with it does
    not answer within the timeout and counts as alive."""
    refs = [a.info.remote() for a in group.actors]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    lost = []
    for r, ref in enumerate(refs):
        if ref in ready:
            try:
                ray.get(ref)
            except RayActorError:
                lost.append(r)
    return lost


def shard_for_learners(samples: list[PromptSamples], advantages: list[float], n_learners: int,
                       micro: int) -> tuple[list[LearnerShard], int]:
    """Split all completions across learners, balanced and cut between prompt groups where one is near
    (a prompt's shared-prefix forward then runs on one rank); every rank runs the same number of
    micro-batches, as ZeRO-3's collective forward requires. With fewer completions than learners the
    last one is copied, with weight 0, to the ranks that would have none: they train on nothing, yet run
    every collective. Each shard carries its prompts' metadata and media refs. Returns (shards,
    micro-batches per rank)."""
    flat = [(gi, c, 1.0) for gi, g in enumerate(samples) for c in g.completions]
    advantages = list(advantages)
    if not flat:
        raise ValueError("no completion to train on")
    while len(flat) < n_learners:
        flat.append((flat[-1][0], flat[-1][1], 0.0))
        advantages.append(0.0)
    parts, num_micro = plan_learner_shards([gi for gi, _, _ in flat], n_learners, micro)
    shards = []
    for part in parts:
        used: dict[int, int] = {}
        shard = LearnerShard([], [], [], [], [])
        for j in part:
            gi, c, _ = flat[j]
            if gi not in used:
                used[gi] = len(shard.prompts)
                shard.prompts.append(samples[gi].inputs)
                shard.media_refs.append(samples[gi].media_ref)
            shard.prompt_index.append(used[gi])
            shard.completions.append(c.token_ids)
            shard.advantages.append(advantages[j])
        lps = [flat[j][1].logprobs for j in part]
        shard.sampling_logprobs = lps if all(lp is not None for lp in lps) else None
        weights = [flat[j][2] for j in part]
        shard.weights = weights if min(weights) < 1.0 else None
        shards.append(shard)
    return shards, num_micro
