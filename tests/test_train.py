"""Training end to end on small synthetic feature caches: learning, ablation, run folder, exact resume, crash."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_process.fixtures.synthetic_features import write_synthetic
from nel_model.training.loop import main as train_main

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "synthetic.yaml"


@pytest.fixture(scope="module")
def image_store(tmp_path_factory):
    """Gold entity recoverable from the mention image (and regions); text carries only a weak hint."""
    d = tmp_path_factory.mktemp("img")
    write_synthetic(d / "ds", d / "feat", num_entities=48, mentions_per_split=(256, 64, 64), signal="image", seed=3)
    return d / "feat"


def run(feat, out, *extra):
    argv = ["--config", str(CONFIG), "--features", str(feat), "--output_dir", str(out), "--patience", "0", *extra]
    return train_main([str(a) for a in argv])


def dev_lines(out):
    return [(r["epoch"], r["step"], r["train_loss"], r["dev"]) for r in map(json.loads, (out / "metrics.jsonl").open())]


def test_training_beats_zero_shot_and_image_view_matters(image_store, tmp_path):
    untrained = run(image_store, tmp_path / "zero", "--epochs", 0)
    trained = run(image_store, tmp_path / "full", "--epochs", 10)
    no_image = run(image_store, tmp_path / "noimg", "--epochs", 10, "--no_image")
    mrr = {k: r["protocols"]["full_kb"]["test"]["mrr"] for k, r in
           [("zero", untrained), ("full", trained), ("noimg", no_image)]}
    assert mrr["full"] > mrr["zero"] + 0.2, mrr
    assert mrr["full"] > mrr["noimg"] + 0.2, mrr
    # candidate protocol is reported where the dataset has candidates, and is easier than the full KB
    cand = trained["protocols"]["candidates"]["test"]
    assert cand["n"] == 64 and cand["mrr"] >= mrr["full"]


def test_run_folder_contents(image_store, tmp_path):
    out = tmp_path / "run"
    res = run(image_store, out, "--epochs", 2, "--loss", "infonce", "--label", "demo", "--tensorboard")
    for name in ("config.json", "env.json", "metrics.jsonl", "results.json", "entity_embeddings.npy",
                 "entity_ids.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (out / name).is_file(), name
    assert any((out / "tb").iterdir())
    conf = json.loads((out / "config.json").read_text())
    assert conf["loss"] == "infonce" and conf["lr"] == 0.002 and conf["label"] == "demo"   # config + CLI override
    env = json.loads((out / "env.json").read_text())
    assert {"git", "versions", "device", "seed", "command", "start_time"} <= set(env)
    lines = dev_lines(out)
    assert [e for e, *_ in lines] == [1, 2]
    saved = json.loads((out / "results.json").read_text())
    assert saved["label"] == "demo" and saved["dataset"] == "synthetic" and saved["seed"] == 114514
    assert set(saved["protocols"]["full_kb"]) == {"dev", "test"}
    assert set(saved["protocols"]["full_kb"]["test"]) == {"mrr", "hits@1", "hits@3", "hits@5", "hits@10",
                                                          "hits@20", "n"}
    assert saved["protocols"] == json.loads(json.dumps(res["protocols"]))
    emb = np.load(out / "entity_embeddings.npy")
    assert emb.shape == (48, 32) and emb.dtype == np.float16
    assert len(json.loads((out / "entity_ids.json").read_text())) == 48
    with pytest.raises(FileExistsError):
        run(image_store, out, "--epochs", 1)


RESUME_FLAGS = ("--epochs", 4, "--hard_negatives", "--grad_accum", 2, "--batch_size", 16)


def test_resume_gives_identical_metrics(image_store, tmp_path):
    ref = run(image_store, tmp_path / "ref", *RESUME_FLAGS)
    part = run(image_store, tmp_path / "cut", *RESUME_FLAGS, "--stop_after_epochs", 2)
    assert part == {"stopped_at_epoch": 2} and not (tmp_path / "cut" / "results.json").exists()
    resumed = run(image_store, tmp_path / "cut", *RESUME_FLAGS, "--resume")
    assert resumed["protocols"] == ref["protocols"]
    assert resumed["best_epoch"] == ref["best_epoch"]
    assert dev_lines(tmp_path / "cut") == dev_lines(tmp_path / "ref")


def _cmd(feat, out, *extra):
    return [sys.executable, "-m", "nel_model.train", "--config", str(CONFIG), "--features", str(feat),
            "--output_dir", str(out), "--patience", "0", *map(str, extra)]


def test_crash_mid_epoch_then_resume(image_store, tmp_path):
    flags = ("--epochs", 3, "--batch_size", 32)         # 8 optimizer steps per epoch
    ref = run(image_store, tmp_path / "ref", *flags)
    out = tmp_path / "crash"
    proc = subprocess.run(_cmd(image_store, out, *flags, "--stop_after_steps", 12), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr[-2000:]
    assert [e for e, *_ in dev_lines(out)] == [1]       # killed in the middle of epoch 2
    resumed = run(image_store, out, *flags, "--resume")
    assert resumed["protocols"] == ref["protocols"]
    assert dev_lines(out) == dev_lines(tmp_path / "ref")


def test_sigkill_during_training_then_resume(image_store, tmp_path):
    flags = ("--epochs", 8, "--batch_size", 16)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(image_store, out, *flags), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = out / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    resumed = run(image_store, out, *flags, "--resume")
    ref = run(image_store, tmp_path / "ref", *flags)
    assert resumed["protocols"] == ref["protocols"]
    assert dev_lines(out) == dev_lines(tmp_path / "ref")


def test_early_stopping_with_patience(image_store, tmp_path):
    res = run(image_store, tmp_path / "es", "--epochs", 6, "--lr", 0, "--patience", 2)
    # lr 0: no epoch beats the untrained model (epoch 0, the first "best") -> stop after 2 epochs without gain
    assert res["epochs_run"] == 2 and res["best_epoch"] == 0
    assert len(dev_lines(tmp_path / "es")) == 2


def test_config_file_yaml_booleans_and_choices(tmp_path):
    from nel_model.args import parse_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text("amp: off\ndata_on_device: no\n")     # YAML 1.1 reads both as False
    a = parse_args(["--config", str(cfg)])
    assert a.amp == "off" and a.data_on_device == "no"
    cfg.write_text("data_on_device: yes\n")
    assert parse_args(["--config", str(cfg)]).data_on_device == "yes"
    cfg.write_text("amp: bf61\n")
    with pytest.raises(ValueError, match="amp: invalid value 'bf61'"):
        parse_args(["--config", str(cfg)])


def test_rng_checkpoint_touches_only_the_training_gpu(monkeypatch):
    import torch

    from nel_model.training import loop as T

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("touched every visible GPU"))
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: calls.append(("get", device)) or "S")
    st = T.rng_states(torch.device("cpu"))
    assert "cuda" not in st and not calls

    def set_state(state, device="cuda"):
        if torch.device(device).index not in (None, 0):
            raise RuntimeError("invalid device ordinal")
        calls.append(("set", state))

    monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_state)
    # the checkpoint holds the training GPU's state only, restored to the GPU that resumes
    T.restore_rng({**st, "cuda": "A"}, torch.device("cuda", 0))
    assert calls == [("set", "A")]
    assert T.rng_states(torch.device("cuda", 0))["cuda"] == "S"


def test_tensorboard_logs_survive_a_stop(image_store, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nel_model import distributed as D
    from nel_model.args import parse_args
    from nel_model.training.loop import Trainer

    out = tmp_path / "tb_stop"
    argv = ["--config", str(CONFIG), "--features", str(image_store), "--output_dir", str(out), "--epochs", "3",
            "--tensorboard", "--stop_after_epochs", "1"]
    trainer = Trainer(parse_args(argv), D.DistInfo())     # kept alive: the writer is not garbage-collected
    assert trainer.fit() == {"stopped_at_epoch": 1}
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("dev/mrr")] == [1]


def test_resume_without_a_finished_epoch_says_how_to_restart(image_store, tmp_path):
    with pytest.raises(FileNotFoundError, match="--overwrite"):
        run(image_store, tmp_path / "none", "--epochs", 1, "--resume")


def test_training_without_dev_mentions_is_refused(tmp_path):
    write_synthetic(tmp_path / "ds", tmp_path / "feat", num_entities=16, mentions_per_split=(32, 0, 16), seed=1)
    with pytest.raises(ValueError, match="the dataset has no dev mentions; the best model is chosen by dev MRR"):
        train_main(["--config", str(Path(__file__).resolve().parents[1] / "configs/synthetic.yaml"),
                    "--features", str(tmp_path / "feat"), "--output_dir", str(tmp_path / "run"), "--epochs", "1"])
