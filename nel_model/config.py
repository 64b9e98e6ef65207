"""The typed training configuration: one dataclass per section (run, optimiser, evaluation, data, model, loss), from
which every training command's flags are generated and which ``config.json`` serialises.

* **Sections.** :class:`RunConfig` (the run folder and its lifecycle) and :class:`OptimConfig` (optimiser, schedule,
  selection) are shared by every training command (``dim-mel train``, ``dim-mel rerank``) and by every task the
  training engine (:mod:`nel_model.training.engine`) runs; ``eval_batch_size`` is shared too
  (:class:`EvalBatchConfig`). Each command is a :class:`TaskConfig` subclass naming its sections and their defaults:
  :class:`TrainConfig` (the DIM retriever) and :class:`RerankConfig` (the feature re-ranker). A section's defaults are
  the command's one source of defaults: a command run without ``--config`` behaves as its documented config file
  says (``configs/rerank.yaml`` equals :class:`RerankConfig`'s defaults; a test checks), and the model section's
  defaults are the model's own (:class:`DIMModelConfig` reads them from :class:`nel_model.nel.DIMConfig`).
* **Flags** are generated from the fields (:meth:`TaskConfig.build_parser`): one flag per field, spelled with dashes
  (``--batch-size``; the underscore spelling is an alias), booleans with both forms (``--residual`` /
  ``--no-residual``), choices from the field, a ``tuple`` field as a comma-separated list (``--views a,b``; a list
  in YAML). A YAML config's keys are the field names (``batch_size: 64``), checked by
  :func:`data_process.core.settings.load_settings`; precedence: defaults < ``--config FILE`` < explicit flags. A key
  or flag renamed since (``RerankConfig.RENAMED``: the re-ranker's ``hidden`` is now ``hidden_size``) is one error
  line naming the new name.
* **config.json** (:meth:`TaskConfig.record`) holds ``{"format": 2, "task", "config": {section: {field: value}}}`` and,
  beside it, what the run resolved (``label``, ``features``, ``dataset_resolved``, ``model_config``, ...; the task
  says which). :meth:`TaskConfig.from_record` reads it back, and reads the flat ``config.json`` of older runs (every
  flag at the top level) the same way, renamed keys included. ``--resume`` compares the typed configurations
  (:meth:`TaskConfig.check_resume`), not command-line namespaces.
* **The model** knows no flag names: :func:`dim_config` builds :class:`~nel_model.nel.DIMConfig` (resolved values)
  from the model section and the views the feature cache holds; :func:`views_read` lists the feature views a
  configuration's model reads (what ``dim-mel features`` must encode; the ``views`` key names them for the feature
  step, docs/CONTRACTS.md).

Where to add a model: a :class:`TaskConfig` subclass with its sections (reuse :class:`RunConfig` and
:class:`OptimConfig`), one line in :data:`TRAIN_CONFIGS` (``dim-mel train --model NAME``), and its task in
``nel_model.train.TASKS`` (docs/ARCHITECTURE.md, "Where to add").
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, NoReturn, Sequence

from data_process.core.settings import Setting, ToolkitParser, add_bool, load_settings, settings_from_parser
from data_process.encode.feature_store import PROFILE_ROWS
from nel_model.mimic import MISSING_IMAGE_CHOICES, MIMICConfig
from nel_model.nel import SWITCH_CHOICES, DIMConfig
from nel_model.runs import (CANDIDATE_RULES, CONFIG_FILE, METRIC_KEYS, PROTOCOLS, TIE_RULES, RunError,
                            load_config)

FORMAT = 2                       # config.json's format: 2 = typed sections; older runs' files are flat (format 1)


def opt(default: Any, help: str = "", choices: Sequence[Any] | None = None,
        effective: tuple[str, tuple[Any, ...]] | None = None) -> Any:
    """A setting: its default, its help, its allowed values and (``effective``) the setting and values under which
    it has an effect (given under others, it is a warning naming it)."""
    return field(default=default, metadata={"help": help, "choices": tuple(choices) if choices else None,
                                            "effective": effective})


def _section(factory: Callable[[], Any]) -> Any:
    return field(default_factory=factory)


# ---------------------------------------------------------------------------------------------
# Sections every training command shares


@dataclass
class RunConfig:
    """The run folder and its lifecycle (the training engine's)."""

    config: str | None = opt(None, "YAML file of flag defaults (CLI flags override it)")
    output_dir: str | None = opt(None, "run folder (see docs/CONTRACTS.md)")
    label: str | None = opt(None, "run label stored in config.json/results.json (default: the folder's name)")
    resume: bool = opt(False, "continue from OUTPUT_DIR/checkpoints/last.pt")
    overwrite: bool = opt(False, "allow starting fresh in a run folder that has checkpoints")
    force: bool = opt(False, "with --resume: continue although settings other than the stopping ones differ from "
                             "the run's config.json")
    tensorboard: bool = opt(False, "write TensorBoard logs to OUTPUT_DIR/tb/")
    seed: int = opt(114514)
    deterministic: bool = opt(True, "deterministic algorithms where possible")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    threads: int = opt(0, "torch CPU threads (0 = torch default)")
    stop_after_epochs: int = opt(0, "stop (cleanly, without the final test) once this many epochs are complete; "
                                    "--resume continues the same schedule")
    stop_after_steps: int = opt(0, "debug: exit abruptly (no cleanup) once the optimizer step count reaches N "
                                   "(tests a crash)")


@dataclass
class OptimConfig:
    """The optimiser (AdamW, linear warm-up and decay), the schedule, early stopping and model selection."""

    epochs: int = opt(300)
    batch_size: int = opt(64, "global batch per micro-step (split evenly over DDP processes)")
    grad_accum: int = opt(1, "micro-steps per optimizer step")
    lr: float = opt(5e-5)
    weight_decay: float = opt(0.001)
    warmup_steps: int = opt(100)
    max_grad_norm: float = opt(1.0, "gradient clipping (0 = off)")
    patience: int = opt(0, "stop after N epochs without a gain of the --select-by metric on dev (0 = off)")
    select_by: str = opt("full_kb:mrr", "dev metric that picks the best checkpoint, PROTOCOL:METRIC (DIM: "
                                        "candidates:hits@1); a candidates metric falls back to full_kb:mrr, with a "
                                        "warning, when there are no lists")
    amp: str = opt("auto", "mixed precision on CUDA (auto: bf16 where supported, else fp16 + GradScaler)",
                   ("auto", "bf16", "fp16", "off"))
    compile: bool = opt(False, "torch.compile the model: the first epoch compiles (a minute or more on a CPU; the "
                               "last, smaller batch once more), later steps are faster; not yet measured on a GPU")


@dataclass
class EvalBatchConfig:
    """The evaluation's batch (every task evaluates dev after every epoch)."""

    eval_batch_size: int = opt(512, "mentions per scoring chunk")


# ---------------------------------------------------------------------------------------------
# The DIM retriever (dim-mel train)

# The views a run may switch off (ablations): each a boolean, on by default (--no-image etc.).
VIEW_FLAGS: dict[str, str] = {
    "sentence": "sentence tokens", "image": "the mention image (regions and global)",
    "regions": "image regions (with --no-regions the global image is kept)",
    "global_image": "the whole mention image (with --no-global-image the regions are kept)",
    "caption": "the caption profile row", "enrichment": "the LLM enrichment profile row",
    "entity_image": "entity images", "entity_profile": "entity enrichment",
}
# the feature views (SIDE.VIEW, as the feature cache names them) a DIM model may read
FEATURE_VIEWS = ("mention.mention", "mention.sentence", "mention.context", "mention.image", "mention.regions",
                 "mention.profile", "entity.desc", "entity.image", "entity.profile")
# every view of the feature cache, in its order: also those written only when asked (MIMIC's entity tokens and
# regions; data_process.encode.features.ASKED_VIEWS)
CACHE_VIEWS = (*FEATURE_VIEWS, "entity.desc_tokens", "entity.regions")
_DIM_DEFAULTS = {f.name: f.default for f in fields(DIMConfig) if f.default is not MISSING}


def _model(name: str, help: str = "", **kw: Any) -> Any:
    """A model setting whose default is the model's own (:class:`~nel_model.nel.DIMConfig`): one default."""
    return opt(_DIM_DEFAULTS[name], help, SWITCH_CHOICES.get(name), **kw)


@dataclass
class EvalConfig(EvalBatchConfig):
    """Scoring and the evaluation protocol (recorded in results.json)."""

    entity_chunk: int = opt(8192, "entities per encoding/scoring chunk")
    eval_dtype: str = opt("auto", "scoring precision (auto = float32); float16/bfloat16 are faster on GPUs and give "
                                  "the same ranks (near-ties are re-checked in float32)",
                          ("auto", "float32", "float16", "bfloat16"))
    tie_rule: str = opt("pessimistic", "how ties count (results.json holds all three): pessimistic, strict (DIM), "
                                       "mean", TIE_RULES)
    candidate_rule: str = opt("dim", "dim: the gold is ranked against its candidate list whether or not the list "
                                     "holds it; in_list: a gold missing from its list is a miss", CANDIDATE_RULES)


@dataclass
class FeaturesConfig:
    """The feature cache and how batches are read from it."""

    features: str | None = opt(None, "feature folder written by data_process.encode.features")
    dataset: str | None = opt(None, "unified dataset folder (gold ids, splits, candidates); default: meta.json "
                                    "'dataset'")
    views: tuple[str, ...] = opt((), "the feature views this configuration's model may read, SIDE.VIEW comma-"
                                     "separated (a list in YAML; default: every view); dim-mel features --config "
                                     "encodes these (docs/CONTRACTS.md)")
    num_workers: int = opt(0, "DataLoader workers (host-memory mode)")
    pin_memory: bool = opt(True, "pin host batches on CUDA")
    data_on_device: str = opt("auto", "keep all features on the device (GPU memory, or RAM on a CPU) when they fit "
                                      "(auto), always, or never (read batches from the memory-mapped cache)",
                              ("auto", "yes", "no"))


@dataclass
class DIMModelConfig:
    """DIM's settings (the model's own defaults); :func:`dim_config` resolves them against a feature cache."""

    hidden_size: int = _model("hidden_size", "hidden size (0 = the text feature size)")
    output_size: int = _model("output_size", "embedding size (0 = the text feature dim, which keeps the residual "
                                             "zero-shot start)")
    ff_size: int = _model("ff_size")
    num_heads: int = _model("num_heads")
    num_layers: int = _model("num_layers")
    dropout: float = _model("dropout")
    residual: bool = _model("residual", "add the raw mention/description features to the outputs (the zero-shot "
                                        "start; needs output_size = the text feature size)")
    residual_base: str = _model("residual_base", "what the residual start adds to the query: the mention phrase's "
                                "feature, the pooled 'mention (sentence)' feature (view mention.context), or a "
                                "learned mix of both that starts at the context (caches without the context view: "
                                "the mention)", effective=("residual", (True,)))
    sentence: bool = opt(True, f"use {VIEW_FLAGS['sentence']} (--no-sentence: an ablation)")
    image: bool = opt(True, f"use {VIEW_FLAGS['image']} (--no-image: an ablation)")
    regions: bool = opt(True, f"use {VIEW_FLAGS['regions']} (--no-regions: an ablation)")
    global_image: bool = opt(True, f"use {VIEW_FLAGS['global_image']} (--no-global-image: an ablation)")
    caption: bool = opt(True, f"use {VIEW_FLAGS['caption']} (--no-caption: an ablation)")
    enrichment: bool = opt(True, f"use {VIEW_FLAGS['enrichment']} (--no-enrichment: an ablation)")
    entity_image: bool = opt(True, f"use {VIEW_FLAGS['entity_image']} (--no-entity-image: an ablation)")
    entity_profile: bool = opt(True, f"use {VIEW_FLAGS['entity_profile']} (--no-entity-profile: an ablation)")
    # where the DIM paper/code differs (docs/DIVERGENCES.md)
    sentence_fusion: str = _model("sentence_fusion", "the mention attends over the sentence tokens, their mean is "
                                  "added to it (add), or the pooled feature of 'mention (sentence)' is added (pooled: "
                                  "DIM's code)")
    image_fusion: str = _model("image_fusion", "the whole mention image: an attention key beside the regions, or "
                                               "added to the query")
    profile_pool: str = _model("profile_pool", "profile rows (enrichment, caption): attended one by one, or "
                                               "max-pooled into one first")
    shared_attention: bool = _model("shared_attention", "one attention module for every view (DIM's code) instead "
                                                        "of one per view")
    entity_tower: str = _model("entity_tower", "trained entity side (description + image + enrichment), or the "
                                               "frozen text feature")
    init: str = _model("init", "initialisation of the linear layers (xavier: DIM's code)")
    query_input: str = _model("query_input", "the query from projected views (ours), or one linear map of the sum "
                                             "of the RAW features (raw: DIM's code; needs --hidden-size 0 and no "
                                             "attention)")
    caption_constant: bool = _model("caption_constant", "with --query-input raw: add the projected caption to every "
                                    "query, LayerNorm(ReLU(b)) where a mention has none (DIM's code)",
                                    effective=("query_input", ("raw",)))


@dataclass
class LossConfig:
    """The training objective and its negatives."""

    loss: str = opt("triplet", "triplet on cosines, InfoNCE over the batch, or DIM's N-pair loss on raw dot products",
                    ("triplet", "infonce", "npair"))
    margin: float = opt(0.5, "triplet margin (cosine)", effective=("loss", ("triplet",)))
    temperature: float = opt(0.05, "InfoNCE temperature", effective=("loss", ("infonce",)))
    npair_l2: float = opt(0.02, "N-pair loss: weight of |q|^2 + |e+|^2", effective=("loss", ("npair",)))
    npair_negatives: str = opt("own", "N-pair loss: each mention's own negatives, or every negative of the batch "
                                      "(batch: what DIM's code computes through a broadcast)", ("own", "batch"),
                               effective=("loss", ("npair",)))
    num_negatives: int = opt(1, "sampled KB negatives per mention")
    negatives: str = opt("random", "random KB entities, or DIM's TF-IDF sampling (entities sharing a salient "
                                   "description word)", ("random", "tfidf"))
    hard_negatives: bool = opt(False, "draw negatives from each mention's top-ranked wrong entities of the previous "
                                      "epoch")
    hard_negative_pool: int = opt(20, "top-k wrong entities kept per mention", effective=("hard_negatives", (True,)))
    hard_negative_ratio: float = opt(0.5, "probability that a negative is hard (when --hard-negatives and a ranking "
                                          "exists)", effective=("hard_negatives", (True,)))


def parse_select_by(text: str) -> tuple[str, str]:
    """``"candidates:hits@1"`` -> ``("candidates", "hits@1")``."""
    proto, _, metric = str(text).partition(":")
    if proto not in PROTOCOLS or metric not in METRIC_KEYS:
        raise ValueError(f"--select_by must be PROTOCOL:METRIC with PROTOCOL full_kb or candidates and METRIC one of "
                         f"{', '.join(METRIC_KEYS)}, got {text!r}")
    return proto, metric


# Settings a resumed run may change: how far it runs, how fast and where it writes, never what it computes.
RESUME_MAY_CHANGE = frozenset({"epochs", "stop_after_epochs", "stop_after_steps", "resume", "overwrite", "force",
                               "tensorboard", "threads", "num_workers", "pin_memory", "device", "data_on_device",
                               "compile", "config", "output_dir", "label"})


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in str(text).split(",") if x.strip())


