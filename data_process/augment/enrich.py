"""Dynamic entity enrichment with an LLM: build the "+" dataset.

    python -m data_process.augment.enrich --data DIR --out DIR_PLUS [--model M] [--base-url URL] [--dry-run] ...

For every KB entity (name + description + attributes) and every mention (sentence + mention) an
OpenAI-compatible chat model is asked, with a versioned prompt template (``configs/prompts/``), for a
structured JSON answer ``{"description", "type", "attributes"}``. Each answer is validated; an invalid one
is retried (the model is shown its answer and the error) a bounded number of times, then recorded as
failed with every raw text kept.

Requests, the answer cache, the worker pool, cost and the stop message are the paid-call machinery's
(:mod:`data_process.augment.paid_calls`), which the LLM re-ranker shares. Durability: every answer is appended to a
:class:`~data_process.core.durable_io.JsonlCache` (fsync'ed, status ``received``) *before* it is parsed, then again
with its verdict; a rerun parses a ``received`` answer without asking again. Any parser failure (even a ``RecursionError`` on deeply nested brackets) makes the answer invalid. Answers are keyed by ``stable_hash({"model", "template_version", "input"})``. A re-run skips
cached items, so a crash loses at most the requests in flight and paid work is never repeated; items
recorded as failed are asked again only with ``--retry-failed``. Request errors (HTTP 4xx other than
auth/model errors, or transport errors that outlived the retries) are not answers: nothing is cached for
them and the next run asks again.

The output folder is a unified dataset (``data_process/core/records.py``) whose records carry
``enrichment = {"text", "description", "type", "attributes", "provenance"}``; failed items carry none.
Images are placed with ``data_process.core.placement`` (``--images symlink`` by default: the source folder's
top-level image folders are linked, so every image path in the records stays as it was; or ``copy``, ``rewrite``). ``enrichment_report.json`` in the output
folder holds the counts and failures; it is published with the records as one set (``save_dataset``), so a run killed
while writing leaves a folder that ``load_dataset`` refuses, never one run's records with another's report.
A cache record of the wrong shape (``"answer": 5``) is an error naming the cache file and line: a paid answer is
never silently dropped or asked again. One writer per output: a second run on the same ``--out`` (or the same
``--cache``) stops at once with ``OutputLocked``. A malformed ``usage`` block is unknown usage (the answer is kept);
timed-out requests (which the server may bill) are counted in the report and the summary; a full disk stops the
run's requests and says how many paid answers could not be saved.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as _dt
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from data_process.augment.cache_records import checked_record, is_str_list
from data_process.augment.llm_client import (RESPONSE_FORMATS, LLMClient, LLMConfig, LLMFatalError, LLMRequestError,
                                             messages_tokens)
from data_process.augment.llm_prompts import (ANSWER_SCHEMA, AnswerError, PromptTemplate, correction_message,
                                              enrichment_text, parse_answer)
from data_process.augment.paid_calls import (EXIT_USAGE, CallCounts, PaidCalls, add_client_flags,  # noqa: F401
                                             check_concurrency, check_prices, client_config, estimate_cost,
                                             format_cost, open_cache, picker, quiet_http_logging, read_only_cache,
                                             record_usage, stopped_early)
from data_process.core.durable_io import JsonlCache
from data_process.core.entry import run_main
from data_process.core.fingerprints import stable_hash
from data_process.core.locks import output_lock
from data_process.core.placement import PLACEMENT_MODES, dataset_links, place_record_images, record_image_paths
from data_process.core.records import DatasetInfo, Entity, Mention, load_dataset, save_dataset
from data_process.core.settings import ConfigError, Setting, ToolkitParser, add_bool, load_settings, settings_from_parser

log = logging.getLogger("data_process.augment.enrich")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "enrich.yaml"
REPORT_FILE = "enrichment_report.json"
CACHE_FILE = "enrichment_cache.jsonl"
KINDS = ("entities", "mentions")

EXIT_OK, EXIT_INCOMPLETE = 0, 3  # and EXIT_USAGE (2), as every paid-call command (paid_calls)


# ---------------------------------------------------------------------------------------------
# Work items


@dataclass(frozen=True)
class WorkItem:
    kind: str  # "entity" | "mention"
    item_id: str
    key: str
    template: PromptTemplate
    inputs: dict[str, str]
    messages: list[dict[str, str]]


def entity_inputs(e: Entity) -> dict[str, str]:
    attrs = "\n".join(f"- {k}: {v}" for k, v in sorted(e.attributes.items())) or "(none)"
    return {"name": e.name, "description": e.description or "(none)", "attributes": attrs}


def mention_inputs(m: Mention) -> dict[str, str]:
    return {"sentence": m.sentence, "mention": m.mention}


def cache_key(model: str, template: PromptTemplate, inputs: Mapping[str, str]) -> str:
    return stable_hash({"model": model, "template_version": template.version, "input": dict(inputs)})


def make_item(kind: str, item_id: str, model: str, template: PromptTemplate, inputs: dict[str, str]) -> WorkItem:
    return WorkItem(kind=kind, item_id=item_id, key=cache_key(model, template, inputs), template=template,
                    inputs=inputs, messages=template.render(inputs))


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class RunStats(CallCounts):
    """One run's counts: what was paid (:class:`~data_process.augment.paid_calls.CallCounts`) and the items."""

    total: int = 0            # items (after de-duplication of identical inputs)
    cached: int = 0           # answered (ok) in an earlier run
    cached_failed: int = 0    # recorded as failed earlier and not retried (no --retry-failed)
    done: int = 0             # answered (ok) in this run
    failed: int = 0           # recorded as failed in this run (invalid after every answer retry)
    errors: int = 0           # request errors this run: no answer, nothing cached, asked again next run
    invalid_answers: int = 0  # answers (this run or received earlier) that did not parse or validate
    error_messages: dict[str, str] = field(default_factory=dict)  # key -> last request error

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("error_messages")
        return d


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


