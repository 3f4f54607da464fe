"""benchmarks/gpu_train.py on CPU: the --dry-run path runs every stage (numerics checks, attention kernel timing,
the timed matrix with compile and checkpointing) and writes the JSON and markdown a GPU run would write."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_train.py"
BREAKDOWN = {"data", "forward", "backward", "optimizer", "other", "host_gap"}


def load_bench():
    spec = importlib.util.spec_from_file_location("gpu_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict, str, str]:
    """One subprocess run (the DeepSpeed check sets up a process group and env vars: keep them out of pytest)."""
    out = tmp_path_factory.mktemp("gpu_bench") / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--dry-run", "--models", "1.3b",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), out.with_suffix(".md").read_text(), proc.stdout


def test_checks_ran_and_passed(dry_run):
    results, _, _ = dry_run
    checks = results["checks"]
    attn = checks["attention"]
    assert attn["passed"] is True
    for case in ("sdpa/causal_gqa", "sdpa/causal_documents"):  # measured, and within bf16 tolerance
        errs = attn["cases"][case]
        assert 0 < errs["out"] <= attn["tolerance"]["out"] and 0 < errs["dq"] <= attn["tolerance"]["grad"]
    assert "not importable" in attn["cases"]["flash_attn/causal_gqa"]
    curve = checks["bf16_vs_fp32"]
    assert curve["passed"] is True and len(curve["bf16"]) == len(curve["fp32"]) == curve["steps"] >= 5
    assert curve["fp32"][-1] < curve["fp32"][0] and 0 < curve["max_abs_diff"] <= curve["tolerance"]
    zero = checks["deepspeed_zero"]
    assert zero["passed"] is True and set(zero["cases"]) == {"zero1/fp32", "zero2/fp32"}
    for case in zero["cases"].values():  # fp32 ZeRO on one process reproduces the plain engine
        assert case["loss_max_rel"] <= 1e-4 and case["grad_norm_max_rel"] <= 1e-4
        assert len(case["losses"]) == zero["steps"]
    kernels = results["attention_kernels"]
    assert kernels["sdpa (dispatcher)"]["ms"] > 0 and "error" in kernels["flash_attn"]


def test_matrix_rows_and_fields(dry_run):
    results, _, _ = dry_run
    env = results["env"]
    assert env["device"] == "cpu" and env["peak_tflops"] is None and env["matmul_tflops"] > 0
    rows = {(r["backend"], r["compile"], r["checkpointing"]): r for r in results["runs"]}
    assert len(rows) == 8 and {r["model"] for r in results["runs"]} == {"1.3b"}
    for compile_, ckpt in [("off", "off"), ("on", "off"), ("off", "on"), ("on", "on")]:
        r = rows[("sdpa", compile_, ckpt)]
        assert r["status"] == "ok", r["status"]
        assert r["tokens_per_s"] > 0 and r["tflops"] > 0 and 0 < r["mfu_matmul"] and r["mfu_peak"] is None
        assert r["tokens_per_step"] == r["micro_batch"] * r["accum"] * env["seq"]
        assert set(r["breakdown_ms"]) == BREAKDOWN
        assert all(r["breakdown_ms"][k] > 0 for k in ("forward", "backward", "optimizer"))
        parts = sum(v for k, v in r["breakdown_ms"].items() if k != "host_gap")
        assert parts + r["breakdown_ms"]["host_gap"] == pytest.approx(r["step_ms"])
        # whole-model compile: one graph, no breaks; eager runs report none
        assert (r["compiled_graphs"], r["graph_breaks"]) == ((1, 0) if compile_ == "on" else (None, None))
        if ckpt == "off":  # profiled: the heaviest ops of one step, with their share of it
            ops = r["top_ops"]
            assert len(ops) >= 5 and all(o["ms"] >= 0 and o["calls"] >= 1 for o in ops)
            assert 0 < sum(o["share"] for o in ops) <= 1 + 1e-6
            assert [o["ms"] for o in ops] == sorted((o["ms"] for o in ops), reverse=True)
        else:
            assert r["top_ops"] is None
    for compile_, ckpt in [("off", "off"), ("on", "on")]:
        assert rows[("flash_attn", compile_, ckpt)]["status"] == "skipped: flash-attn not importable"


def test_markdown_table(dry_run):
    results, md, stdout = dry_run
    assert "| model | attention | compile | ckpt |" in md and md in stdout
    table = [line for line in md.splitlines() if line.startswith("| 1.3b |")]
    assert len(table) == len(results["runs"]) == 8
    assert all(line.count("|") == 19 for line in table)
    assert "| attention | pass |" in md and "| deepspeed_zero | pass |" in md
    assert md.count("top ops of one step, 1.3b sdpa") == 2
    best = max((r for r in results["runs"] if r["status"] == "ok"), key=lambda r: r["tflops"])
    assert f"best 1.3b: {best['tflops']:.3g} TFLOP/s" in md


def test_budget_then_resume(tmp_path, monkeypatch):
    """Runs past --budget-s are listed as skipped; --resume runs exactly those and keeps the rest."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    bench = load_bench()
    common = ["--device", "cpu", "--dry-run", "--skip-checks", "--backends", "sdpa", "--compile", "off",
              "--checkpointing", "off", "--out", str(tmp_path / "r.json")]
    first = bench.main(common + ["--models", "125m,350m", "--budget-s", "0"])
    assert [r["status"] for r in first["runs"]] == ["skipped: budget"] * 2
    second = bench.main(common + ["--models", "125m,350m,1.3b", "--resume", str(tmp_path / "r.json")])
    assert [(r["model"], r["status"]) for r in second["runs"]] == [("125m", "ok"), ("350m", "ok"), ("1.3b", "ok")]
    assert json.loads((tmp_path / "r.json").read_text())["runs"] == second["runs"]


def test_peak_table_and_bad_input():
    bench = load_bench()
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops("NVIDIA H200") == 989.0
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.peak_tflops("Tesla T4") is None
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--models", "13b"])
