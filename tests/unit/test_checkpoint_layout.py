"""Our model against the layout the reference HumanOmni code writes, at real size, on the meta device.

tests/reference/r1omni_0.5b_checkpoint_keys.json (a copy of the shared reference file, kept in the repo so a
user's clone runs this too) holds the published R1-Omni-0.5B config.json, the tower configs, and every tensor
name and shape the reference code saves. The model is built the way load_policy
builds it for that checkpoint (unedited config.json, tower folders given as run-config overrides), with no
weights, and every listed tensor must land on a parameter of the same shape.
"""

import json
import os
import re
from pathlib import Path

import pytest
import torch

from r1omni_ray.model.loading import LEGACY_KEY_MAPPING, UNUSED_IN_FORWARD, load_model_config
from r1omni_ray.model.modeling import HumanOmniQwen2ForCausalLM
from r1omni_ray.model.towers import TowerPaths

REFERENCE = Path(__file__).resolve().parents[1] / "reference" / "r1omni_0.5b_checkpoint_keys.json"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "reference" / "r1omni_0.5b_checkpoint_keys.json"


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


def test_the_in_repo_reference_is_the_shared_one():
    """Where the shared reference folder sits beside the clone (CI, developers), the copy has not drifted."""
    if not SHARED.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{SHARED} not present: CI always has it beside the clone")
        pytest.skip(f"{SHARED} not present (a user's clone): the in-repo copy is what the other tests read")
    assert json.loads(SHARED.read_text()) == json.loads(REFERENCE.read_text())


def write_published_layout(root: Path, reference: dict) -> Path:
    """The published checkpoint's config.json (unedited) and the three tower folders' config.json files,
    in separate folders as a user downloads them."""
    ckpt = root / "R1-Omni-0.5B"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps(reference["config_json"]))
    towers = reference["tower_configs"]
    for name in ("siglip-base-patch16-224", "whisper-large-v3", "bert-base-uncased"):
        (root / "towers" / name).mkdir(parents=True)
        (root / "towers" / name / "config.json").write_text(json.dumps(towers[name]))
    return ckpt


@pytest.fixture(scope="module")
def meta_model(reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    ckpt = write_published_layout(root, reference)
    # Relative overrides resolve against the checkpoint directory, not the current one.
    towers = TowerPaths("../towers/siglip-base-patch16-224", "../towers/whisper-large-v3",
                        "../towers/bert-base-uncased")
    config = load_model_config(ckpt, towers)
    with torch.device("meta"):
        return HumanOmniQwen2ForCausalLM(config)


def test_every_reference_tensor_maps_onto_a_parameter_of_the_same_shape(reference, meta_model):
    ours = {k: list(v.shape) for k, v in meta_model.state_dict().items()}
    theirs = reference["tensors"]
    unused = set(reference["not_used_in_forward"])
    tied = {"lm_head.weight"} if meta_model.config.tie_word_embeddings else set()

    missing = sorted(set(ours) - set(theirs) - tied)
    unexpected = sorted(set(theirs) - set(ours))
    wrong_shape = sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])
    assert missing == [], f"{len(missing)} of our parameters are not in the reference checkpoint: {missing[:8]}"
    assert unexpected == sorted(unused), f"unexpected beyond not_used_in_forward: {sorted(set(unexpected) - unused)[:8]}"
    assert wrong_shape == [], [(k, ours[k], theirs[k]) for k in wrong_shape[:8]]
    assert len(theirs) == 1322  # the reference file's count; a shrinking file would hide gaps


def test_the_loader_skips_exactly_the_unused_tensors_and_renames_none(reference):
    names = list(reference["tensors"])
    assert sorted(k for k in names if UNUSED_IN_FORWARD.search(k)) == sorted(reference["not_used_in_forward"])
    for pattern in LEGACY_KEY_MAPPING:  # the legacy renames never touch reference names
        assert not any(re.search(pattern, k) for k in names), pattern


def test_published_config_values_reach_the_model(reference, meta_model):
    c = meta_model.config
    pub = reference["config_json"]
    assert (c.hidden_size, c.num_hidden_layers, c.vocab_size) == (pub["hidden_size"], pub["num_hidden_layers"], 151936)
    assert c.rope_parameters["rope_theta"] == pub["rope_theta"] == 1e6
    assert c.mm_projector_type == "all_in_one_small" and c.mm_vision_select_layer == -2
    assert c.vision_config["hidden_size"] == 768 and c.audio_config["d_model"] == 1280
    assert c.bert_config["hidden_size"] == 768
    # 8 frames x 7 x 7 video tokens, 1500 / 3 audio tokens: what R1-Omni splices in.
    assert meta_model.model.vision_tower.patches_per_side == 14


def test_a_missing_tower_folder_names_the_key_to_set(reference, tmp_path):
    ckpt = write_published_layout(tmp_path, reference)
    with pytest.raises(FileNotFoundError, match="mm_vision_tower.*model.vision_tower_path"):
        load_model_config(ckpt)
    with pytest.raises(FileNotFoundError, match="model.bert_path"):
        load_model_config(ckpt, TowerPaths("../towers/siglip-base-patch16-224", "../towers/whisper-large-v3"))
