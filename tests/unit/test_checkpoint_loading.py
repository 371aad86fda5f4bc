"""Strict loading: every parameter comes from the checkpoint or from its tower's own folder, never from a
silent random init; the published layout loads unedited; exports stay readable by older readers."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig,
    BertForPreTraining,
    Qwen2Config,
    SiglipConfig,
    SiglipModel,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

from r1omni_ray.data.processor import OmniProcessor
from r1omni_ray.model.loading import AUDIO_PREFIX, CheckpointError, load_policy
from r1omni_ray.model.towers import TowerPaths
from r1omni_ray.tiny.model import make_tiny_checkpoint
from r1omni_ray.tiny.synthetic import SYNTHETIC_VOCAB_TEXTS

WEIGHTS = "model.safetensors"


@pytest.fixture()
def ckpt(tmp_path) -> Path:
    return make_tiny_checkpoint(tmp_path / "ckpt", corpus=tuple(SYNTHETIC_VOCAB_TEXTS))


def rewrite_weights(ckpt: Path, edit) -> dict[str, torch.Tensor]:
    sd = load_file(ckpt / WEIGHTS)
    new = edit(dict(sd))
    save_file(new, ckpt / WEIGHTS, metadata={"format": "pt"})
    return sd


def without(prefix: str):
    return lambda sd: {k: v for k, v in sd.items() if not k.startswith(prefix)}


def test_an_export_loads_with_nothing_missing_or_skipped(ckpt, caplog):
    with caplog.at_level(logging.INFO, logger="r1omni_ray.model.loading"):
        model = load_policy(ckpt, "float32")
    saved = load_file(ckpt / WEIGHTS)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert "skipped" not in caplog.text and "loaded them from" not in caplog.text


def test_a_checkpoint_missing_a_tower_fails_naming_the_keys(ckpt):
    rewrite_weights(ckpt, without(AUDIO_PREFIX))
    with pytest.raises(CheckpointError, match=r"parameter\(s\) missing.*model\.audio_tower\.audio_tower\.encoder\."):
        load_policy(ckpt, "float32")


def test_a_partly_missing_tower_is_an_error_even_with_a_tower_folder(ckpt):
    model = load_policy(ckpt, "float32")
    _save_tower_folders(model, ckpt)
    key = AUDIO_PREFIX + "layers.0.fc1.weight"
    rewrite_weights(ckpt, lambda sd: {k: v for k, v in sd.items() if k != key})
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_policy(ckpt, "float32")


def _save_tower_folders(model, ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Write each tower's weights into its folder in the layout of the downloads: a SiglipModel (text +
    vision), a WhisperForConditionalGeneration and a BertForPreTraining, all random, with our tower configs."""
    c = model.config
    torch.manual_seed(1)
    vcfg = {k: v for k, v in c.vision_config.items() if k not in ("model_type", "transformers_version")}
    siglip = SiglipModel(SiglipConfig(
        vision_config=vcfg,
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=50, max_position_embeddings=16),
    ))
    whisper = WhisperForConditionalGeneration(WhisperConfig(**{k: v for k, v in c.audio_config.items()
                                                               if k not in ("model_type", "transformers_version")}))
    bert = BertForPreTraining(BertConfig(**{k: v for k, v in c.bert_config.items()
                                         if k not in ("model_type", "transformers_version")}))
    siglip.save_pretrained(ckpt / "vision_tower")
    whisper.save_pretrained(ckpt / "audio_tower")
    bert.save_pretrained(ckpt / "bert")
    return {
        "vision": siglip.vision_model.state_dict(),
        "audio": whisper.model.encoder.state_dict(),
        "bert": bert.bert.state_dict(),
    }


def test_towers_missing_from_the_checkpoint_load_from_their_folders(ckpt, caplog):
    model = load_policy(ckpt, "float32")
    expected = _save_tower_folders(model, ckpt)
    rewrite_weights(ckpt, lambda sd: {k: v for k, v in sd.items()
                                      if not k.startswith(("model.vision_tower.", "model.audio_tower.", "model.bert_model."))})
    with caplog.at_level(logging.WARNING, logger="r1omni_ray.model.loading"):
        loaded = load_policy(ckpt, "float32")
    m = loaded.model
    got = {"vision": m.vision_tower.siglip.state_dict(), "audio": m.audio_tower.encoder.state_dict(),
           "bert": m.bert_model.state_dict()}
    for tower, sd in expected.items():
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}  # the pooling head is never used
        assert got[tower].keys() == sd.keys(), tower
        assert all(torch.equal(got[tower][k], v) for k, v in sd.items()), tower
        assert f"no {tower} tower weights; loaded them from" in caplog.text
    # everything else still comes from the checkpoint
    assert torch.equal(m.audio_projector[0].weight, model.model.audio_projector[0].weight)


