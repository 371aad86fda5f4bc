"""Evaluation CLI (`launch.evaluate`) on a rollout-only Ray pool with the tiny model and synthetic data,
and the report writer on hand-made results."""

import csv
import json

import pytest
import ray

from actors.evaluation import EvalResult
from launch.evaluate import main, write_report
from r1omni_ray.emotion_metrics import emotion_metrics
from r1omni_ray.tracking import read_offline_run

LABELS = ["happy", "sad", "angry", "neutral"]


def fake_result(preds, golds, errors=None):
    errors = errors or [None] * len(preds)
    rows = [{"id": f"r{i}", "label": g, "prediction": p, "reasoning": "r", "completion": f"<answer>{p}</answer>",
             "format_ok": p is not None, "error": e} for i, (p, g, e) in enumerate(zip(preds, golds, errors, strict=True))]
    return EvalResult(emotion_metrics(preds, golds, LABELS), rows, sum(p is not None for p in preds) / len(preds))


def test_attribution_colours_mean_one_condition_each(tmp_path, monkeypatch):
    from launch import evaluate

    colours = {}
    orig = evaluate.plot_attribution

    def spy(rows, path):
        import matplotlib.axes

        real_bar = matplotlib.axes.Axes.bar

        def bar(self, x, h, w, label=None, color=None, **kw):
            colours.setdefault(label, set()).add(color)
            return real_bar(self, x, h, w, label=label, color=color, **kw)

        monkeypatch.setattr(matplotlib.axes.Axes, "bar", bar)
        return orig(rows, path)

    golds = ["happy", "sad"]
    full = fake_result(["happy", "sad"], golds)
    monkeypatch.setattr(evaluate, "plot_attribution", spy)
    write_report(tmp_path, full, LABELS, fake_result(["sad", "sad"], golds), fake_result(["happy", "happy"], golds), {})
    # The removed modality has the same colour in the accuracy panel and the changed-share panel.
    assert colours["no video"] == colours["video removed"] and colours["no audio"] == colours["audio removed"]
    assert len({c for cs in colours.values() for c in cs}) == 3


def test_write_report_files_and_rates(tmp_path):
    golds = ["happy", "happy", "sad", "angry"]
    full = fake_result(["happy", None, "sad", "bored"], golds, [None, None, None, None])
    nv = fake_result(["sad", None, "sad", "bored"], golds)
    na = fake_result(["happy", None, "angry", "bored"], golds)
    m = write_report(tmp_path, full, LABELS, nv, na, {"checkpoint": "x"})
    assert m["war"] == 0.5 and m["parse_failure_rate"] == 0.25 and m["out_of_set_rate"] == 0.5
    assert m["checkpoint"] == "x" and m["war_no_video"] == 0.25
    assert json.loads((tmp_path / "metrics.json").read_text())["uar"] == pytest.approx(m["uar"])
    for f in ("confusion.png", "attribution.png", "attribution.md", "attribution.csv", "prediction_shares.csv"):
        assert (tmp_path / f).stat().st_size > 0, f
    with (tmp_path / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and rows[0]["prediction_no_video"] == "sad"
    assert {a["label"]: a["leans_on"] for a in m["attribution"]}["happy"] == "video"


@pytest.mark.slow
def test_evaluate_cli_with_attribution(tiny_ckpt, synth_data, tmp_path, capsys):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(
        "rollout: {num_workers: 2, max_new_tokens: 6, num_cpus_per_worker: 0.5}\n"
        f"train: {{output_dir: {tmp_path}}}\nwandb: {{mode: offline}}\n"
    )
    out = tmp_path / "report"
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        rc = main(["--config", str(cfg), "--ckpt", str(tiny_ckpt), "--data", str(synth_data / "sft.json"),
                   "--label-set", "dfew", "--out", str(out), "--attribution"])
    finally:
        ray.shutdown()
    assert rc == 0
    printed = capsys.readouterr().out
    assert "WAR" in printed and "UAR" in printed and "| label | n |" in printed
    assert f"checkpoint: {tiny_ckpt.resolve()}" in printed  # the checkpoint --ckpt resolved to

    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 8 and 0.0 <= m["war"] <= 1.0 and 0.0 <= m["parse_failure_rate"] <= 1.0
    assert len(m["label_set"]) == 7 and len(m["confusion"]) == 7  # DFEW
    assert [a["label"] for a in m["attribution"]][-1] == "ALL"
    preds = json.loads((out / "predictions.json").read_text())
    assert len(preds) == 8 and {"prediction", "prediction_no_video", "prediction_no_audio"} <= set(preds[0])
    for f in ("predictions.csv", "confusion.png", "attribution.png", "attribution.md", "attribution.csv"):
        assert (out / f).is_file(), f

    (run_dir,) = sorted((out / "wandb").glob("offline-run-*"))
    run = read_offline_run(run_dir)
    logged = {k for h in run["history"] for k in h}
    assert {"eval/war", "eval/uar", "eval/parse_failure_rate", "eval/war_no_video", "eval/predictions",
            "eval/attribution", "eval/confusion"} <= logged
    assert run["summary"]["eval/war"] == pytest.approx(m["war"])
