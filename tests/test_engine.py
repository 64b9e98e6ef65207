"""The training engine runs any task: a toy pairwise scorer trained with in-batch cross-entropy (the shape of the next
model, MIMIC) is added here as a task and a configuration, without touching the engine, and gets learning,
selection, the run folder and exact resume from it."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_process.core.durable_io import atomic_write_json
from nel_model import distributed as D
from nel_model.config import TaskConfig, opt
from nel_model.training.engine import Engine, Epoch, Fitted, Task

N_TRAIN, N_DEV, N_ENT, DIM = 96, 48, 24, 8


@dataclass
class ToyModelConfig:
    """A pairwise scorer: an MLP over (query, entity, query * entity)."""

    width: int = opt(16, "hidden width")
    dropout: float = opt(0.1)


@dataclass
class ToyConfig(TaskConfig):
    """The toy task's configuration: the shared run and optimiser sections, and its model."""

    TASK: ClassVar[str] = "toy_pairwise"
    PROG: ClassVar[str] = "toy"
    model: ToyModelConfig = field(default_factory=ToyModelConfig)


class Scorer(torch.nn.Module):
    def __init__(self, c: ToyModelConfig):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(3 * DIM, c.width), torch.nn.ReLU(),
                                       torch.nn.Dropout(c.dropout), torch.nn.Linear(c.width, 1))

    def forward(self, q: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Every query [B,D] against every entity [E,D]: scores [B,E]."""
        qq, ee = q[:, None].expand(-1, len(e), -1), e[None].expand(len(q), -1, -1)
        return self.mlp(torch.cat([qq, ee, qq * ee], -1)).squeeze(-1)


class ToyPairwiseTask(Task):
    """Queries are noisy rotations of their gold entity; the scorer learns to match them (in-batch negatives)."""

    distributed = False
    epoch0 = "untrained"

    def __init__(self, cfg: ToyConfig, dist: D.DistInfo):
        self.cfg = cfg
        g = torch.Generator().manual_seed(0)
        self.ent = torch.randn(N_ENT, DIM, generator=g)
        rot = torch.linalg.qr(torch.randn(DIM, DIM, generator=g))[0]
        self.gold = torch.randint(0, N_ENT, (N_TRAIN + N_DEV,), generator=g)
        self.query = self.ent[self.gold] @ rot + 0.3 * torch.randn(N_TRAIN + N_DEV, DIM, generator=g)
        self.model = Scorer(cfg.model)

    def model_config(self) -> dict[str, Any]:
        return asdict(self.cfg.model)

    def resolved(self) -> dict[str, Any]:
        return {"toy_entities": N_ENT}

    def has_candidates(self) -> bool:
        return False

    def train_size(self) -> int:
        return N_TRAIN

    def epoch(self, epoch: int) -> Epoch:
        bs = self.cfg.optim.batch_size
        order = np.random.default_rng([self.cfg.run.seed, epoch]).permutation(N_TRAIN)
        return Epoch((torch.from_numpy(order[s:s + bs]) for s in range(0, N_TRAIN, bs)), math.ceil(N_TRAIN / bs),
                     N_TRAIN)

    def forward(self, model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
        return model(self.query[idx], self.ent[self.gold[idx]])           # [B,B]: in-batch negatives

    def loss(self, logits: torch.Tensor, idx: torch.Tensor, accumulation: int) -> tuple[torch.Tensor, torch.Tensor]:
        raw = F.cross_entropy(logits, torch.arange(len(idx)), reduction="sum")
        return raw / len(idx) / accumulation, raw

    @torch.no_grad()
    def evaluate_dev(self) -> dict[str, dict[str, float]]:
        self.model.eval()
        dev = slice(N_TRAIN, N_TRAIN + N_DEV)
        scores = self.model(self.query[dev], self.ent)
        gold = scores.gather(1, self.gold[dev, None])
        rank = 1 + (scores > gold).sum(1) + (scores == gold).sum(1) - 1
        return {"full_kb": {"mrr": float((1.0 / rank).mean()), "hits@1": float((rank == 1).double().mean()),
                            "n": N_DEV, "nan": 0}}

    def finish(self, fitted: Fitted) -> dict[str, Any]:
        results = {"label": fitted.label, "best_epoch": fitted.best_epoch, "epochs_run": fitted.epochs_run,
                   "selection": fitted.selection, "dev": self.evaluate_dev()["full_kb"]}
        atomic_write_json(fitted.out / "results.json", results)
        return results


def fit(out: Path, *flags: str) -> dict[str, Any]:
    cfg = ToyConfig.parse(["--output-dir", str(out), "--lr", "0.01", "--warmup-steps", "0", "--batch-size", "16",
                           "--patience", "0", *flags])
    return Engine(cfg, ToyPairwiseTask, D.DistInfo()).fit()


def _lines(out: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in json.loads(x).items() if k not in ("time_s", "train_s")}
            for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_new_task_learns_and_gets_the_run_folder_from_the_engine(tmp_path):
    untrained = fit(tmp_path / "zero", "--epochs", "0")
    trained = fit(tmp_path / "run", "--epochs", "8", "--label", "toy")
    assert trained["dev"]["mrr"] > untrained["dev"]["mrr"] + 0.2, (trained, untrained)
    assert trained["best_epoch"] > 0 and trained["epochs_run"] == 8 and trained["label"] == "toy"
    conf = json.loads((tmp_path / "run" / "config.json").read_text())
    assert conf["format"] == 2 and conf["task"] == "toy_pairwise" and conf["toy_entities"] == N_ENT
    assert conf["config"]["model"] == {"width": 16, "dropout": 0.1} and conf["config"]["optim"]["lr"] == 0.01
    assert [r["epoch"] for r in _lines(tmp_path / "run")] == list(range(1, 9))
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=False)
    assert best["epoch"] == trained["best_epoch"] and best["model_config"] == {"width": 16, "dropout": 0.1}
    assert (tmp_path / "run" / "env.json").is_file() and (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_a_new_task_resumes_exactly_with_gradient_accumulation(tmp_path):
    full = fit(tmp_path / "full", "--epochs", "4", "--grad-accum", "2")
    assert fit(tmp_path / "cut", "--epochs", "4", "--grad-accum", "2", "--stop-after-epochs", "2") == \
        {"stopped_at_epoch": 2}
    resumed = fit(tmp_path / "cut", "--epochs", "4", "--grad-accum", "2", "--resume")
    assert {**resumed, "label": "full"} == full and resumed["best_epoch"] > 0
    assert _lines(tmp_path / "cut") == _lines(tmp_path / "full")
    with pytest.raises(ValueError, match=r"--width 32 \(the run's: 16\)"):
        fit(tmp_path / "cut", "--epochs", "4", "--grad-accum", "2", "--resume", "--width", "32")


def test_a_selection_by_candidate_lists_falls_back_for_a_task_without_them(tmp_path, capsys):
    res = fit(tmp_path / "c", "--epochs", "1", "--select-by", "candidates:hits@1")
    assert res["selection"] == "full_kb:mrr"
    assert "the dataset has no candidate lists; the best checkpoint is chosen by full_kb:mrr" in capsys.readouterr().err
