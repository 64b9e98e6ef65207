"""Where torch work runs: the one device resolver, and CPU thread counts beside image-decoding workers."""

from __future__ import annotations

import os

import torch


def resolve_device(spec: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> the process's GPU when CUDA is available, else the CPU; ``cuda`` -> ``cuda:<local_rank>``.

    Asking for CUDA on a machine without it is an error (never a silent fall-back to the CPU)."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: CUDA is not available on this machine (use --device cpu or auto)")
        if spec == "cuda":
            return torch.device("cuda", local_rank)
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"--device {spec}: not a device (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def cpu_threads(num_workers: int) -> int:
    """Torch threads that leave one core per image-decoding worker (oversubscribed cores slow CPU
    inference down several times)."""
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - num_workers))
