"""Performance at full scale on one GPU: evaluation, training and feature extraction vs naive references.

Every case times our code path and a naive reference side by side, in the same process, on the same device,
and reports the speed-up as a ratio of the two measurements:

* ``eval``: full-KB ranking of N mentions against E entities (d = 512) with
  :func:`nel_model.evaluation.metrics.full_kb_ranks` (chunked matmul + rank on the device) and chunked ``torch.topk`` (the
  predictions path), their achieved TFLOP/s (2·N·E·d / time) against two matrix-product ceilings measured in the
  same run (a large square product and the same ``[chunk, d] x [d, E]`` shape alone, same dtype); the entity
  embedding step (:func:`nel_model.encoding.encode_entities`, ``DIM.encode_entities`` in chunks); the faiss
  index (:func:`nel_model.index.matrix_index`, ivfpq and hnsw, the kinds' defaults) query time and recall@20 against exact search.
  Naive references: a per-mention Python loop in fp32 (``scores = E @ q; rank = (scores > gold).sum()``) timed on
  a subset of the mentions and extrapolated linearly (the JSON says so), and a per-entity Dataset + default collate
  fp32 KB encode.
* ``train``: one epoch of the real trainer (:class:`nel_model.training.engine.Engine` with the retriever task,
  ``train_epoch``: epoch plan, whole-batch gathers, AMP and features on the GPU when they fit) on a synthetic feature
  cache with WikiMEL sizes, vs a per-sample Dataset of dicts + default collate + fp32 + ``num_workers=0`` loop with
  the same model, loss, optimizer, mentions and negatives; plus one full-KB encode of each kind.
* ``features``: CLIP ViT-B/32 (random weights from the default ``CLIPConfig``) image features through our path
  (``data_process.encode.features``: DataLoader decode workers, batches, fp16 on GPU) vs one image at a time with
  ``CLIPImageProcessor`` in fp32, and the decode-only rate (decode + resize + normalise, same workers): the
  ceiling of the pipeline on this machine's CPU cores.

Timing: warm-up first, ``torch.cuda.synchronize()`` before every clock read, median of repeats.

    .venv/bin/python bench/bench_perf.py --scale full --device cuda --out bench/results/perf_h100
    .venv/bin/python bench/bench_perf.py --scale cpu --device cpu --out bench/results/perf_cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import contextlib
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from data_process.core.durable_io import atomic_write_json, atomic_write_text
from data_process.fixtures.synthetic_features import write_synthetic
from data_process.core.devices import resolve_device
from nel_model.runs import cpu_model

# Sizes per scale. Feature dims are the full ones at every scale (text/image 512, 32 sentence tokens, 9 regions).
SCALES: dict[str, dict[str, Any]] = {
    "tiny": dict(eval_n=256, eval_kb=[3000], naive_rank_n=16, naive_encode_max=1000, chunk=128,
                 square=256, faiss_n=64, train_mentions=64, train_kb=600, batch=16,
                 images=8, naive_images=2, img_batch=4, large_images=4, clip="tiny", repeats=1),
    "cpu": dict(eval_n=2000, eval_kb=[110_000], naive_rank_n=100, naive_encode_max=20_000, chunk=512,
                square=2048, faiss_n=1000, train_mentions=2000, train_kb=20_000, batch=64,
                images=64, naive_images=16, img_batch=32, large_images=32, clip="base", repeats=2),
    "full": dict(eval_n=10_000, eval_kb=[110_000, 161_000], naive_rank_n=1000, naive_encode_max=200_000, chunk=512,
                 square=8192, faiss_n=2000, train_mentions=18_000, train_kb=110_000, batch=64,
                 batch_sweep=(128, 256, 512),
                 images=4096, naive_images=256, img_batch=64, large_images=1024, clip="base", repeats=5),
}
DIM_T, DIM_I, SEQ, REGIONS = 512, 512, 32, 9


# ---------------------------------------------------------------------------------------------
# Timing and device facts


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time of ``fn`` (seconds) after ``warmup`` calls; the device is synchronised around each."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": len(times)}


def device_info(device: torch.device) -> dict[str, Any]:
    cpu = cpu_model()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    info = {"device": str(device), "cpu": cpu, "cpu_cores": cores, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    else:
        info["name"] = f"CPU: {cpu} ({cores} cores)"
    with contextlib.suppress(Exception):
        import transformers
        info["transformers"] = transformers.__version__
    with contextlib.suppress(Exception):
        import faiss
        info["faiss"] = faiss.__version__
    return info


# ---------------------------------------------------------------------------------------------
# Synthetic data: a unified dataset + full-size feature cache (the project's one synthetic feature writer)


def write_store(root: Path, num_entities: int, n_train: int, n_dev: int = 0, seed: int = 0) -> tuple[Path, Path]:
    """A unified dataset + feature cache at full feature sizes; returns (dataset, features)."""
    return write_synthetic(root / "dataset", root / "features", num_entities=num_entities,
                           mentions_per_split=(n_train, n_dev, 0), text_dim=DIM_T, image_dim=DIM_I, seq_len=SEQ,
                           regions=REGIONS, num_candidates=0, seed=seed)


def train_args(features: Path, out: Path, device: torch.device, batch: int, extra: list[str] = ()) -> list[str]:
    return ["--features", str(features), "--output_dir", str(out), "--device", str(device),
            "--batch_size", str(batch), "--hidden_size", "512", "--num_heads", "8", "--ff_size", "2048",
            "--num_layers", "2", "--epochs", "1", *extra]


# ---------------------------------------------------------------------------------------------
# Naive references (per-sample datasets, default collate, fp32)


class NaiveEntities(torch.utils.data.Dataset):
    """One entity per item: a dict of fp32 tensors (desc, image, image_mask, profile, profile_mask)."""

    def __init__(self, data, rows: np.ndarray, views: tuple[str, ...]):
        self.data, self.rows, self.views = data, rows, views

    def __len__(self) -> int:
        return len(self.rows)

    def item(self, r: int) -> dict[str, torch.Tensor]:
        out = {}
        for v in self.views:
            arr, mask = self.data.view("entity", v)
            out[v] = torch.tensor(np.asarray(arr[r], dtype=np.float32))
            if mask is not None:
                out[v + "_mask"] = torch.tensor(bool(mask[r]))
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.item(int(self.rows[i]))


class NaiveTrain(torch.utils.data.Dataset):
    """One training mention per item: its views, its gold entity's views and its negatives' views."""

    def __init__(self, data, plan, mention_views: tuple[str, ...], entity_views: tuple[str, ...]):
        self.data, self.plan, self.mviews = data, plan, mention_views
        self.ents = NaiveEntities(data, np.arange(data.num_entities), entity_views)

    def __len__(self) -> int:
        return len(self.plan.order)

    def __getitem__(self, i: int) -> dict[str, Any]:
        m = int(self.plan.order[i])
        mention = {}
        for v in self.mviews:
            arr, mask = self.data.view("mention", v)
            mention[v] = torch.tensor(np.asarray(arr[m], dtype=np.float32))
            if mask is not None:
                mention[v + "_mask"] = torch.tensor(np.asarray(mask[m]))
        negs = [self.ents.item(int(n)) for n in self.plan.negatives[i]]
        neg = {k: torch.stack([n[k] for n in negs]) for k in negs[0]}
        return {"mention": mention, "pos": self.ents.item(int(self.plan.gold[i])), "neg": neg}


@torch.no_grad()
def naive_encode_kb(model, data, views, device, rows: np.ndarray, batch: int = 64) -> torch.Tensor:
    model.eval()
    loader = torch.utils.data.DataLoader(NaiveEntities(data, rows, views), batch_size=batch, num_workers=0)
    out = [model.encode_entities({k: v.to(device) for k, v in b.items()}) for b in loader]
    model.train()
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# Case 1: evaluation


def synthetic_embeddings(n: int, e: int, d: int, device: torch.device, seed: int = 0):
    """Unit entity embeddings with cluster structure, and queries near their gold entity (like trained ones)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    centers = torch.randn(max(1, e // 100), d, generator=g)
    ent = torch.nn.functional.normalize(centers[torch.randint(len(centers), (e,), generator=g)]
                                        + 0.8 * torch.randn(e, d, generator=g), dim=1)
    gold = torch.randint(e, (n,), generator=g)
    q = torch.nn.functional.normalize(ent[gold] + 0.6 * torch.randn(n, d, generator=g), dim=1)
    return q.to(device), ent.to(device), gold.to(device)


def chunked_topk(q: torch.Tensor, ent: torch.Tensor, k: int, chunk: int, dtype: torch.dtype):
    e = ent.to(dtype)
    vals, idx = [], []
    for s in range(0, len(q), chunk):
        top = torch.topk(q[s:s + chunk].to(dtype) @ e.T, k, dim=1)
        vals.append(top.values)
        idx.append(top.indices)
    return torch.cat(vals), torch.cat(idx)


def naive_ranks(q: torch.Tensor, ent: torch.Tensor, gold: torch.Tensor) -> list[int]:
    """The reference: one mention at a time, fp32, a Python int per mention."""
    e = ent.float()
    out = []
    for i in range(len(q)):
        scores = e @ q[i].float()
        out.append(int((scores > scores[gold[i]]).sum()) + 1)
    return out


def matmul_tflops(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, repeats: int) -> dict[str, float]:
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    t = bench(lambda: a @ b, device, repeats, warmup=2)
    return {"shape": [m, k, n], "time_s": t["median_s"], "tflops": 2 * m * k * n / t["median_s"] / 1e12}


def eval_case(sc: dict[str, Any], device: torch.device, tmp: Path, log) -> dict[str, Any]:
    from nel_model.data import FeatureSource, load_mel_data
    from nel_model.encoding import encode_entities
    from nel_model.evaluation.evaluate import EvalSettings
    from nel_model.evaluation.metrics import full_kb_counts, full_kb_ranks
    from nel_model.nel import DIM, DIMConfig

    cuda = device.type == "cuda"
    dtypes = ({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16} if cuda
              else {"fp32": torch.float32})
    n, d, chunk, reps = sc["eval_n"], DIM_T, sc["chunk"], sc["repeats"]
    out: dict[str, Any] = {"mentions": n, "dim": d, "chunk": chunk, "kb": []}
    out["ceiling_square"] = {name: matmul_tflops(sc["square"], sc["square"], sc["square"], dt, device, reps)
                             for name, dt in dtypes.items()}
    for E in sc["eval_kb"]:
        log(f"eval: {n} mentions x {E} entities")
        q, ent, gold = synthetic_embeddings(n, E, d, device)
        flops = 2 * n * E * d
        row: dict[str, Any] = {"entities": E, "flops": flops, "dtypes": {}}
        for name, dt in dtypes.items():
            r = bench(lambda: full_kb_counts(q, ent, gold, chunk, dt), device, reps)
            rt = bench(lambda: full_kb_counts(q, ent, gold, chunk, dt, top_k=20), device, reps)
            tk = bench(lambda: chunked_topk(q, ent, 20, chunk, dt), device, reps)
            qa, ea = q[:chunk].to(dt), ent.to(dt)
            shape = bench(lambda: qa @ ea.T, device, max(reps, 5), warmup=2)
            shape_total = shape["median_s"] * math.ceil(n / chunk)
            row["dtypes"][name] = {
                "rank_s": r["median_s"], "rank_tflops": flops / r["median_s"] / 1e12,
                "rank_over_matmul": r["median_s"] / shape_total,
                "rank_top20_same_pass_s": rt["median_s"], "rank_top20_over_matmul": rt["median_s"] / shape_total,
                "exact_float32_ranks": True,
                "topk20_s": tk["median_s"], "topk20_tflops": flops / tk["median_s"] / 1e12,
                "matmul_same_shape_tflops": 2 * chunk * E * d / shape["median_s"] / 1e12,
                "matmul_same_shape_total_s": shape_total,
                "ceiling_square_tflops": out["ceiling_square"][name]["tflops"],
                "rank_fraction_of_square_ceiling": (flops / r["median_s"] / 1e12) / out["ceiling_square"][name]["tflops"],
                "mentions_per_s": n / r["median_s"],
            }
        # naive: per-mention loop, fp32, on a subset; extrapolated linearly to all N mentions
        sub = min(n, sc["naive_rank_n"])
        t = bench(lambda: naive_ranks(q[:sub], ent, gold[:sub]), device, 1, warmup=1)
        naive_total = t["median_s"] * n / sub
        ours = full_kb_ranks(q[:sub], ent, gold[:sub], chunk, torch.float32).cpu().tolist()
        first = next(iter(dtypes))
        row["naive_rank"] = {"measured_mentions": sub, "measured_s": t["median_s"], "extrapolated_s": naive_total,
                             "extrapolated": sub < n, "dtype": "fp32",
                             "rank_mismatches_vs_ours_fp32": int(sum(a != b for a, b in zip(
                                 ours, naive_ranks(q[:sub], ent, gold[:sub]))))}
        row["speedup_rank"] = naive_total / row["dtypes"][first]["rank_s"]
        row["faiss"] = faiss_case(q, ent, sc, reps) if E == sc["eval_kb"][0] else None

        # entity-embedding step: DIM.encode_entities over the whole KB in chunks (real evaluate path)
        log(f"eval: entity encoding, {E} entities")
        _, feat = write_store(tmp / f"kb{E}", E, n_train=8)
        data = load_mel_data(feat)
        cfg = DIMConfig(text_dim=DIM_T, image_dim=DIM_I)
        model = DIM(cfg).to(device)
        on_dev = cuda and FeatureSource(data, cfg.mention_views(), cfg.entity_views()).nbytes() < 0.5 * torch.cuda.mem_get_info(device)[0]
        src = FeatureSource(data, (), cfg.entity_views(), device, on_device=on_dev)
        settings = EvalSettings()      # evaluation encodes in float32, without autocast (nel_model.encoding)
        enc = bench(lambda: encode_entities(model, src, device, settings), device, reps)
        nsub = min(E, sc["naive_encode_max"])
        nenc = bench(lambda: naive_encode_kb(model, data, cfg.entity_views(), device, np.arange(nsub)), device, 1)
        naive_enc = nenc["median_s"] * E / nsub
        row["encode_entities"] = {"ours_s": enc["median_s"], "entities_per_s": E / enc["median_s"],
                                  "features_on_device": on_dev, "encode_dtype": "float32",
                                  "naive_s": naive_enc, "naive_measured_entities": nsub,
                                  "naive_extrapolated": nsub < E, "speedup": naive_enc / enc["median_s"]}
        del src, data, model
        shutil.rmtree(tmp / f"kb{E}", ignore_errors=True)
        out["kb"].append(row)
        del q, ent, gold
        if cuda:
            torch.cuda.empty_cache()
    return out


def faiss_case(q: torch.Tensor, ent: torch.Tensor, sc: dict[str, Any], reps: int) -> dict[str, Any]:
    """``nel_model.index`` ivfpq / hnsw on the CPU (what ``dim-mel index`` builds, the kinds' defaults): build time,
    query time, recall@20 vs exact."""
    from nel_model.index import matrix_index

    nq = min(len(q), sc["faiss_n"])
    qc, ec = q[:nq].float().cpu(), torch.nn.functional.normalize(ent.float().cpu(), dim=1)
    import faiss
    faiss.omp_set_num_threads(torch.get_num_threads())       # the same CPU threads as the exact search
    exact = bench(lambda: chunked_topk(qc, ec, 20, 1024, torch.float32), torch.device("cpu"), reps)
    res: dict[str, Any] = {"queries": nq, "k": 20, "exact_cpu_fp32_s": exact["median_s"],
                           "exact_queries_per_s": nq / exact["median_s"], "indexes": {}}
    for kind in ("ivfpq", "hnsw"):
        t0 = time.perf_counter()
        with matrix_index(ec, kind) as index:
            build = time.perf_counter() - t0
            qt = bench(lambda: index.search_rows(qc.numpy(), 20), torch.device("cpu"), reps)
            res["indexes"][kind] = {"settings": (index.manifest.get("faiss") or {}).get("params"), "build_s": build,
                                    "query_s": qt["median_s"], "queries_per_s": nq / qt["median_s"],
                                    "recall@20": index.measure_recall(qc.numpy(), ks=(20,))["recall@20"],
                                    "speedup_vs_exact": exact["median_s"] / qt["median_s"]}
    return res


# ---------------------------------------------------------------------------------------------
# Case 2: training


def train_case(sc: dict[str, Any], device: torch.device, tmp: Path, log) -> dict[str, Any]:
    from nel_model import distributed as D
    from nel_model.config import dim_config, parse_train_args
    from nel_model.training.batches import make_epoch_plan
    from nel_model.encoding import encode_entities
    from nel_model.losses import triplet_loss_sum
    from nel_model.nel import DIM
    from nel_model.training.engine import Engine, make_optimizer
    from nel_model.training.loop import RetrieverTask

    n_train, E, batch, reps = sc["train_mentions"], sc["train_kb"], sc["batch"], sc["repeats"]
    log(f"train: writing a {n_train}-mention / {E}-entity feature cache")
    t0 = time.perf_counter()
    _, feat = write_store(tmp / "train", E, n_train=n_train, n_dev=8)
    write_s = time.perf_counter() - t0
    det_before = torch.are_deterministic_algorithms_enabled()
    args = parse_train_args(train_args(feat, tmp / "run", device, batch))
    trainer = Engine(args, RetrieverTask, D.DistInfo(device=device))
    task = trainer.task
    data = task.data
    full_rows = data.splits["train"]
    out: dict[str, Any] = {"train_mentions": n_train, "kb": E, "batch_size": batch, "store_write_s": write_s,
                           "trainer": {"amp": str(trainer.amp_dtype), "features_on_device": task.source.on_device,
                                       "num_workers": args.data.num_workers, "deterministic": args.run.deterministic,
                                       "compile": args.optim.compile, "loss": args.loss.loss,
                                       "num_negatives": args.loss.num_negatives}}

    def epoch(rows):
        data.splits["train"] = rows
        trainer.train_epoch()
        trainer.epoch += 1

    log("train: our epoch")
    epoch(full_rows[: 4 * batch])                       # warm-up: a few batches through the same code path
    sync(device)
    ours = bench(lambda: epoch(full_rows), device, max(1, reps // 2), warmup=0)
    data.splits["train"] = full_rows
    enc = bench(lambda: encode_entities(trainer.model, task.source, device, task.eval_settings), device, reps)
    out["ours"] = {"epoch_s": ours["median_s"], "mentions_per_s": n_train / ours["median_s"],
                   "epochs_timed": ours["repeats"], "kb_encode_s": enc["median_s"],
                   "step_ms": 1000 * ours["median_s"] / math.ceil(n_train / batch),
                   "phases_ms": step_phases(trainer, full_rows[: 16 * batch], device)}
    del trainer
    out["batch_sweep"] = []
    for b in sc.get("batch_sweep", ()):                  # the best batch size for this GPU
        t_args = parse_train_args(train_args(feat, tmp / f"run_b{b}", device, b))
        tr_b = Engine(t_args, RetrieverTask, D.DistInfo(device=device))

        def epoch_b(rows, tr_b=tr_b):
            tr_b.task.data.splits["train"] = rows
            tr_b.train_epoch()
            tr_b.epoch += 1

        epoch_b(full_rows[: 4 * b])
        tb = bench(lambda: epoch_b(full_rows), device, 1, warmup=0)
        out["batch_sweep"].append({"batch_size": b, "epoch_s": tb["median_s"],
                                   "mentions_per_s": n_train / tb["median_s"]})
        log(f"train: batch {b}: {n_train / tb['median_s']:.0f} mentions/s")
        del tr_b
    torch.use_deterministic_algorithms(det_before)

    # naive: same model config, loss, optimizer, mentions and negatives; per-sample items, default collate, fp32
    log("train: naive epoch")
    model = DIM(dim_config(args.model, data)).to(device)
    opt = make_optimizer(model, args.optim.lr, args.optim.weight_decay)
    mviews, eviews = model.cfg.mention_views(), model.cfg.entity_views()

    def naive_epoch(rows, ep=0):
        plan = make_epoch_plan(args.run.seed, ep, rows, data.gold, data.num_entities, batch,
                               args.loss.num_negatives)
        loader = torch.utils.data.DataLoader(NaiveTrain(data, plan, mviews, eviews), batch_size=batch,
                                             shuffle=False, num_workers=0)
        model.train()
        for b in loader:
            m = {k: v.to(device) for k, v in b["mention"].items()}
            G, nn_ = len(b["pos"]["desc"]), b["neg"]["desc"].shape[1]
            ents = {k: torch.cat([b["pos"][k], b["neg"][k].reshape(G * nn_, *b["neg"][k].shape[2:])]).to(device)
                    for k in b["pos"]}
            qv, ev = model(m, ents)
            loss = triplet_loss_sum(qv, ev, 0, G, G, nn_, args.loss.margin) / G
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.optim.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)

    naive_epoch(full_rows[: 4 * batch])
    sync(device)
    naive = bench(lambda: naive_epoch(full_rows), device, 1, warmup=0)
    nsub = min(E, sc["naive_encode_max"])
    nenc = bench(lambda: naive_encode_kb(model, data, eviews, device, np.arange(nsub)), device, 1, warmup=0)
    out["naive"] = {"epoch_s": naive["median_s"], "mentions_per_s": n_train / naive["median_s"],
                    "kb_encode_s": nenc["median_s"] * E / nsub, "kb_encode_measured_entities": nsub,
                    "kb_encode_extrapolated": nsub < E}
    out["speedup_epoch"] = naive["median_s"] / ours["median_s"]
    out["speedup_kb_encode"] = out["naive"]["kb_encode_s"] / enc["median_s"]
    shutil.rmtree(tmp / "train", ignore_errors=True)
    shutil.rmtree(tmp / "run", ignore_errors=True)
    return out


def step_phases(trainer, rows: np.ndarray, device: torch.device) -> dict[str, float]:
    """Milliseconds a step spends gathering the batch, in the forward pass, the loss, the backward pass and the
    optimizer step (clipping, AdamW, scheduler), each bracketed by a device synchronisation; ``overhead`` is
    everything but forward and backward."""
    from nel_model.training.batches import TrainBatches, make_epoch_plan, make_loader
    from nel_model.data import to_device
    from nel_model.losses import NORMALISED_LOSSES, batch_loss_sum

    a, task = trainer.cfg, trainer.task
    plan = make_epoch_plan(a.run.seed, 0, rows, task.data.gold, task.data.num_entities, a.optim.batch_size,
                           a.loss.num_negatives)
    ds = TrainBatches(plan, task.source)
    trainer.train_model.train()
    tot = dict.fromkeys(("gather", "forward", "loss", "backward", "step"), 0.0)
    it = iter(make_loader(ds, 0, a.data.num_workers, False))
    for _ in range(len(ds)):
        marks = [time.perf_counter()]
        batch = to_device(next(it), device)
        sync(device), marks.append(time.perf_counter())
        lo, hi = batch["local"]
        with trainer._autocast():
            q, e = trainer.train_model(batch["mention"], batch["entity"],
                                       normalize=a.loss.loss in NORMALISED_LOSSES)
        sync(device), marks.append(time.perf_counter())
        c = a.loss
        loss = batch_loss_sum(c.loss, q.float(), e.float(), batch["entity_rows"], lo, hi, batch["global_n"],
                              batch["num_negatives"], c.margin, c.temperature, c.npair_l2) / batch["global_n"]
        sync(device), marks.append(time.perf_counter())
        trainer.scaler.scale(loss).backward()
        sync(device), marks.append(time.perf_counter())
        trainer._step()
        sync(device), marks.append(time.perf_counter())
        for key, t0, t1 in zip(tot, marks, marks[1:]):
            tot[key] += t1 - t0
    out = {k: 1000 * v / len(ds) for k, v in tot.items()}
    out["overhead"] = out["gather"] + out["loss"] + out["step"]
    return out


# ---------------------------------------------------------------------------------------------
# Case 3: image features


def write_jpegs(folder: Path, n: int, unique: int = 128, seed: int = 0, size: tuple[int, int] = (500, 375)
                ) -> list[Path]:
    """``n`` JPEGs of ``size`` (smooth random content + noise, quality 90; ``unique`` distinct files, the rest
    copies)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img{i:06d}.jpg"
        if i < unique:
            small = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
            arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, size=(size[1], size[0], 3))
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(p, quality=90)
        else:
            shutil.copyfile(paths[i % unique], p)
        paths.append(p)
    return paths


def clip_model(size: str, device: torch.device, dtype: torch.dtype):
    from transformers import CLIPConfig, CLIPModel

    if size == "base":
        cfg = CLIPConfig()                         # ViT-B/32 sizes
    else:                                          # smoke-test size: same code path, tiny tower
        cfg = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                      "num_attention_heads": 2},
                         vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                        "num_attention_heads": 2}, projection_dim=512)
    with torch.device(device):
        model = CLIPModel(cfg)
    return model.to(dtype=dtype).eval(), cfg


def features_case(sc: dict[str, Any], device: torch.device, tmp: Path, log, workers: int) -> dict[str, Any]:
    from data_process.encode.encoders import ImageEncoder
    from data_process.core.devices import cpu_threads
    from data_process.core.images import iter_decoded
    from data_process.encode.features import _encode_image_batch
    from PIL import Image

    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Proc
    except ImportError:  # other transformers versions
        from transformers import CLIPImageProcessor as Proc

    cuda = device.type == "cuda"
    n, bs, reps = sc["images"], sc["img_batch"], sc["repeats"]
    log(f"features: writing {n} JPEGs")
    paths = write_jpegs(tmp / "jpegs", n)
    proc_dir = tmp / "clip_processor"
    Proc().save_pretrained(str(proc_dir))
    fast_dtype = torch.float16 if cuda else torch.float32
    model, cfg = clip_model(sc["clip"], device, fast_dtype)
    enc = ImageEncoder(str(proc_dir), device, region_grid=3, clip_model=model)
    threads0 = torch.get_num_threads()
    # the feature step's CLI leaves one core per decoding worker on CPU
    ours_threads = threads0 if cuda else cpu_threads(workers)

    def decode_only():
        for _ in iter_decoded(paths, bs, workers, enc.preprocess):
            pass

    def ours():
        for items in iter_decoded(paths, bs, workers, enc.preprocess):
            _encode_image_batch(items, enc)

    log("features: decode-only")
    dec = bench(decode_only, device, max(1, reps - 1))
    log("features: ours")
    torch.set_num_threads(ours_threads)
    try:
        _encode_image_batch([(0, enc.preprocess(Image.open(paths[0]).convert("RGB")), None)] * min(bs, n), enc)
        t_ours = bench(ours, device, max(1, reps - 1))
    finally:
        torch.set_num_threads(threads0)
    enc_preprocess = enc.preprocess
    del enc, model
    if cuda:
        torch.cuda.empty_cache()

    log("features: naive")
    model32, _ = clip_model(sc["clip"], device, torch.float32)
    naive_enc = ImageEncoder(str(proc_dir), device, region_grid=3, clip_model=model32)
    proc = Proc.from_pretrained(str(proc_dir))
    sub = paths[: min(n, sc["naive_images"])]

    def naive():
        for p in sub:
            with Image.open(p) as im:
                img = im.convert("RGB")
            px = proc(images=img, return_tensors="pt")["pixel_values"]
            naive_enc.encode(px)

    t_naive = bench(naive, device, 1)
    del naive_enc, model32
    shutil.rmtree(tmp / "jpegs", ignore_errors=True)

    # large photos (1600x1200): decoding at libjpeg's reduced scale before the resize (--jpeg_draft)
    log("features: large JPEGs, full decode vs draft decode")
    big = write_jpegs(tmp / "jpegs_large", sc["large_images"], unique=min(32, sc["large_images"]), size=(1600, 1200))
    large = {"images": len(big), "image_size": [1600, 1200]}
    for name, draft in (("full_decode", False), ("jpeg_draft", True)):
        pre = dataclasses.replace(enc_preprocess, jpeg_draft=draft)
        t = bench(lambda pre=pre: [None for _ in iter_decoded(big, bs, workers, pre)], device, max(1, reps - 1))
        large[f"decode_{name}_images_per_s"] = len(big) / t["median_s"]
    large["draft_speedup"] = large["decode_jpeg_draft_images_per_s"] / large["decode_full_decode_images_per_s"]
    shutil.rmtree(tmp / "jpegs_large", ignore_errors=True)
    ours_rate, naive_rate, dec_rate = n / t_ours["median_s"], len(sub) / t_naive["median_s"], n / dec["median_s"]
    return {"images": n, "image_size": [500, 375], "batch_size": bs, "workers": workers,
            "torch_threads_ours": ours_threads, "torch_threads_naive": threads0,
            "model": "CLIP ViT-B/32 (default CLIPConfig, random weights)" if sc["clip"] == "base"
            else "tiny CLIP (smoke test)", "dtype_ours": str(fast_dtype), "dtype_naive": "torch.float32",
            "ours_images_per_s": ours_rate, "decode_only_images_per_s": dec_rate,
            "ours_fraction_of_decode_ceiling": ours_rate / dec_rate,
            "naive_images_per_s": naive_rate, "naive_measured_images": len(sub), "speedup": ours_rate / naive_rate,
            "transport": "uint8 pixels from the workers, normalised on the device", "large_jpegs": large}


# ---------------------------------------------------------------------------------------------
# Report


def summary_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    cases = res["cases"]
    if "eval" in cases:
        for kb in cases["eval"]["kb"]:
            E, first = kb["entities"], next(iter(kb["dtypes"]))
            for name, dt in kb["dtypes"].items():
                rows.append({"case": "eval", "what": f"full-KB rank {cases['eval']['mentions']}x{E} {name}",
                             "ours": dt["rank_s"], "naive": kb["naive_rank"]["extrapolated_s"], "unit": "s",
                             "speedup": kb["naive_rank"]["extrapolated_s"] / dt["rank_s"],
                             "note": f"exact counts (all tie rules), {dt['rank_over_matmul']:.2f}x the same-shape "
                                     f"matmul ({dt['rank_top20_over_matmul']:.2f}x with top-20 in the same pass); "
                                     f"{dt['rank_tflops']:.2f} TFLOP/s vs ceiling {dt['ceiling_square_tflops']:.2f}"
                                     + ("; naive extrapolated from "
                                        f"{kb['naive_rank']['measured_mentions']} mentions"
                                        if kb["naive_rank"]["extrapolated"] else "")})
            ee = kb["encode_entities"]
            rows.append({"case": "eval", "what": f"encode KB ({E} entities)", "ours": ee["ours_s"],
                         "naive": ee["naive_s"], "unit": "s", "speedup": ee["speedup"],
                         "note": "naive extrapolated from " + str(ee["naive_measured_entities"])
                         if ee["naive_extrapolated"] else "per-entity Dataset + default collate, fp32"})
            fz = kb.get("faiss")
            if fz:
                for kind, ix in fz["indexes"].items():
                    rows.append({"case": "eval", "what": f"faiss {kind} top-20, {fz['queries']} queries x {E}",
                                 "ours": ix["query_s"], "naive": fz["exact_cpu_fp32_s"], "unit": "s",
                                 "speedup": ix["speedup_vs_exact"],
                                 "note": f"recall@20 {ix['recall@20']:.3f} vs exact (CPU, chunked fp32); "
                                         f"build {ix['build_s']:.1f} s"})
    if "train" in cases:
        t = cases["train"]
        rows.append({"case": "train", "what": f"epoch, {t['train_mentions']} mentions, KB {t['kb']}",
                     "ours": t["ours"]["mentions_per_s"], "naive": t["naive"]["mentions_per_s"],
                     "unit": "mentions/s", "speedup": t["speedup_epoch"],
                     "note": f"epoch {t['ours']['epoch_s']:.2f} s vs {t['naive']['epoch_s']:.2f} s; step "
                             f"{t['ours']['step_ms']:.1f} ms, of which forward {t['ours']['phases_ms']['forward']:.1f} + "
                             f"backward {t['ours']['phases_ms']['backward']:.1f}, overhead (gather, loss, optimizer) "
                             f"{t['ours']['phases_ms']['overhead']:.1f}; amp {t['trainer']['amp']}, features on "
                             f"device {t['trainer']['features_on_device']}"
                             + "".join(f"; batch {b['batch_size']}: {b['mentions_per_s']:.0f}/s"
                                       for b in t.get("batch_sweep", []))})
        rows.append({"case": "train", "what": f"encode KB ({t['kb']} entities)", "ours": t["ours"]["kb_encode_s"],
                     "naive": t["naive"]["kb_encode_s"], "unit": "s", "speedup": t["speedup_kb_encode"], "note": ""})
    if "features" in cases:
        f = cases["features"]
        rows.append({"case": "features", "what": f"CLIP image features, {f['images']} JPEGs 500x375",
                     "ours": f["ours_images_per_s"], "naive": f["naive_images_per_s"], "unit": "images/s",
                     "speedup": f["speedup"],
                     "note": f"decode-only ceiling {f['decode_only_images_per_s']:.1f} images/s with "
                             f"{f['workers']} workers ({100 * f['ours_fraction_of_decode_ceiling']:.0f}% of it)"})
        lg = f["large_jpegs"]
        rows.append({"case": "features", "what": f"decode {lg['images']} JPEGs 1600x1200 (+ resize, crop)",
                     "ours": lg["decode_jpeg_draft_images_per_s"], "naive": lg["decode_full_decode_images_per_s"],
                     "unit": "images/s", "speedup": lg["draft_speedup"],
                     "note": "ours: --jpeg_draft (libjpeg reduced-scale decode); naive: full decode"})
    return rows


def markdown(res: dict[str, Any]) -> str:
    dev = res["device"]
    lines = [f"# Performance: `bench/bench_perf.py --scale {res['scale']}`", "",
             f"Device: **{dev['name']}**" + (f"; host CPU {dev['cpu']} ({dev['cpu_cores']} cores)" if "cuda" in
                                               dev["device"] else "")
             + f"; torch threads {dev['torch_threads']}; torch {dev['torch']}; {res['timestamp']}.", "",
             "| case | what | ours | naive | unit | speed-up | notes |", "|---|---|---:|---:|---|---:|---|"]
    for r in res["summary"]:
        lines.append(f"| {r['case']} | {r['what']} | {r['ours']:.4g} | {r['naive']:.4g} | {r['unit']} | "
                     f"{r['speedup']:.1f}x | {r['note']} |")
    lines += ["", "Time rows (unit s): lower is better; rate rows: higher is better. Speed-up = naive / ours, "
              "both measured in this run on this device. Full numbers: the JSON beside this file."]
    return "\n".join(lines) + "\n"


def table(res: dict[str, Any]) -> str:
    out = [f"{'case':<9}{'what':<48}{'ours':>11}{'naive':>11}  {'unit':<11}{'speed-up':>9}"]
    for r in res["summary"]:
        out.append(f"{r['case']:<9}{r['what'][:47]:<48}{r['ours']:>11.4g}{r['naive']:>11.4g}  {r['unit']:<11}"
                   f"{r['speedup']:>8.1f}x")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", choices=list(SCALES), default="cpu")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--cases", default="eval,train,features", help="comma-separated subset of eval,train,features")
    ap.add_argument("--out", default=None, help="output stem: writes OUT.json and OUT.md (default: print only)")
    ap.add_argument("--workers", type=int, default=None,
                    help="image decoding workers (default: CPU cores - 1 on CUDA, the feature step's default "
                         "min(2, cores) on CPU)")
    ap.add_argument("--repeats", type=int, default=None, help="override the scale's repeat count")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0 = torch default); on a shared, oversubscribed CPU use 1")
    ap.add_argument("--tmp", default=None, help="scratch folder (default: a temporary folder)")
    a = ap.parse_args(argv)
    cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    bad = set(cases) - {"eval", "train", "features"}
    if bad:
        ap.error(f"unknown case(s) {sorted(bad)}")
    device = resolve_device(a.device)
    sc = dict(SCALES[a.scale])
    if a.repeats:
        sc["repeats"] = a.repeats
    cores = os.cpu_count() or 1
    workers = a.workers if a.workers is not None else (max(1, cores - 1) if device.type == "cuda" else min(2, cores))
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False        # fp32 means fp32 for the naive references

    def log(msg: str) -> None:
        print(f"[bench_perf {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    res: dict[str, Any] = {"scale": a.scale, "sizes": sc, "device": device_info(device),
                           "timestamp": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv),
                           "cases": {}}
    with tempfile.TemporaryDirectory(dir=a.tmp, prefix="bench_perf_") as td:
        tmp = Path(td)
        for case in cases:
            t0 = time.perf_counter()
            if case == "eval":
                res["cases"]["eval"] = eval_case(sc, device, tmp, log)
            elif case == "train":
                res["cases"]["train"] = train_case(sc, device, tmp, log)
            else:
                res["cases"]["features"] = features_case(sc, device, tmp, log, workers)
            res["cases"][case]["case_wall_s"] = time.perf_counter() - t0
    res["summary"] = summary_rows(res)
    print(table(res))
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out.with_suffix(".json"), res)
        atomic_write_text(out.with_suffix(".md"), markdown(res))
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