def test_reference_only_tensors_are_skipped_and_reported_once_but_strangers_fail(ckpt, caplog):
    extra = {
        "model.audio_tower.audio_tower.classifier.weight": torch.zeros(2, 8),
        "model.audio_tower.audio_tower.projector.weight": torch.zeros(8, 32),
        "model.vision_tower.vision_tower.vision_model.head.probe": torch.zeros(1, 1, 32),
    }
    rewrite_weights(ckpt, lambda sd: {**sd, **extra})
    with caplog.at_level(logging.INFO, logger="r1omni_ray.model.loading"):
        load_policy(ckpt, "float32")
    assert caplog.text.count("skipped 3 tensor(s) the forward never reads") == 1

    rewrite_weights(ckpt, lambda sd: {**sd, "model.some_new_module.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"model\.some_new_module\.weight"):
        load_policy(ckpt, "float32")


@torch.no_grad()
def test_the_published_layout_loads_unedited_from_another_directory(ckpt, tmp_path, monkeypatch):
    """config.json as published: hub ids for the towers, no text_model_path, no embedded tower configs.
    The towers live in separate download folders that the run config points at, relative to the checkpoint."""
    original = load_policy(ckpt, "float32")
    expected = _save_tower_folders(original, ckpt)
    downloads = tmp_path / "downloads"
    for sub, name in (("vision_tower", "siglip-base-patch16-224"), ("audio_tower", "whisper-large-v3"),
                      ("bert", "bert-base-uncased")):
        shutil.move(ckpt / sub, downloads / name)
    cfg = json.loads((ckpt / "config.json").read_text())
    for key in ("vision_config", "audio_config", "bert_config", "text_model_path"):
        cfg.pop(key)
    cfg.update(mm_vision_tower="google/siglip-base-patch16-224", mm_audio_tower="openai/whisper-large-v3")
    (ckpt / "config.json").write_text(json.dumps(cfg))
    towers = TowerPaths("../downloads/siglip-base-patch16-224", "../downloads/whisper-large-v3",
                        "../downloads/bert-base-uncased")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    with pytest.raises(FileNotFoundError, match="model.vision_tower_path"):
        load_policy(ckpt, "float32")
    loaded = load_policy(ckpt, "float32", towers)
    proc = OmniProcessor.from_pretrained(ckpt, towers=towers)
    a, b = original.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # from the checkpoint, not folders
    assert not torch.equal(b["model.audio_tower.audio_tower.encoder.conv1.weight"],
                           expected["audio"]["conv1.weight"])
    assert proc.image_processor.size["height"] == original.config.vision_config["image_size"]


def test_exports_write_rope_theta_for_older_readers(tmp_path):
    from r1omni_ray.model.modeling import HumanOmniQwen2ForCausalLM
    from r1omni_ray.tiny.model import tiny_config

    HumanOmniQwen2ForCausalLM(tiny_config(120, rope_theta=1e6)).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    # transformers 4.x's Qwen2Config (the reference code's) reads these two top-level keys.
    assert raw["rope_theta"] == 1e6 and raw["rope_scaling"] is None
    assert Qwen2Config.from_pretrained(tmp_path).rope_parameters["rope_theta"] == 1e6
    reloaded = load_policy(tmp_path, "float32")
    assert reloaded.config.rope_parameters["rope_theta"] == 1e6


def test_a_tower_folder_missing_weights_is_an_error_too(ckpt):
    _save_tower_folders(load_policy(ckpt, "float32"), ckpt)
    folder = ckpt / "audio_tower"
    rewrite_weights(folder, lambda sd: {k: v for k, v in sd.items() if "encoder.layers.0.fc1" not in k})
    rewrite_weights(ckpt, without(AUDIO_PREFIX))
    with pytest.raises(CheckpointError, match=r"audio tower folder lacks .*layers\.0\.fc1"):
        load_policy(ckpt, "float32")
