"""Smoke test of bench/bench_perf.py at --scale tiny on the CPU: every case runs, reports positive numbers, and its
derived numbers are the ones its measurements give (a speed-up is the ratio of the two timings it compares, a rate
the count over the time, the summary the cases' own figures): a benchmark that reports a number it did not measure
fails here.

No timing assertions (the machine may be shared).
"""

from __future__ import annotations

import pytest

import json
import math
import subprocess
import sys
from pathlib import Path

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _ratio(a, b) -> float:
    return a / b


def test_bench_perf_tiny(tmp_path):
    out = tmp_path / "perf_tiny"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_perf.py"), "--scale", "tiny", "--device", "cpu",
                           "--threads", "1", "--out", str(out), "--tmp", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".md").read_text().count("|") > 10
    assert res["device"]["name"] and res["device"]["torch"] and res["device"]["cpu_cores"] >= 1
    assert set(res["cases"]) == {"eval", "train", "features"}

    ev = res["cases"]["eval"]
    assert ev["kb"], "no KB size measured"
    for kb in ev["kb"]:
        for dt in kb["dtypes"].values():
            for key in ("rank_s", "rank_tflops", "topk20_s", "matmul_same_shape_tflops", "ceiling_square_tflops"):
                assert _positive(dt[key]), key
        assert _positive(kb["naive_rank"]["extrapolated_s"]) and _positive(kb["speedup_rank"])
        assert kb["naive_rank"]["rank_mismatches_vs_ours_fp32"] == 0
        for key in ("ours_s", "naive_s", "speedup"):
            assert _positive(kb["encode_entities"][key]), key
        ee = kb["encode_entities"]
        assert math.isclose(ee["speedup"], _ratio(ee["naive_s"], ee["ours_s"]), rel_tol=1e-9)
        first = next(iter(kb["dtypes"].values()))
        assert math.isclose(kb["speedup_rank"], _ratio(kb["naive_rank"]["extrapolated_s"], first["rank_s"]),
                            rel_tol=1e-9)
    faiss = ev["kb"][0]["faiss"]
    assert set(faiss["indexes"]) == {"ivfpq", "hnsw"}
    for ix in faiss["indexes"].values():
        assert _positive(ix["query_s"]) and 0 < ix["recall@20"] <= 1

    tr = res["cases"]["train"]
    for side in ("ours", "naive"):
        assert _positive(tr[side]["epoch_s"]) and _positive(tr[side]["mentions_per_s"])
        assert _positive(tr[side]["kb_encode_s"])
    assert _positive(tr["speedup_epoch"]) and _positive(tr["speedup_kb_encode"])
    assert math.isclose(tr["speedup_epoch"], _ratio(tr["naive"]["epoch_s"], tr["ours"]["epoch_s"]), rel_tol=1e-9)
    assert math.isclose(tr["ours"]["mentions_per_s"] * tr["ours"]["epoch_s"],
                        tr["naive"]["mentions_per_s"] * tr["naive"]["epoch_s"], rel_tol=1e-9)   # the same mentions

    ft = res["cases"]["features"]
    for key in ("ours_images_per_s", "decode_only_images_per_s", "naive_images_per_s", "speedup"):
        assert _positive(ft[key]), key
    assert math.isclose(ft["speedup"], _ratio(ft["ours_images_per_s"], ft["naive_images_per_s"]), rel_tol=1e-9)

    cases_in_summary = {r["case"] for r in res["summary"]}
    assert cases_in_summary == {"eval", "train", "features"}
    for r in res["summary"]:
        assert _positive(r["ours"]) and _positive(r["naive"]) and _positive(r["speedup"]), r
        faster = _ratio(r["ours"], r["naive"]) if r["unit"] != "s" else _ratio(r["naive"], r["ours"])
        assert math.isclose(r["speedup"], faster, rel_tol=1e-9), r
    md = out.with_suffix(".md").read_text()
    assert all(f"{r['speedup']:.1f}" in md for r in res["summary"])
