"""Run-folder records (docs/CONTRACTS.md): config.json, env.json, metrics.jsonl, checkpoints, results.json.

Checkpoints are serialised to memory and written with :func:`atomic_write_bytes`, so a kill during a save leaves
the previous checkpoint intact. ``metrics.jsonl`` is append-only (fsync per line); on resume it is cut back to the
epochs covered by the checkpoint (an epoch logged just before a crash is recomputed identically).
"""

from __future__ import annotations

import io
import json
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from data_process.core.durable_io import atomic_write_bytes, atomic_write_text

REPO_ROOT = Path(__file__).resolve().parent.parent


def git_commit(root: Path = REPO_ROOT) -> dict[str, Any]:
    def git(*a):
        return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=20)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions(names=("torch", "numpy", "transformers", "faiss-cpu", "tqdm", "pyyaml")) -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), for run records and benchmark reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment(device: torch.device, seed: int, world_size: int) -> dict[str, Any]:
    dev = {"type": device.type, "name": "cpu", "cpu": cpu_model()}
    if device.type == "cuda":
        dev["name"] = torch.cuda.get_device_name(device)
        dev["cuda"] = torch.version.cuda
    return {"git": git_commit(), "versions": package_versions(), "device": dev, "world_size": world_size,
            "seed": seed, "command": [sys.executable, *sys.argv], "host": socket.gethostname(),
            "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch_threads": torch.get_num_threads()}


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    return torch.load(path, map_location="cpu", weights_only=False)


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break    # a torn last line from a crash; later lines cannot exist
    return out


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """Keep only the lines of epochs ``<= last_epoch`` (atomic rewrite)."""
    kept = [r for r in read_metrics(path) if r.get("epoch", 0) <= last_epoch]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
