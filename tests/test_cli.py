"""The command line (python -m fusedloss info/verify/bench), the GPU check
script's CPU-side logic, and the training example."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import HAS_CUDA, OUTSIDE_SOURCE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, timeout=600, env=None):
    return subprocess.run(
        [sys.executable, "-m", "fusedloss", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=OUTSIDE_SOURCE,
        env=env,
    )


def test_info_table_and_json():
    r = cli("info")
    assert r.returncode == 0, r.stderr
    for key in ("torch (built against)", "torch (running)", "CUDA kernels", "CUDA archs", "OpenMP", "visible GPUs"):
        assert key in r.stdout
    j = json.loads(cli("info", "--json").stdout)
    assert j["build"]["torch_version"] == torch.__version__ and j["torch_running"] == torch.__version__


def test_verify_quick_passes():
    r = cli("verify", "--quick", "--device", "cpu")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    assert "FAIL" not in r.stdout and "passed (errors:" in r.stdout.strip().splitlines()[-1]
    for loss in ("bce_with_logits", "mse", "cross_entropy", "hinge_embedding", "soft_margin", "hinge", "multi_margin"):
        assert loss in r.stdout


def test_errors_are_one_line():
    r = cli("bench", "--loss", "nope")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "unknown loss 'nope'" in r.stderr
    if not HAS_CUDA:
        r = cli("bench", "--device", "cuda")
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "cuda" in r.stderr


def test_bench_writes_csv_json_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "b"
    r = cli(
        "bench",
        "--device",
        "cpu",
        "--loss",
        "mse",
        "--quick",
        "--reps",
        "2",
        "--warmup",
        "1",
        "--csv",
        f"{out}.csv",
        "--json",
        f"{out}.json",
        "--plot",
        f"{out}.png",
    )
    assert r.returncode == 0, r.stderr
    assert "mse" in r.stdout and "vs eager" in r.stdout
    with open(f"{out}.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "loss",
        "case",
        "provider",
        "mode",
        "dtype",
        "shape",
        "device",
        "median_ms",
        "p20_ms",
        "p80_ms",
        "gbps",
        "peak_mem_mb",
        "torch",
        "git_sha",
    ]
    assert {r["provider"] for r in rows} == {"fusedloss", "torch", "torch.compile"}
    # --quick runs the losses, small and autocast suites, each for --loss only
    assert {r["loss"] for r in rows} == {"mse"}
    by_case = {}
    for r in rows:
        by_case.setdefault(r["case"], set()).add(r["mode"])
    assert by_case.pop("small") == {"full", "fwd_nograd"}
    assert by_case.pop("plain") == {"fwd", "bwd", "full"}  # the losses suite
    assert by_case.pop("no_autocast") == by_case.pop("autocast") == {"full"}
    assert not by_case
    assert all(float(r["median_ms"]) > 0 and float(r["p20_ms"]) <= float(r["p80_ms"]) for r in rows)
    summary = json.load(open(f"{out}.json"))["summary"]
    assert all(s["ratio_vs_torch"] > 0 for s in summary)
    assert os.path.getsize(f"{out}.png") > 10_000


def _gpu_check(*args, env=None):
    return subprocess.run(
        ["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def test_gpu_check_script_arguments():
    r = _gpu_check()
    assert r.returncode == 2 and "OUTDIR" in r.stdout
    r = _gpu_check("--help")
    assert r.returncode == 0 and "compute-sanitizer" in r.stdout


def test_gpu_check_script_layout_without_gpu(tmp_path):
    out = tmp_path / "out"
    env = {"SKIP_BUILD": "1", "SKIP_TESTS": "1", "SKIP_SANITIZER": "1", "SKIP_BENCH": "1", "PYTHON": sys.executable}
    r = _gpu_check(str(out), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(os.listdir(out)) == ["env.txt", "summary.txt"]
    summary = (out / "summary.txt").read_text()
    assert "GPU check of fusedloss" in summary and "all steps passed" in summary
    assert "fusedloss" in (out / "env.txt").read_text()
    assert r.stdout.rstrip().endswith("all steps passed")  # the summary is printed last


def test_training_example_curves_agree():
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "train_classifier.py"),
            "--steps",
            "5",
            "--batch",
            "32",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=OUTSIDE_SOURCE,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "largest relative difference" in r.stdout and "faster" in r.stdout


def test_bench_suites_rows_and_tables():
    """The small-call, autocast and training-step suites produce rows of the CSV
    schema and their tables (one case each here: timings are not asserted)."""
    from fusedloss import benchmark as B
    from fusedloss import benchmark_suites as S

    small = S.run_small("cpu", reps=1, cases=S.SMALL_CASES[:1])
    assert {(r["provider"], r["mode"]) for r in small} == {
        (p, m) for p in ("fusedloss", "torch", "torch.compile") for m in ("full", "fwd_nograd")
    }
    assert "cross_entropy" in S.format_small(small)
    ac = S.run_autocast("cpu", quick=True, reps=1, warmup=1, losses=["mse"])
    assert {(r["provider"], r["case"]) for r in ac} == {
        (p, c) for p in ("fusedloss", "torch") for c in ("no_autocast", "autocast")
    }
    assert all(r["peak_mem_mb"] == r["peak_mem_mb"] for r in ac)  # measured, not NaN
    assert "mse" in S.format_autocast(ac)
    step = S.run_step("cpu", quick=True, reps=1, warmup=1, sizes=(1, 16, 512))
    assert "training step, compiled" in S.format_step(step)
    for r in small + ac + step:
        assert set(r) == set(B.CSV_COLUMNS)
