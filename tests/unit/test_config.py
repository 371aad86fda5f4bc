"""Config loading: every shipped YAML parses; wrong keys and types are named in the error."""

from pathlib import Path

import pytest

from r1omni_ray.config import ConfigError, config_from_dict, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert config_from_dict(cfg.to_dict()) == cfg


def test_overrides_are_typed():
    cfg = load_config(None, ["rollout.num_workers=4", "grpo.dual_clip=3", "train.overlap=true", "model.path=null"])
    assert cfg.rollout.num_workers == 4 and cfg.grpo.dual_clip == 3.0 and cfg.train.overlap is True
    assert cfg.model.path is None


@pytest.mark.parametrize(
    "override, needle",
    [
        ("rollout.nope=1", "rollout: unknown key(s) ['nope']"),
        ("rollout.num_workers=abc", "rollout.num_workers: expected an integer"),
        ("grpo.loss_agg=bogus", "grpo.loss_agg: 'bogus' is not one of"),
        ("learner.zero_stage=5", "learner.zero_stage"),
        ("learner.old_logprobs=sometimes", "learner.old_logprobs: 'sometimes' is not one of"),
        ("train.overlap=3", "train.overlap: expected true/false"),
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


def test_where_off_policy_old_logprobs_come_from():
    from r1omni_ray.config import check_rlvr
    from r1omni_ray.learner.old_logprobs import engine_logprobs_allowed

    assert engine_logprobs_allowed(load_config(None, []))  # auto + hf: the engine's own, no extra pass
    assert not engine_logprobs_allowed(load_config(None, ["rollout.engine=vllm"]))
    assert not engine_logprobs_allowed(load_config(None, ["learner.old_logprobs=recompute"]))
    # vLLM returns processed log-probs (after temperature): its own are a valid opt-in at any temperature
    # (tests/system/test_vllm_cpu.py proves them equal to the learners' at T=0.7).
    cfg = load_config(None, ["rollout.engine=vllm", "learner.old_logprobs=rollout", "rollout.temperature=0.7"])
    check_rlvr(cfg)
    assert engine_logprobs_allowed(cfg)


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
    ([], [3, 3], True, "forward"),  # on-policy: the training forward's own
    ([], [3, 2], True, "rollout"),  # off-policy, hf (auto): the engine's own
    ([], [3, 2], False, "recompute"),  # ... unless some completion lacks them
    (["rollout.engine=vllm"], [3, 2], True, "recompute"),  # auto + vLLM: other kernels, recompute
    (["rollout.engine=vllm"], [3, 3], True, "forward"),
    (["rollout.engine=vllm", "learner.old_logprobs=rollout"], [2, 3], True, "rollout"),  # an explicit opt-in
    (["learner.old_logprobs=recompute"], [3, 2], True, "recompute"),
    (["learner.recompute_old_logprobs=true"], [3, 3], True, "recompute"),  # forced, even on-policy
    (["learner.recompute_old_logprobs=true", "learner.old_logprobs=rollout"], [3, 2], True, "recompute"),
])
def test_old_logprob_source_table(overrides, versions, present, want):
    from r1omni_ray.learner.old_logprobs import old_logprob_source

    assert old_logprob_source(load_config(None, overrides), versions, 3, present) == want
