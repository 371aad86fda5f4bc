"""Checkpoint bookkeeping: atomic writes, the latest pointer, pruning, model-dir resolution."""

import json
import os

import pytest

from r1omni_ray import checkpointing as ck
from r1omni_ray.checkpointing import DriverState


def state(step: int, **kw) -> DriverState:
    return DriverState(step=step, seed=0, weight_version=step, prompts_per_step=4, num_records=16,
                       init_ckpt="/x", **kw)


def save(out, step: int, payload: str = "w") -> None:
    tmp = ck.begin_checkpoint(out, step)
    (tmp / "deepspeed").mkdir()
    (tmp / "deepspeed" / "shard.pt").write_text(payload)
    ck.commit_checkpoint(out, step, state(step))


def test_commit_renames_tmp_and_moves_latest(tmp_path):
    save(tmp_path, 1)
    root = tmp_path / "checkpoints"
    assert (root / "step_1" / "state.json").is_file() and not (root / "step_1.tmp").exists()
    assert (root / "latest").read_text().strip() == "step_1"
    save(tmp_path, 2)
    assert ck.latest_checkpoint(tmp_path) == root / "step_2"
    assert ck.read_state(root / "step_2") == state(2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [1, 2]


def test_state_json_round_trip_ignores_unknown_keys(tmp_path):
    s = state(3, wandb_run_id="abc", wandb_step=17, weights_checksum=[[1.5, 2.25, 3.0]])
    d = json.loads(s.to_json()) | {"added_by_a_newer_version": 1}
    assert DriverState.from_dict(d) == s


def test_half_written_checkpoint_is_never_latest(tmp_path):
    save(tmp_path, 1)
    # A crash after DeepSpeed wrote its shards but before commit: only step_N.tmp exists.
    tmp = ck.begin_checkpoint(tmp_path, 2)
    (tmp / "deepspeed").mkdir()
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_1"
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [1]
    # The retry starts from an empty tmp dir.
    assert not any(ck.begin_checkpoint(tmp_path, 2).iterdir())


def test_latest_falls_back_when_pointer_missing_or_stale(tmp_path):
    save(tmp_path, 1)
    save(tmp_path, 3)
    root = tmp_path / "checkpoints"
    (root / "latest").unlink()
    assert ck.latest_checkpoint(tmp_path) == root / "step_3"
    (root / "latest").write_text("step_9\n")  # points at a pruned/missing dir
    assert ck.latest_checkpoint(tmp_path) == root / "step_3"
    assert ck.latest_checkpoint(tmp_path / "nothing") is None


def test_write_text_atomic_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "latest"
    ck.write_text_atomic(p, "a")
    ck.write_text_atomic(p, "b")
    assert p.read_text() == "b"
    assert os.listdir(tmp_path) == ["latest"]


def test_recommit_same_step_replaces_it(tmp_path):
    save(tmp_path, 2, payload="old")
    save(tmp_path, 2, payload="new")
    root = tmp_path / "checkpoints"
    assert (root / "step_2" / "deepspeed" / "shard.pt").read_text() == "new"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_2"]


def test_prune_keeps_last_n_and_removes_leftovers(tmp_path):
    for s in (1, 2, 3, 4):
        save(tmp_path, s)
    ck.begin_checkpoint(tmp_path, 5)  # leftover of a crash
    removed = ck.prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["step_1", "step_2", "step_5.tmp"]
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [3, 4]
    assert ck.prune_checkpoints(tmp_path, keep_last=0) == []  # 0 keeps everything


def test_prune_never_removes_what_latest_names(tmp_path):
    for s in (1, 2, 3):
        save(tmp_path, s)
    ck.write_text_atomic(tmp_path / "checkpoints" / "latest", "step_1\n")
    ck.prune_checkpoints(tmp_path, keep_last=1)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [1, 3]


def test_read_state_errors_name_the_file(tmp_path):
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match="state.json"):
        ck.read_state(tmp_path)


def test_resolve_model_dir(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert ck.resolve_model_dir(model) == model
    run = tmp_path / "run"
    tmp = ck.begin_checkpoint(run, 2)
    (tmp / "hf").mkdir()
    (tmp / "hf" / "config.json").write_text("{}")
    ck.commit_checkpoint(run, 2, state(2))
    step2 = run / "checkpoints" / "step_2"
    assert ck.resolve_model_dir(step2) == step2 / "hf"
    assert ck.resolve_model_dir(run) == step2 / "hf"
    save(run, 3)  # a DeepSpeed-only checkpoint is latest now
    with pytest.raises(FileNotFoundError, match="DeepSpeed-only"):
        ck.resolve_model_dir(run / "checkpoints" / "step_3")
    with pytest.raises(FileNotFoundError):
        ck.resolve_model_dir(run)


def test_link_or_copy_tree(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "w.bin").write_bytes(b"123")
    dst = ck.link_or_copy_tree(src, tmp_path / "dst")
    assert (dst / "sub" / "w.bin").read_bytes() == b"123"
    ck.link_or_copy_tree(src, dst)  # replacing an existing copy
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]
