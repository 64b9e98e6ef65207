"""Process helpers for the kill -9 tests."""

from __future__ import annotations

import signal
import subprocess


def sigkill(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Kill ``proc`` with SIGKILL (no cleanup can run) and wait for it; the test checks ``returncode``."""
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
