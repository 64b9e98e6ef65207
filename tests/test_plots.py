"""nel_model/reporting/plots.py (dim-mel plot) on fixture run folders: PNGs written with the expected pixel size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from nel_model.runs import RunError

from nel_model.reporting import plots as pr  # noqa: E402


def write_run(path: Path, label: str, seed: int, scale: float, epochs: int = 5) -> Path:
    path.mkdir(parents=True)
    test = {"mrr": 0.6 * scale, "hits@1": 0.5 * scale, "hits@3": 0.65 * scale, "hits@5": 0.7 * scale,
            "hits@10": 0.8 * scale, "hits@20": 0.9 * scale, "n": 50}
    (path / "results.json").write_text(json.dumps({"dataset": "synthetic", "label": label, "seed": seed,
                                                   "best_epoch": 3,
                                                   "protocols": {"full_kb": {"dev": test, "test": test}}}))
    recs = [{"epoch": e, "step": 7 * e, "train_loss": 1.5 / e, "lr": 1e-4, "time_s": 0.5,
             "dev": {"mrr": min(1.0, 0.15 * e * scale), "hits@1": 0.1 * e * scale}} for e in range(1, epochs + 1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _check_png(path: Path, size: tuple[int, int]) -> None:
    assert path.is_file() and path.stat().st_size > 5000
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == size
        # not a blank canvas: many distinct colours (lines, text, grid)
        assert len(im.convert("RGB").getcolors(maxcolors=100000) or []) > 20


def test_single_run_default_out(tmp_path, capsys):
    run = write_run(tmp_path / "run1", "DIM", 1, 1.0)
    assert pr.main([str(run)]) == 0
    assert capsys.readouterr().out.split() == [str(run / "plots" / "curves.png"), str(run / "plots" / "hits_at_k.png")]
    _check_png(run / "plots" / "curves.png", (1200, 450))
    _check_png(run / "plots" / "hits_at_k.png", (800, 500))


def test_several_runs_overlaid(tmp_path):
    runs = [write_run(tmp_path / "runs" / f"dim_s{s}", "DIM", s, 1.0 - 0.05 * s) for s in (1, 2)]
    runs.append(write_run(tmp_path / "runs" / "text", "text only", 1, 0.6, epochs=3))
    paths = pr.plot_runs(runs, tmp_path / "plots")
    assert [p.name for p in paths] == ["curves.png", "hits_at_k.png"]
    _check_png(paths[0], (1200, 450))
    _check_png(paths[1], (800, 500))
    loaded = [pr.load_run(r) for r in runs]
    assert [pr.run_name(r, loaded) for r in loaded] == ["DIM (seed 1)", "DIM (seed 2)", "text only"]


def test_errors(tmp_path, capsys):
    runs = [write_run(tmp_path / f"r{s}", "DIM", s, 1.0) for s in (1, 2)]
    with pytest.raises(RunError, match="^2 runs given: --out is required with several runs$"):
        pr.plot_runs(runs)
    assert pr.main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing'}: run folder not found\n"
