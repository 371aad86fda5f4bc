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

    assert grpo_step.main(TINY_GRPO + ["--layouts", "1w1l-sync,1w1l-overlap"]) == 0
    recs = json_lines(capsys.readouterr().out)
    assert recs[0]["kind"] == "config" and recs[-1]["kind"] == "summary"
    steps = [r for r in recs if r.get("layout")]
    assert [r["mode"] for r in steps] == ["sync", "overlap"]
    for r in steps:
        assert r["samples_per_step"] == [4] and r["completion_tokens_mean"] == 4  # no early stop
        assert set(r["phase_s_median"]) >= {"rollout", "reward", "logprob", "update", "broadcast"}
        assert set(r["idle_frac"]) == {"rollout", "learner"}

    assert overlap.main(TINY_GRPO) == 0
    recs = json_lines(capsys.readouterr().out)
    assert recs[-1]["kind"] == "summary" and set(recs[-1]["idle_frac"]) == {"sync", "overlap"}
    assert ray.is_initialized()  # a Ray the benchmark did not start is left running


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
