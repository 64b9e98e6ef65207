"""One writer per output (data_process.core.locks): a second writer is refused, naming the holder; a writer killed
with SIGKILL leaves no stuck lock."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from data_process.core.locks import OutputLocked, lock_path, output_lock
from tests.procs import sigkill

HOLD = ("import sys, time\nfrom data_process.core.locks import output_lock\n"
        "with output_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)\n")


def _holder(out):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_and_a_killed_writer_leaves_no_lock(tmp_path):
    out = tmp_path / "linked.jsonl"
    proc = _holder(out)
    try:
        with pytest.raises(OutputLocked, match=rf"{out}: another process is writing it \(pid {proc.pid}:"):
            with output_lock(out):
                pass
    finally:
        sigkill(proc)
    assert lock_path(out).exists()             # the file stays; the kernel dropped the flock with the process
    with output_lock(out) as held:
        assert held == lock_path(out)


def test_the_lock_is_released_after_the_block_and_wait_blocks_until_then(tmp_path):
    out = tmp_path / "run"
    with output_lock(out):
        with pytest.raises(OutputLocked):
            with output_lock(out):
                pass
    with output_lock(out):
        pass
    proc = _holder(out)
    t0 = time.monotonic()
    subprocess.Popen(["bash", "-c", f"sleep 1; kill -9 {proc.pid}"])
    with output_lock(out, wait=True):
        waited = time.monotonic() - t0
    proc.wait()
    assert waited > 0.5                        # it waited for the holder to die, then got the lock
