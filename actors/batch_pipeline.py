"""What happens to a step's batch before the learners see it, in one place: rollouts submitted ahead within the
staleness window (train.max_staleness), collected, too-stale prompts redrawn, scored, DAPO's group filter with
refills (train.filter_groups), then the group advantages. The driver only orders the step around it.

The window: with the learners at weight version v (v updates done), the rollouts of steps up to v + k are
submitted, so a step-t sample is drawn by weights at least t - k old and trained at version t: staleness <= k.
Rollout workers take new weights between generate calls (RolloutWorker: its weights concurrency group), so a
queued rollout samples with the newest weights it finds when it starts generating. With train.stream_groups the
rollouts are one stream of small calls instead, and a step takes the first groups to complete
(actors/group_stream.py).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import ray
import torch

from actors.group_stream import GroupStream
from actors.groups import RLVRGroups
from actors.rollout import PromptSamples, usable_samples
from actors.rollout_group import PendingRollout, wait_with_progress
from r1omni_ray.advantages import compute_advantages
from r1omni_ray.config import RunConfig
from r1omni_ray.data.bad_records import BadRecords
from r1omni_ray.data.errors import DataError
from r1omni_ray.data.sampler import batch_indices, refill_indices
from r1omni_ray.engines.base import SamplingParams, step_seed
from r1omni_ray.grpo import flat_groups
from r1omni_ray.learner.old_logprobs import behaviour_logprobs_requested
from r1omni_ray.rewards import RewardBatch, SampleContext
from r1omni_ray.timing import PhaseTimer

log = logging.getLogger("r1omni_ray")
# A refill round's prompt uids start at round * REFILL_UID_STRIDE: fresh ids (and so fresh per-sample seeds).
REFILL_UID_STRIDE = 1_000_000


@dataclass
class StepBatch:
    """One step's trainable batch, scored, with its advantages (group-contiguous, in prompt order)."""

    step: int
    samples: list[PromptSamples]  # the prompts trained on
    skipped: list[PromptSamples]  # records found this step not to load (bad media): each counted once a run
    rewards: RewardBatch  # of the trained samples
    advantages: torch.Tensor  # [len(completions)]
    scored: RewardBatch | None = None  # every sample scored this step (refill rounds included)
    counters: dict[str, float] = field(default_factory=dict)  # staleness drops, filter rounds

    @property
    def completions(self) -> list[Any]:
        return [c for g in self.samples for c in g.completions]

    @property
    def lengths(self) -> list[int]:
        return [len(c.token_ids) for c in self.completions]