def _kind(tp: Any) -> tuple[type, bool]:
    """(bool | int | float | str | tuple, nullable) of a field's annotation."""
    args = typing.get_args(tp)
    if type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return _kind(inner)[0], True
    return (typing.get_origin(tp) or tp), False


@dataclass
class TaskConfig:
    """A training command's configuration: its sections (dataclass fields) and what a task adds to them. Subclasses
    set ``TASK`` (config.json's "task"), ``PROG``/``DESCRIPTION`` (the parser) and ``RENAMED`` (old key -> new)."""

    TASK: ClassVar[str] = ""
    PROG: ClassVar[str] = ""
    DESCRIPTION: ClassVar[str] = ""
    RENAMED: ClassVar[dict[str, str]] = {}
    PATHS: ClassVar[tuple[str, ...]] = ()      # settings that are folders: recorded and compared resolved

    run: RunConfig = _section(RunConfig)
    optim: OptimConfig = _section(OptimConfig)
    # the settings the config file or the command line gave (the others are defaults); not recorded
    given: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    # -- the sections ----------------------------------------------------------------------------
    @classmethod
    def section_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name != "given")

    def sections(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.section_names()}

    @classmethod
    def settings(cls) -> dict[str, tuple[str, Any, Any]]:
        """``{setting: (section, dataclasses.Field, annotation)}`` of every setting (names are unique across
        sections)."""
        out: dict[str, tuple[str, Any, Any]] = {}
        for name, section in cls().sections().items():
            hints = typing.get_type_hints(type(section))
            for f in fields(section):
                if f.name in out:
                    raise TypeError(f"{cls.__name__}: setting {f.name!r} is in two sections")
                out[f.name] = (name, f, hints[f.name])
        return out

    def flat(self) -> dict[str, Any]:
        """``{setting: value}`` over every section."""
        return {k: v for section in self.sections().values() for k, v in asdict(section).items()}

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> "TaskConfig":
        """The configuration of ``{setting: value}`` (settings not given keep the command's defaults)."""
        default = cls()
        built = {}
        for name, section in default.sections().items():
            hints = typing.get_type_hints(type(section))
            kw = {}
            for f in fields(section):
                v = values.get(f.name, getattr(section, f.name))
                if _kind(hints[f.name])[0] is tuple and v is not None:
                    v = tuple(v)
                kw[f.name] = v
            built[name] = type(section)(**kw)
        return cls(**built)

    # -- flags ------------------------------------------------------------------------------------
    @classmethod
    def build_parser(cls) -> ToolkitParser:
        p = ToolkitParser(prog=cls.PROG, description=cls.DESCRIPTION)
        for name, section in cls().sections().items():
            g = p.add_argument_group(f"{name}: {(type(section).__doc__ or '').strip().splitlines()[0]}")
            hints = typing.get_type_hints(type(section))
            for f in fields(section):
                kind, _ = _kind(hints[f.name])
                default, meta = getattr(section, f.name), f.metadata
                if kind is bool:
                    add_bool(g, f.name, default, meta["help"] or None)
                elif kind is tuple:
                    action = g.add_argument(f"--{f.name}", type=_comma_list, default=default, help=meta["help"])
                    action.setting_kind = list         # a list in a YAML config (settings_from_parser)
                else:
                    g.add_argument(f"--{f.name}", type=kind, default=default, choices=meta["choices"],
                                   help=meta["help"] or None)
        return p

    @classmethod
    def parse(cls, argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None
              ) -> "TaskConfig":
        """The configuration of a command line (config file, then flags), checked as a whole (:meth:`check`)."""
        parser = parser or cls.build_parser()
        argv = list(sys.argv[1:] if argv is None else argv)
        for a in argv:
            old = a.split("=", 1)[0][2:].replace("-", "_") if a.startswith("--") else None
            if old in cls.RENAMED:
                parser.error(f"--{old.replace('_', '-')} is now --{cls.RENAMED[old].replace('_', '-')}")
        first, _ = parser.parse_known_args(argv)
        from_config: dict[str, Any] = {}
        if first.config:
            from_config = load_settings(first.config, settings_from_parser(parser), renamed=cls.RENAMED)
            parser.set_defaults(**{k: tuple(v) if isinstance(v, list) else v for k, v in from_config.items()})
        ns = parser.parse_args(argv)
        values = {k: v for k, v in vars(ns).items() if k != "model"}
        values.update({k: str(Path(values[k]).resolve()) for k in cls.PATHS if values.get(k)})
        cfg = cls.from_flat(values)
        cfg.given = frozenset(from_config) | _given_dests(parser, argv)
        cfg.check(parser.error)
        cfg.warn_ineffective()
        return cfg

    def check(self, error: Callable[[str], NoReturn]) -> None:
        """Settings that contradict one another or are out of range: ``error(message)``."""
        r, o = self.run, self.optim
        if o.batch_size < 1 or o.grad_accum < 1 or o.epochs < 0:
            error("batch_size and grad_accum must be >= 1, epochs >= 0")
        if r.resume and r.overwrite:
            error("--resume and --overwrite contradict each other (continue the run, or start it again)")
        try:
            parse_select_by(o.select_by)
        except ValueError as exc:
            error(str(exc))

    def warn_ineffective(self) -> None:
        """A setting given where another setting makes it idle is a warning naming it."""
        flat, spec = self.flat(), self.settings()
        for name, (_, f, _) in spec.items():
            eff = f.metadata.get("effective")
            if eff is None or name not in self.given:
                continue
            setting, values = eff
            value = flat[setting]
            if value not in values:
                dashed = setting.replace("_", "-")
                under = f"without --{dashed}" if isinstance(value, bool) else f"with --{dashed} {value}"
                print(f"warning: --{name.replace('_', '-')} has no effect {under}", file=sys.stderr)

    # -- config.json ------------------------------------------------------------------------------
    def to_json(self) -> dict[str, dict[str, Any]]:
        return json.loads(json.dumps({name: asdict(s) for name, s in self.sections().items()}))

    def record(self, resolved: Mapping[str, Any]) -> dict[str, Any]:
        """What ``config.json`` holds: the format, the task, what the run ``resolved`` and the configuration."""
        return {"format": FORMAT, "task": self.TASK, **resolved, "config": self.to_json()}

    @classmethod
    def from_record(cls, conf: Mapping[str, Any], where: str | Path = CONFIG_FILE) -> "TaskConfig":
        """The configuration a ``config.json`` records: format 2, or the flat file of older runs (every flag at the
        top level; renamed keys read under their new names)."""
        if conf.get("format") == FORMAT:
            if conf.get("task") != cls.TASK:
                raise RunError(f"{where}: a {conf.get('task')!r} run, not one of {cls.PROG} ({cls.TASK!r})")
            return cls.from_flat({k: v for section in conf["config"].values() for k, v in section.items()})
        return cls.from_flat(cls.migrate_flat(conf))

    @classmethod
    def migrate_flat(cls, conf: Mapping[str, Any]) -> dict[str, Any]:
        """An older run's flat ``config.json`` as settings (renamed keys under their new names)."""
        flat = {cls.RENAMED.get(k, k): v for k, v in conf.items()}
        if isinstance(flat.get("data_on_device"), bool):          # it recorded the resolved choice
            flat["data_on_device"] = "yes" if flat["data_on_device"] else "no"
        return flat

    def check_resume(self, run_dir: str | Path, force: bool = False) -> None:
        """``--resume`` continues a run only with its own configuration: a difference in anything but
        :data:`RESUME_MAY_CHANGE` (``epochs`` may grow) is a :class:`RunError` naming the settings, unless
        ``force``."""
        run_dir = Path(run_dir)
        old_conf = load_config(run_dir, required=False)
        if not old_conf or force:
            return
        old, new = type(self).from_record(old_conf, run_dir / CONFIG_FILE).to_flat_json(), self.to_flat_json()
        differ = [k for k in sorted(new) if k not in RESUME_MAY_CHANGE and old.get(k) != new.get(k)]
        if new["epochs"] < old["epochs"]:
            differ.insert(0, "epochs")
        if differ:
            shown = ", ".join(f"--{k.replace('_', '-')} {new.get(k)!r} (the run's: {old.get(k)!r})" for k in differ)
            raise RunError(f"{run_dir / CONFIG_FILE}: --resume with a configuration other than the run's: {shown}; "
                           "resume with the run's flags (only the stopping flags may change, and --epochs may grow), "
                           "or pass --force to continue with the new ones (config.json then records them)")

    def to_flat_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.flat()))


