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
from nel_model.train import main as train_main

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
    assert conf["format"] == 2 and conf["task"] == "dim" and conf["label"] == "demo"
    assert conf["config"]["loss"]["loss"] == "infonce" and conf["config"]["optim"]["lr"] == 0.002   # config + CLI
    env = json.loads((out / "env.json").read_text())
    assert {"git", "versions", "device", "seed", "command", "start_time"} <= set(env)
    lines = dev_lines(out)
    assert [e for e, *_ in lines] == [1, 2]
    saved = json.loads((out / "results.json").read_text())
    assert saved["label"] == "demo" and saved["dataset"] == "synthetic" and saved["seed"] == 114514
    assert set(saved["protocols"]["full_kb"]) == {"dev", "test"}
    assert set(saved["protocols"]["full_kb"]["test"]) == {"mrr", "hits@1", "hits@3", "hits@5", "hits@10",
                                                          "hits@20", "n", "nan"}
    assert saved["protocols"] == json.loads(json.dumps(res["protocols"]))
    emb = np.load(out / "entity_embeddings.npy")
    assert emb.shape == (48, 32) and emb.dtype == np.float32       # as evaluation scores them
    record = json.loads((out / "entity_embeddings.json").read_text())
    assert record["shape"] == [48, 32] and record["checkpoint"] == "best" and record["encode_dtype"] == "float32"
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_sigkill_during_training_then_resume(image_store, tmp_path):
    flags = ("--epochs", 40, "--batch_size", 16)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(image_store, out, *flags), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = out / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: the test would resume a finished run"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    done = len(dev_lines(out))
    assert not (out / "results.json").exists() and 1 <= done < 40      # killed in the middle of the run
    resumed = run(image_store, out, *flags, "--resume")
    ref = run(image_store, tmp_path / "ref", *flags)
    assert resumed["protocols"] == ref["protocols"]
    assert dev_lines(out) == dev_lines(tmp_path / "ref")


def test_resume_refuses_other_flags_names_them_and_force_goes_through(image_store, tmp_path):
    out = tmp_path / "r"
    assert run(image_store, out, "--epochs", 3, "--stop_after_epochs", 1) == {"stopped_at_epoch": 1}
    with pytest.raises(ValueError) as err:
        run(image_store, out, "--epochs", 3, "--resume", "--lr", 0.1, "--seed", 7)
    msg = str(err.value)
    assert msg.startswith(f"{out / 'config.json'}: --resume with a configuration other than the run's: ")
    assert "--lr 0.1 (the run's: 0.002)" in msg and "--seed 7 (the run's: 114514)" in msg and "--epochs 3" not in msg
    with pytest.raises(ValueError, match="--epochs 2 \\(the run's: 3\\)"):
        run(image_store, out, "--epochs", 2, "--resume")                   # epochs may grow, not shrink
    assert run(image_store, out, "--epochs", 4, "--resume", "--stop_after_epochs", 2) == {"stopped_at_epoch": 2}
    res = run(image_store, out, "--epochs", 4, "--resume", "--lr", 0.001, "--force")
    assert res["epochs_run"] == 4
    assert json.loads((out / "config.json").read_text())["config"]["optim"]["lr"] == 0.001   # records what was used


def test_a_corrupt_middle_line_of_metrics_is_an_error_not_a_silent_cut(image_store, tmp_path):
    out = tmp_path / "m"
    run(image_store, out, "--epochs", 4, "--stop_after_epochs", 3)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    from nel_model.runs import RunError
    with pytest.raises(RunError, match=r"metrics.jsonl, line 2: invalid JSON"):
        run(image_store, out, "--epochs", 4, "--resume")
    assert (out / "metrics.jsonl").read_text().splitlines()[2] == lines[2]     # the later epochs are kept


def test_a_nan_loss_stops_training_naming_epoch_and_step_and_resume_continues(image_store, tmp_path, monkeypatch):
    from nel_model.training import engine as E
    from nel_model.training import loop as T

    real, calls = T.batch_loss_sum, []

    def nan_in_epoch_two(*a, **k):          # 8 optimizer steps per epoch here; the 12th loss is NaN
        calls.append(1)
        out = real(*a, **k)
        return out * float("nan") if len(calls) == 12 else out

    ref = run(image_store, tmp_path / "ref", "--epochs", 3)
    out = tmp_path / "nan"
    monkeypatch.setattr(T, "batch_loss_sum", nan_in_epoch_two)
    with pytest.raises(E.NonFiniteLoss) as err:
        run(image_store, out, "--epochs", 3)
    assert "the training loss is not finite at epoch 2, optimizer step 12" in str(err.value)
    assert "holds the last good epoch (1)" in str(err.value)
    assert [e for e, *_ in dev_lines(out)] == [1]
    monkeypatch.setattr(T, "batch_loss_sum", real)
    resumed = run(image_store, out, "--epochs", 3, "--resume")
    assert resumed["protocols"] == ref["protocols"]


