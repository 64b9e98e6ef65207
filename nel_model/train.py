"""``python -m nel_model.train`` (``dim-mel train``): train and evaluate a model on a feature cache.

``--model NAME`` (or a config file's ``model:``) picks the model: its configuration (``nel_model.config.TRAIN_CONFIGS``,
whose fields are the command's flags) and its task of the training engine (:data:`TASKS`). The entry point keeps the
name DIM's own code uses.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from data_process.core.entry import run_main
from nel_model.config import parse_train_args
from nel_model.training.engine import fit
from nel_model.training.loop import RetrieverTask
from nel_model.training.mimic_task import MIMICTask

# dim-mel train --model NAME -> the engine task that trains it (its configuration: nel_model.config.TRAIN_CONFIGS)
TASKS: dict[str, Callable[..., Any]] = {"dim": RetrieverTask, "mimic": MIMICTask}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train (or resume) the run the command line describes; its results (``{"stopped_at_epoch": N}`` when it
    stopped early)."""
    cfg = parse_train_args(argv)
    return fit(cfg, TASKS[cfg.TASK])


def command(argv: list[str] | None = None) -> int:
    """``python -m nel_model.train``: train, then print the test metrics."""
    out = main(argv)
    print(json.dumps(out.get("protocols", out), indent=1))
    return 0


if __name__ == "__main__":
    run_main(command)
