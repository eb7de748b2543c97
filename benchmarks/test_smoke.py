"""`python -m benchmarks.smoke`: refuses to pretend on a CPU, and its --cpu-dry-run runs the
GPU code path (every op's Triton kernel at R = 1 and 11, the MCTP step through the runner) at
the tiny geometry through the interpreter. Its numbers are never checked: not a measurement."""
import json

import pytest
import torch

from benchmarks import harness, smoke


def test_case_rows_reads_the_registry_names():
    assert smoke.case_rows("o_proj-R11-3584x3584") == 11
    assert smoke.case_rows("R1-V168072") == 1
    assert smoke.case_rows("R14-pos47-off3") == 14
    assert smoke.case_rows("bias_only-32x96") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_a_gpu_it_says_so_and_fails(capsys):
    assert smoke.main([]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--cpu-dry-run" in err


def test_dry_run_refuses_a_cuda_device():
    with pytest.raises(SystemExit):
        smoke.main(["--cpu-dry-run", "--device", "cuda"])


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: this process's Triton kernels are "
                    "built for it, and the interpreter can only be chosen before they are (the real smoke runs instead)")
def test_cpu_dry_run_covers_every_op_and_the_mctp_step(tmp_path, capsys):
    from vita_kernels.registry import GEOMETRIES, ops

    path = tmp_path / "smoke.json"
    assert smoke.main(["--cpu-dry-run", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert harness.SMOKE_BANNER in out and "### MCTP step" in out
    record = json.loads(path.read_text())
    assert record["dry_run"] is True and record["measurement"] is False
    assert record["settings"]["geometry"] == "tiny" and record["settings"]["dtype"] == "bf16"
    assert record["copy_bandwidth"]["gbps"] > 0
    tiny = GEOMETRIES["tiny"]
    expected = set()
    for spec in ops():
        for case in spec.cases(tiny, torch.bfloat16, torch.device("cpu"), torch.Generator()):
            if smoke.case_rows(case.name) in smoke.ROWS:
                expected.add((spec.name, case.name))
    assert {(r["op"], r["case"]) for r in record["ops"]} == expected
    assert {r["rows"] for r in record["ops"]} == set(smoke.ROWS)
    assert all(r["us"] > 0 and r["gbps"] > 0 and r["impl"] == "triton" for r in record["ops"]), record["ops"]
    step = record["mctp_step"]
    assert step["rows"] == smoke.STEP_ROWS and step["us"] > 0 and step["bytes_moved"] > 0
    assert set(step["backend"].values()) == {"triton"}
