"""Command-line flags of ``nel_model.train`` (and the settings ``nel_model.evaluation.evaluate`` reloads).

Precedence: argparse defaults < ``--config FILE.yaml`` < explicit flags. A config file's keys are the flag names with
underscores (``batch_size: 64``, ``residual: false``); it may start from another file (``base: base.yaml``). The
file is checked by :func:`data_process.core.settings.load_settings`: an unknown key, a wrong type or a value outside
the choices is an error naming the file and the key. Flags are spelled with dashes (``--batch-size``; the
underscore spelling works too) and every boolean has both forms (``--residual`` / ``--no-residual``), so every
config value can be overridden on the command line.

:func:`parse_args` also checks how the flags go together: a flag that has no effect under the chosen settings (a
triplet margin with InfoNCE) is a warning naming it; contradictory flags are an error.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from data_process.core.settings import ToolkitParser, add_bool, load_settings, settings_from_parser
from nel_model.evaluation.metrics import CANDIDATE_RULES, TIE_RULES
from nel_model.nel import SWITCH_CHOICES

# The views a run may switch off (ablations): each a boolean flag, on by default (--no-image etc.).
VIEW_FLAGS: dict[str, str] = {
    "sentence": "sentence tokens", "image": "the mention image (regions and global)",
    "regions": "image regions (with --no-regions the global image is kept)",
    "global_image": "the whole mention image (with --no-global-image the regions are kept)",
    "caption": "the caption profile row", "enrichment": "the LLM enrichment profile row",
    "entity_image": "entity images", "entity_profile": "entity enrichment",
}
# Flags that only matter under one setting: flag -> (setting flag, values under which it has an effect).
EFFECTIVE_ONLY: dict[str, tuple[str, tuple[Any, ...]]] = {
    "margin": ("loss", ("triplet",)),
    "temperature": ("loss", ("infonce",)),
    "npair_l2": ("loss", ("npair",)),
    "npair_negatives": ("loss", ("npair",)),
    "caption_constant": ("query_input", ("raw",)),
    "residual_base": ("residual", (True,)),
    "hard_negative_pool": ("hard_negatives", (True,)),
    "hard_negative_ratio": ("hard_negatives", (True,)),
}


def build_parser() -> argparse.ArgumentParser:
    p = ToolkitParser(prog="dim-mel train",
                                description="Train and evaluate the DIM multimodal entity linker on a feature cache.")
    g = p.add_argument_group("paths")
    g.add_argument("--config", type=str, default=None, help="YAML file of flag defaults (CLI flags override it)")
    g.add_argument("--features", type=str, default=None, help="feature folder written by data_process.encode.features")
    g.add_argument("--dataset", type=str, default=None,
                   help="unified dataset folder (gold ids, splits, candidates); default: meta.json 'dataset'")
    g.add_argument("--output_dir", type=str, default=None, help="run folder (see docs/CONTRACTS.md)")
    g.add_argument("--label", type=str, default=None, help="run label stored in config.json/results.json")
    add_bool(g, "resume", False, "continue from OUTPUT_DIR/checkpoints/last.pt")
    add_bool(g, "overwrite", False, "allow starting fresh in a non-empty run folder")
    add_bool(g, "force", False, "with --resume: continue although flags other than the stopping ones differ from "
             "the run's config.json")
    add_bool(g, "tensorboard", False, "write TensorBoard logs to OUTPUT_DIR/tb/")

    g = p.add_argument_group("model")
    g.add_argument("--hidden_size", type=int, default=512, help="hidden size (0 = the text feature size)")
    g.add_argument("--output_size", type=int, default=0,
                   help="embedding size (0 = the text feature dim, which keeps the residual zero-shot start)")
    g.add_argument("--ff_size", type=int, default=2048)
    g.add_argument("--num_heads", type=int, default=8)
    g.add_argument("--num_layers", type=int, default=2)
    g.add_argument("--dropout", type=float, default=0.4)
    add_bool(g, "residual", True, "add the raw mention/description features to the outputs (the zero-shot start; "
             "needs output_size = the text feature size)")
    g.add_argument("--residual_base", choices=SWITCH_CHOICES["residual_base"], default="mix",
                   help="what the residual start adds to the query: the mention phrase's feature, the pooled "
                        "'mention (sentence)' feature (view mention.context), or a learned mix of both that starts "
                        "at the context (caches without the context view: the mention)")
    for flag, what in VIEW_FLAGS.items():
        add_bool(g, flag, True, f"use {what} (--no-{flag.replace('_', '-')}: an ablation)")
    g = p.add_argument_group("model choices where the DIM paper/code differs (docs/DIVERGENCES.md)")
    g.add_argument("--sentence_fusion", choices=SWITCH_CHOICES["sentence_fusion"], default="attention",
                   help="the mention attends over the sentence tokens, their mean is added to it (add), or the "
                        "pooled feature of 'mention (sentence)' is added (pooled: DIM's code)")
    g.add_argument("--image_fusion", choices=SWITCH_CHOICES["image_fusion"], default="key",
                   help="the whole mention image: an attention key beside the regions, or added to the query")
    g.add_argument("--profile_pool", choices=SWITCH_CHOICES["profile_pool"], default="attention",
                   help="profile rows (enrichment, caption): attended one by one, or max-pooled into one first")
    add_bool(g, "shared_attention", False, "one attention module for every view (DIM's code) instead of one per view")
    g.add_argument("--entity_tower", choices=SWITCH_CHOICES["entity_tower"], default="trained",
                   help="trained entity side (description + image + enrichment), or the frozen text feature")
    g.add_argument("--init", choices=SWITCH_CHOICES["init"], default="default",
                   help="initialisation of the linear layers (xavier: DIM's code)")
    g.add_argument("--query_input", choices=SWITCH_CHOICES["query_input"], default="projected",
                   help="the query from projected views (ours), or one linear map of the sum of the RAW features "
                        "(raw: DIM's code; needs --hidden-size 0 and no attention)")
    add_bool(g, "caption_constant", False, "with --query-input raw: add the projected caption to every query, "
             "LayerNorm(ReLU(b)) where a mention has none (DIM's code)")

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=300)
    g.add_argument("--batch_size", type=int, default=64,
                   help="global batch per micro-step (split evenly over DDP processes)")
    g.add_argument("--grad_accum", type=int, default=1, help="micro-steps per optimizer step")
    g.add_argument("--lr", type=float, default=5e-5)
    g.add_argument("--weight_decay", type=float, default=0.001)
    g.add_argument("--warmup_steps", type=int, default=100)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping (0 = off)")
    g.add_argument("--loss", choices=["triplet", "infonce", "npair"], default="triplet",
                   help="triplet on cosines, InfoNCE over the batch, or DIM's N-pair loss on raw dot products")
    g.add_argument("--margin", type=float, default=0.5, help="triplet margin (cosine)")
    g.add_argument("--temperature", type=float, default=0.05, help="InfoNCE temperature")
    g.add_argument("--npair_l2", type=float, default=0.02, help="N-pair loss: weight of |q|^2 + |e+|^2")
    g.add_argument("--npair_negatives", choices=["own", "batch"], default="own",
                   help="N-pair loss: each mention's own negatives, or every negative of the batch (batch: what "
                        "DIM's code computes through a broadcast)")
    g.add_argument("--num_negatives", type=int, default=1, help="sampled KB negatives per mention")
    g.add_argument("--negatives", choices=["random", "tfidf"], default="random",
                   help="random KB entities, or DIM's TF-IDF sampling (entities sharing a salient description word)")
    add_bool(g, "hard_negatives", False, "draw negatives from each mention's top-ranked wrong entities of the previous "
             "epoch")
    g.add_argument("--hard_negative_pool", type=int, default=20, help="top-k wrong entities kept per mention")
    g.add_argument("--hard_negative_ratio", type=float, default=0.5,
                   help="probability that a negative is hard (when --hard_negatives and a ranking exists)")
    g.add_argument("--patience", type=int, default=0,
                   help="stop after N epochs without a gain of the --select_by metric on dev (0 = off)")
    g.add_argument("--select_by", default="full_kb:mrr",
                   help="dev metric that picks the best checkpoint, PROTOCOL:METRIC (DIM: candidates:hits@1); "
                        "a candidates metric falls back to full_kb:mrr, with a warning, when there are no lists")
    g.add_argument("--seed", type=int, default=114514)
    add_bool(g, "deterministic", True, "deterministic algorithms where possible")
    g.add_argument("--stop_after_steps", type=int, default=0,
                   help="debug: exit abruptly (no cleanup) once the optimizer step count reaches N (tests a crash)")
    g.add_argument("--stop_after_epochs", type=int, default=0,
                   help="stop (cleanly, without the final test) once this many epochs are complete; "
                        "--resume continues the same schedule")

    g = p.add_argument_group("performance")
    g.add_argument("--device", type=str, default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="mixed precision on CUDA (auto: bf16 where supported, else fp16 + GradScaler)")
    add_bool(g, "compile", False,
             "torch.compile the model: the first epoch compiles (a minute or more on a CPU; the last, "
                        "smaller batch once more), later steps are faster; not yet measured on a GPU")
    g.add_argument("--num_workers", type=int, default=0, help="DataLoader workers (host-memory mode)")
    add_bool(g, "pin_memory", True, "pin host batches on CUDA")
    g.add_argument("--data_on_device", choices=["auto", "yes", "no"], default="auto",
                   help="keep all features on the device (GPU memory, or RAM on a CPU) when they fit (auto), "
                        "always, or never (read batches from the memory-mapped cache)")
    g.add_argument("--eval_batch_size", type=int, default=512, help="mentions per scoring chunk")
    g.add_argument("--entity_chunk", type=int, default=8192, help="entities per encoding/scoring chunk")
    g.add_argument("--eval_dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="scoring precision (auto = float32); float16/bfloat16 are faster on GPUs and give the same "
                        "ranks (near-ties are re-checked in float32)")
    g = p.add_argument_group("evaluation protocol (recorded in results.json)")
    g.add_argument("--tie_rule", choices=TIE_RULES, default="pessimistic",
                   help="how ties count (results.json holds all three): pessimistic, strict (DIM), mean")
    g.add_argument("--candidate_rule", choices=CANDIDATE_RULES, default="dim",
                   help="dim: the gold is ranked against its candidate list whether or not the list holds it; "
                        "in_list: a gold missing from its list is a miss")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    return p


def given_dests(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The flag destinations the command line sets explicitly (argparse leaves a pre-set attribute alone when the
    flag is absent, so a sentinel tells given from default)."""
    sentinel = object()
    ns = argparse.Namespace(**{a.dest: sentinel for a in parser._actions if a.dest != argparse.SUPPRESS})
    ns, _ = parser.parse_known_args(argv, namespace=ns)
    return {k for k, v in vars(ns).items() if v is not sentinel}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The training flags (config file, then the command line) checked together (module docstring)."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    from_config: dict[str, Any] = {}
    if first.config:
        from_config = load_settings(first.config, settings_from_parser(parser))
        parser.set_defaults(**from_config)
    args = parser.parse_args(argv)
    given = set(from_config) | given_dests(parser, argv)
    if args.batch_size < 1 or args.grad_accum < 1 or args.epochs < 0:
        parser.error("batch_size and grad_accum must be >= 1, epochs >= 0")
    if args.hidden_size % args.num_heads:
        parser.error(f"hidden_size {args.hidden_size} is not divisible by num_heads {args.num_heads}")
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite contradict each other (continue the run, or start it again)")
    if not args.image:
        both = sorted(f"--{f.replace('_', '-')}" for f in ("regions", "global_image")
                      if f in given and getattr(args, f))
        if both:
            parser.error(f"--no-image contradicts {' and '.join(both)} (the image views are off with --no-image)")
    try:
        parse_select_by(args.select_by)
    except ValueError as exc:
        parser.error(str(exc))
    for flag, (setting, effective) in EFFECTIVE_ONLY.items():
        value = getattr(args, setting)
        if flag in given and value not in effective:
            under = (f"without --{setting.replace('_', '-')}" if isinstance(value, bool)
                     else f"with --{setting.replace('_', '-')} {value}")
            print(f"warning: --{flag.replace('_', '-')} has no effect {under}", file=sys.stderr)
    args.given = sorted(given)
    return args


SELECT_METRICS = ("mrr", "hits@1", "hits@3", "hits@5", "hits@10", "hits@20")


def parse_select_by(text: str) -> tuple[str, str]:
    """``"candidates:hits@1"`` -> ``("candidates", "hits@1")``."""
    proto, _, metric = str(text).partition(":")
    if proto not in ("full_kb", "candidates") or metric not in SELECT_METRICS:
        raise ValueError(f"--select_by must be PROTOCOL:METRIC with PROTOCOL full_kb or candidates and METRIC one of "
                         f"{', '.join(SELECT_METRICS)}, got {text!r}")
    return proto, metric
