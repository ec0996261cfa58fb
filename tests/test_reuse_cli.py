"""``bench.py reuse`` and ``bench.py remote`` end to end on the bundled model: every restored turn comes from the
tier it is measured for, restores the whole history and gives the recompute's first token (the bench checks
each run and fails otherwise)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def run_bench(tmp_path, cmd):
    out = tmp_path / f"{cmd}.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), cmd, "--histories", "96", "--new", "8",
                        "--repeats", "2", "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = json.loads(out.read_text())["results"]
    assert row["history"] == 96 and row["new"] == 8
    return row


def test_reuse_bench_measures_each_tier(tmp_path):
    row = run_bench(tmp_path, "reuse")
    for k in ("ttft_recompute_s", "ttft_dram_s", "ttft_disk_s"):
        assert row[k] > 0, k
    assert row["speedup_dram"] == row["ttft_recompute_s"] / row["ttft_dram_s"]
    assert row["record_mb"] > 0


def test_remote_bench_reads_a_real_redis(tmp_path):
    if shutil.which("redis-server") is None:  # the bench starts its own on loopback
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed: .ci/run must install it")
        pytest.skip("redis-server is not installed")
    row = run_bench(tmp_path, "remote")
    assert row["ttft_redis_s"] > 0 and row["speedup_redis"] == row["ttft_recompute_s"] / row["ttft_redis_s"]
