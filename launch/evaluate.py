"""Evaluate a checkpoint on an R1-Omni JSON dataset with a pool of greedy rollout workers.

    python -m launch.evaluate --config configs/tiny_cpu.yaml --ckpt runs/demo --data eval.json \
        [--label-set dfew|mafw|ravdess] [--out DIR] [--attribution]

--ckpt takes an HF-format model dir, a checkpoint dir with an hf/ export, or a run output dir (its latest
checkpoint's hf/, else final_model). Writes metrics.json (WAR, UAR, per-class recall, confusion, parse
failure rate), predictions.json / .csv and confusion.png into --out, and logs them to W&B. With
--attribution every example is re-scored without video and without audio, and attribution.{md,csv,png}
report per emotion which modality the model leans on.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from actors.evaluation import EvalResult, evaluate_records
from launch.common import base_parser, init_ray, parse_config, resolve_labels, run_main, setup_logging
from launch.splits import load_split
from r1omni_ray.attribution import (
    AttributionRow,
    modality_attribution,
    prediction_shares,
    to_csv,
    to_markdown,
)
from r1omni_ray.checkpointing import resolve_model_dir
from r1omni_ray.config import RunConfig
from r1omni_ray.labels import LABEL_SETS
from r1omni_ray.labels import label_set as named_label_set
from r1omni_ray.tracking import RunLogger

log = logging.getLogger("r1omni_ray")

PREDICTION_COLUMNS = ["id", "label", "prediction", "format_ok", "error", "reasoning", "completion"]


def _matplotlib() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(confusion: Any, labels: list[str], path: Path, title: str = "") -> Path:
    """Row-normalised confusion matrix with counts; the last column collects out-of-set predictions."""
    import numpy as np

    plt = _matplotlib()
    cm = np.asarray(confusion, dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1.0)
    cols = list(labels) + ["other"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(cols), 1.0 + 0.6 * len(labels)))
    ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion (row-normalised colour, counts)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


ATTRIBUTION_COLOURS = {"full": "tab:gray", "no video": "tab:blue", "no audio": "tab:orange"}


def plot_attribution(rows: list[AttributionRow], path: Path) -> Path:
    """Accuracy per emotion under full / no-video / no-audio input, and the share of changed predictions."""
    import numpy as np

    plt = _matplotlib()
    names = [r.label for r in rows]
    x = np.arange(len(rows))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(8.0, 1.4 * len(rows) + 4), 4))
    # One colour per condition in both panels: "no video" left is "video removed" right, and so on.
    for k, (attr, lab) in enumerate([("acc_full", "full"), ("acc_no_video", "no video"), ("acc_no_audio", "no audio")]):
        a1.bar(x + (k - 1) * 0.27, [getattr(r, attr) for r in rows], 0.27, label=lab, color=ATTRIBUTION_COLOURS[lab])
    a1.set_title("accuracy per emotion")
    a1.set_ylim(0, 1)
    for k, (attr, lab, key) in enumerate([("changed_no_video", "video removed", "no video"),
                                         ("changed_no_audio", "audio removed", "no audio")]):
        a2.bar(x + (k - 0.5) * 0.4, [getattr(r, attr) for r in rows], 0.4, label=lab, color=ATTRIBUTION_COLOURS[key])
    a2.set_title("share of predictions that changed")
    a2.set_ylim(0, 1)
    for ax in (a1, a2):
        ax.set_xticks(x, [f"{n}\n({r.leans_on})" for n, r in zip(names, rows, strict=True)], fontsize=8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_predictions(rows: list[dict[str, Any]], out: Path, extra_columns: tuple[str, ...] = ()) -> None:
    cols = PREDICTION_COLUMNS[:3] + list(extra_columns) + PREDICTION_COLUMNS[3:]
    (out / "predictions.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    with (out / "predictions.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def write_report(out: Path, full: EvalResult, labels: list[str], no_video: EvalResult | None = None,
                 no_audio: EvalResult | None = None, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything on disk for one evaluation; returns the metrics dict (also metrics.json)."""
    out.mkdir(parents=True, exist_ok=True)
    m = full.metrics
    n = max(m.n, 1)
    data_errors = sum(r["error"] is not None for r in full.rows)
    no_answer = sum(r["prediction"] is None and r["error"] is None for r in full.rows)
    metrics: dict[str, Any] = m.to_dict() | {
        "format_rate": full.format_rate,
        "parse_failure_rate": no_answer / n,  # generated, but no <answer> tag
        "data_errors": data_errors,  # media that could not be loaded (scored wrong)
        "out_of_set_rate": m.out_of_set / n,
        **(meta or {}),
    }
    rows = [dict(r) for r in full.rows]
    files = {"confusion": plot_confusion(m.confusion, list(m.label_set), out / "confusion.png")}
    extra: tuple[str, ...] = ()
    if no_video is not None and no_audio is not None:
        for r, rv, ra in zip(rows, no_video.rows, no_audio.rows, strict=True):
            r["prediction_no_video"], r["prediction_no_audio"] = rv["prediction"], ra["prediction"]
        extra = ("prediction_no_video", "prediction_no_audio")
        attr = modality_attribution([r["label"] for r in rows], [r["prediction"] for r in rows],
                                    [r["prediction_no_video"] for r in rows], [r["prediction_no_audio"] for r in rows],
                                    labels)
        (out / "attribution.csv").write_text(to_csv(attr))
        (out / "attribution.md").write_text(to_markdown(attr))
        shares = prediction_shares([r["prediction"] for r in rows], [r["prediction_no_video"] for r in rows],
                                   [r["prediction_no_audio"] for r in rows], labels)
        with (out / "prediction_shares.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(shares[0]))
            w.writeheader()
            w.writerows(shares)
        files["attribution"] = plot_attribution(attr, out / "attribution.png")
        metrics["attribution"] = [asdict(a) for a in attr]
        metrics["war_no_video"], metrics["war_no_audio"] = no_video.metrics.war, no_audio.metrics.war
        metrics["uar_no_video"], metrics["uar_no_audio"] = no_video.metrics.uar, no_audio.metrics.uar
    write_predictions(rows, out, extra)
    metrics["files"] = {k: str(v) for k, v in files.items()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def log_report(logger: RunLogger, metrics: dict[str, Any], rows_path: Path, step: int = 0) -> None:
    scalars = {f"eval/{k}": metrics[k] for k in ("war", "uar", "format_rate", "parse_failure_rate", "out_of_set_rate")}
    scalars |= {f"eval/recall/{c}": v for c, v in metrics["per_class_recall"].items()}
    for k in ("war_no_video", "war_no_audio", "uar_no_video", "uar_no_audio"):
        if k in metrics:
            scalars[f"eval/{k}"] = metrics[k]
    logger.log(scalars, step=step)
    logger.summary(scalars)
    preds = json.loads(rows_path.read_text())
    if preds:
        cols = list(preds[0])
        logger.log_table("eval/predictions", cols, [[r.get(c) for c in cols] for r in preds], step)
    if "attribution" in metrics:
        cols = list(metrics["attribution"][0])
        logger.log_table("eval/attribution", cols, [[a[c] for c in cols] for a in metrics["attribution"]], step)
    logger.log_images({f"eval/{k}": v for k, v in metrics["files"].items()}, step)


def run_evaluation(cfg: RunConfig, ckpt: str, data: str, label_set: str | None = None, out: str | None = None,
                   attribution: bool = False) -> dict[str, Any]:
    from actors.rollout_group import RolloutGroup

    model_dir = resolve_model_dir(ckpt)
    log.info("evaluating checkpoint %s (from --ckpt %s)", model_dir, ckpt)
    print(f"checkpoint: {Path(model_dir).resolve()}")
    labels = list(named_label_set(label_set)) if label_set else resolve_labels(cfg)
    records = load_split(data, labels, cfg) or []
    if not records:
        raise ValueError(f"{data}: no usable records for label set {labels}")
    out_dir = Path(out) if out else Path(cfg.train.output_dir) / "eval" / Path(data).stem
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"checkpoint": str(model_dir), "data": str(Path(data).resolve()), "label_set_name": label_set}
    init_ray(cfg)
    logger = RunLogger(out_dir, cfg.wandb, cfg.to_dict() | {"eval": meta}, job_type="eval")
    try:
        pool = RolloutGroup(cfg, str(model_dir))
        mnt, d = cfg.rollout.max_new_tokens, cfg.data
        try:
            full = evaluate_records(pool, records, labels, mnt, d.use_video, d.use_audio, desc="eval")
            nv = na = None
            if attribution:
                nv = evaluate_records(pool, records, labels, mnt, False, d.use_audio, desc="eval without video")
                na = evaluate_records(pool, records, labels, mnt, d.use_video, False, desc="eval without audio")
        finally:
            pool.shutdown()
        metrics = write_report(out_dir, full, labels, nv, na, meta)
        log_report(logger, metrics, out_dir / "predictions.json")
    finally:
        logger.finish()
    metrics["out_dir"] = str(out_dir)
    return metrics


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = base_parser(__doc__ or "")
    parser.add_argument("--ckpt", required=True, help="HF model dir, checkpoint dir (with hf/) or run output dir")
    parser.add_argument("--data", required=True, help="R1-Omni JSON/JSONL dataset")
    parser.add_argument("--label-set", choices=sorted(LABEL_SETS), default=None,
                        help="score against this label set (default: data.labels / the config's label set)")
    parser.add_argument("--out", default=None, help="report dir (default <output_dir>/eval/<data stem>)")
    parser.add_argument("--attribution", action="store_true",
                        help="also score without video and without audio; report modality reliance per emotion")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the flags
    cfg = parse_config(args)
    m = run_evaluation(cfg, args.ckpt, args.data, args.label_set, args.out, args.attribution)
    print(f"WAR {m['war']:.4f}  UAR {m['uar']:.4f}  n={m['n']}  format {m['format_rate']:.3f}  "
          f"parse failures {m['parse_failure_rate']:.3f}")
    for c, r in m["per_class_recall"].items():
        print(f"  recall {c:>14s}: {r:.3f}  (n={m['support'][c]})")
    if "attribution" in m:
        print((Path(m["out_dir"]) / "attribution.md").read_text(), end="")
    print(f"report: {m['out_dir']}")
    return 0


if __name__ == "__main__":
    run_main(main)
