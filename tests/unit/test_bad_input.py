"""Bad input fails clearly (naming the file / record / field) or is skipped with a counted, logged reason
— before it can crash deep inside a worker. Plus the security checks: no unsafe deserialisation or
eval, and no secret ends up in run output. Fast, no Ray."""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
from pathlib import Path

import pytest

from actors.rollout import PromptSamples, usable_samples
from launch.splits import load_split
from r1omni_ray.config import ConfigError, WandbConfig, config_from_dict, load_config
from r1omni_ray.data.errors import DataError, MediaError
from r1omni_ray.data.records import load_records
from r1omni_ray.engines.base import Completion
from r1omni_ray.rewards import RewardSpec, check_reward_specs
from r1omni_ray.tiny.synthetic import make_corrupt_media
from r1omni_ray.tracking import RunLogger

ROOT = Path(__file__).resolve().parents[2]
LABELS = ["happy", "sad", "angry", "neutral"]
CONV = [{"from": "human", "value": "<video>\n<audio>\nWhich emotion?"}, {"from": "gpt", "value": "sad"}]


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("yaml_text", "match"),
    [
        ("rollout:\n  num_wokers: 2\n", r"rollout: unknown key\(s\) \['num_wokers'\]"),
        ("trian:\n  steps: 2\n", r"unknown key\(s\) \['trian'\]"),
        ("learner:\n  lr: fast\n", r"learner.lr: expected a number, got str"),
        ("train:\n  steps: 2.5\n", r"train.steps: expected an integer"),
        ("data:\n  on_error: ignore\n", r"data.on_error: 'ignore' is not one of \['raise', 'skip'\]"),
        ("reward:\n  rewards: accuracy\n", r"reward.rewards: expected a list"),
        ("rollout: [1, 2]\n", r"rollout: expected a mapping"),
        ("rollout:\n  group_size: 4\n bad indent\n", r"invalid YAML"),
        ("- a\n- b\n", r"top level must be a mapping"),
    ],
)
def test_bad_config_names_file_and_field(tmp_path, yaml_text, match):
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=match) as ei:
        load_config(path)
    assert str(path) in str(ei.value)