class BatchPipeline:
    def __init__(self, cfg: RunConfig, groups: RLVRGroups, records: list[Any], timer: PhaseTimer | None = None,
                 bad: BadRecords | None = None) -> None:
        """bad: the run's records known not to decode (left out of every batch; default: remembered in memory)."""
        self.cfg, self.groups, self.records = cfg, groups, records
        self.bad = bad if bad is not None else BadRecords()
        self.timer = timer or PhaseTimer()
        rc = cfg.rollout
        self.params = SamplingParams(n=rc.group_size, temperature=rc.temperature, top_p=rc.top_p,
                                     max_new_tokens=rc.max_new_tokens, min_new_tokens=rc.min_new_tokens,
                                     logprobs=behaviour_logprobs_requested(cfg))
        self.window: dict[int, list[PendingRollout]] = {}  # step -> its submitted rollout
        self.stale_dropped = 0  # prompts redrawn because their samples were older than max_staleness
        self.total: int = cfg.train.steps
        self.stream = (GroupStream(cfg, groups, records, self.params_for, self.score, self.timer, self.bad)
                       if cfg.train.stream_groups else None)

    # ---- the window ----
    def items_for(self, step: int) -> list[tuple[int, Any]]:
        """The step's (uid, record) pairs, less the records known not to decode (a uid is the prompt's place in
        the step's draw, so leaving one out changes no other prompt's seed)."""
        idx = batch_indices(len(self.records), self.cfg.train.prompts_per_step, step, self.cfg.train.seed)
        return [(uid, self.records[i]) for uid, i in enumerate(idx) if self.records[i].id not in self.bad]

    def params_for(self, step: int, round_: int = 0) -> SamplingParams:
        seed = step_seed(self.cfg.train.seed, step) if round_ == 0 else step_seed(self.cfg.train.seed + round_, step)
        return dataclasses.replace(self.params, seed=seed)

    def fill(self, learner_step: int, total: int | None = None) -> None:
        """Submit every rollout the window allows with the learners at ``learner_step`` updates: steps up to
        learner_step + train.max_staleness (before ``total``, default train.steps), each once."""
        self.total = self.cfg.train.steps if total is None else total
        if self.stream is not None:
            self.stream.fill(learner_step, self.total)
            return
        last = min(learner_step + self.cfg.train.max_staleness, self.total - 1)
        for t in range(learner_step, last + 1):
            self.submit(t)

    def submit(self, step: int) -> list[PendingRollout]:
        """Step ``step``'s rollout, submitted now unless it already is (with the next step's records to decode
        ahead): the in-flight calls that next_batch(step) collects."""
        if step not in self.window:
            d = self.cfg.data
            ahead = self.items_for(step + 1) if step + 1 < self.total else None
            self.window[step] = self.groups.rollout.submit(self.items_for(step), self.params_for(step), d.use_video,
                                                           d.use_audio, ahead)
        return self.window[step]

    def in_flight(self) -> list[PendingRollout]:
        if self.stream is not None:
            return list(self.stream.in_flight)
        return [p for ps in self.window.values() for p in ps]

    def drain(self) -> None:
        """Wait until no rollout is running (a worker may leave only then); results stay for their steps."""
        refs = [p.ref for p in self.in_flight()]
        if refs:
            ray.wait(refs, num_returns=len(refs), fetch_local=False)

    def discard(self) -> None:
        """Forget the submitted rollouts (the learners rolled back: they were drawn by weights that no longer
        exist and their steps are redone)."""
        self.window.clear()
        if self.stream is not None:
            self.stream.restore(self.stream.state())

    def state(self) -> dict[str, Any] | None:
        """What a checkpoint keeps of the pipeline: with streamed groups, the positions ahead of the learners
        (drawn again on resume); None otherwise (the data order is a function of (seed, step))."""
        return self.stream.state() if self.stream is not None else None

    def restore(self, state: dict[str, Any] | None, step: int) -> None:
        """Continue after ``step`` steps from a checkpoint's pipeline state (nothing in flight is kept)."""
        self.window.clear()
        if self.stream is not None:
            self.stream.restore(state, step)

    # ---- a step's batch ----
    def next_batch(self, step: int, learner_version: int) -> StepBatch:
        """Step ``step``'s batch with the learners at ``learner_version``: its rollout collected (submitted now
        if the window had not), prompts drawn more than max_staleness versions back redrawn, scored, filtered,
        advantages computed."""
        if self.stream is not None:
            return self._streamed_batch(step, learner_version)
        d, k = self.cfg.data, self.cfg.train.max_staleness
        pending = self.submit(step)
        del self.window[step]
        params = self.params_for(step)
        with self.timer.phase("rollout"):
            wait_with_progress(pending, f"rollout {step + 1}")
            samples = self.groups.rollout.collect(pending, params, d.use_video, d.use_audio)
            stale = [g for g in samples if g.error is None and learner_version - g.weight_version > k]
            if stale:  # never trained on: redrawn now with the current weights
                log.warning("step %d: %d prompts were drawn %d+ weight versions back (train.max_staleness=%d); "
                            "redrawing them", step + 1, len(stale), k + 1, k)
                self.stale_dropped += len(stale)
                redo = {g.uid for g in stale}
                fresh = self.groups.rollout.collect(
                    self.groups.rollout.submit([it for it in self.items_for(step) if it[0] in redo], params,
                                               d.use_video, d.use_audio), params, d.use_video, d.use_audio)
                samples = sorted([g for g in samples if g.uid not in redo] + fresh, key=lambda g: g.uid)
        samples, skipped = usable_samples(samples, d.on_error)
        counters = {"async/stale_redrawn": float(len(stale)), "async/stale_redrawn_total": float(self.stale_dropped)}
        if not samples:
            return StepBatch(step, [], self.remember(step, skipped), RewardBatch([], {}), torch.zeros(0), None,
                             counters | self.bad_counters())
        rewards = self.score(samples)
        scored = rewards
        if self.cfg.train.filter_groups:
            samples, rewards, scored, more_skipped, fc = self._filter(step, samples, rewards)
            skipped += more_skipped
            counters |= fc
        return StepBatch(step, samples, self.remember(step, skipped), rewards, self.advantages(rewards), scored,
                         counters | self.bad_counters())

    def _streamed_batch(self, step: int, learner_version: int) -> StepBatch:
        assert self.stream is not None
        t = self.stream.take(step, learner_version)
        skipped, counters = self.remember(step, t.skipped), t.counters | self.bad_counters()
        if not t.groups or t.rewards is None:
            return StepBatch(step, [], skipped, RewardBatch([], {}), torch.zeros(0), None, counters)
        return StepBatch(step, t.groups, skipped, t.rewards, self.advantages(t.rewards), t.scored, counters)

    # ---- records that do not decode ----
    def remember(self, step: int, skipped: list[PromptSamples]) -> list[PromptSamples]:
        """Those of ``skipped`` to count this step: a record whose media failed, the first time (the others were
        in flight when an earlier step found them), named once, written to the run's list and left out of every
        later batch; and any group that came back without completions (not the record's fault: not remembered)."""
        new = []
        for g in skipped:
            if g.error is None:  # no completions came back: not the record's media, so not remembered
                log.warning("skipped record %r (rollout worker %d): the rollout returned no completions",
                            g.record_id, g.worker)
                new.append(g)
                continue
            reason = g.error
            if self.bad.add(g.record_id, reason, step + 1):
                log.warning("skipped record %r (rollout worker %d): %s; left out of the rest of the run",
                            g.record_id, g.worker, reason)
                new.append(g)
        if new and len(self.bad) >= len({r.id for r in self.records}):
            raise DataError(f"none of the {len(self.records)} training records decodes (the last: {new[-1].error}); "
                            f"see {self.bad.path or 'the log'}")
        return new

    def bad_counters(self) -> dict[str, float]:
        return {"data/known_bad_records": float(len(self.bad))}

    def advantages(self, rewards: RewardBatch) -> torch.Tensor:
        """grpo.advantage over the trained groups (group-contiguous, in prompt order)."""
        g = self.cfg.grpo
        return compute_advantages(g.advantage, torch.tensor(rewards.total, dtype=torch.float32),
                                  g.advantage_args(self.cfg.rollout.group_size))

    def score(self, samples: list[PromptSamples]) -> RewardBatch:
        texts = [c.text for g in samples for c in g.completions]
        with self.timer.phase("reward"):
            return self.groups.rewards.score(texts, self.contexts(samples))

    def contexts(self, samples: list[PromptSamples]) -> list[SampleContext]:
        """What each completion's rewards may read besides its text (context rewards: r1omni_ray.rewards)."""
        out = []
        for g in samples:
            video, audio = g.modalities()
            for c in g.completions:
                out.append(SampleContext(g.inputs.solution, g.inputs.label, g.record_id, video, audio,
                                         len(c.token_ids), c.finish_reason, self.cfg.rollout.max_new_tokens))
        return out

    def _filter(self, step: int, samples: list[PromptSamples], rewards: RewardBatch):
        """DAPO's dynamic sampling: keep the groups whose rewards differ; refill from the sampler (fresh prompt
        uids and seeds, a pure function of (seed, step, round)) until prompts_per_step such groups or
        train.filter_max_rounds refills. Short of them, the step is topped up with flat groups (no policy
        gradient, KL only) so its size stays fixed; counted."""
        G, want, d = self.cfg.rollout.group_size, self.cfg.train.prompts_per_step, self.cfg.data
        # Every group sampled this step, in order, with its rewards at the same place in ``scored``.
        seen, scored, skipped, rounds = list(samples), rewards, [], 0

        def informative() -> list[int]:
            return [j for j, f in enumerate(flat_groups(torch.tensor(scored.total), G).tolist()) if not f]

        while len(informative()) < want and rounds < self.cfg.train.filter_max_rounds:
            rounds += 1
            idx = refill_indices(len(self.records), want - len(informative()), step, rounds, self.cfg.train.seed)
            items = [(rounds * REFILL_UID_STRIDE + j, self.records[i]) for j, i in enumerate(idx)
                     if self.records[i].id not in self.bad]
            params = self.params_for(step, rounds)
            with self.timer.phase("rollout"):
                more = self.groups.rollout.collect(self.groups.rollout.submit(items, params, d.use_video, d.use_audio),
                                                   params, d.use_video, d.use_audio)
            more, bad = usable_samples(more, d.on_error)
            skipped += bad
            if more:
                seen += more
                scored = scored.merge(self.score(more))
        keep = informative()
        flat = sorted(set(range(len(seen))) - set(keep))
        chosen = keep[:want] + flat[: max(0, want - len(keep))]
        out_samples = [seen[j] for j in chosen]
        # select keeps the whole step's failure counters (those of every round)
        out_rewards = scored.select([j * G + i for j in chosen for i in range(G)])
        counters = {"filter/rounds": float(rounds), "filter/informative_groups": float(len(keep)),
                    "filter/flat_groups_seen": float(len(flat)),
                    "filter/short_steps": float(len(keep) < want)}
        return out_samples, out_rewards, scored, skipped, counters