STATUSES = ("ok", "invalid", "failed", "received")  # received: cached, not yet parsed (the run stopped there)


def _record_problem(rec: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(field, problem)`` when a cache record has not the shape this module writes, else None."""
    if rec.get("status") not in STATUSES:
        return "status", f"must be one of {', '.join(STATUSES)}, got {rec.get('status')!r}"
    if not is_str_list(rec.get("raw")):
        return "raw", f"must be a list of strings, got {rec.get('raw')!r:.80}"
    if "errors" in rec and not is_str_list(rec["errors"]):
        return "errors", f"must be a list of strings, got {rec['errors']!r:.80}"
    attempts = rec.get("attempts", 0)
    if not isinstance(attempts, int) or isinstance(attempts, bool):
        return "attempts", f"must be an integer, got {attempts!r:.80}"
    usage = rec.get("usage", {})
    if not isinstance(usage, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in usage.values()):
        return "usage", f"must be a mapping of token counts, got {usage!r:.80}"
    if rec["status"] == "ok":
        answer = rec.get("answer")
        if not (isinstance(answer, dict) and isinstance(answer.get("description"), str)
                and isinstance(answer.get("type"), str) and isinstance(answer.get("attributes"), dict)):
            return "answer", f"must be an object with description, type and attributes, got {answer!r:.80}"
        for name in ("model", "template", "template_version", "created"):
            if not isinstance(rec.get(name), str):
                return name, f"must be a string, got {rec.get(name)!r:.80}"
    return None


def cached(cache: JsonlCache, key: str) -> dict[str, Any] | None:
    """The cache record of ``key`` (None when absent); one of the wrong shape is an error naming the cache file and
    line (:mod:`data_process.augment.cache_records`)."""
    return checked_record(cache, key, _record_problem)


def _is_finished(rec: Mapping[str, Any] | None, retry_failed: bool) -> bool:
    if rec is None:
        return False
    return rec.get("status") == "ok" or (rec.get("status") == "failed" and not retry_failed)


async def answer_item(item: WorkItem, calls: PaidCalls, *, max_answers: int, model: str, stats: RunStats) -> str:
    """Ask until a valid answer or ``max_answers`` invalid ones; every answer is cached before it is parsed.

    Returns the final status ("ok" | "failed"). Raises LLMRequestError when a request got no answer.
    """
    rec = cached(calls.cache, item.key)
    raws: list[str] = []
    errors: list[str] = []
    used = 0
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    unparsed = False  # the last of ``raws`` was received (and cached) but never parsed
    if rec is not None:  # resume an unfinished item ("invalid", "received") or retry a failed one
        raws, errors = list(rec["raw"]), list(rec.get("errors", []))
        usage = {**usage, **rec.get("usage", {})}
        used = rec.get("attempts", 0) if rec["status"] in ("invalid", "received") else 0
        unparsed = rec["status"] == "received" and bool(raws)

    def record(status: str, **extra: Any) -> dict[str, Any]:
        return {"kind": item.kind, "item_id": item.item_id, "model": model, "template": item.template.name,
                "template_version": item.template.version, "input": item.inputs, "raw": raws,
                "attempts": used, "usage": usage, "created": _now(), "status": status, "errors": errors, **extra}

    while True:
        if not unparsed:
            messages = list(item.messages)
            if used > 0 and raws and errors:  # show the model its invalid answer and why
                messages += [{"role": "assistant", "content": raws[-1]}, correction_message(errors[-1])]
            result = await calls.ask(messages)
            used += 1
            usage = record_usage(usage, result)
            raws.append(result.text)
            await calls.save(item.key, record("received"), answer=True)  # paid for: on disk before it is parsed
        unparsed = False
        try:
            answer = parse_answer(raws[-1], item.template.instructions)
        except Exception as exc:  # noqa: BLE001 - whatever the parser raises, the answer is invalid, not a crash
            stats.invalid_answers += 1
            errors.append(str(exc) if isinstance(exc, AnswerError) else f"unparseable answer ({type(exc).__name__}: "
                                                                          f"{str(exc)[:200]})")
            status = "failed" if used >= max_answers else "invalid"
            await calls.save(item.key, record(status))
            if status == "failed":
                return status
            continue
        await calls.save(item.key, record("ok", answer=answer))  # the validated answer beside the raw one
        return "ok"


async def run_items(items: Sequence[WorkItem], client: LLMClient, cache: JsonlCache, *, model: str,
                    concurrency: int, answer_retries: int, retry_failed: bool, max_consecutive_errors: int = 50,
                    progress: bool = True, stats: RunStats | None = None) -> RunStats:
    """Answer every unfinished item with ``concurrency`` requests in flight (the paid-call pool); ``stats`` (a new
    one when None) holds the counts, also when the run stops early."""
    stats = stats if stats is not None else RunStats()
    stats.total = len(items)
    pending: list[WorkItem] = []
    for it in items:
        rec = cached(cache, it.key)
        if rec is not None and rec.get("status") == "ok":
            stats.cached += 1
        elif rec is not None and rec.get("status") == "failed" and not retry_failed:
            stats.cached_failed += 1
        else:
            pending.append(it)
    calls = PaidCalls(client, cache, stats)

    async def one(it: WorkItem) -> str:
        status = await answer_item(it, calls, max_answers=1 + answer_retries, model=model, stats=stats)
        stats.done += status == "ok"
        stats.failed += status != "ok"
        return status

    def no_answer(it: WorkItem, exc: LLMRequestError) -> None:
        stats.errors += 1
        stats.error_messages[it.key] = str(exc)
        log.warning("%s %s: no answer: %s", it.kind, it.item_id, exc)

    await calls.run(pending, one, concurrency=concurrency, max_consecutive_errors=max_consecutive_errors,
                    no_answer=no_answer, progress=progress, desc="enrich", unit="item",
                    postfix=lambda: {"failed": stats.failed, "errors": stats.errors,
                                     "tokens": stats.prompt_tokens + stats.completion_tokens})
    return stats


# ---------------------------------------------------------------------------------------------
# Output dataset


def build_enrichment(rec: Mapping[str, Any]) -> dict[str, Any]:
    answer = rec["answer"]
    return {
        "text": enrichment_text(answer),
        "description": answer["description"],
        "type": answer["type"],
        "attributes": dict(answer["attributes"]),
        "provenance": {"model": rec["model"], "template": rec["template"],
                       "template_version": rec["template_version"], "created": rec["created"]},
    }


# ---------------------------------------------------------------------------------------------
# Configuration and CLI


@dataclass(frozen=True)
class EnrichOptions:
    data: Path
    out: Path
    cache: Path
    kinds: tuple[str, ...]
    mention_template: Path
    entity_template: Path
    concurrency: int
    answer_retries: int
    retry_failed: bool
    limit: int | None
    images: str
    prices: Mapping[str, Mapping[str, float]]
    expected_completion_tokens: int
    dry_run: int | None  # number of prompts to print, or None
    progress: bool
    max_consecutive_errors: int


# Flags that are no settings (what to read and write, how to run this once); the others are config keys.
NOT_SETTINGS = ("config", "help", "data", "out", "dry_run", "progress", "verbose")
CONFIG_ONLY = {"prices": Setting(dict), "kinds": Setting(object, nullable=True),  # checked by parse_kinds
               "expected_completion_tokens": Setting(int)}


def config_schema() -> dict[str, Setting]:
    """The keys of an enrichment config: the flags (underscored) plus the config-only ones."""
    return {**settings_from_parser(build_parser(), skip=NOT_SETTINGS), **CONFIG_ONLY}


def parse_kinds(value: Any) -> tuple[str, ...]:
    """``kinds`` as a list or a comma string of ``entities``/``mentions``; ValueError saying what is allowed."""
    parts = value.split(",") if isinstance(value, str) else value
    if not isinstance(parts, list) or not all(isinstance(k, str) for k in parts):
        raise ValueError(f"expected a list or a comma string of {', '.join(KINDS)}, got {value!r}")
    kinds = tuple(k.strip() for k in parts if k.strip())
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"expected some of {', '.join(KINDS)}, got {value!r}")
    return kinds


def load_config(path: Path | None) -> dict[str, Any]:
    """The config file (default ``configs/enrich.yaml``) checked against :func:`config_schema`."""
    path = path or DEFAULT_CONFIG
    cfg = load_settings(path, config_schema())
    if cfg.get("api_key") is not None:
        raise ConfigError(path, "api_key", "do not put the API key in a config file; use OPENAI_API_KEY or --api-key")
    if "kinds" in cfg:
        try:
            cfg["kinds"] = parse_kinds(cfg["kinds"])
        except ValueError as exc:
            raise ConfigError(path, "kinds", str(exc)) from None
    check_prices(path, cfg)
    return cfg


def build_parser() -> argparse.ArgumentParser:
    p = ToolkitParser(prog="dim-mel enrich", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="unified dataset folder to enrich")
    p.add_argument("--out", required=True, type=Path, help="output folder for the '+' dataset")
    p.add_argument("--config", type=Path, default=None, help=f"YAML defaults (default: {DEFAULT_CONFIG})")
    add_client_flags(p, cache_help=f"answer cache (default: OUT/{CACHE_FILE})",
                     concurrency_help="requests in flight (1-256; 8-64 typical)")
    p.add_argument("--response-format", choices=RESPONSE_FORMATS,
                   help="json_object (JSON mode), json_object_schema (llama-cpp-python: JSON mode + schema), "
                        "json_schema (OpenAI structured outputs, vLLM, Ollama), none")
    p.add_argument("--answer-retries", type=int, help="extra tries after an invalid answer")
    p.add_argument("--kinds", help="comma list of entities,mentions")
    p.add_argument("--mention-template", type=Path)
    p.add_argument("--entity-template", type=Path)
    p.add_argument("--images", choices=PLACEMENT_MODES)
    p.add_argument("--limit", type=int, help="only the first N entities and first N mentions")
    add_bool(p, "retry-failed", None, "ask again for items recorded as failed")
    p.add_argument("--dry-run", nargs="?", type=int, const=3, default=None, metavar="N",
                   help="print the first N prompts (default 3) and the run's size and cost; no API calls")
    p.add_argument("-v", "--verbose", action=argparse.BooleanOptionalAction, default=False)
    return p


def _resolve_cfg_path(value: str | Path) -> Path:
    p = Path(value)
    return p if p.is_absolute() or p.exists() else REPO_ROOT / p


def resolve(args: argparse.Namespace) -> tuple[EnrichOptions, LLMConfig]:
    cfg = load_config(args.config)
    pick = picker(args, cfg)

    try:
        kinds = parse_kinds(args.kinds) if args.kinds is not None else cfg.get("kinds", KINDS)
    except ValueError as exc:
        raise ValueError(f"--kinds: {exc}") from None
    concurrency = check_concurrency(pick("concurrency", 16))
    llm = client_config(pick, args.api_key, dry_run=args.dry_run is not None, max_tokens=256,
                        response_format=pick("response_format", "json_object"), answer_schema=ANSWER_SCHEMA)
    out = args.out
    if args.data.resolve() == out.resolve():
        raise ValueError("--out must differ from --data")
    templates = {}
    for name in ("mention_template", "entity_template"):
        v = getattr(args, name)
        templates[name] = v if v is not None else _resolve_cfg_path(cfg.get(name, f"configs/prompts/{name[:-9]}_v1.txt"))
    cache = pick("cache")
    opts = EnrichOptions(
        data=args.data, out=out, cache=Path(cache) if cache else out / CACHE_FILE, kinds=kinds,
        mention_template=templates["mention_template"], entity_template=templates["entity_template"],
        concurrency=concurrency, answer_retries=max(0, int(pick("answer_retries", 2))),
        retry_failed=bool(pick("retry_failed", False)), limit=pick("limit"), images=pick("images", "symlink"),
        prices=cfg.get("prices") or {}, expected_completion_tokens=int(pick("expected_completion_tokens", 80)),
        dry_run=args.dry_run, progress=args.progress,
        max_consecutive_errors=pick("max_consecutive_errors", 50),
    )
    return opts, llm


def collect_items(ds, opts: EnrichOptions, model: str) -> tuple[list[WorkItem], dict[tuple[str, str], str]]:
    """Unique work items (identical inputs share one request) and the (kind, id) -> key map."""
    keys: dict[tuple[str, str], str] = {}
    items: dict[str, WorkItem] = {}
    if "entities" in opts.kinds:
        tpl = PromptTemplate.load(opts.entity_template)
        for e in ds.entities[: opts.limit]:
            it = make_item("entity", e.id, model, tpl, entity_inputs(e))
            keys[("entity", e.id)] = it.key
            items.setdefault(it.key, it)
    if "mentions" in opts.kinds:
        tpl = PromptTemplate.load(opts.mention_template)
        for m in ds.mentions[: opts.limit]:
            it = make_item("mention", m.id, model, tpl, mention_inputs(m))
            keys[("mention", m.id)] = it.key
            items.setdefault(it.key, it)
    return list(items.values()), keys


def dry_run(items: Sequence[WorkItem], cache: JsonlCache | None, opts: EnrichOptions, llm: LLMConfig) -> None:
    pending = [it for it in items if not _is_finished(cached(cache, it.key) if cache else None, opts.retry_failed)]
    n = opts.dry_run or 0
    for i, it in enumerate(pending[:n], 1):
        print(f"===== prompt {i}/{min(n, len(pending))}: {it.kind} {it.item_id} "
              f"(template {it.template.name} @ {it.template.version}, key {it.key[:12]}) =====")
        for m in it.messages:
            print(f"--- {m['role']} ---\n{m['content']}")
        print()
    prompt_tokens = sum(messages_tokens(it.messages) for it in pending)
    exp_completion = opts.expected_completion_tokens * len(pending)
    max_completion = llm.max_tokens * len(pending)
    by_kind = {k: sum(1 for it in pending if it.kind == k) for k in ("entity", "mention")}
    print(f"dry run: {len(pending)} requests to make ({by_kind['entity']} entities, {by_kind['mention']} mentions; "
          f"{len(items) - len(pending)} of {len(items)} already cached), model {llm.model}")
    print(f"estimated tokens: ~{prompt_tokens} prompt (chars/4), ~{exp_completion} completion "
          f"({opts.expected_completion_tokens}/request; at most {max_completion} with max_tokens={llm.max_tokens})")
    print(f"estimated cost: {format_cost(estimate_cost(llm.model, prompt_tokens, exp_completion, opts.prices))} "
          f"(upper bound {format_cost(estimate_cost(llm.model, prompt_tokens, max_completion, opts.prices))}); "
          "invalid answers that are retried cost more")


def write_output(ds, opts: EnrichOptions, llm: LLMConfig, cache: JsonlCache, keys: Mapping[tuple[str, str], str],
                 stats: RunStats, templates: Mapping[str, PromptTemplate]) -> dict[str, Any]:
    """Write the '+' dataset and its report; returns the report."""
    failures = []
    counts: dict[str, dict[str, int]] = {}

    def enrich_of(kind: str, rid: str, current):
        if (kind, rid) not in keys:  # kind not enriched in this run (or beyond --limit): keep as is
            return current
        c = counts.setdefault(kind, {"total": 0, "ok": 0, "failed": 0, "missing": 0})
        c["total"] += 1
        rec = cached(cache, keys[(kind, rid)])
        if rec is not None and rec.get("status") == "ok":
            c["ok"] += 1
            return build_enrichment(rec)
        if rec is not None and rec.get("status") == "failed":
            c["failed"] += 1
            failures.append({"kind": kind, "id": rid, "key": rec["key"], "errors": rec.get("errors", []),
                             "raw": [r[:500] for r in rec.get("raw", [])]})
        else:
            c["missing"] += 1
            err = stats.error_messages.get(keys[(kind, rid)])
            failures.append({"kind": kind, "id": rid, "key": keys[(kind, rid)], "errors": [err] if err else
                             ["not answered (rerun to complete)"], "raw": []})
        return None  # never a made-up value

    entities = [dataclasses.replace(e, enrichment=enrich_of("entity", e.id, e.enrichment)) for e in ds.entities]
    mentions = [dataclasses.replace(m, enrichment=enrich_of("mention", m.id, m.enrichment)) for m in ds.mentions]
    opts.out.mkdir(parents=True, exist_ok=True)
    linked = (sorted(dataset_links(opts.data, record_image_paths(entities, mentions)))
              if opts.images != "rewrite" else [])
    entities, mentions = place_record_images(opts.out, entities, mentions, opts.images, src_root=opts.data)
    prompt_cost = estimate_cost(llm.model, stats.prompt_tokens, stats.completion_tokens, opts.prices)
    enrichment_note = {
        "source": str(opts.data.resolve()), "model": llm.model,
        "templates": {k: {"name": t.name, "version": t.version} for k, t in templates.items()},
        "images": {"mode": opts.images, "entries": linked}, "report": REPORT_FILE,
    }
    name = ds.info.name if ds.info.name.endswith("+") else ds.info.name + "+"
    info = DatasetInfo(name=name, source_format=ds.info.source_format, split_rule=ds.info.split_rule,
                       notes={**ds.info.notes, "enrichment": enrichment_note})
    report = {
        "created": _now(), "data": str(opts.data), "out": str(opts.out), "cache": str(opts.cache),
        "llm": llm.public(), "counts": counts, "run": stats.as_dict(),
        "estimated_cost_usd": prompt_cost, "complete": stats.errors == 0 and
        all(c["missing"] == 0 for c in counts.values()),
        "failures": failures,
    }
    # One set: a run killed while writing leaves a folder load_dataset refuses, never this report beside the records
    # of another run.
    save_dataset(opts.out, info, entities, mentions,
                 extra_files={REPORT_FILE: json.dumps(report, indent=2, ensure_ascii=False) + "\n"})
    return report


def print_summary(stats: RunStats, report: Mapping[str, Any], llm: LLMConfig) -> None:
    print(f"enrichment: {stats.total} unique requests: {stats.done} done, {stats.cached} cached, "
          f"{stats.failed} failed now, {stats.cached_failed} failed earlier, {stats.errors} unanswered "
          f"(transport retries {stats.transport_retries})", file=sys.stderr)
    for kind, c in report["counts"].items():
        print(f"  {kind}: {c['ok']}/{c['total']} enriched, {c['failed']} failed, {c['missing']} missing",
              file=sys.stderr)
    print(f"  tokens this run: {stats.prompt_tokens} prompt + {stats.completion_tokens} completion; "
          f"estimated cost {format_cost(report['estimated_cost_usd'])} ({llm.model})", file=sys.stderr)
    for note in stats.notes():
        print(f"  {note}", file=sys.stderr)
    print(f"  wrote {report['out']} (report {REPORT_FILE})", file=sys.stderr)


async def _run_async(items, opts: EnrichOptions, llm: LLMConfig, cache: JsonlCache, stats: RunStats) -> RunStats:
    async with LLMClient(llm) as client:
        return await run_items(items, client, cache, model=llm.model, concurrency=opts.concurrency,
                               answer_retries=opts.answer_retries, retry_failed=opts.retry_failed,
                               max_consecutive_errors=opts.max_consecutive_errors, progress=opts.progress,
                               stats=stats)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    quiet_http_logging()
    opts, llm = resolve(args)
    ds = load_dataset(opts.data)
    items, keys = collect_items(ds, opts, llm.model)
    templates = {}
    if "entities" in opts.kinds:
        templates["entity"] = PromptTemplate.load(opts.entity_template)
    if "mentions" in opts.kinds:
        templates["mention"] = PromptTemplate.load(opts.mention_template)
    if opts.dry_run is not None:
        with read_only_cache(opts.cache) as cache:
            dry_run(items, cache, opts, llm)
        return EXIT_OK
    stats = RunStats()
    # One writer per output and per answer cache (a second run would pay every prompt again).
    with output_lock(opts.out), open_cache(opts.cache) as cache:
        try:
            asyncio.run(_run_async(items, opts, llm, cache, stats))
        except (LLMFatalError, KeyboardInterrupt) as exc:
            return stopped_early(exc, opts.cache, stats)
        report = write_output(ds, opts, llm, cache, keys, stats, templates)
    print_summary(stats, report, llm)
    return EXIT_OK if report["complete"] else EXIT_INCOMPLETE


if __name__ == "__main__":
    run_main(main)
