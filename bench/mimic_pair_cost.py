"""The cost of MIMIC's pairwise scoring (``nel_model.mimic``) against a whole KB, and the memory of one chunk.

    python bench/mimic_pair_cost.py --out bench/results/mimic_pair_cost_cpu           # CPU, a couple of minutes
    python bench/mimic_pair_cost.py --small                                           # smoke test (seconds)

For each case (the WikiMEL benchmark's text-only model on MiniLM features; the full model on CLIP-sized features),
a MIMIC with the official sizes (hidden 96, dv 96, 40 text tokens a side) and random weights and inputs (speed does
not depend on them) encodes a KB of ``--kb`` entities once, then scores ``--measure`` mentions against all of it,
``--block`` mentions at a time, in entity chunks chosen from a memory bound (``--memory-mb``) with
``nel_model.mimic.pair_bytes``, as whole-KB evaluation will. Reported: pairs/s, GFLOP/s by ``pair_flops``, the
time of the KB's encoding, the extrapolation of the scoring to ``--mentions`` mentions (linear in the mentions:
every mention costs the same), the bound of one call beside the encoded KB side's size, and the process's peak
resident memory (cases run in one process, so a later case's peak includes the earlier one's; the bound itself is
checked against the tensors a call allocates in ``tests/test_mimic_model.py``).

Writes ``OUT.json`` (every number, device, settings) and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

from nel_model.mimic import MIMIC, EntitySide, MIMICConfig, pair_bytes, pair_flops

CASES = {
    # the WikiMEL benchmark's setting: MiniLM text (384), no images, so the text unit alone
    "text_minilm": {"text_dim": 384, "image_dim": 0, "use_image_unit": False, "use_fusion_unit": False},
    # MIMIC's own inputs: CLIP ViT-B/32 sizes (512), 3x3 regions + the global image as image tokens, every unit
    "all_clip": {"text_dim": 512, "image_dim": 512},
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def random_views(side: str, n: int, cfg: MIMICConfig, regions: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    pooled, tokens = ("context", "sentence") if side == "mention" else ("desc", "desc_tokens")
    length = cfg.text_len
    v = {pooled: torch.randn(n, cfg.text_dim, generator=g).half(),
         tokens: torch.randn(n, length, cfg.text_dim, generator=g).half(),
         tokens + "_mask": torch.arange(length)[None, :] < torch.randint(8, length + 1, (n, 1), generator=g)}
    if cfg.uses_images:
        v.update(image=torch.randn(n, cfg.image_dim, generator=g).half(), image_mask=torch.rand(n, generator=g) > 0.1,
                 regions=torch.randn(n, regions, cfg.image_dim, generator=g).half(),
                 regions_mask=torch.ones(n, regions, dtype=torch.bool))
    return v


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_case(name: str, args) -> dict:
    cfg = MIMICConfig(**CASES[name], text_len=args.text_len)
    torch.manual_seed(0)
    model = MIMIC(cfg).eval()
    g = torch.Generator().manual_seed(1)
    length = cfg.text_len
    budget = args.memory_mb * 2**20
    per_entity = pair_bytes(args.block, 1, length, length, cfg.hidden, cfg.units, text_dim=cfg.text_dim)
    chunk = max(1, min(args.kb, budget // per_entity))
    with torch.no_grad():
        t0 = time.perf_counter()
        sides = []
        for start in range(0, args.kb, 4096):      # the KB side, encoded once in blocks
            sides.append(model.encode_entities(random_views("entity", min(4096, args.kb - start), cfg, 9, g)))
        kb = EntitySide.cat(sides)
        encode_s = time.perf_counter() - t0
        mentions = model.encode_mentions(random_views("mention", args.measure, cfg, 9, g))
        # warm-up: one chunk
        model.pair_scores(mentions.rows(slice(0, min(args.block, args.measure))), kb.rows(slice(0, chunk)))
        t0 = time.perf_counter()
        best = []
        for b0 in range(0, args.measure, args.block):
            m = mentions.rows(slice(b0, b0 + args.block))
            scores = torch.cat([model.pair_scores(m, kb.rows(slice(e0, e0 + chunk)))
                                for e0 in range(0, args.kb, chunk)], 1)
            best.append(scores.argmax(1))
        score_s = time.perf_counter() - t0
    pairs = args.measure * args.kb
    flops = pair_flops(length, length, cfg.hidden, cfg.text_dim, cfg.units)
    return {
        "case": name, "units": list(cfg.units), "text_dim": cfg.text_dim, "image_dim": cfg.image_dim,
        "hidden": cfg.hidden, "dv": cfg.dv, "mention_len": length, "entity_len": length, "kb": args.kb,
        "block_mentions": args.block, "entity_chunk": int(chunk), "memory_budget_mb": args.memory_mb,
        "pair_bytes_bound_mb": pair_bytes(args.block, chunk, length, length, cfg.hidden, cfg.units,
                                          text_dim=cfg.text_dim) / 2**20,
        "process_peak_rss_mb": peak_rss_bytes() / 2**20,
        "kb_side_mb": sum(t.nelement() * t.element_size() for t in vars(kb).values() if t is not None) / 2**20,
        "encode_kb_s": encode_s, "measured_mentions": args.measure, "score_s": score_s,
        "pairs_per_s": pairs / score_s, "flops_per_pair": flops, "gflops_per_s": pairs * flops / score_s / 1e9,
        "extrapolated_mentions": args.mentions,
        "extrapolated_whole_kb_s": encode_s + args.mentions * args.kb / (pairs / score_s),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kb", type=int, default=18880, help="KB entities (WikiMEL benchmark: 18,880)")
    p.add_argument("--mentions", type=int, default=4883, help="mentions to extrapolate to (GHMFC's test split)")
    p.add_argument("--measure", type=int, default=128, help="mentions actually scored against the whole KB")
    p.add_argument("--block", type=int, default=64, help="mentions per call")
    p.add_argument("--memory-mb", type=int, default=64, help="memory bound of one call (pair_bytes)")
    p.add_argument("--sweep-mb", default="1024,256,64,16",
                   help="also: the text-only case at these bounds on --sweep-kb entities (chunk size vs speed)")
    p.add_argument("--sweep-kb", type=int, default=4000)
    p.add_argument("--text-len", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--small", action="store_true", help="a smoke test: a tiny KB and few mentions")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    if args.small:
        args.kb, args.measure, args.block, args.mentions, args.sweep_kb, args.sweep_mb = 300, 8, 4, 100, 300, "8,1"
    torch.set_num_threads(args.threads)
    device = f"CPU: {cpu_name()} ({torch.get_num_threads()} torch threads); torch {torch.__version__}"
    results = [run_case(c, args) for c in args.cases.split(",")]
    sweep = []
    for mb in (int(x) for x in args.sweep_mb.split(",") if x):
        sweep.append(run_case("text_minilm", argparse.Namespace(**{**vars(args), "memory_mb": mb, "kb": args.sweep_kb,
                                                                   "measure": args.block})))
    lines = [f"Device: **{device}**; {time.strftime('%Y-%m-%d %H:%M:%S')}.", "",
             "| case | units | chunk (mentions x entities) | bound of one call | KB side | process peak RSS | "
             "encode KB | pairs/s | GFLOP/s | whole KB, measured mentions | whole KB, extrapolated |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(
            f"| {r['case']} | {'+'.join(r['units'])} | {r['block_mentions']} x {r['entity_chunk']} | "
            f"{r['pair_bytes_bound_mb']:.0f} MiB | {r['kb_side_mb']:.0f} MiB | {r['process_peak_rss_mb']:.0f} MiB | "
            f"{r['encode_kb_s']:.1f} s | {r['pairs_per_s']:.3g} | {r['gflops_per_s']:.1f} | "
            f"{r['measured_mentions']} x {r['kb']}: {r['score_s']:.1f} s | "
            f"{r['extrapolated_mentions']} x {r['kb']}: {r['extrapolated_whole_kb_s'] / 60:.1f} min |")
    if sweep:
        lines += ["", f"Chunk size against speed, text unit, {args.block} mentions x {args.sweep_kb} entities:", "",
                  "| memory bound | chunk (mentions x entities) | pairs/s | GFLOP/s |", "|---:|---|---:|---:|"]
        lines += [f"| {r['memory_budget_mb']} MiB | {r['block_mentions']} x {r['entity_chunk']} | {r['pairs_per_s']:.3g} | "
                  f"{r['gflops_per_s']:.1f} |" for r in sweep]
    lines += ["", f"FLOPs per pair (`pair_flops`): " + ", ".join(f"{r['case']} {r['flops_per_pair']:,}" for r in results)
              + ". Float32 scores; random weights and inputs; the extrapolation is linear in the mentions (every "
              "mention is scored against the same whole KB) and adds the KB's encoding once."]
    table = "\n".join(lines)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        out.with_suffix(".json").write_text(json.dumps({"device": device, "settings": settings, "results": results, "sweep": sweep},
                                                       indent=1) + "\n")
        out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