def _given_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> frozenset[str]:
    """The settings the command line sets explicitly (argparse leaves a pre-set attribute alone when the flag is
    absent, so a sentinel tells given from default)."""
    sentinel = object()
    ns = argparse.Namespace(**{a.dest: sentinel for a in parser._actions if a.dest != argparse.SUPPRESS})
    ns, _ = parser.parse_known_args(argv, namespace=ns)
    return frozenset(k for k, v in vars(ns).items() if v is not sentinel)


@dataclass
class TrainConfig(TaskConfig):
    """``dim-mel train``: the DIM bi-encoder (the retriever)."""

    TASK: ClassVar[str] = "dim"
    PROG: ClassVar[str] = "dim-mel train"
    DESCRIPTION: ClassVar[str] = "Train and evaluate the DIM multimodal entity linker on a feature cache."
    PATHS: ClassVar[tuple[str, ...]] = ("features",)

    data: FeaturesConfig = _section(FeaturesConfig)
    model: DIMModelConfig = _section(DIMModelConfig)
    loss: LossConfig = _section(LossConfig)
    eval: EvalConfig = _section(EvalConfig)

    def check(self, error: Callable[[str], NoReturn]) -> None:
        super().check(error)
        m = self.model
        if m.hidden_size % m.num_heads:
            error(f"hidden_size {m.hidden_size} is not divisible by num_heads {m.num_heads}")
        if not m.image:
            both = sorted(f"--{f.replace('_', '-')}" for f in ("regions", "global_image")
                          if f in self.given and getattr(m, f))
            if both:
                error(f"--no-image contradicts {' and '.join(both)} (the image views are off with --no-image)")
        _check_views(self, error)


