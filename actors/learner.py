"""DeepSpeed learner actor: one data-parallel rank of the policy (ZeRO 1/2/3), plus a frozen reference."""

from __future__ import annotations

import copy
import datetime
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch

from actors.common import device, node_ip, setup_process
from r1omni_ray.config import RunConfig, config_from_dict
from r1omni_ray.data.sampler import split_even
from r1omni_ray.grpo import LossConfig, grad_scale_for_framework, policy_loss
from r1omni_ray.model.loading import freeze_modules, load_policy, set_train_mode
from r1omni_ray.safe_load import install_safe_checkpoint_loading
from r1omni_ray.weight_sync import BroadcastGroup, CollectiveError, ParamMeta, plan_buckets, send_buckets

# Loss terms normalised by global token/sequence counts: summing over micro-batches and ranks gives the
# batch value. Everything else is a local token mean.
GLOBALLY_NORMALISED = frozenset({"loss", "policy_loss", "kl_loss"})


@dataclass
class TrainBatch:
    """One learner's share of a step: prompts and the sampled completions that refer to them."""

    prompts: list[Any]  # OmniInputs
    prompt_index: list[int]
    completions: list[list[int]]
    advantages: list[float]
    old_logp: list[list[float]] | None = None
    ref_logp: list[list[float]] | None = None


