"""Smoke test of bench/bench_regions.py with the tiny models: every stage runs through the feature step's code
and reports positive rates; the cached rerun detects nothing. No timing assertions (the machine may be shared)."""

from __future__ import annotations

import pytest

import json
import math
import subprocess
import sys
from pathlib import Path

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_bench_regions_small(tmp_path):
    out = tmp_path / "regions_small"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_regions.py"), "--small", "--device", "cpu",
                           "--threads", "1", "--images", "3", "--max_regions", "2", "--out", str(out),
                           "--tmp", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["env"]["device"].startswith("CPU") and res["env"]["torch_threads"] == 1
    stages = res["stages"]
    assert set(stages) == {"decode", "detect", "detect_cached", "crops", "total"}
    for stage in stages.values():
        assert math.isfinite(stage["images_per_s"]) and stage["images_per_s"] > 0
    assert stages["detect"]["detected"] == 3 and stages["detect_cached"] == {**stages["detect_cached"], "detected": 0,
                                                                              "cached": 3}
    assert stages["crops"]["boxes_kept"] == 6  # score threshold 0: K = 2 crops for each of the 3 images
    assert "| detect_cached |" in out.with_suffix(".md").read_text()
