"""``bash benchmarks/gpu_check.sh --dry-run``: the GPU check's stages on CPU with tiny sizes -- the python probes
(attention kernel per case, engine steps on 1 and 2 ranks, bf16-vs-fp32 parity), the training benchmark and the
end-to-end tokenize -> prepare -> train -> checkpoint -> resume -- and its one table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.dist_utils import REPO

pytestmark = [pytest.mark.slow, pytest.mark.dist]  # starts torchrun with 2 gloo ranks, trains, tokenizes


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OUT": str(out), "WORK": str(out / "work"), "OMP_NUM_THREADS": "1", "BUDGET_S": "1500",
           "PY": sys.executable}  # the python that runs the tests (a venv need not be active)
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1800)
    return proc, out


def test_dry_run_passes_and_prints_one_table(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    table = (out / "table.txt").read_text()
    for section in ("attention kernel", "engine step", "bf16 vs fp32", "training bf16", "end to end"):
        assert section in table, table
    assert "gpu_check: PASS" in proc.stdout


def test_probes_measured_each_engine_in_bf16(dry_run):
    _, out = dry_run
    steps = {**json.loads((out / "steps_cpu.json").read_text()),
             **json.loads((out / "steps_2ranks_cpu.json").read_text())}
    assert set(steps) == {"local", "zero1", "pp2", "ep2", "tp2_sp"}
    for layout, r in steps.items():
        assert set(r["linear_output_dtypes"]) == {"bfloat16"}, (layout, r)  # train.precision=bf16 honoured
        assert r["forwards_per_step"] == [r["micro_batches_per_step"]] * 2, (layout, r)  # no rebuilt schedule
        assert all(n >= 0 for n in r["host_syncs_per_step"])
    kernels = json.loads((out / "attention.json").read_text())
    assert kernels["sdpa causal gqa bf16"]["kernels"]  # the profiler named the kernel SDPA picked
    assert json.loads((out / "parity.json").read_text())["passed"]
