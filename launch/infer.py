"""Single-clip inference without Ray: print the model's reasoning and the emotion.

    python -m launch.infer --ckpt runs/demo/final_model --video clip.mp4 [--audio a.wav] [--no-video|--no-audio]

Without --audio the clip's own audio track is used (as R1-Omni records without an "audio" key).
--ckpt takes an HF model dir, a checkpoint dir with hf/, or a run output dir.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from launch.common import run_main
from r1omni_ray.labels import EMOTION_QUESTION


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--video", default=None, help="video clip (mp4, ...)")
    p.add_argument("--audio", default=None, help="separate audio file (default: the video's own track)")
    p.add_argument("--no-video", action="store_true", help="drop the video (audio + text only)")
    p.add_argument("--no-audio", action="store_true", help="drop the audio (video + text only)")
    p.add_argument("--question", default=EMOTION_QUESTION)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--vision-tower", default=None, help="SigLIP folder (overrides config.json's mm_vision_tower)")
    p.add_argument("--audio-tower", default=None, help="Whisper folder (overrides config.json's mm_audio_tower)")
    p.add_argument("--bert", default=None, help="BERT folder for the gate (default: <ckpt>/bert)")
    p.add_argument("--input-style", default="trainer", choices=["trainer", "inference"],
                   help="prompt/frames as R1-Omni's GRPO trainer built them, or as its inference.py does")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    video = None if args.no_video else args.video
    audio = None if args.no_audio else (args.audio or args.video)
    if video is None and audio is None:
        print("error: nothing to look at: give --video and/or --audio (and not both --no-* flags)", file=sys.stderr)
        return 2
    for path in (video, audio):
        if path is not None and not Path(path).is_file():
            print(f"error: {path}: no such file", file=sys.stderr)
            return 2

    import torch

    from actors.common import device, setup_process
    from r1omni_ray.checkpointing import resolve_model_dir
    from r1omni_ray.completions import split_reasoning
    from r1omni_ray.config import ModelConfig
    from r1omni_ray.data.errors import DataError
    from r1omni_ray.data.records import OmniRecord
    from r1omni_ray.engines.base import SamplingParams
    from r1omni_ray.engines.hf_engine import HFEngine
    from r1omni_ray.model.family import detect

    setup_process(torch.get_num_threads())
    mc = ModelConfig(dtype=args.dtype, vision_tower_path=args.vision_tower, audio_tower_path=args.audio_tower,
                     bert_path=args.bert)
    try:
        model_dir = resolve_model_dir(args.ckpt)
        fam = detect(model_dir)
        processor = fam.load_processor(model_dir, mc, args.input_style)
        model = fam.load_policy(model_dir, mc).to(device())
    except (FileNotFoundError, ValueError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    rec = OmniRecord(
        id=Path(video or audio).stem, video=str(Path(video).resolve()) if video else None,
        audio=str(Path(audio).resolve()) if audio else None, question=args.question, label="", solution="",
    )
    try:
        inputs = processor.process(rec, use_video=video is not None, use_audio=audio is not None)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    greedy = args.temperature <= 0.0
    params = SamplingParams(n=1, greedy=greedy, temperature=1.0 if greedy else args.temperature,
                            max_new_tokens=args.max_new_tokens, seed=args.seed)
    completion = HFEngine(model, processor.tokenizer).generate([inputs], params)[0][0]
    parsed = split_reasoning(completion.text)
    if args.json:
        print(json.dumps({"reasoning": parsed.reasoning, "emotion": parsed.answer, "completion": completion.text,
                          "finish_reason": completion.finish_reason, "video": rec.video, "audio": rec.audio}))
    else:
        print(f"Reasoning: {parsed.reasoning}")
        print(f"Emotion: {parsed.answer if parsed.answer is not None else '(no <answer> tag in the output)'}")
    return 0


if __name__ == "__main__":
    run_main(main)