def test_a_dev_evaluation_with_nan_scores_is_never_the_best(image_store, tmp_path, monkeypatch):
    from nel_model.training.loop import RetrieverTask

    real, calls = RetrieverTask.evaluate_dev, []

    def nan_after_epoch_one(self):
        res = real(self)
        calls.append(1)
        if len(calls) >= 3:     # after epochs 2, 3 (call 1 is the untrained model): a perfect H@1, NaN gold scores
            res = {proto: {**m, "mrr": 1.0, "hits@1": 1.0, "nan": 3} for proto, m in res.items()}
        return res

    monkeypatch.setattr(RetrieverTask, "evaluate_dev", nan_after_epoch_one)
    res = run(image_store, tmp_path / "n", "--epochs", 3)
    assert res["best_epoch"] <= 1


def test_the_dataset_name_comes_from_the_dataset_not_the_working_directory(tmp_path, monkeypatch):
    write_synthetic(tmp_path / "ds", tmp_path / "feat", num_entities=12, mentions_per_split=(16, 8, 8), seed=2)
    meta = json.loads((tmp_path / "feat" / "meta.json").read_text())
    (tmp_path / "feat" / "meta.json").write_text(json.dumps({**meta, "dataset": "moved-away"}))
    monkeypatch.chdir(tmp_path / "feat")
    res = run(tmp_path / "feat", tmp_path / "run", "--epochs", 0, "--dataset", "../ds")
    assert res["dataset"] == json.loads((tmp_path / "ds" / "dataset.json").read_text())["name"] == "synthetic"


def test_the_schedule_counts_the_batches_the_epoch_plan_keeps():
    from nel_model.training.batches import make_epoch_plan
    from nel_model.training.engine import steps_per_epoch

    gold = np.zeros(65, dtype=np.int64)
    for world, accum in ((1, 1), (4, 1), (4, 3), (2, 2)):
        plan = make_epoch_plan(0, 0, np.arange(65), gold, 10, 8, 1, min_batch=world)
        assert steps_per_epoch(65, 8, accum, world) == -(-plan.num_batches // accum)
    assert steps_per_epoch(65, 8, 1, 4) == 8 and steps_per_epoch(65, 8, 1, 1) == 9


def test_early_stopping_with_patience(image_store, tmp_path):
    res = run(image_store, tmp_path / "es", "--epochs", 6, "--lr", 0, "--patience", 2)
    # lr 0: no epoch beats the untrained model (epoch 0, the first "best") -> stop after 2 epochs without gain
    assert res["epochs_run"] == 2 and res["best_epoch"] == 0
    assert len(dev_lines(tmp_path / "es")) == 2


def test_config_file_yaml_booleans_and_choices(tmp_path):
    from nel_model.config import parse_train_args as parse_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text("amp: off\ndata_on_device: no\n")     # YAML 1.1 reads both as False
    a = parse_args(["--config", str(cfg)])
    assert a.optim.amp == "off" and a.data.data_on_device == "no"
    cfg.write_text("data_on_device: yes\n")
    assert parse_args(["--config", str(cfg)]).data.data_on_device == "yes"
    cfg.write_text("amp: bf61\n")
    with pytest.raises(ValueError, match="amp: invalid value 'bf61'"):
        parse_args(["--config", str(cfg)])


def test_rng_checkpoint_touches_only_the_training_gpu(monkeypatch):
    import torch

    from nel_model.training import engine as T

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
    from nel_model.config import parse_train_args as parse_args
    from nel_model.training.engine import Engine
    from nel_model.training.loop import RetrieverTask

    out = tmp_path / "tb_stop"
    argv = ["--config", str(CONFIG), "--features", str(image_store), "--output_dir", str(out), "--epochs", "3",
            "--tensorboard", "--stop_after_epochs", "1"]
    trainer = Engine(parse_args(argv), RetrieverTask, D.DistInfo())   # kept alive: the writer is not collected
    assert trainer.fit() == {"stopped_at_epoch": 1}
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("dev/mrr")] == [1]


def test_resume_without_a_finished_epoch_says_how_to_restart(image_store, tmp_path):
    with pytest.raises(FileNotFoundError, match="--overwrite"):
        run(image_store, tmp_path / "none", "--epochs", 1, "--resume")


def test_training_without_dev_mentions_names_the_command_that_fixes_it_for_the_format(tmp_path):
    write_synthetic(tmp_path / "ds", tmp_path / "feat", num_entities=16, mentions_per_split=(32, 0, 16), seed=1)
    argv = ["--config", str(Path(__file__).resolve().parents[1] / "configs/synthetic.yaml"),
            "--features", str(tmp_path / "feat"), "--output_dir", str(tmp_path / "run"), "--epochs", "1"]
    info = tmp_path / "ds" / "dataset.json"
    for fmt, advice in (("ghmfc", "dim-mel prepare --format ghmfc --src RELEASE --out DATASET --dev-from-train 0.1"),
                        ("melbench", "dim-mel prepare --format melbench --src RELEASE --out DATASET --splits 0.7,0.1,0.2"),
                        ("mimic", "Its 'mimic' release fixes the splits and has none for dev")):
        info.write_text(json.dumps({**json.loads(info.read_text()), "source_format": fmt}))
        with pytest.raises(ValueError) as err:
            train_main(argv)
        assert "the dataset has no dev mentions; the best model is chosen by dev MRR" in str(err.value)
        assert advice in str(err.value)
