"""The benchmark suite's plumbing on the CPU: `run_all --smoke` end to end, its files, its
labelling, where it may write, and the pure functions behind the targets and the auto choice.
Smoke numbers are never checked for speed: they are not a measurement."""
import importlib.util
import json

import pytest
import torch

from benchmarks import bench_ops, harness, run_all

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    rc = run_all.main(["--smoke", "--out", str(out)])
    return rc, out, json.loads((out / "results.json").read_text())


def test_smoke_run_completes_and_is_labelled(smoke):
    rc, out, r = smoke
    assert rc == 0 and r["errors"] == {}
    assert r["smoke"] is True and r["measurement"] is False
    assert "NOT A MEASUREMENT" in (out / "results.md").read_text()
    env = r["environment"]
    assert {"date_utc", "git_commit", "git_dirty", "python", "torch", "cuda", "triton", "transformers",
            "gpu"} <= set(env)
    assert r["copy_bandwidth"]["gbps"] > 0 and "end" in r["copy_bandwidth"]


def test_smoke_run_covers_every_section(smoke):
    from vita_kernels.registry import ops

    _, _, r = smoke
    assert set(r["sections"]) == {"mctp", "e2e", "ops"}
    op_rows = r["sections"]["ops"]["rows"]
    assert {row["op"] for row in op_rows} == {spec.name for spec in ops()}
    assert all(row["us"] > 0 and row["gbps"] is not None for row in op_rows if row["impl"] == "torch")
    assert set(r["sections"]["ops"]["fastest"]) == {spec.name for spec in ops()}
    mctp = r["sections"]["mctp"]["rows"]
    assert {(row["region"], row["impl"]) for row in mctp} >= {
        ("mctp_step", "ours (graph)"), ("mctp_step", "transformers eager"), ("burst", "ours (graph)"),
        ("burst", "transformers eager"), ("llm_step", "ours (graph)")}
    assert all(row["us"] > 0 for row in mctp)
    e2e = r["sections"]["e2e"]
    assert [row["mode"] for row in e2e["rows"]] == list(__import__("benchmarks.bench_e2e").bench_e2e.MODES)
    assert all(row["tokens"] == e2e["new_tokens"] and row["first_chunk_ms"] > 0 for row in e2e["rows"])
    assert e2e["memory_report"]["kv_cache"] > 0
    assert [t["met"] for t in r["targets"]] == ["n/a (smoke)"] * len(run_all.TARGETS)


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib (the `bench` extra) is not installed")
def test_smoke_run_draws_the_charts(smoke):
    _, out, r = smoke
    assert r["charts"] == {"ops": "ops.png", "mctp": "mctp_step.png"}
    for name in ("ops.png", "mctp_step.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_rewrites_markdown_from_json(smoke):
    _, out, _ = smoke
    (out / "results.md").unlink()
    assert run_all.main(["--render", str(out)]) == 0
    assert "### Targets" in (out / "results.md").read_text()


def test_smoke_never_writes_under_results(tmp_path):
    target = harness.RESULTS_DIR / "smoke-here"
    assert run_all.main(["--smoke", "--out", str(target), "--skip", "ops,mctp,e2e"]) == 2
    assert not target.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_measurement_needs_a_gpu(capsys):
    assert run_all.main(["--skip", "ops"]) == 2
    assert "--smoke" in capsys.readouterr().err


def test_unknown_section_is_named(capsys):
    assert run_all.main(["--smoke", "--skip", "ops,warp"]) == 2
    assert "warp" in capsys.readouterr().err


def test_targets_met_and_missed():
    settings = harness.Settings(device="cuda")  # 7B bf16, not smoke
    results = {"environment": {"gpu": {"name": "NVIDIA H100 80GB HBM3"}}, "sections": {
        "mctp": {"rows": [{"region": "mctp_step", "rows": 1, "impl": "ours (graph)", "us": 600.0}]},
        "e2e": {"rows": [
            {"mode": "vanilla", "loop": "graph", "tokens_per_s": 100.0, "first_chunk_ms": 60.0, "pct_of_floor": 80.0},
            {"mode": "boost", "loop": "graph", "tokens_per_s": 300.0, "first_chunk_ms": 12.5},
            {"mode": "turbo", "loop": "graph", "tokens_per_s": 460.0, "first_chunk_ms": 12.0}]}}}
    rows = run_all.targets(results, settings)
    assert [t["measured"] for t in rows] == [pytest.approx(0.6), 12.5, pytest.approx(4.6), 80.0]
    assert [t["met"] for t in rows] == [True, True, True, False]
    results["environment"]["gpu"]["name"] = "NVIDIA H200"
    assert all("H100" in t["note"] for t in run_all.targets(results, settings))


def test_fastest_choice_and_its_file(tmp_path):
    rows = [{"op": "linear", "impl": "torch", "us": 10.0}, {"op": "linear", "impl": "triton", "us": 4.0},
            {"op": "linear", "impl": "torch", "us": 10.0}, {"op": "linear", "impl": "triton", "us": 30.0},
            {"op": "linear", "impl": "torch.compile", "us": 1.0}, {"op": "linear", "impl": "torch.compile", "us": 1.0},
            {"op": "head_argmax", "impl": "torch", "us": 9.0}, {"op": "head_argmax", "impl": "cuda", "us": 3.0},
            {"op": "head_argmax", "impl": "torch", "us": 9.0}, {"op": "head_argmax", "impl": "cuda", "us": None}]
    # torch.compile cannot be selected by the runtime; an impl that failed a case is not eligible.
    assert bench_ops.fastest(rows) == {"linear": "torch", "head_argmax": "torch"}
    path = bench_ops.write_auto_choice({"linear": "triton"}, tmp_path / "auto_choice.json",
                                       harness.Settings.smoke_settings())
    assert json.loads(path.read_text()) == {"device_name": "cpu", "choice": {"linear": "triton"}}
