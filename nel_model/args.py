"""Command-line flags of ``nel_model.train`` (and the settings ``nel_model.evaluate`` reloads).

Precedence: argparse defaults < ``--config FILE.yaml`` < explicit CLI flags. The config file is parsed first,
its keys (flag names without dashes, e.g. ``batch_size: 64``) become parser defaults, then the command line is
parsed again. Unknown keys in a config file are an error naming the file and key.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from data_process.core.settings import parse_bool, read_yaml_mapping
from nel_model.metrics import CANDIDATE_RULES, TIE_RULES
from nel_model.nel import SWITCH_CHOICES

# Flags that switch views off (ablations). Each is a boolean "store_true".
VIEW_FLAGS = ("no_sentence", "no_image", "no_regions", "no_global_image", "no_caption", "no_enrichment",
              "no_entity_image", "no_entity_profile")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nel_model.train",
                                description="Train and evaluate the DIM multimodal entity linker on a feature cache.")
    g = p.add_argument_group("paths")
    g.add_argument("--config", type=str, default=None, help="YAML file of flag defaults (CLI flags override it)")
    g.add_argument("--features", type=str, default=None, help="feature folder written by data_process.encode.features")
    g.add_argument("--dataset", type=str, default=None,
                   help="unified dataset folder (gold ids, splits, candidates); default: meta.json 'dataset'")
    g.add_argument("--output_dir", type=str, default=None, help="run folder (see docs/CONTRACTS.md)")
    g.add_argument("--label", type=str, default=None, help="run label stored in config.json/results.json")
    g.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoints/last.pt")
    g.add_argument("--overwrite", action="store_true", help="allow starting fresh in a non-empty run folder")
    g.add_argument("--tensorboard", action="store_true", help="write TensorBoard logs to OUTPUT_DIR/tb/")

    g = p.add_argument_group("model")
    g.add_argument("--hidden_size", type=int, default=512)
    g.add_argument("--output_size", type=int, default=0,
                   help="embedding size (0 = the text feature dim, which keeps the residual zero-shot start)")
    g.add_argument("--ff_size", type=int, default=2048)
    g.add_argument("--num_heads", type=int, default=8)
    g.add_argument("--num_layers", type=int, default=2)
    g.add_argument("--dropout", type=float, default=0.4)
    g.add_argument("--no_residual", action="store_true",
                   help="do not add the raw mention/description features to the outputs (no zero-shot start)")
    for flag, what in [("no_sentence", "sentence tokens"), ("no_image", "mention image (regions and global)"),
                       ("no_regions", "image regions (keep the global image)"),
                       ("no_global_image", "the whole mention image (keep the regions)"),
                       ("no_caption", "the caption profile row"), ("no_enrichment", "the LLM enrichment profile row"),
                       ("no_entity_image", "entity images"), ("no_entity_profile", "entity enrichment")]:
        g.add_argument(f"--{flag}", action="store_true", help=f"ablation: do not use {what}")
    g = p.add_argument_group("model choices where the DIM paper/code differs (docs/DIVERGENCES.md)")
    g.add_argument("--sentence_fusion", choices=SWITCH_CHOICES["sentence_fusion"], default="attention",
                   help="the mention attends over the sentence tokens, or their mean is added to it")
    g.add_argument("--image_fusion", choices=SWITCH_CHOICES["image_fusion"], default="key",
                   help="the whole mention image: an attention key beside the regions, or added to the query")
    g.add_argument("--profile_pool", choices=SWITCH_CHOICES["profile_pool"], default="attention",
                   help="profile rows (enrichment, caption): attended one by one, or max-pooled into one first")
    g.add_argument("--shared_attention", type=parse_bool, default=False,
                   help="one attention module for every view (DIM's code) instead of one per view")
    g.add_argument("--entity_tower", choices=SWITCH_CHOICES["entity_tower"], default="trained",
                   help="trained entity side (description + image + enrichment), or the frozen text feature")
    g.add_argument("--init", choices=SWITCH_CHOICES["init"], default="default",
                   help="initialisation of the linear layers (xavier: DIM's code)")

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
    g.add_argument("--num_negatives", type=int, default=1, help="sampled KB negatives per mention")
    g.add_argument("--negatives", choices=["random", "tfidf"], default="random",
                   help="random KB entities, or DIM's TF-IDF sampling (entities sharing a salient description word)")
    g.add_argument("--hard_negatives", action="store_true",
                   help="draw negatives from each mention's top-ranked wrong entities of the previous epoch")
    g.add_argument("--hard_negative_pool", type=int, default=20, help="top-k wrong entities kept per mention")
    g.add_argument("--hard_negative_ratio", type=float, default=0.5,
                   help="probability that a negative is hard (when --hard_negatives and a ranking exists)")
    g.add_argument("--patience", type=int, default=0,
                   help="stop after N epochs without a gain of the --select_by metric on dev (0 = off)")
    g.add_argument("--select_by", default="full_kb:mrr",
                   help="dev metric that picks the best checkpoint, PROTOCOL:METRIC (DIM: candidates:hits@1); "
                        "a candidates metric falls back to full_kb:mrr, with a warning, when there are no lists")
    g.add_argument("--seed", type=int, default=114514)
    g.add_argument("--deterministic", type=parse_bool, default=True, help="deterministic algorithms where possible")
    g.add_argument("--stop_after_steps", type=int, default=0,
                   help="debug: exit abruptly (no cleanup) once the optimizer step count reaches N (tests a crash)")
    g.add_argument("--stop_after_epochs", type=int, default=0,
                   help="stop (cleanly, without the final test) once this many epochs are complete; "
                        "--resume continues the same schedule")

    g = p.add_argument_group("performance")
    g.add_argument("--device", type=str, default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="mixed precision on CUDA (auto: bf16 where supported, else fp16 + GradScaler)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model: the first epoch compiles (a minute or more on a CPU; the last, "
                        "smaller batch once more), later steps are faster; not yet measured on a GPU")
    g.add_argument("--num_workers", type=int, default=0, help="DataLoader workers (host-memory mode)")
    g.add_argument("--pin_memory", type=parse_bool, default=True, help="pin host batches on CUDA")
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


def load_config_file(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    path = Path(path)
    raw = read_yaml_mapping(path)
    known = {a.dest for a in parser._actions}
    for key in raw:
        if key not in known or key == "config":
            raise ValueError(f"{path}: unknown key {key!r} (keys are flag names, e.g. batch_size)")
    # argparse never checks defaults against ``choices``, and YAML 1.1 reads off/no/yes/on as booleans:
    # ``amp: off`` would arrive as False (and silently mean fp16), ``data_on_device: no`` as False (= auto).
    for action in parser._actions:
        if action.choices is None or action.dest not in raw:
            continue
        value = raw[action.dest]
        if isinstance(value, bool):
            spellings = ("true", "yes", "on") if value else ("false", "no", "off")
            value = next((c for c in action.choices if str(c).lower() in spellings), value)
        if value not in action.choices:
            raise ValueError(f"{path}: {action.dest}: invalid value {raw[action.dest]!r} "
                             f"(choose from {', '.join(map(str, action.choices))})")
        raw[action.dest] = value
    return raw


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**load_config_file(first.config, parser))
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.grad_accum < 1 or args.epochs < 0:
        parser.error("batch_size and grad_accum must be >= 1, epochs >= 0")
    if args.hidden_size % args.num_heads:
        parser.error(f"hidden_size {args.hidden_size} is not divisible by num_heads {args.num_heads}")
    try:
        parse_select_by(args.select_by)
    except ValueError as exc:
        parser.error(str(exc))
    return args


SELECT_METRICS = ("mrr", "hits@1", "hits@3", "hits@5", "hits@10", "hits@20")


def parse_select_by(text: str) -> tuple[str, str]:
    """``"candidates:hits@1"`` -> ``("candidates", "hits@1")``."""
    proto, _, metric = str(text).partition(":")
    if proto not in ("full_kb", "candidates") or metric not in SELECT_METRICS:
        raise ValueError(f"--select_by must be PROTOCOL:METRIC with PROTOCOL full_kb or candidates and METRIC one of "
                         f"{', '.join(SELECT_METRICS)}, got {text!r}")
    return proto, metric
