"""Single-clip inference (`launch.infer`) with the tiny random checkpoint: structure, not content."""

import json
import subprocess
import sys
from pathlib import Path

from launch.infer import main

ROOT = Path(__file__).resolve().parents[2]


def first_video(synth_data: Path) -> Path:
    return sorted((synth_data / "videos").glob("*.mp4"))[0]


def test_infer_prints_reasoning_and_emotion_without_ray(tiny_ckpt, synth_data):
    # A fresh interpreter: inference must not need (or even import) Ray.
    code = ("import sys; from launch.infer import main; rc = main(sys.argv[1:]); "
            "assert 'ray' not in sys.modules, 'ray was imported'; sys.exit(rc)")
    proc = subprocess.run(
        [sys.executable, "-c", code, "--ckpt", str(tiny_ckpt), "--video", str(first_video(synth_data)),
         "--max-new-tokens", "8"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert any(x.startswith("Reasoning:") for x in lines)
    assert sum(x.startswith("Emotion: ") for x in lines) == 1


def test_infer_modality_flags_and_json(tiny_ckpt, synth_data, capsys):
    video = first_video(synth_data)
    wavs = sorted((synth_data / "audios").glob("*.wav"))
    audio_args = ["--audio", str(wavs[0])] if wavs else []
    assert main(["--ckpt", str(tiny_ckpt), "--video", str(video), *audio_args, "--no-video", "--json",
                 "--max-new-tokens", "6"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["video"] is None and out["audio"].endswith(".wav" if wavs else ".mp4")
    assert set(out) >= {"reasoning", "emotion", "completion"} and out["finish_reason"] in ("stop", "length")

    assert main(["--ckpt", str(tiny_ckpt), "--video", str(video), "--no-audio", "--json", "--temperature", "0.7",
                 "--max-new-tokens", "6"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["audio"] is None and out["video"].endswith(".mp4")


def test_infer_errors(tiny_ckpt, tmp_path, capsys):
    assert main(["--ckpt", str(tiny_ckpt)]) == 2
    assert main(["--ckpt", str(tiny_ckpt), "--video", str(tmp_path / "missing.mp4")]) == 2
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    assert main(["--ckpt", str(tiny_ckpt), "--video", str(bad)]) == 2
    assert main(["--ckpt", str(tmp_path), "--video", str(bad)]) == 2
    assert "error:" in capsys.readouterr().err
