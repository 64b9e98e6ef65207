"""Acceptance of the whole pipeline on a small generated dataset, with fixed seeds:

synthetic dataset -> tiny CLIP features -> DIM training -> full-KB evaluation.
The trained model beats the same model untrained by a wide margin, and the full model (text + image) beats
the text-only ablation. Also: the launchers stop with a clear message when the data folder is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _train(features: Path, out: Path, *flags: str) -> None:
    cmd = [sys.executable, "-m", "nel_model.train", "--config", str(ROOT / "configs" / "synthetic.yaml"),
           "--features", str(features), "--output_dir", str(out), "--seed", "3", "--device", "cpu",
           "--threads", "1", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    from data_process.encode.features import FeatureSettings, build_features
    from data_process.fixtures.synthetic import SyntheticConfig, generate
    from data_process.fixtures.tiny_models.clip import save_tiny_clip

    w = tmp_path_factory.mktemp("e2e")
    data = generate(w / "data", SyntheticConfig(entities=80, mentions=600, seed=5, image_size=32), progress=False)
    clip = save_tiny_clip(w / "clip", image_size=32)
    build_features(data, w / "feat", FeatureSettings(clip=str(clip), max_len=16, region_grid=2), num_workers=0,
                   device="cpu", progress=False)
    return w / "feat"


@pytest.fixture(scope="module")
def run_dirs(features, tmp_path_factory) -> dict[str, Path]:
    runs = tmp_path_factory.mktemp("e2e_runs")
    dirs = {"untrained": runs / "untrained", "full": runs / "full", "text_only": runs / "text"}
    _train(features, dirs["untrained"], "--epochs", "0")
    _train(features, dirs["full"], "--epochs", "15")
    _train(features, dirs["text_only"], "--epochs", "15", "--no_image", "--no_entity_image")
    return dirs


@pytest.fixture(scope="module")
def results(run_dirs) -> dict[str, dict]:
    return {name: json.loads((d / "results.json").read_text())["protocols"]["full_kb"]["test"]
            for name, d in run_dirs.items()}


def test_trained_beats_untrained_by_a_wide_margin(results):
    assert results["full"]["n"] == results["untrained"]["n"] > 50
    assert results["full"]["mrr"] > results["untrained"]["mrr"] + 0.2  # measured: 0.732 vs 0.449
    assert results["full"]["hits@1"] > 2 * results["untrained"]["hits@1"]


def test_full_model_beats_text_only(results):
    # Names are shared inside a family and most sentences carry no hint: only the image separates the members.
    assert results["full"]["mrr"] > results["text_only"]["mrr"] + 0.12  # measured: 0.732 vs 0.529
    assert results["full"]["hits@1"] > results["text_only"]["hits@1"] + 0.2


def test_analysis_shows_the_image_winning_on_shared_names(run_dirs, tmp_path):
    # The error analysis of the same runs: on mentions whose name 2+ KB entities share, the image must carry the
    # full model past the text-only one (every synthetic family has 2-5 members, so that is the whole test split).
    from nel_model.reporting import analyze

    out = tmp_path / "full_vs_text"
    assert analyze.main(["--run", str(run_dirs["full"]), "--compare", str(run_dirs["text_only"]),
                         "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    shared = {row["bucket"]: row for row in res["breakdowns"]["name_shared"]}["2+"]
    full, text = shared["metrics"]
    assert shared["n"] > 50
    assert full["mrr"] > text["mrr"] + 0.1 and full["hits@1"] > text["hits@1"] + 0.15
    assert shared["better"][0] > 2 * shared["better"][1]   # mentions the full model ranks better vs worse
    assert out.with_suffix(".png").stat().st_size > 0 and "## Hardest confusions" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("launcher,envvar", [("wiki.sh", "WIKI_DIR"), ("rich.sh", "RICH_DIR"),
                                             ("diverse.sh", "DIVERSE_DIR"), ("person.sh", "PERSON_DIR")])
def test_launcher_without_data_says_what_to_download(launcher, envvar, tmp_path):
    env = {k: v for k, v in ENV.items() if k != envvar}
    missing = tmp_path / "nowhere"
    proc = subprocess.run(["bash", str(ROOT / launcher), "--data", str(missing)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 1
    assert f"raw data folder not found: '{missing}'" in proc.stderr
    assert f"Set {envvar}=/path/to/release or pass --data DIR." in proc.stderr
    assert "Download the " in proc.stderr
    assert not (tmp_path / "outputs").exists()  # nothing written


def test_launcher_rejects_unknown_flag(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "wiki.sh"), "--epochs", "3"], capture_output=True, text=True,
                          env=ENV, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert "error: unknown flag --epochs (see --help)" in proc.stderr


def _write_mimic_release(dataset_dir: Path, out: Path) -> dict[str, str]:
    """Lay out a unified dataset as a MIMIC-style release (kb_entity.json, WIKIMEL_*.json, images)."""
    import shutil

    from data_process.core.records import load_dataset

    ds = load_dataset(dataset_dir)
    qid = {e.id: f"Q{i + 1}" for i, e in enumerate(ds.entities)}
    (out / "kb_image").mkdir(parents=True)
    (out / "mention_image").mkdir()
    kb = []
    for i, e in enumerate(ds.entities):
        names = []
        for rel in e.images[:1]:
            name = f"{qid[e.id]}.png"
            shutil.copy(ds.root / rel, out / "kb_image" / name)
            names.append(name)
        kb.append({"qid": qid[e.id], "id": i, "entity_name": e.name, "desc": e.description, "image_list": names})
    (out / "kb_entity.json").write_text(json.dumps(kb))
    for split in ("train", "dev", "test"):
        recs = []
        for m in ds.split(split):
            img = ""
            if m.image:
                img = f"{m.id}.png"
                shutil.copy(ds.root / m.image, out / "mention_image" / img)
            recs.append({"id": m.id, "sentence": m.sentence, "mentions": m.mention, "answer": qid[m.gold_id],
                         "imgPath": img})
        (out / f"WIKIMEL_{split}.json").write_text(json.dumps(recs))
    return qid


@pytest.fixture(scope="module")
def mimic_release(tmp_path_factory) -> dict[str, Path]:
    from data_process.fixtures.synthetic import SyntheticConfig, generate
    from data_process.fixtures.tiny_models.clip import save_tiny_clip

    w = tmp_path_factory.mktemp("mimic")
    data = generate(w / "synthetic", SyntheticConfig(entities=24, mentions=120, seed=2, image_size=32),
                    progress=False)
    _write_mimic_release(Path(data), w / "WikiMEL")
    return {"src": w / "WikiMEL", "clip": save_tiny_clip(w / "clip", image_size=32)}


def _run_wiki_sh(release: dict[str, Path], work: Path, *flags: str, env: dict | None = None):
    cmd = ["bash", str(ROOT / "wiki.sh"), "--data", str(release["src"]), "--work", str(work),
           "--clip", str(release["clip"]), "--seed", "1", *flags, "--", "--epochs", "2", "--threads", "1",
           "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**(env or ENV), "PYTHON": sys.executable},
                          cwd=work.parent, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_wiki_launcher_runs_a_mimic_release_end_to_end(mimic_release, tmp_path):
    work = tmp_path / "work"
    proc = _run_wiki_sh(mimic_release, work)
    validation = json.loads((work / "unified" / "validation.json").read_text())
    assert validation["ok"] and validation["entities"] == 24 and validation["dataset"] == "WikiMEL"
    results = json.loads((work / "runs" / "ours_seed1" / "results.json").read_text())
    assert results["dataset"] == "WikiMEL" and results["label"] == "ours" and results["seed"] == 1
    assert results["protocols"]["full_kb"]["test"]["n"] == sum(
        1 for line in (work / "unified" / "mentions.jsonl").read_text().splitlines() if '"split": "test"' in line)
    assert "| ours | 1 | " in proc.stdout  # the results table: our default model is labelled as ours


def test_wiki_launcher_paper_preset_trains_dim_as_the_paper_describes(mimic_release, tmp_path):
    from data_process.fixtures.tiny_models.detector import save_tiny_detector

    detector = save_tiny_detector(tmp_path / "detector")
    work = tmp_path / "work"
    proc = _run_wiki_sh(mimic_release, work, "--preset", "dim_paper", "--detector", str(detector))
    meta = json.loads((work / "features" / "meta.json").read_text())
    assert meta["regions"]["mode"] == "detector" and meta["regions"]["labels"] == ["person"]
    assert "mention.context" not in meta["views"] and "entity.image" not in meta["views"]   # views the model reads
    run = work / "runs" / "DIM_dim_paper_seed1"
    conf = json.loads((run / "config.json").read_text())
    settings = {k: v for section in conf["config"].values() for k, v in section.items()}
    assert conf["model_config"]["entity_tower"] == "frozen" and settings["loss"] == "npair"
    assert settings["negatives"] == "tfidf" and settings["tie_rule"] == "strict"
    results = json.loads((run / "results.json").read_text())
    assert results["label"] == "DIM (dim_paper)" and results["tie_rule"] == "strict"
    assert "| DIM (dim_paper) | 1 | " in proc.stdout


def test_wiki_launcher_plus_enriches_through_an_openai_compatible_server(mimic_release, tmp_path):
    from fake_openai_server import FakeOpenAIServer

    from data_process.core.records import load_dataset

    work = tmp_path / "work"
    with FakeOpenAIServer() as server:
        env = {**ENV, "OPENAI_API_KEY": "sk-test-launcher"}
        _run_wiki_sh(mimic_release, work, "--plus", "--llm-base-url", server.base_url, "--llm-model", "fake-model",
                     env=env)
        asked = server.input_counts()
    plus = load_dataset(work / "plus")
    assert max(asked.values()) == 1  # each distinct input asked once (identical mentions share one answer)
    assert 0 < sum(asked.values()) <= len(plus.entities) + len(plus.mentions)
    assert all(e.enrichment and e.enrichment["provenance"]["model"] == "fake-model" for e in plus.entities)
    meta = json.loads((work / "features" / "meta.json").read_text())
    assert "entity.profile" in meta["views"] and "mention.profile" in meta["views"]
    results = json.loads((work / "runs" / "ours+_seed1" / "results.json").read_text())
    assert results["label"] == "ours+" and results["dataset"] == plus.info.name
