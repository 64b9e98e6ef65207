"""Output paths and input lines have bounds: an output that is not a regular file is refused (a FIFO would hang the
writer), and the one JSON Lines reader refuses a line over its size limit without holding it whole (issue 26
items 6 and 14)."""

from __future__ import annotations

import os

import pytest

from data_process.core.durable_io import JsonlCache, atomic_write_text
from data_process.core.records import DataError, iter_json_lines
from data_process.core.safe_paths import UnsafePath, check_output_file


def test_an_output_path_must_be_absent_or_a_regular_file(tmp_path):
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    for write in (lambda p: atomic_write_text(p, "x"), JsonlCache, check_output_file):
        with pytest.raises(UnsafePath, match=f"{fifo}: not a regular file: a FIFO"):
            write(fifo)
    with pytest.raises(UnsafePath, match="not a regular file: a directory"):
        atomic_write_text(tmp_path, "x")
    assert check_output_file(tmp_path / "new.json") == tmp_path / "new.json"
    atomic_write_text(tmp_path / "new.json", "{}")
    assert check_output_file(tmp_path / "new.json") == tmp_path / "new.json"       # a file: rewritten


def test_a_line_over_the_limit_is_refused_and_the_next_lines_are_still_read(tmp_path):
    path = tmp_path / "in.jsonl"
    limit = 64
    ok = '{"a": "' + "x" * (limit - 9) + '"}'                   # exactly the limit
    assert len(ok) == limit
    path.write_bytes((ok + "\r\n" + '{"b": "' + "y" * 5000 + '"}\n' + '{"c": 1}\n').encode())
    with pytest.raises(DataError, match=rf"{path}, line 2: longer than {limit} bytes, the limit on a line "
                                        r"\(--max-line-bytes\)"):
        list(iter_json_lines(path, max_line_bytes=limit))
    seen = []
    got = list(iter_json_lines(path, on_error=lambda err, kind: seen.append(str(err)), max_line_bytes=limit))
    assert [n for n, _ in got] == [1, 3] and got[1][1] == {"c": 1} and len(seen) == 1
    assert [n for n, _ in iter_json_lines(path)] == [1, 2, 3]             # no limit: every line
