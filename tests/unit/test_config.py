"""Config loading: every shipped YAML parses; wrong keys and types are named in the error."""

import re
from pathlib import Path

import pytest

from r1omni_ray.config import ConfigError, config_from_dict, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert config_from_dict(cfg.to_dict()) == cfg


def test_overrides_are_typed():
    cfg = load_config(None, ["rollout.num_workers=4", "grpo.dual_clip=3", "train.max_staleness=2", "model.path=null"])
    assert cfg.rollout.num_workers == 4 and cfg.grpo.dual_clip == 3.0 and cfg.train.max_staleness == 2
    assert cfg.model.path is None


@pytest.mark.parametrize(
    "override, needle",
    [
        ("rollout.nope=1", "rollout: unknown key(s) ['nope']"),
        ("rollout.num_workers=abc", "rollout.num_workers: expected an integer"),
        ("grpo.loss_agg=bogus", "grpo.loss_agg: 'bogus' is not one of"),
        ("learner.zero_stage=5", "learner.zero_stage"),
        ("learner.old_logprobs=sometimes", "learner.old_logprobs: 'sometimes' is not one of"),
        ("train.max_staleness=true", "train.max_staleness: expected an integer"),
        ("train.max_staleness=-1", "train.max_staleness: -1 must be >= 0"),
        ("train.overlap=true", "train: unknown key(s) ['overlap']"),  # train.max_staleness=1 now
        ("learner.rollout_correction=is", "learner.rollout_correction: 'is' is not one of"),
        ("learner.correction_cap=1", "learner.correction_cap: 1.0 must be > 1"),
        ("learner.correction_cap=0.5", "learner.correction_cap: 0.5 must be > 1"),
        ("learner.correction_band=[1.2,3]", "learner.correction_band: [1.2, 3.0] must be [lo, hi] with 0 <= lo <= 1 <= hi"),
        ("learner.correction_band=[0.2,0.9]", "learner.correction_band: [0.2, 0.9] must be [lo, hi]"),
        ("learner.correction_band=[0.5]", "learner.correction_band: [0.5] must be [lo, hi]"),
        ("train.filter_max_rounds=-1", "train.filter_max_rounds: -1 must be >= 0"),
        ("reward.rewards=[1]", "reward.rewards[0]: expected a mapping"),
        ("notasection=1", "unknown key(s) ['notasection']"),
    ],
)
def test_bad_overrides_name_the_field(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_bad_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: learner\.lr: expected a number"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("spelling", ["1e-5", "1E-5", "1.0e-5", "0.00001", "+1e-05"])
def test_any_float_spelling_is_a_number(spelling):
    # PyYAML reads "1e-5" (no dot) as a string; the config must not reject what a user means as a number.
    assert load_config(None, [f"learner.lr={spelling}"]).learner.lr == pytest.approx(1e-5)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.steps=-3", "train.steps: -3 must be >= 1"),
        ("train.prompts_per_step=0", "train.prompts_per_step: 0 must be >= 1"),
        ("rollout.num_workers=-1", "rollout.num_workers: -1 must be >= 0"),
        ("rollout.group_size=0", "rollout.group_size: 0 must be >= 1"),
        ("learner.lr=0", "learner.lr: 0.0 must be > 0"),
        ("learner.num_learners=0", "learner.num_learners: 0 must be >= 1"),
        ("rollout.temperature=-1", "rollout.temperature: -1.0 must be > 0"),
    ],
)
def test_out_of_range_values_name_the_field(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_rlvr_needs_a_rollout_worker():
    from r1omni_ray.config import check_rlvr

    with pytest.raises(ConfigError, match="rollout.num_workers: 0 must be >= 1 for RLVR"):
        check_rlvr(load_config(None, ["rollout.num_workers=0"]))
    with pytest.raises(ConfigError, match=r"train.filter_groups: true needs rollout.group_size >= 2 \(got 1\)"):
        check_rlvr(load_config(None, ["train.filter_groups=true", "rollout.group_size=1"]))
    check_rlvr(load_config(None, ["train.filter_groups=true", "rollout.group_size=2"]))


@pytest.mark.parametrize("overrides, msg", [
    (["train.stream_groups=true"], "train.stream_groups: true needs train.max_staleness >= 1"),
    (["rollout.min_new_tokens=80", "rollout.max_new_tokens=64"],
     "rollout.min_new_tokens: 80 > rollout.max_new_tokens: 64"),
    (["rollout.group_size=1"], "grpo.advantage: 'grpo' gives every sample advantage 0 with rollout.group_size=1"),
    (["rollout.group_size=1", "grpo.advantage=rloo"], "grpo.advantage: 'rloo' gives every sample advantage 0"),
    (["learner.use_reference=false"], "grpo.beta: 0.04 needs learner.use_reference: true"),
    (["grpo.mini_batches=3", "train.prompts_per_step=2", "rollout.group_size=4", "learner.micro_batch_size=4"],
     "grpo.mini_batches: 3 > the 1 micro-batches of learner.micro_batch_size=4 each learner runs per step"),
    (["rollout.engine=vllm", "rollout.num_gpus_per_worker=1", "rollout.tensor_parallel_size=2"],
     "rollout.num_gpus_per_worker: 1 < rollout.tensor_parallel_size=2"),
    (["rollout.num_workers=3", "rollout.max_workers=2"], "rollout.num_workers: 3 must lie within"),
    (["learner.broadcast_backend=nccl"], "learner.broadcast_backend: nccl needs GPUs on both ends"),
    (["learner.broadcast_backend=nccl", "learner.num_gpus_per_learner=1", "rollout.num_gpus_per_worker=0"],
     "learner.broadcast_backend: nccl needs GPUs on both ends"),
])
def test_cross_field_rules_stop_before_ray_with_one_line_naming_both_keys(overrides, msg):
    from r1omni_ray.config import check_rlvr

    cfg = load_config(None, overrides)  # each setting alone is valid
    with pytest.raises(ConfigError, match=re.escape(msg)) as e:
        check_rlvr(cfg)
    assert "\n" not in str(e.value)


def test_cross_field_rules_let_the_fixed_combinations_through():
    from r1omni_ray.config import check_rlvr

    for overrides in (["rollout.group_size=1", "grpo.advantage=reinforce_pp"],
                      ["learner.use_reference=false", "grpo.beta=0"],
                      ["grpo.mini_batches=2", "train.prompts_per_step=2", "rollout.group_size=4",
                       "learner.micro_batch_size=2", "learner.num_learners=2"]):
        check_rlvr(load_config(None, overrides))


def test_elastic_worker_bounds_default_to_a_fixed_group_and_must_hold_num_workers():
    from r1omni_ray.config import check_rlvr

    assert load_config(None, ["rollout.num_workers=3"]).rollout.worker_bounds() == (3, 3)
    cfg = load_config(None, ["rollout.num_workers=2", "rollout.min_workers=1", "rollout.max_workers=8"])
    check_rlvr(cfg)
    assert cfg.rollout.worker_bounds() == (1, 8)
    with pytest.raises(ConfigError, match=r"rollout.num_workers: 4 must lie within \[rollout.min_workers, "
                                          r"rollout.max_workers\] = \[1, 3\]"):
        check_rlvr(load_config(None, ["rollout.num_workers=4", "rollout.min_workers=1", "rollout.max_workers=3"]))
    with pytest.raises(ConfigError, match="rollout.min_workers: 0 must be >= 1"):
        load_config(None, ["rollout.min_workers=0"])
    with pytest.raises(ConfigError, match="learner.max_restarts: -1 must be >= 0"):
        load_config(None, ["learner.max_restarts=-1"])


def test_behaviour_logprobs_are_recorded_whenever_a_step_can_be_off_policy():
    from r1omni_ray.learner.old_logprobs import behaviour_logprobs_requested

    assert not behaviour_logprobs_requested(load_config(None, []))  # synchronous: on request only
    assert behaviour_logprobs_requested(load_config(None, ["rollout.sampling_logprobs=true"]))
    for engine in ("hf", "vllm"):
        assert behaviour_logprobs_requested(load_config(None, ["train.max_staleness=1", f"rollout.engine={engine}"]))


def test_network_settings_reach_actors_as_environment_and_ports_come_from_the_range():
    import socket

    from actors.common import free_ports
    from r1omni_ray.config import ConfigError, config_from_dict

    cfg = config_from_dict({"ray": {"network_interface": "ib0", "port_range": [29500, 29599]}})
    assert cfg.ray.actor_env() == {"GLOO_SOCKET_IFNAME": "ib0", "NCCL_SOCKET_IFNAME": "ib0"}
    assert config_from_dict({}).ray.actor_env() == {} and config_from_dict({}).ray.placement_strategy == "PACK"
    with pytest.raises(ConfigError, match=r"ray.port_range: \[10, 11\] must be \[first, last\]"):
        config_from_dict({"ray": {"port_range": [10, 11]}})
    with socket.socket() as busy:  # a port in use is skipped
        busy.bind(("", 0))
        taken = busy.getsockname()[1]
        got = free_ports(2, [taken, taken + 50])
    assert taken not in got and len(set(got)) == 2 and all(taken < p <= taken + 50 for p in got)
    with pytest.raises(RuntimeError, match="fewer than 2 free ports"):
        with socket.socket() as busy:
            busy.bind(("", 0))
            p = busy.getsockname()[1]
            free_ports(2, [p, p])


@pytest.mark.parametrize("overrides,versions,present,want", [
    # on-policy without behaviour log-probs: the training forward's own, nothing to compare or correct
    ([], [3, 3], False, ("forward", "none", False)),
    # on-policy with them (rollout.sampling_logprobs, or an async run's fresh step): the kernel mismatch is corrected
    ([], [3, 3], True, ("forward", "tis", True)),
    # off-policy, either engine: the proximal policy is the learners' current one, weighted to the behaviour's.
    # (The bug this replaces: vLLM recomputed "old" log-probs with the current weights and corrected nothing.)
    ([], [3, 2], True, ("forward", "tis", True)),
    (["rollout.engine=vllm"], [3, 2], True, ("forward", "tis", True)),
    (["rollout.engine=vllm", "learner.rollout_correction=seq_mis"], [1, 3], True, ("forward", "seq_mis", True)),
    (["learner.old_logprobs=recompute"], [3, 2], True, ("recompute", "tis", True)),
    (["learner.old_logprobs=recompute"], [3, 3], False, ("recompute", "none", False)),  # forced, even on-policy
    # plain off-policy PPO: the clip around the behaviour policy, no separate weight
    (["learner.old_logprobs=behaviour"], [3, 2], True, ("behaviour", "none", False)),
    (["learner.old_logprobs=behaviour"], [3, 3], False, ("forward", "none", False)),
    # correction off: the mismatch is still measured (offpolicy/* metrics), no weight applied
    (["learner.rollout_correction=none"], [3, 2], True, ("forward", "none", True)),
    # several optimizer steps per batch: the later forwards run on updated weights, so a pass before the first
    (["grpo.num_iterations=2"], [3, 3], False, ("recompute", "none", False)),
    (["grpo.mini_batches=2"], [3, 2], True, ("recompute", "tis", True)),
    (["grpo.num_iterations=2", "learner.old_logprobs=behaviour"], [3, 2], True, ("behaviour", "none", False)),
])
def test_old_logprob_source_table(overrides, versions, present, want):
    from r1omni_ray.learner.old_logprobs import LogprobPlan, old_logprob_source

    assert old_logprob_source(load_config(None, overrides), versions, 3, present) == LogprobPlan(*want)


def test_an_off_policy_step_without_behaviour_logprobs_is_refused():
    from r1omni_ray.learner.old_logprobs import MissingBehaviourLogprobs, old_logprob_source

    with pytest.raises(MissingBehaviourLogprobs, match=r"weight versions \[2, 3\] but the learners are at 3"):
        old_logprob_source(load_config(None, ["rollout.engine=vllm"]), [3, 2], 3, False)