def _check_views(cfg: "TrainConfig | MIMICTrainConfig", error: Callable[[str], NoReturn]) -> None:
    """A ``views`` list names views of the cache, and a warning names those the model reads that it leaves out."""
    if not cfg.data.views:
        return
    known = FEATURE_VIEWS if isinstance(cfg, TrainConfig) else CACHE_VIEWS
    unknown = [v for v in cfg.data.views if v not in known]
    if unknown:
        error(f"--views: unknown view {unknown[0]!r} (views: {', '.join(known)})")
    left_out = [v for v in views_read(cfg) if v not in cfg.data.views]
    if left_out:       # a flag over a config's list (--residual over dim_paper.yaml): the cache may lack it
        print(f"warning: --views leaves out {', '.join(left_out)}, which this model reads (the feature step "
              "encodes only the views listed; add them, or switch their use off)", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# The feature re-ranker (dim-mel rerank)

@dataclass
class RetrieverListsConfig:
    """The retriever run and its lists (dim-mel retrieve) the re-ranker learns from."""

    retriever: str | None = opt(None, "retriever run folder with retrieval/ lists")
    retriever_checkpoint: str = opt("best", "the retriever's checkpoint", ("best", "last"))
    top_k: int = opt(0, "entries of each list to re-rank (0: the lists' K)")


@dataclass
class RerankModelConfig:
    """The feature re-ranker (nel_model.rerank.feature; its RerankerConfig holds the resolved values)."""

    hidden_size: int = opt(128, "width of the pair MLP and of the attention across candidates")
    proj: int = opt(64, "width of the token interactions and of the retriever-embedding feature")
    num_heads: int = opt(4, "attention heads across the K candidates")
    num_layers: int = opt(1, "transformer layers across the K candidates")
    dropout: float = opt(0.1)
    score_temperature: float = opt(0.05, "the retriever's score enters as score / T")
    lexical: bool = opt(True, "string features of mention vs entity name, sentence vs description")
    token_attention: bool = opt(True, "the description attends over sentence tokens (and regions)")
    retriever_embeddings: bool = opt(True, "the retriever's q * e as a feature")
    cross_candidates: bool = opt(True, "attention across the K candidates")
    sentence: bool = opt(True, "use the sentence view when the cache has it")
    profile: bool = opt(True, "use the profile view when the cache has it")
    image: bool = opt(True, "use the image view when the cache has it")
    regions: bool = opt(True, "use the regions view when the cache has it")
    entity_image: bool = opt(True, "use the entity image view when the cache has it")
    entity_profile: bool = opt(True, "use the entity profile view when the cache has it")

    def reranker_settings(self) -> dict[str, Any]:
        """The keyword arguments of ``FeatureReranker.config_for`` (the re-ranker model's own field names)."""
        a = asdict(self)
        return {**{k: a[k] for k in ("proj", "dropout", "lexical", "token_attention", "retriever_embeddings",
                                     "cross_candidates", "sentence", "profile", "image", "regions", "entity_image",
                                     "entity_profile")},
                "hidden": self.hidden_size, "heads": self.num_heads, "layers": self.num_layers,
                "temperature": self.score_temperature}


@dataclass
class RerankConfig(TaskConfig):
    """``dim-mel rerank``: the feature re-ranker on a retriever's lists. Its defaults are ``configs/rerank.yaml``'s."""

    TASK: ClassVar[str] = "feature_reranker"
    PROG: ClassVar[str] = "dim-mel rerank"
    DESCRIPTION: ClassVar[str] = ("Train the feature re-ranker on a retriever run's train lists (dim-mel retrieve), "
                                  "select it on dev, evaluate dev and test as a two-stage run.")
    # the re-ranker's flags before they took train's names for the same concepts
    RENAMED: ClassVar[dict[str, str]] = {"hidden": "hidden_size", "heads": "num_heads", "layers": "num_layers",
                                         "temperature": "score_temperature"}
    PATHS: ClassVar[tuple[str, ...]] = ("retriever",)

    run: RunConfig = _section(lambda: RunConfig(seed=1, device="cpu"))     # CPU-sized (docs/RERANK.md)
    optim: OptimConfig = _section(lambda: OptimConfig(epochs=6, lr=1e-3, weight_decay=0.01, warmup_steps=50,
                                                      patience=2))
    data: RetrieverListsConfig = _section(RetrieverListsConfig)
    model: RerankModelConfig = _section(RerankModelConfig)
    eval: EvalBatchConfig = _section(lambda: EvalBatchConfig(eval_batch_size=256))

    def check(self, error: Callable[[str], NoReturn]) -> None:
        super().check(error)
        if not self.data.retriever or not self.run.output_dir:
            error("--retriever and --output-dir are required")
        if self.data.top_k < 0:
            error("--top-k must be >= 0")
        if self.model.hidden_size % self.model.num_heads:
            error(f"--hidden-size {self.model.hidden_size} is not divisible by --num-heads {self.model.num_heads}")

    @classmethod
    def migrate_flat(cls, conf: Mapping[str, Any]) -> dict[str, Any]:
        flat = super().migrate_flat(conf)
        if conf.get("retriever_resolved"):       # the resolved folder, as this version records it
            flat["retriever"] = conf["retriever_resolved"]
        return flat


# ---------------------------------------------------------------------------------------------
# MIMIC (dim-mel train --model mimic): defaults = the official config/wikimel.yaml = configs/mimic.yaml

DEV_PROTOCOLS = ("full_kb", "candidates", "subset")
_MIMIC_DEFAULTS = {f.name: f.default for f in fields(MIMICConfig) if f.default is not MISSING}


def _mimic(name: str, help: str = "", choices: Sequence[Any] | None = None) -> Any:
    """A MIMIC model setting whose default is the model's own (:class:`~nel_model.mimic.MIMICConfig`)."""
    return opt(_MIMIC_DEFAULTS[name], help, choices)


@dataclass
class MIMICDataConfig:
    """The feature cache (it must hold the views MIMIC reads: docs/MIMIC.md)."""

    features: str | None = opt(None, "feature folder written by data_process.encode.features (with the views "
                                     "configs/mimic.yaml lists: entity.desc_tokens, entity.regions)")
    dataset: str | None = opt(None, "unified dataset folder (gold ids, splits, candidates); default: meta.json "
                                    "'dataset'")
    views: tuple[str, ...] = opt((), "the feature views this configuration's model reads, SIDE.VIEW comma-separated "
                                     "(a list in YAML); dim-mel features --config encodes these")


@dataclass
class MIMICModelConfig:
    """MIMIC's matcher (nel_model.mimic.MIMICConfig; docs/MIMIC.md, docs/DIVERGENCES.md M1-M12)."""

    hidden: int = _mimic("hidden", "the units' hidden size (official TGLU/IDLU/CMFU_hidden_dim)")
    dv: int = _mimic("dv", "image features are mapped to this size before the units (official dv)")
    dropout: float = _mimic("dropout", "on the normalised inputs (the official code has none)")
    use_text_unit: bool = _mimic("use_text_unit", "the text-based global-local unit (TGLU)")
    use_image_unit: bool = _mimic("use_image_unit", "the vision-based dual-gated local unit (VDLU; reads images)")
    use_fusion_unit: bool = _mimic("use_fusion_unit", "the cross-modal fusion unit (CMFU; reads images)")
    text_len: int = _mimic("text_len", "token positions read of the token views (official text_max_length)")
    global_image_token: bool = _mimic("global_image_token", "the pooled image is the first image token (CLIP's "
                                                            "class token, as the official code)")
    mask_padding: bool = _mimic("mask_padding", "padded token positions take no part (false: they do, as the "
                                                "official code; docs/DIVERGENCES.md M6)")
    missing_image: str = _mimic("missing_image", "a missing image: masked, or fed as its cached (zero) row like the "
                                                 "official code's blank image (M7)", MISSING_IMAGE_CHOICES)


@dataclass
class MIMICLossConfig:
    """The official loss: CE(overall) + CE(text) + CE(image) + CE(fusion), in-batch (losses.mimic_loss_sum)."""

    mask_gold_copies: bool = opt(False, "mask another copy of a mention's gold in the batch (the official code counts "
                                        "it as a negative)")


@dataclass
class MIMICOptimConfig(OptimConfig):
    """AdamW as the official code configures it (lightning_mimic.py), the schedule, early stopping and selection."""

    adam_eps: float = opt(1e-4, "AdamW epsilon (the official 1e-4; the engine's default optimiser: 1e-8)")
    decay_norm_weights: bool = opt(True, "weight decay on every parameter but biases, layer-norm weights included "
                                         "(the official code); false: on matrices only (the engine's rule)")
    lr_schedule: str = opt("constant", "constant learning rate (the official code) or the engine's linear warm-up "
                                       "and decay", ("constant", "linear"))


@dataclass
class MIMICEvalConfig(EvalConfig):
    """Pairwise scoring in chunks bounded in memory, the dev protocol the checkpoint is selected on, the tie and
    candidate rules."""

    pair_memory_mb: int = opt(1024, "bound on the memory of one pairwise scoring call (nel_model.mimic.pair_bytes): "
                                    "the mention and entity chunks shrink to fit it")
    dev_protocol: str = opt("full_kb", "what dev is evaluated on after each epoch: every dev mention against the "
                                       "whole KB (the official selection; minutes per epoch on a CPU for WikiMEL), "
                                       "the candidate lists only (seconds), or a fixed subset of --dev-subset dev "
                                       "mentions against the whole KB plus every list", DEV_PROTOCOLS)
    dev_subset: int = opt(1000, "dev mentions of --dev-protocol subset (a fixed sample, the same for every seed)",
                          effective=("dev_protocol", ("subset",)))


def _mimic_optim() -> MIMICOptimConfig:
    return MIMICOptimConfig(epochs=20, batch_size=128, lr=1e-5, weight_decay=1e-4, warmup_steps=0,
                            max_grad_norm=0.0, patience=6)


@dataclass
class MIMICTrainConfig(TaskConfig):
    """``dim-mel train --model mimic``: MIMIC (Luo et al., KDD 2023) on a feature cache, trained by the engine. Its
    defaults are the official ``config/wikimel.yaml`` (``configs/mimic.yaml`` writes them out)."""

    TASK: ClassVar[str] = "mimic"
    PROG: ClassVar[str] = "dim-mel train --model mimic"
    DESCRIPTION: ClassVar[str] = ("Train and evaluate MIMIC (a pairwise matcher of token interactions) on a feature "
                                  "cache: docs/MIMIC.md.")
    PATHS: ClassVar[tuple[str, ...]] = ("features",)

    run: RunConfig = _section(lambda: RunConfig(seed=43, threads=1))
    optim: MIMICOptimConfig = _section(_mimic_optim)
    data: MIMICDataConfig = _section(MIMICDataConfig)
    model: MIMICModelConfig = _section(MIMICModelConfig)
    loss: MIMICLossConfig = _section(MIMICLossConfig)
    eval: MIMICEvalConfig = _section(lambda: MIMICEvalConfig(eval_batch_size=20, entity_chunk=6000))

    def check(self, error: Callable[[str], NoReturn]) -> None:
        super().check(error)
        e = self.eval
        if e.eval_dtype not in ("auto", "float32"):
            error(f"--eval-dtype {e.eval_dtype}: a pairwise model scores in float32 (auto)")
        if e.pair_memory_mb < 1 or e.dev_subset < 1 or e.entity_chunk < 1 or e.eval_batch_size < 1:
            error("--pair-memory-mb, --dev-subset, --entity-chunk and --eval-batch-size must be at least 1")
        select = parse_select_by(self.optim.select_by)[0]
        if e.dev_protocol == "candidates" and select != "candidates":
            error(f"--dev-protocol candidates evaluates dev on the candidate lists only: select on them too "
                  f"(--select-by candidates:mrr, not {self.optim.select_by})")
        try:
            mimic_config(self.model, _FullCache(text_dim=1, image_dim=1))
        except ValueError as exc:
            error(str(exc))
        _check_views(self, error)


# dim-mel train --model NAME: the configuration of each model (its task: nel_model.train.TASKS)
TRAIN_CONFIGS: dict[str, type[TaskConfig]] = {"dim": TrainConfig, "mimic": MIMICTrainConfig}


def parse_train_args(argv: Sequence[str] | None = None) -> TaskConfig:
    """``dim-mel train``'s configuration: ``--model`` (or the config file's ``model:``) picks the model's
    configuration class, whose flags the rest of the command line sets."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = ToolkitParser(add_help=False)
    pre.add_argument("--model", choices=tuple(TRAIN_CONFIGS), default=None)
    pre.add_argument("--config", default=None)
    first, _ = pre.parse_known_args(argv)
    name = first.model
    if name is None and first.config:
        name = load_settings(first.config, {"model": Setting(str, tuple(TRAIN_CONFIGS))},
                             ignore_unknown=True).get("model")
    cls = TRAIN_CONFIGS[name or "dim"]
    parser = cls.build_parser()
    parser.add_argument("--model", choices=tuple(TRAIN_CONFIGS), default=cls.TASK,
                        help="the model to train (its flags follow from it)")
    return cls.parse(argv, parser)


def train_config_of(conf: Mapping[str, Any], where: str | Path = CONFIG_FILE) -> TaskConfig:
    """The configuration of a run's ``config.json`` (either format) for its task."""
    task = conf.get("task", "dim") if conf.get("format") == FORMAT else (
        RerankConfig.TASK if "retriever_resolved" in conf else "dim")
    classes = {**{c.TASK: c for c in TRAIN_CONFIGS.values()}, RerankConfig.TASK: RerankConfig}
    if task not in classes:
        raise RunError(f"{where}: unknown task {task!r}")
    return classes[task].from_record(conf, where)


def eval_settings_of(conf: TaskConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The evaluation section (``eval_batch_size``, ``entity_chunk``, ``eval_dtype``, ``tie_rule``,
    ``candidate_rule``) of a configuration or of a run's ``config.json`` (either format; settings an older run did
    not record take today's defaults)."""
    cfg = conf if isinstance(conf, TaskConfig) else train_config_of(conf)
    section = cfg.eval
    return {**asdict(EvalConfig()), **asdict(section)}


# ---------------------------------------------------------------------------------------------
# The model's configuration from the typed one (the model file knows no flag names)


def dim_config(m: DIMModelConfig, data: Any) -> DIMConfig:
    """:class:`~nel_model.nel.DIMConfig` (resolved values) of the model settings ``m`` on a feature cache ``data``
    (anything with ``mention_views``, ``entity_views``, ``profile_rows``, ``text_dim`` and ``image_dim``, e.g. a
    :class:`nel_model.data.MELData`): a view the cache lacks is off; the residual base falls back to the mention
    where the cache has no context view."""
    mv, ev = set(data.mention_views), set(data.entity_views)
    rows = tuple(data.profile_rows)
    on = {"enrichment": m.enrichment, "caption": m.caption}
    use = tuple(on.get(r, True) for r in rows)
    has_img_dim = data.image_dim > 0
    residual_base = m.residual_base if m.sentence and "context" in mv else "mention"
    return DIMConfig(
        text_dim=data.text_dim, image_dim=data.image_dim, hidden_size=m.hidden_size, output_size=m.output_size,
        ff_size=m.ff_size, num_heads=m.num_heads, num_layers=m.num_layers, dropout=m.dropout, residual=m.residual,
        use_sentence=m.sentence and "sentence" in mv,
        use_image=m.image and m.global_image and "image" in mv and has_img_dim,
        use_regions=m.image and m.regions and "regions" in mv and has_img_dim,
        profile_rows=rows, profile_use=use if "profile" in mv else tuple(False for _ in rows),
        use_entity_image=m.entity_image and "image" in ev and has_img_dim,
        use_entity_profile=m.entity_profile and "profile" in ev,
        sentence_fusion=m.sentence_fusion, image_fusion=m.image_fusion, profile_pool=m.profile_pool,
        shared_attention=m.shared_attention, entity_tower=m.entity_tower, init=m.init,
        query_input=m.query_input, caption_constant=m.caption_constant, residual_base=residual_base,
    )


@dataclass
class _FullCache:
    """A feature cache holding every view (what :func:`views_read` asks the model about)."""

    text_dim: int
    image_dim: int
    mention_views: tuple[str, ...] = ("mention", "sentence", "context", "image", "regions", "profile")
    entity_views: tuple[str, ...] = ("desc", "image", "profile")
    profile_rows: tuple[str, ...] = PROFILE_ROWS


def views_read(cfg: "TrainConfig | MIMICTrainConfig") -> tuple[str, ...]:
    """The feature views (``SIDE.VIEW``) the model of ``cfg`` reads from a cache that holds them all, in the feature
    cache's order: what the feature step must encode for it (``dim-mel features --views``)."""
    if isinstance(cfg, MIMICTrainConfig):
        model = mimic_config(cfg.model, _FullCache(text_dim=1, image_dim=1))
        read = {f"mention.{v}" for v in model.mention_views()} | {f"entity.{v}" for v in model.entity_views()}
        return tuple(v for v in CACHE_VIEWS if v in read)
    m = cfg.model
    # a text size under which the configured sizes hold (the residual start, a raw query's sum)
    d = m.output_size or (m.hidden_size if m.query_input == "raw" else 0) or 512
    try:
        model = dim_config(m, _FullCache(text_dim=d, image_dim=d))
    except ValueError:              # sizes only a real cache can settle: every view
        return FEATURE_VIEWS
    read = {f"mention.{v}" for v in model.mention_views()} | {f"entity.{v}" for v in model.entity_views()}
    return tuple(v for v in FEATURE_VIEWS if v in read)


# Model settings an older checkpoint did not record, with the value it was trained with (not today's default).
_LEGACY_MODEL = {"residual_base": "mention"}


def dim_config_from_saved(saved: Mapping[str, Any]) -> DIMConfig:
    """The :class:`~nel_model.nel.DIMConfig` a checkpoint's ``model_config`` records (tuples restored; settings an
    older checkpoint lacks take the value it was trained with)."""
    conf = {**_LEGACY_MODEL, **saved}
    conf["profile_rows"], conf["profile_use"] = tuple(conf["profile_rows"]), tuple(conf["profile_use"])
    return DIMConfig(**conf)


def mimic_config(m: MIMICModelConfig, data: Any) -> MIMICConfig:
    """:class:`~nel_model.mimic.MIMICConfig` of the model settings ``m`` on a feature cache ``data`` (anything with
    ``text_dim`` and ``image_dim``)."""
    return MIMICConfig(text_dim=data.text_dim, image_dim=data.image_dim, **asdict(m))


def mimic_config_from_saved(saved: Mapping[str, Any]) -> MIMICConfig:
    """The :class:`~nel_model.mimic.MIMICConfig` a MIMIC checkpoint's ``model_config`` records (``"model":
    "mimic"`` beside the model's fields)."""
    return MIMICConfig(**{k: v for k, v in saved.items() if k != "model"})