def test_bad_override_and_missing_config(tmp_path):
    with pytest.raises(ConfigError, match=r"rollout.group_size: expected an integer"):
        load_config(None, ["rollout.group_size=many"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(None, ["rollout.group_size"])
    with pytest.raises(ConfigError, match="nope.yaml: cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_reward_is_a_startup_error_not_an_actor_crash():
    with pytest.raises(ValueError, match=r"reward.rewards\[1\].name: unknown reward 'acuracy'"):
        check_reward_specs([RewardSpec("format"), RewardSpec("acuracy")])
    with pytest.raises(ValueError, match="reward.modules: cannot import 'no_such_reward_module'"):
        check_reward_specs([RewardSpec("format")], ["no_such_reward_module"])
    check_reward_specs([RewardSpec("test_parity")], ["tests.fault_rewards"])  # a registered custom reward


# ---------------------------------------------------------------------------------------------- datasets


def _cfg(tmp_path: Path, on_error: str):
    return config_from_dict({"data": {"on_error": on_error}, "train": {"output_dir": str(tmp_path)}})


@pytest.fixture()
def media(tmp_path: Path) -> Path:
    (tmp_path / "v.mp4").write_bytes(b"x")  # existence is all the loader checks
    return tmp_path


def test_malformed_line_unknown_label_missing_file_skip_or_raise(media, tmp_path, caplog):
    good = {"video": "v.mp4", "conversations": CONV}
    lines = [
        json.dumps(good),
        '{"video": "v.mp4", "conversations": [',  # malformed JSON line
        json.dumps({"video": "v.mp4", "conversations": [CONV[0], {"from": "gpt", "value": "bored"}]}),
        json.dumps({"video": "gone.mp4", "conversations": CONV}),
        json.dumps(good),
    ]
    path = media / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")

    with caplog.at_level(logging.WARNING, logger="r1omni_ray"):
        recs = load_split(str(path), LABELS, _cfg(tmp_path, "skip"))
    assert len(recs) == 2
    text = caplog.text
    assert "skipped record 1" in text and "line 2" in text and "malformed JSON line" in text
    assert "skipped record 2" in text and "unknown label 'bored'" in text
    assert "skipped record 3" in text and "field 'video'" in text and "gone.mp4" in text

    with pytest.raises(DataError, match=r"train.jsonl: line 2: record 1: malformed JSON line"):
        load_split(str(path), LABELS, _cfg(tmp_path, "raise"))


def test_empty_and_all_invalid_datasets_are_errors_in_both_modes(media, tmp_path):
    empty = media / "empty.json"
    empty.write_text("")
    nothing_valid = media / "bad.json"
    nothing_valid.write_text(json.dumps([{"video": "v.mp4", "conversations": []}]))
    for on_error in ("skip", "raise"):
        with pytest.raises(DataError, match="empty.json: dataset is empty"):
            load_split(str(empty), LABELS, _cfg(tmp_path, on_error))
        with pytest.raises(DataError, match=r"bad.json.*(no valid records|no human turn)"):
            load_split(str(nothing_valid), LABELS, _cfg(tmp_path, on_error))
    with pytest.raises(DataError, match="missing.json: dataset file not found"):
        load_records(media / "missing.json")


# ---------------------------------------------------------------------------------------------- media


@pytest.fixture(scope="module")
def proc(tiny_ckpt):
    from r1omni_ray.data.processor import OmniProcessor

    return OmniProcessor.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def bad_media(tmp_path_factory):
    return make_corrupt_media(tmp_path_factory.mktemp("corrupt"))


@pytest.mark.parametrize(
    ("video", "audio", "expect"),
    [
        ("truncated_mp4", None, "truncated.mp4"),
        ("garbage_mp4", None, "garbage.mp4"),
        ("no_audio_mp4", None, "no_audio.mp4: video container has no audio track"),  # and no audio path
        ("GOOD", "zero_length_wav", "zero_length.wav"),
        ("GOOD", "empty_file_wav", "empty_file.wav"),
        ("MISSING", None, "missing.mp4"),
    ],
)
def test_bad_media_is_a_data_error_naming_the_file(proc, synth_data, bad_media, video, audio, expect):
    """What a rollout worker catches (DataError -> PromptSamples.error) instead of crashing."""
    rec = load_records(synth_data / "train.json", label_set=LABELS).records[0]
    paths = {"GOOD": rec.video, "MISSING": str(Path(rec.video).with_name("missing.mp4"))}
    v = paths.get(video) or str(bad_media[video])
    a = str(bad_media[audio]) if audio else v  # no audio path: the video's own track
    with pytest.raises(DataError, match=expect.replace(".", r"\.")) as ei:
        proc.process(dataclasses.replace(rec, video=v, audio=a))
    assert isinstance(ei.value, MediaError)


def test_usable_samples_skip_splits_and_raise_names_the_file():
    """skip: split off (BatchPipeline.remember names and counts them, once a run); raise: the run stops."""
    ok = PromptSamples(0, "good", object(), [Completion([1], "x", "stop")], worker=0)
    bad = PromptSamples(1, "rec-7", None, error="/data/v7.mp4: cannot open video: moov atom not found", worker=1)
    empty = PromptSamples(2, "rec-8", object(), [], worker=1)
    good, skipped = usable_samples([ok, bad, empty], "skip")
    assert good == [ok] and skipped == [bad, empty]
    with pytest.raises(DataError, match=r"record 'rec-7' \(rollout worker 1\): /data/v7.mp4: cannot open video"):
        usable_samples([ok, bad], "raise")
    assert usable_samples([ok], "raise") == ([ok], [])


# ---------------------------------------------------------------------------------------------- security


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name):  # a builtin / plain function: owner None
                yield node, None, f.id
            elif isinstance(f, ast.Attribute):  # module.fn(...) or obj.method(...): owner "" unless a name
                yield node, f.value.id if isinstance(f.value, ast.Name) else "", f.attr


def test_no_unsafe_deserialisation_or_eval_in_the_code():
    """torch.load only with weights_only=True, yaml only via safe_load, no pickle.load(s) of files, and
    no eval/exec (model output is parsed with str.find / regexes, never evaluated)."""
    problems = []
    for pkg in ("r1omni_ray", "actors", "launch", "bench"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node, owner, name in _calls(ast.parse(path.read_text(), str(path))):
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                if owner is None and name in ("eval", "exec"):
                    problems.append(f"{where}: {name}()")
                elif owner == "torch" and name == "load":
                    kw = {k.arg: k.value for k in node.keywords}
                    wo = kw.get("weights_only")
                    if not (isinstance(wo, ast.Constant) and wo.value is True):
                        problems.append(f"{where}: torch.load without weights_only=True")
                elif owner == "pickle" and name in ("load", "loads"):
                    problems.append(f"{where}: pickle.{name}")
                elif owner == "yaml" and name in ("load", "unsafe_load", "full_load"):
                    problems.append(f"{where}: yaml.{name}")
    assert not problems, problems


def test_wandb_key_and_ray_token_never_reach_logs_or_run_files(tmp_path, monkeypatch, capfd, caplog):
    key = "fake0wandb0key0" + "7" * 25  # 40 chars, like a real key
    token = "fake-ray-auth-token-0123456789abcdef"
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = config_from_dict({"train": {"output_dir": str(tmp_path)}, "wandb": {"mode": "offline"}})
    with caplog.at_level(logging.DEBUG):
        logger = RunLogger(tmp_path, WandbConfig(mode="offline", project="secrets-test"), cfg.to_dict())
        logger.log({"reward/total_mean": 0.5, "note": "hello"}, step=1)
        logger.log_table("samples", ["id", "completion"], [["r1", "<answer>sad</answer>"]], step=1)
        logger.finish()
    out, err = capfd.readouterr()
    assert any(tmp_path.rglob("*.wandb")), "expected an offline W&B run under the run dir"
    for secret in (key, token):
        assert secret not in out and secret not in err and secret not in caplog.text
        for f in tmp_path.rglob("*"):
            if f.is_file():
                assert secret.encode() not in f.read_bytes(), f"secret written to {f}"


class _Exploit:
    """A pickle that runs code when loaded (writes a marker file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_checkpoint_loading_never_runs_pickled_code(tmp_path):
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from r1omni_ray.safe_load import safe_torch_load

    # What a ZeRO optimizer shard holds loads fine ...
    good = tmp_path / "optim_states.pt"
    torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients, "w": torch.ones(3)}, good)
    sd = safe_torch_load(good)
    assert sd["zero_stage"] == ZeroStageEnum.gradients and torch.equal(sd["w"], torch.ones(3))
    # ... a crafted file is refused without executing anything.
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "x": _Exploit(str(marker))}, evil)
    with pytest.raises(RuntimeError, match="evil.pt: refusing to load"):
        safe_torch_load(evil)
    assert not marker.exists()