def _pad(rows: Sequence[Sequence[float]], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(list(r), dtype=torch.float32)
    return out


def _chunks(n: int, num_micro: int) -> list[slice]:
    """Exactly num_micro contiguous, balanced slices: every DP rank must run the same number of
    forward/backward passes (ZeRO-3 gathers parameters collectively inside each forward)."""
    return [slice(r.start, r.stop) for r in split_even(n, num_micro)]


def _set_dp_timeouts(timeout: datetime.timedelta) -> None:
    """DeepSpeed builds its data-parallel groups with new_group() and torch's default timeout (30 min for
    gloo), whatever init_distributed got: give every group learner.dist_timeout_s, so a hung or dead peer
    surfaces as an error instead of a silent half-hour stall."""
    from torch.distributed import distributed_c10d as c10d

    for pg in list(c10d._world.pg_map):
        try:
            c10d._set_pg_timeout(timeout, pg)
        except Exception:  # noqa: BLE001 - a group this rank is not in, or a backend without timeouts
            pass


@ray.remote
class LearnerActor:
    def __init__(
        self, rank: int, world_size: int, master_addr: str, master_port: int, cfg: dict, ckpt_dir: str,
        grad_accum: int,
    ) -> None:
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

        self.cuda = torch.cuda.is_available()
        # The rendezvous waits for every rank to start (imports, model loading on a busy node): at least
        # 5 minutes; the collectives themselves get learner.dist_timeout_s (_set_dp_timeouts below).
        deepspeed.init_distributed(
            dist_backend="nccl" if self.cuda else "gloo",
            timeout=datetime.timedelta(seconds=max(lc.dist_timeout_s, 300.0)),
        )
        self.device = device()
        mc = self.cfg.model
        model = load_policy(ckpt_dir, mc.dtype, mc.towers())
        freeze_modules(model, mc.freeze_vision_tower, mc.freeze_audio_tower, mc.freeze_bert)
        self.ref = None
        if lc.use_reference and self.cfg.grpo.beta > 0:
            # With learner.ref_offload the frozen reference is parked in host memory between uses
            # (it is needed once per step, for the reference log-probs).
            self.ref_home = torch.device("cpu") if lc.ref_offload else self.device
            self.ref = copy.deepcopy(model).eval().requires_grad_(False).to(self.ref_home)
        self.grad_accum = grad_accum
        bf16 = self.cuda and model.dtype == torch.bfloat16
        ds_config = {
            "train_micro_batch_size_per_gpu": lc.micro_batch_size,
            "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": lc.grad_clip,
            "zero_optimization": {"stage": lc.zero_stage, "overlap_comm": False},
            "bf16": {"enabled": bf16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        params = [p for p in model.parameters() if p.requires_grad]
        optim = torch.optim.AdamW(params, lr=lc.lr, weight_decay=lc.weight_decay, betas=(0.9, 0.99))
        # Every ZeRO stage ends its step in this optimizer's step(): gating it skips an update with
        # weights and Adam state untouched, while DeepSpeed still clears grads and counters.
        self._skip_step = False
        base_step = optim.step

        def gated_step(*args: Any, **kwargs: Any) -> Any:
            return None if self._skip_step else base_step(*args, **kwargs)

        optim.step = gated_step  # type: ignore[method-assign]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optim, config=ds_config, model_parameters=params
        )
        _set_dp_timeouts(datetime.timedelta(seconds=lc.dist_timeout_s))
        install_safe_checkpoint_loading(self.engine)  # resume reads torch pickles: weights_only=True
        self.zero3 = lc.zero_stage == 3
        self.sync_group: BroadcastGroup | None = None
        self.version = 0
        self.skipped_updates = 0
        # Local gradients are checked as autograd produces them, before ZeRO reduces/partitions them.
        self._grad_bad = torch.zeros((), dtype=torch.bool, device=self.device)
        self._inject_grad: float | None = None  # fault injection for tests (debug_inject_nonfinite_grad)
        for p in self.engine.module.parameters():
            if p.requires_grad:
                p.register_hook(self._check_grad)

    def _check_grad(self, g: torch.Tensor) -> torch.Tensor:
        if self._inject_grad is not None:
            g = g + self._inject_grad
        self._grad_bad.logical_or_(~torch.isfinite(g).all())
        return g

    def debug_inject_nonfinite_grad(self, value: float = float("nan")) -> bool:
        """Test-only fault injection: the next update's gradients on this rank get `value` added."""
        self._inject_grad = value
        return True

    def _seed_step(self) -> None:
        """Dropout (e.g. in the BERT gate) draws from (train.seed, weight version, rank), not from the
        process's history: a run resumed from a checkpoint repeats an uninterrupted run's masks."""
        torch.manual_seed((self.cfg.train.seed * 1_000_003 + self.version) * 1_009 + self.rank)

    def _dp_any(self, flag: bool) -> bool:
        """True if any data-parallel rank raised `flag` (every rank takes the same skip decision)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        timeout = datetime.timedelta(seconds=self.cfg.learner.dist_timeout_s)
        try:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, async_op=True).wait(timeout)
        except Exception as e:
            raise CollectiveError(
                f"learner-{self.rank}: data-parallel all-reduce (rank {self.rank}/{self.world_size}) failed or "
                f"timed out after {timeout.total_seconds():.0f}s: {e}"
            ) from e
        return bool(t.item() > 0)

    def _optimizer_step(self, local_bad: bool) -> bool | None:
        """engine.step() after a micro-batch's backward. At the accumulation boundary a non-finite loss or
        gradient on any rank skips the update on all ranks; returns whether it did (None off-boundary)."""
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()
            return None
        skip = self._dp_any(local_bad or bool(self._grad_bad))
        self._skip_step = skip
        try:
            self.engine.step()
        finally:
            self._skip_step = False
            self._grad_bad.zero_()
            self._inject_grad = None
        if skip:
            self.skipped_updates += 1
        return skip

    def _backward_micro(
        self, loss: torch.Tensor, lp: torch.Tensor, scale: float, bad_so_far: bool
    ) -> tuple[torch.Tensor, bool, bool]:
        """Backward + engine step of one micro-batch. A non-finite loss becomes a zero loss on the same
        graph, so every rank still runs the same collectives; the update is then skipped at the
        accumulation boundary. Returns (loss used, this loss was non-finite, update skipped)."""
        bad = not bool(torch.isfinite(loss))
        if bad:
            loss = (lp * 0.0).nan_to_num(0.0).sum()
        self.engine.backward(loss * scale)
        return loss, bad, bool(self._optimizer_step(bad_so_far or bad))

    # ---- info ----
    def info(self) -> dict[str, Any]:
        return {"rank": self.rank, "node_ip": node_ip(), "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "version": self.version}

    def sync_metas(self) -> list[ParamMeta]:
        """Layout of the tensors broadcast to rollout workers: every trainable parameter."""
        named = [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]
        metas = []
        for n, p in named:
            shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
            metas.append(ParamMeta(n, shape, str(p.dtype).removeprefix("torch.")))
        return metas

    # ---- log-probs ----
    def _logprobs(self, model, batch: TrainBatch, with_entropy: bool = False):
        return model.completion_logprobs(
            batch.prompts, batch.prompt_index, batch.completions,
            temperature=self.cfg.rollout.temperature, with_entropy=with_entropy,
        )

    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch, num_micro: int) -> dict[str, list[list[float]]]:
        """Old (current policy) and reference log-probs of every completion, micro-batched."""
        out: dict[str, list[list[float]]] = {"old": [], "ref": []}
        self.engine.module.eval()
        if self.ref is not None and self.ref_home != self.device:
            self.ref.to(self.device)
        for sl in _chunks(len(batch.completions), num_micro):
            sub = self._sub(batch, sl)
            lp, mask, _ = self._logprobs(self.engine.module, sub)
            out["old"] += [lp[i, : int(mask[i].sum())].tolist() for i in range(lp.shape[0])]
            if self.ref is not None:
                rlp, _, _ = self._logprobs(self.ref, sub)
                out["ref"] += [rlp[i, : int(mask[i].sum())].tolist() for i in range(rlp.shape[0])]
        if self.ref is not None and self.ref_home != self.device:
            self.ref.to(self.ref_home)
        return out

    @staticmethod
    def _sub(batch: TrainBatch, sl: slice) -> TrainBatch:
        idx = batch.prompt_index[sl]
        used = sorted(set(idx))
        remap = {p: j for j, p in enumerate(used)}
        return TrainBatch(
            prompts=[batch.prompts[p] for p in used],
            prompt_index=[remap[p] for p in idx],
            completions=batch.completions[sl],
            advantages=batch.advantages[sl],
            old_logp=batch.old_logp[sl] if batch.old_logp is not None else None,
            ref_logp=batch.ref_logp[sl] if batch.ref_logp is not None else None,
        )

    # ---- GRPO update ----
    def _set_grad_accum(self, num_micro: int) -> None:
        if num_micro != self.grad_accum:
            self.engine.set_train_batch_size(self.cfg.learner.micro_batch_size * num_micro * self.world_size)
            self.grad_accum = num_micro

    def train_step(
        self, batch: TrainBatch, num_micro: int, num_global_tokens: int, num_global_seqs: int, max_len: int
    ) -> dict[str, float]:
        g = self.cfg.grpo
        loss_cfg = LossConfig(
            clip_eps_low=g.clip_eps_low, clip_eps_high=g.clip_eps_high, dual_clip=g.dual_clip,
            beta=g.beta if batch.ref_logp is not None else 0.0, kl_estimator=g.kl_estimator,
            loss_agg=g.loss_agg, max_len=max_len,
        )
        self._set_grad_accum(num_micro)
        slices = _chunks(len(batch.completions), num_micro)
        scale = grad_scale_for_framework(self.world_size, self.grad_accum)
        set_train_mode(self.engine.module)
        self._seed_step()
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        summed: dict[str, float] = {}
        total_loss = 0.0
        nonfinite = 0
        skipped = False
        for sl in slices:
            sub = self._sub(batch, sl)
            lp, mask, ent = self._logprobs(self.engine.module, sub, with_entropy=True)
            width = lp.shape[1]
            old = _pad(sub.old_logp, width).to(lp) if sub.old_logp is not None else lp.detach()
            ref = _pad(sub.ref_logp, width).to(lp) if sub.ref_logp is not None else None
            adv = torch.tensor(sub.advantages, dtype=lp.dtype, device=lp.device)
            loss, metrics = policy_loss(
                lp, old, adv, mask, loss_cfg, ref_logp=ref, entropy=ent,
                num_global_tokens=num_global_tokens, num_global_seqs=num_global_seqs,
            )
            loss, bad, step_skipped = self._backward_micro(loss, lp, scale, nonfinite > 0)
            nonfinite += bad
            skipped = step_skipped or skipped
            total_loss += float(loss.detach())
            w = float(mask.sum())
            for k, v in metrics.items():
                if not (isinstance(v, float) and math.isfinite(v)):
                    continue
                if k in GLOBALLY_NORMALISED:  # already divided by global counts: they add up
                    summed[k] = summed.get(k, 0.0) + v
                else:
                    sums[k] = sums.get(k, 0.0) + v * w
            sums["_tokens"] = sums.get("_tokens", 0.0) + w
        tokens = max(sums.pop("_tokens", 1.0), 1.0)
        out = {k: v / tokens for k, v in sums.items()} | summed
        out["loss"] = total_loss
        out["grad_norm"] = float(self.engine.get_global_grad_norm() or 0.0)
        out["lr"] = float(self.optimizer.param_groups[0]["lr"])
        out["nonfinite_microbatches"] = float(nonfinite)
        out["skipped_update"] = float(skipped)  # same on every rank (all-reduced decision)
        out["skipped_updates"] = float(self.skipped_updates)  # cumulative
        out["update_s"] = time.perf_counter() - t0
        self.version += 1
        return out

    # ---- SFT (cold start) ----
    def sft_batch(self, records: list[Any], num_micro: int, use_video: bool = True,
                  use_audio: bool = True) -> dict[str, Any]:
        """Process records with this rank's own processor (media decoding is spread over the learners).
        A record whose media fails to load keeps its slot with zero loss weight (every rank must run the
        same micro-batches) and is counted; with data.on_error=raise every rank returns {"error": ...}
        before training, and the driver raises it."""
        from r1omni_ray.data.errors import DataError

        if not hasattr(self, "processor"):
            from r1omni_ray.data.processor import OmniProcessor

            self.processor = OmniProcessor.from_pretrained(
                self.ckpt_dir, towers=self.cfg.model.towers(), input_style=self.cfg.data.input_style
            )
            self._sft_cache: dict[str, tuple[Any, list[int]] | str] = {}
        entries: list[tuple[Any, list[int]] | str] = []
        for rec in records:
            key = f"{rec.id}|{use_video}|{use_audio}"
            if key not in self._sft_cache:
                try:
                    inp = self.processor.process(rec, use_video=use_video, use_audio=use_audio)
                    self._sft_cache[key] = (inp, self.processor.response_ids(rec.response or rec.solution))
                except DataError as e:
                    self._sft_cache[key] = f"record {rec.id!r} (learner-{self.rank}, SFT): {e}"
            entries.append(self._sft_cache[key])
        errors = [e for e in entries if isinstance(e, str)]
        good = [e for e in entries if not isinstance(e, str)]
        if good:
            self._sft_fallback = good[0]
        # Collective, so that every rank takes the same branch below.
        if self._dp_any(bool(errors)) and self.cfg.data.on_error == "raise":
            return {"error": errors[0] if errors else ""}
        fallback = getattr(self, "_sft_fallback", None)
        if errors and fallback is None:
            raise DataError(f"learner-{self.rank}: no SFT record has loaded yet to stand in for bad ones: {errors[0]}")
        prompts = [fallback[0] if isinstance(e, str) else e[0] for e in entries]
        targets = [fallback[1] if isinstance(e, str) else e[1] for e in entries]
        weights = [0.0 if isinstance(e, str) else 1.0 for e in entries]
        out: dict[str, Any] = self.sft_step(prompts, targets, num_micro, weights)
        out["skipped_records"] = float(len(errors))
        out["skipped_reasons"] = errors
        return out

    def sft_step(self, prompts: list[Any], targets: list[list[int]], num_micro: int,
                 weights: list[float] | None = None) -> dict[str, float]:
        """Cross-entropy on the response tokens (token mean over the global batch); a zero weight drops a
        sample from the loss and the token count."""
        n = len(targets)
        self._set_grad_accum(num_micro)
        slices = _chunks(n, num_micro)
        w = torch.tensor(weights if weights is not None else [1.0] * n, dtype=torch.float32)
        tokens_local = sum(len(tg) * float(wi) for tg, wi in zip(targets, w, strict=True))
        t = torch.tensor([float(tokens_local)])
        torch.distributed.all_reduce(t)
        scale = grad_scale_for_framework(self.world_size, self.grad_accum)
        set_train_mode(self.engine.module)
        self._seed_step()
        total, correct = 0.0, 0.0
        nonfinite, skipped = 0, False
        for sl in slices:
            idx = list(range(sl.start, sl.stop))
            lp, mask, _ = self.engine.module.completion_logprobs(prompts, idx, targets[sl])
            mask = mask * w[sl].to(mask)[:, None]
            loss = -(lp * mask).sum() / max(t.item(), 1.0)
            loss, bad, step_skipped = self._backward_micro(loss, lp, scale, nonfinite > 0)
            nonfinite += bad
            skipped = step_skipped or skipped
            total += float(loss.detach())
            correct += float(((lp > math.log(0.5)) * mask).sum())
        self.version += 1
        return {"sft_loss": total, "sft_token_acc": correct / max(tokens_local, 1), "tokens": float(tokens_local),
                "skipped_update": float(skipped)}

    # ---- weight broadcast ----
    def init_sync_group(self, backend: str, host: str, port: int, world_size: int, timeout_s: float) -> bool:
        if self.rank != 0:
            return True
        if self.sync_group is not None:
            self.sync_group = None  # drop the old group (a worker was replaced)
        self.sync_group = BroadcastGroup(backend, host, port, 0, world_size, timeout_s, name="learner-0")
        return True

    def broadcast_weights(self, version: int, bucket_bytes: int) -> dict[str, float]:
        """All learner ranks call this (ZeRO-3 gathers are collective); rank 0 sends."""
        import deepspeed

        t0 = time.perf_counter()
        named = [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]
        metas = self.sync_metas()
        buckets = plan_buckets(metas, bucket_bytes)

        def get_tensors(idx: Sequence[int]) -> list[torch.Tensor]:
            return [named[i][1].data for i in idx]

        sent = 0
        for b in buckets:
            params = [named[i][1] for i in b]
            if self.zero3:
                with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                    if self.rank == 0:
                        sent += send_buckets(self.sync_group, metas, [b], get_tensors, self.device)
            elif self.rank == 0:
                sent += send_buckets(self.sync_group, metas, [b], get_tensors, self.device)
        self.version = version
        return {"broadcast_s": time.perf_counter() - t0, "broadcast_bytes": float(sent)}

    def full_state(self) -> dict[str, torch.Tensor]:
        """Full (gathered) trainable weights on CPU, for checks and HF export."""
        import deepspeed

        out = {}
        for n, p in self.engine.module.named_parameters():
            if self.zero3:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    out[n] = p.data.detach().cpu().clone()
            else:
                out[n] = p.data.detach().cpu().clone()
        return out

    def save_hf(self, out_dir: str) -> str | None:
        """Export the current policy as a HF-format directory loadable with from_pretrained (rank 0)."""
        state = self.full_state()  # collective under ZeRO-3
        if self.rank != 0:
            return None
        model = self.engine.module
        import shutil
        from pathlib import Path

        from safetensors.torch import save_file

        out = Path(out_dir)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        # Tokenizer, processors and tower folders come from the checkpoint we started from.
        shutil.copytree(self.ckpt_dir, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.pt"))
        full = {k: v.contiguous() for k, v in state.items()}
        for k, v in model.state_dict().items():  # buffers etc.
            if k not in full and v.numel() > 0:
                full[k] = v.detach().cpu().contiguous()
        if model.config.tie_word_embeddings:
            full.pop("lm_head.weight", None)
        save_file(full, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        return str(out)

    # ---- DeepSpeed checkpoints (collective: every learner rank must call these together) ----
    def save_checkpoint(self, ckpt_dir: str, tag: str) -> str:
        """Module, optimizer (each rank its ZeRO shard) and the weight version under ckpt_dir/tag.
        The driver keeps its own atomic `latest` pointer, so DeepSpeed's is not written."""
        self.engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"weight_version": self.version},
                                    save_latest=False)
        return os.path.join(ckpt_dir, tag)

    def load_checkpoint(self, ckpt_dir: str, tag: str) -> int:
        """Restore module + optimizer state saved by save_checkpoint; returns the restored weight version."""
        path, client = self.engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"rank {self.rank}: no DeepSpeed checkpoint {tag!r} under {ckpt_dir}")
        self.version = int((client or {}).get("weight_version", self.version))
        return self.version

    @torch.no_grad()
    def weights_checksum(self) -> list[float]:
        """[sum, sum of squares, numel] over this rank's trainable weights (its ZeRO-3 partition under
        stage 3): a cheap on-device fingerprint to verify that a resumed run loaded what was saved."""
        s = sq = n = 0.0
        for p in self.engine.module.parameters():
            if not p.requires_grad:
                continue
            t = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
            t = t.detach().double()
            s += float(t.sum())
            sq += float(t.square().sum())
            n += float(t.numel())
        return [s, sq, n]
