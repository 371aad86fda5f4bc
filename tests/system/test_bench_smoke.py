"""The benchmark scripts still run end to end at their smallest sizes (no timing is asserted)."""

import json

import pytest
import ray

TINY_LM = ["--hidden-size", "32", "--intermediate-size", "64", "--layers", "1", "--heads", "2", "--kv-heads", "1"]
TINY_GRPO = TINY_LM + ["--prompts", "2", "--group-size", "2", "--new-tokens", "4", "--warmup-steps", "1",
                       "--steps", "1", "--micro-batch-size", "4"]


def json_lines(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "the benchmark printed nothing"
    return [json.loads(line) for line in lines]  # every stdout line must be JSON


@pytest.fixture(scope="module")
def bench_ray():
    """One local Ray for both GRPO benchmarks (they reuse a running instance and leave it up)."""
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_grpo_step_and_overlap_benchmarks_run(bench_ray, capsys):
    from bench import grpo_step, overlap

    # 3 measured steps: an overlapped run's first step after the warm-up is still on-policy.
    assert grpo_step.main(TINY_GRPO + ["--layouts", "1w1l-sync,1w1l-overlap", "--steps", "3"]) == 0
    recs = json_lines(capsys.readouterr().out)
    assert recs[0]["kind"] == "config" and recs[-1]["kind"] == "summary"
    steps = [r for r in recs if r.get("layout")]
    assert [r["mode"] for r in steps] == ["sync", "overlap"]
    # Off-policy (overlap) steps: the training forward is the proximal policy, weighted towards the behaviour
    # log-probs the hf engine recorded while sampling: no extra pass.
    assert [r["old_logprobs"] for r in steps] == ["training forward", "training forward + correction"]
    for r in steps:
        assert r["samples_per_step"] == [4] and r["completion_tokens_mean"] == 4  # no early stop
        assert set(r["phase_s_median"]) >= {"rollout", "reward", "logprob", "update", "broadcast"}
        assert set(r["idle_frac"]) == {"rollout", "learner"}

    assert overlap.main(TINY_GRPO) == 0
    recs = json_lines(capsys.readouterr().out)
    assert recs[-1]["kind"] == "summary" and set(recs[-1]["idle_frac"]) == {"sync", "overlap"}
    assert ray.is_initialized()  # a Ray the benchmark did not start is left running


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_async_rl_benchmark_runs_each_staleness_with_long_tailed_lengths(bench_ray, capsys):
    from bench import async_rl

    args = TINY_GRPO + ["--staleness", "0,2,2s", "--repeats", "1", "--steps", "3", "--new-tokens", "12",
                        "--stop-ids", "20", "--stream-chunk", "1"]
    assert async_rl.main(args) == 0
    recs = json_lines(capsys.readouterr().out)
    runs = [r for r in recs if r.get("layout")]
    assert [(r["max_staleness"], r["streamed"]) for r in runs] == [(0, False), (2, False), (2, True)]
    assert recs[-1]["kind"] == "summary" and runs[2]["mode"] == "k2-stream1"
    assert runs[0]["weight_version_lag_max"] == 0 and max(r["weight_version_lag_max"] for r in runs[1:]) <= 2
    # eos allowed: completions stop early (20 extra stop ids in a tiny vocabulary)
    assert all(r["completion_tokens_mean"] < 12 for r in runs)
    assert set(recs[-1]["by_staleness"]) == {"0", "2", "2s"} and "speedup_k2s_vs_k2" in recs[-1]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_elastic_benchmark_resizes_its_run(bench_ray, capsys):
    from bench import elastic

    assert elastic.main(TINY_GRPO + ["--phases", "1,2"]) == 0
    recs = json_lines(capsys.readouterr().out)
    phases = [r for r in recs if r.get("workers")]
    assert [r["workers"] for r in phases] == [1, 2] and recs[-1]["kind"] == "summary"
    assert phases[1]["join_steps"] >= 1 and phases[1]["join_s"] > 0
    assert all(r["steps_per_s"] > 0 and r["rollout_scaling_efficiency"] > 0 for r in phases)


@pytest.mark.timeout(120)
def test_weight_broadcast_benchmark_runs(capsys):
    from bench import weight_broadcast

    argv = ["--models", "tiny", "--receivers", "1", "--bucket-mb", "1,0", "--warmup", "0", "--repeats", "1",
            "--small-repeats", "1", "--memcpy-mb", "8", *TINY_LM]
    assert weight_broadcast.main(argv) == 0
    recs = json_lines(capsys.readouterr().out)
    assert [r["when"] for r in recs if r.get("kind") == "memcpy"] == ["start", "end"]
    assert recs[0]["copy_gbps"] > 0
    rows = [r for r in recs if "kind" not in r]
    assert sorted(r["bucket_mb"] for r in rows) == [0.0, 1.0]
    assert all(r["receivers"] == 1 and r["bytes"] > 0 and r["seconds_median"] > 0 for r in rows)
    # The GPU-cluster lines: each rollout GPU receives its part once (the vLLM worker the LM, the actor the
    # front end), less than the twice-everything of the layout before; pipelining is never slower.
    est = {r["model"]: r for r in recs if r.get("kind") == "gpu_cluster_estimate"}
    assert set(est) == {"0.5b", "7b"}
    for r in est.values():
        assert r["bytes_per_vllm_worker"] + r["bytes_per_rollout_actor"] < r["bytes_per_rollout_gpu_before"]
        assert r["seconds"]["pipelined_s"] <= r["seconds"]["serial_s"] < r["seconds"]["before_gloo_staged_s"]


def _run_module(module: str, argv: list[str], timeout: int) -> list[dict]:
    """A benchmark in its own process: bench.omni_shape starts torch.distributed in-process, and TRL's
    trainer changes global torch settings; neither belongs in the test process."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=timeout,
                         env={**__import__("os").environ, "TOKENIZERS_PARALLELISM": "false"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json_lines(out.stdout)


@pytest.mark.slow
@pytest.mark.timeout(450)
def test_omni_shape_benchmark_runs():
    # One head of 32: the vLLM variants need a head size that vLLM's CPU attention accepts.
    argv = TINY_LM[:-4] + ["--heads", "1", "--kv-heads", "1", "--tower-hidden", "16", "--prompts", "1",
                           "--group-size", "2", "--new-tokens", "4", "--warmup", "0", "--steps", "1",
                           "--engine-repeats", "1"]
    recs = _run_module("bench.omni_shape", argv, 400)
    assert recs[0]["kind"] == "config" and recs[0]["prompt_tokens"] == 392 + 500 + 80
    engine = [r for r in recs if r.get("part") == "engine"]
    assert [r["variant"] for r in engine] == ["per_sample", "shared_prefix", "vllm", "vllm_no_prefix_caching"]
    assert all(r["completion_tokens"] == [4, 4] for r in engine)  # exactly new_tokens each
    learner = [r for r in recs if r.get("part") == "learner"]
    assert len(learner) == 4 and all(r["completion_tokens_per_s"] > 0 for r in learner)
    # The reference holds no towers when their features are shipped.
    by = {r["variant"]: r for r in learner}
    assert by["shared_prefix+tower_features"]["reference_params"] < by["shared_prefix+raw_media"]["reference_params"]
    summary = recs[-1]
    assert summary["kind"] == "summary"
    assert set(summary["engine_tokens_per_s_vs_hf_per_sample"]) == {r["variant"] for r in engine[1:]}
    assert set(summary["learner_speedup_vs_per_completion_raw"]) == {r["variant"] for r in learner[1:]}


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_compare_trl_benchmark_runs_both_systems():
    pytest.importorskip("trl")
    argv = TINY_GRPO + ["--layouts", "1w1l-sync-t1x1,1w1l-sync-noprefix-t1x1", "--trl-threads", "1", "--repeats", "1"]
    recs = _run_module("bench.compare_trl", argv, 380)
    trl_rows = [r for r in recs if r.get("system") == "trl"]
    ours = [r for r in recs if r.get("layout")]
    assert len(trl_rows) == 1 and trl_rows[0]["completions_per_s"] > 0
    assert trl_rows[0]["gradient_checkpointing"] is False  # R1-Omni's setting, not TRL's default
    assert trl_rows[0]["completion_tokens_mean"] == 4  # the same exact completion length on both sides
    assert [r["layout"] for r in ours] == ["1w1l-sync-t1x1", "1w1l-sync-noprefix-t1x1"]
    assert all(r["samples_per_step"] == [4] and r["completion_tokens_mean"] == 4 for r in ours)
    summary = recs[-1]
    assert summary["kind"] == "summary" and set(summary["sync_vs_trl_equal_cores"]) == {"1w1l-sync-t1x1 / trl-t1"}
    assert summary["best_sync_vs_trl_equal_cores"]["1 cores"]["layout"] == "1w1l-sync-t1x1"
    assert set(summary["compute_matched_vs_trl_equal_cores"]) == {"1w1l-sync-noprefix-t1x1 / trl-t1"}
    assert summary["trl"]["t1"]["min"] <= summary["trl"]["t1"]["median"] <= summary["trl"]["t1"]["max"]


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_grad_checkpointing_benchmark_runs():
    argv = TINY_LM + ["--tower-hidden", "16", "--group-size", "2", "--new-tokens", "4", "--repeats", "1", "--threads", "1"]
    recs = _run_module("bench.grad_checkpointing", argv, 180)
    rows = [r for r in recs if not r.get("summary")]
    assert [r["gradient_checkpointing"] for r in rows] == [False, True]
    # A checkpointed layer keeps only its inputs for backward.
    assert rows[1]["saved_for_backward_mb"] < rows[0]["saved_for_backward_mb"]
    assert recs[-1]["summary"] and recs[-1]["peak_ratio_on_off"] > 0


def test_memory_model_counts_the_published_model_exactly_and_prints_each_role():
    """The 0.5B count is the reference checkpoint's, tensor for tensor (less what its forward never reads);
    every role of every config has an estimate, and gradient checkpointing lowers the learner's."""
    import math

    from bench.memory_model import REFERENCE, rows

    ref = json.loads(REFERENCE.read_text())
    unused = set(ref["not_used_in_forward"])
    published = sum(math.prod(s) for k, s in ref["tensors"].items() if k not in unused)
    out = rows(80.0)
    models = ("0.5b", "7b", "qwen2_5_omni_3b", "qwen2_5_omni_7b")
    assert {(r["model"], r["role"]) for r in out} == {(m, r) for m in models for r in ("learner", "rollout")}
    assert all(r["params_total"] == published for r in out if r["model"] == "0.5b")
    # The Qwen2.5-Omni-7B thinker with frozen towers trains its LM alone: Qwen2.5-7B's 7,615,616,512 parameters.
    assert {r["params_trainable"] for r in out if r["model"] == "qwen2_5_omni_7b"} == {7_615_616_512}
    assert all(r["engine"] == "vllm" and r["fits"] for r in out if r["model"].startswith("qwen") and r["role"] == "rollout")
    for m in models:
        learner = {r["gradient_checkpointing"]: r["gib"] for r in out if r["model"] == m and r["role"] == "learner"}
        assert learner[True]["activations"] < learner[False]["activations"]
        parts = {k: v for k, v in learner[True].items() if k not in ("total", "startup", "plan_peak")}
        assert learner[True]["total"] == pytest.approx(sum(parts.values()), abs=0.05)
        assert learner[True]["plan_peak"] == max(learner[True]["total"], learner[True]["startup"])
        # what issue 34 found missing is counted
        assert {"fp32_grads", "adamw_temporaries", "zero_buckets", "broadcast_staging"} <= set(parts)
    big = next(r for r in out if r["model"] == "7b" and r["role"] == "learner" and r["gradient_checkpointing"])
    assert big["params_total"] > 7e9 and big["fits"]


@pytest.mark.timeout(300)
def test_decode_benchmark_runs():
    recs = _run_module("bench.decode", ["--seconds", "2", "--repeats", "1"], 240)
    assert recs[0]["bench"] == "decode"
    clips = recs[1:]
    assert [r["clip"] for r in clips] == ["keyframe_every_1s", "one_keyframe"]
    assert all(r["pyav_s"] > 0 for r in clips)
    if recs[0]["decord"]:  # where decord 0.6 installs, both decoded the same frames
        assert all(r["frames_equal"] is True and r["pyav_over_decord"] > 0 for r in clips)


@pytest.mark.slow
@pytest.mark.timeout(450)
def test_omni_shape_benchmark_runs_for_qwen2_5_omni():
    argv = TINY_LM[:-4] + ["--heads", "1", "--kv-heads", "1", "--tower-hidden", "16", "--prompts", "1",
                           "--group-size", "2", "--new-tokens", "4", "--warmup", "0", "--steps", "1",
                           "--engine-repeats", "1", "--family", "qwen2_5_omni"]
    recs = _run_module("bench.omni_shape", argv, 400)
    # 2880 video + 100 audio tokens of a 4 s 720p clip, interleaved, and the question's text
    assert recs[0]["family"] == "qwen2_5_omni" and 2980 < recs[0]["prompt_tokens"] < 3100
    engine = [r for r in recs if r.get("part") == "engine"]
    assert [r["variant"] for r in engine] == ["per_sample", "shared_prefix", "vllm_no_prefix_caching"]  # CPU
    assert all(r["completion_tokens"] == [4, 4] for r in engine)
    learner = [r for r in recs if r.get("part") == "learner"]
    assert len(learner) == 4 and all(r["completion_tokens_per_s"] > 0 for r in learner)
