"""A small trained run on a synthetic feature cache, for the tests of the stages that read run folders."""

from __future__ import annotations

from pathlib import Path

from data_process.fixtures.synthetic_features import write_synthetic
from nel_model.train import main as train_main

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "synthetic.yaml"


def trained_run(folder: Path, *, entities: int, splits: tuple[int, int, int], seed: int, epochs: int) -> Path:
    """Write a synthetic dataset and cache under ``folder`` and train ``epochs`` epochs on it: ``folder/run``."""
    write_synthetic(folder / "ds", folder / "feat", num_entities=entities, mentions_per_split=splits, seed=seed)
    train_main(["--config", str(CONFIG), "--features", str(folder / "feat"), "--output-dir", str(folder / "run"),
                "--epochs", str(epochs)])
    return folder / "run"
