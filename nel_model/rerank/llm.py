"""The LLM / VLM re-ranker: a chat model re-orders each mention's top-k retrieved candidates (listwise, one prompt per
mention) through any OpenAI-compatible endpoint.

    dim-mel rerank-llm --retriever RUN --out OUT --model M --base-url URL [--top-k 5] [--split test] [--limit N]
        [--seed S] [--vision] [--scoring auto|text] [--dry-run [N]]

The prompt (``configs/prompts/rerank_v1.txt``, versioned by its hash) shows the sentence, the mention, the image
caption (when the dataset has one) and the k candidates' names and descriptions, numbered, and asks for the number
of the right one. Scoring (``--scoring auto``): the request asks for ``logprobs``/``top_logprobs`` and each
candidate number is scored by the log-probability of that number as the answer's first token (one forward pass, no
parsing); a server that gives no log-probabilities is answered by parsing the text (a number, or numbers best
first). ``--scoring text`` never asks for them. Numbers are read in ASCII digits only
(:func:`data_process.augment.llm_prompts.ascii_number`): a first token of other digits (``²``, ``①``, ``３``) is
no candidate number. An answer that names no candidate in 1..k (malformed, out of range, unparseable in any way)
keeps the retriever's order for that mention and is counted, on the first run and when read back from the cache. With ``--vision`` the mention image goes into the
user message as an image part (a base64 JPEG data URL) for endpoints that accept images.

Calls go through the paid-call machinery enrichment uses (:mod:`data_process.augment.paid_calls`: the client with
its rate limits, retries and fatal errors, the worker pool, the answer cache, cost, the stop message): every answer is
appended (fsync'ed) to ``OUT/rerank_llm_cache.jsonl`` with status ``received`` before it is parsed, then with its
verdict; a rerun (also after ``kill -9``) asks nothing already answered. A request that got no answer (a transport
error outliving its retries) is not cached: that mention keeps the retriever's order, is counted as unanswered, and
the next run asks again. A malformed ``usage`` block is unknown usage, the answer kept; timed-out requests (which the
server may bill) are counted; a full disk stops the requests and says how many paid answers were not saved. One
writer per output: a second run on the same ``--out`` (or the same answer cache, e.g. ``dim-mel link --rerank`` of
this run) stops at once with ``OutputLocked``. ``--dry-run`` prints prompts and the token and cost estimate from a
private copy of the cache (no request, no file touched).

The output is a two-stage run folder (:func:`nel_model.rerank.two_stage.write_two_stage_run`): the final ranking of
every evaluated mention over the whole KB and the candidate protocol, with the retriever's numbers on the same
mentions beside it (``retriever_same_mentions``) and the re-ranker's counts (malformed, unanswered, scoring used).
The same re-ranker serves the linking API (:mod:`nel_model.inference.linker`) through :class:`LLMReranker`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import datetime as _dt
import io
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from data_process.augment.cache_records import checked_record
from data_process.augment.llm_client import LLMClient, LLMConfig, LLMFatalError, LLMRequestError, messages_tokens
from data_process.augment.llm_prompts import PromptTemplate, ascii_number, ascii_numbers
from data_process.augment.paid_calls import (CallCounts, PaidCalls, add_client_flags, check_concurrency, check_prices,
                                             client_config, estimate_cost, format_cost, open_cache, picker,
                                             quiet_http_logging, read_only_cache, record_usage, stopped_early)
from data_process.core.durable_io import JsonlCache
from data_process.core.entry import run_main
from data_process.core.locks import output_lock
from data_process.core.fingerprints import stable_hash
from data_process.core.images import decode_image
from data_process.core.records import load_dataset
from data_process.core.settings import Setting, ToolkitParser, add_bool, load_settings, settings_from_parser
from nel_model.evaluation.metrics import metrics_from_counts
from nel_model.linking import Candidate, MentionLists, Query

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "rerank_llm.yaml"
CACHE_FILE = "rerank_llm_cache.jsonl"
SCORINGS = ("auto", "text")
STATUSES = ("received", "ok", "malformed")
ABSENT = -1.0e4          # score of a candidate number missing from the top log-probabilities (below any present)
IMAGE_SIDE = 512         # the longer side of an image sent to a VLM
DESC_CHARS = 300         # a candidate's description in the prompt is cut to this many characters
SPLITS = {"test": ("test",), "dev": ("dev",), "all": ("dev", "test")}
EXIT_OK = 0


# ---------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class RerankOptions:
    """How the LLM re-ranks: the candidates shown, the prompt, the scoring, the cache and the parallelism."""

    top_k: int = 5
    scoring: str = "auto"
    top_logprobs: int = 20
    vision: bool = False
    prompt: Path = REPO_ROOT / "configs" / "prompts" / "rerank_v1.txt"
    concurrency: int = 4
    max_consecutive_errors: int = 50
    image_tokens: int = 85
    prices: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    progress: bool = True


# ---------------------------------------------------------------------------------------------
# Prompts and answers


def candidate_lines(cands: Sequence[Candidate]) -> str:
    def one(i: int, c: Candidate) -> str:
        desc = " ".join(c.description.split())
        desc = desc if len(desc) <= DESC_CHARS else desc[: DESC_CHARS - 1].rstrip() + "…"
        return f"{i}. {c.name}: {desc}" if desc else f"{i}. {c.name}"
    return "\n".join(one(i, c) for i, c in enumerate(cands, 1))


def image_data_url(path: Path) -> tuple[str | None, str | None]:
    """``(data URL of the image as a JPEG at most IMAGE_SIDE pixels on its longer side, None)``, or ``(None, why)``
    for a file that is not a readable image."""
    def jpeg(img):
        img.thumbnail((IMAGE_SIDE, IMAGE_SIDE))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    data, why = decode_image(path, jpeg)
    if data is None:
        return None, why
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii"), None


@dataclass(frozen=True)
class Prompt:
    """One mention's request: the chat messages (with the image part, if any) and its cache key."""

    mention_id: str
    k: int
    messages: list[dict[str, Any]]
    text_messages: list[dict[str, str]]      # the messages without the image: token estimate, dry run
    key: str
    image_problem: str | None = None


def build_prompt(template: PromptTemplate, query: Query, cands: Sequence[Candidate], model: str,
                 opts: RerankOptions) -> Prompt:
    """The messages and cache key of one mention (the key covers model, prompt version, scoring, k and the whole
    input, the image by its bytes' hash)."""
    values = {"sentence": query.sentence, "mention": query.mention, "caption": query.caption or "(none)",
              "candidates": candidate_lines(cands), "n": str(len(cands))}
    text = template.render(values)
    messages: list[dict[str, Any]] = [dict(m) for m in text]
    url, problem = None, None
    if opts.vision and query.image is not None:
        url, problem = image_data_url(Path(query.image))
        if url is not None:
            user = messages[-1]
            user["content"] = [{"type": "text", "text": user["content"]},
                               {"type": "image_url", "image_url": {"url": url}}]
    key = stable_hash({"model": model, "prompt_version": template.version, "scoring": opts.scoring,
                       "top_logprobs": opts.top_logprobs if opts.scoring == "auto" else None, "k": len(cands),
                       "messages": text, "image": None if url is None else stable_hash(url)})
    return Prompt(query.id or "", len(cands), messages, text, key, problem)


def retriever_order(k: int) -> list[float]:
    """Scores that keep the retriever's order of ``k`` candidates."""
    return [float(k - j) for j in range(k)]


def scores_from_logprobs(top: Sequence[Sequence[Any]] | None, k: int) -> list[float] | None:
    """Each candidate number's log-probability as the first answer token (``top``: ``[[token, logprob], ...]``);
    numbers missing from the list rank below the present ones in the retriever's order. None when no number in
    1..k is among them."""
    best: dict[int, float] = {}
    for tok, lp in top or ():
        n = ascii_number(str(tok))
        if n is not None and 1 <= n <= k and lp is not None and not math.isnan(float(lp)):
            best[n] = max(best.get(n, -math.inf), max(float(lp), ABSENT / 2))
    if not best:
        return None
    return [best.get(i + 1, ABSENT - i) for i in range(k)]


def scores_from_text(text: str, k: int) -> list[float] | None:
    """Scores from an answer text: its (ASCII) numbers in 1..k, best first (a single number: the chosen candidate,
    the rest in the retriever's order). None when its first number is not a candidate's (or it has none)."""
    nums = ascii_numbers(text or "")
    if not nums or not 1 <= nums[0] <= k:
        return None
    order = list(dict.fromkeys(n for n in nums if 1 <= n <= k))
    scores = retriever_order(k)
    for rank, n in enumerate(order):
        scores[n - 1] = float(2 * k - rank)
    return scores


MALFORMED = {"status": "malformed", "scoring": None, "scores": None}


def verdict(rec: Mapping[str, Any], k: int) -> dict[str, Any]:
    """The parsed verdict of a received answer: ``{"status": ok|malformed, "scoring": logprobs|text|None,
    "scores": [k] | None}``. Whatever the parsing raises makes the answer malformed (a failed item), never a crash:
    the answer is paid for and cached, and a rerun reads it back."""
    try:
        s = scores_from_logprobs(rec.get("top_logprobs"), k)
        if s is not None:
            return {"status": "ok", "scoring": "logprobs", "scores": s}
        s = scores_from_text(rec.get("raw", ""), k)
        if s is not None:
            return {"status": "ok", "scoring": "text", "scores": s}
    except Exception as exc:  # noqa: BLE001 - any parser failure is a malformed answer
        return {**MALFORMED, "error": f"unparseable answer ({type(exc).__name__}: {str(exc)[:200]})"}
    return dict(MALFORMED)


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class RerankStats(CallCounts):
    """What was paid (:class:`~data_process.augment.paid_calls.CallCounts`) and what the answers gave."""

    mentions: int = 0
    cached: int = 0            # answered in an earlier run
    malformed: int = 0         # answers naming no candidate in 1..k: the retriever's order kept
    unanswered: int = 0        # request errors: the retriever's order kept, asked again next run
    by_logprobs: int = 0
    by_text: int = 0
    images: int = 0
    images_unreadable: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _record_problem(rec: Mapping[str, Any]) -> tuple[str, str] | None:
    if rec.get("status") not in STATUSES:
        return "status", f"must be one of {', '.join(STATUSES)}, got {rec.get('status')!r:.80}"
    if not isinstance(rec.get("raw"), str):
        return "raw", f"must be a string, got {rec.get('raw')!r:.80}"
    top = rec.get("top_logprobs")
    if top is not None and not (isinstance(top, list) and all(
            isinstance(x, list) and len(x) == 2 and isinstance(x[0], str) and isinstance(x[1], (int, float))
            for x in top)):
        return "top_logprobs", f"must be null or a list of [token, logprob], got {top!r:.80}"
    k = rec.get("k")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        return "k", f"must be a positive integer, got {k!r:.80}"
    if rec["status"] == "ok":
        s = rec.get("scores")
        if not (isinstance(s, list) and len(s) == k
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in s)):
            return "scores", f"must be a list of {k} numbers (the record's k), got {s!r:.80}"
    return None


def cached(cache: JsonlCache, key: str) -> dict[str, Any] | None:
    """The cache record of ``key``; one of the wrong shape is an error naming the cache file and line."""
    return checked_record(cache, key, _record_problem)


async def _answer(p: Prompt, calls: PaidCalls, model: str, template: PromptTemplate,
                  stats: RerankStats) -> dict[str, Any]:
    rec = cached(calls.cache, p.key)
    if rec is None:
        result = await calls.ask(p.messages)
        rec = {"mention_id": p.mention_id, "model": model, "prompt": template.name,
               "prompt_version": template.version, "k": p.k, "raw": result.text,
               "top_logprobs": [list(t) for t in result.top_logprobs] if result.top_logprobs else None,
               "usage": record_usage(None, result), "attempts": result.attempts, "created": _now(),
               "status": "received"}
        await calls.save(p.key, rec, answer=True)     # paid for: on disk before it is parsed
    else:
        stats.cached += 1
    if rec["status"] == "received":
        rec = settled(rec, p.k)
        await calls.save(p.key, rec)
    return rec


def settled(rec: Mapping[str, Any], k: int) -> dict[str, Any]:
    """A cache record with its verdict: a ``received`` answer (paid for, not yet parsed) parsed."""
    if rec["status"] != "received":
        return dict(rec)
    out = {**rec, **verdict(rec, k)}
    out.pop("key", None)
    return out


async def answer_all(prompts: Sequence[Prompt], client: LLMClient, cache: JsonlCache, model: str,
                     template: PromptTemplate, opts: RerankOptions, stats: RerankStats
                     ) -> list[dict[str, Any] | None]:
    """Each prompt's cache record (None: no answer this time), ``opts.concurrency`` requests in flight (the paid-call
    pool)."""
    calls = PaidCalls(client, cache, stats)

    def no_answer(p: Prompt, exc: LLMRequestError) -> None:
        stats.unanswered += 1
        log.warning("mention %s: no answer: %s", p.mention_id, exc)

    return await calls.run(prompts, lambda p: _answer(p, calls, model, template, stats),
                           concurrency=opts.concurrency, max_consecutive_errors=opts.max_consecutive_errors,
                           no_answer=no_answer, progress=opts.progress, desc="rerank-llm", unit="mention")


class LLMReranker:
    """A chat model that re-orders each mention's first ``top_k`` candidates (the linker's re-ranker protocol:
    ``score(lists) -> [N, K]``, NaN lowest). Answers are cached in ``cache_path``."""

    kind = "llm"

    def __init__(self, llm: LLMConfig, opts: RerankOptions, cache_path: str | Path):
        self.llm = llm
        self.opts = opts
        self.top_k = opts.top_k
        self.cache_path = Path(cache_path)
        self.template = PromptTemplate.load(opts.prompt)
        self.stats = RerankStats()

    def prompts(self, lists: MentionLists) -> list[Prompt]:
        return [build_prompt(self.template, q, c[: self.top_k], self.llm.model, self.opts)
                for q, c in zip(lists.mentions, lists.candidates)]

    def score(self, lists: MentionLists, cache_only: bool = False) -> torch.Tensor:
        """[N, K] scores of ``lists``: the first ``top_k`` candidates in the model's order, the rest below them in
        the retriever's order; a mention without a usable answer keeps the retriever's order. ``cache_only``:
        answers from the cache alone (read from a private copy: nothing asked, no file touched), a prompt it
        lacks counted unanswered (``dim-mel evaluate`` of an LLM run). Otherwise the cache is opened for writing
        with its one-writer lock (``OutputLocked`` while another process writes it)."""
        prompts = self.prompts(lists)
        start = time.perf_counter()
        if cache_only:
            with read_only_cache(self.cache_path) as cache:
                found = [None if cache is None else cached(cache, p.key) for p in prompts]
            recs = [None if rec is None else settled(rec, p.k) for p, rec in zip(prompts, found)]
            self.stats.cached += sum(rec is not None for rec in recs)
            self.stats.unanswered += sum(rec is None for rec in recs)
        else:
            with open_cache(self.cache_path) as cache:
                recs = asyncio.run(self._run(prompts, cache))
        self.stats.seconds += time.perf_counter() - start
        self.stats.mentions += len(prompts)
        width = max((len(c) for c in lists.candidates), default=0)
        out = torch.full((len(prompts), width), float("nan"))
        for i, (p, rec, cands) in enumerate(zip(prompts, recs, lists.candidates)):
            self.stats.images += int(self.opts.vision and lists.mentions[i].image is not None
                                     and p.image_problem is None)
            self.stats.images_unreadable += int(p.image_problem is not None)
            ok = rec is not None and rec["status"] == "ok"
            if rec is not None and not ok:
                self.stats.malformed += 1
            if ok:
                self.stats.by_logprobs += int(rec["scoring"] == "logprobs")
                self.stats.by_text += int(rec["scoring"] == "text")
            head = rec["scores"] if ok else retriever_order(p.k)
            tail = [ABSENT * 10 - j for j in range(len(cands) - p.k)]
            out[i, : len(cands)] = torch.tensor(head + tail, dtype=torch.float32)
        return out

    async def _run(self, prompts: list[Prompt], cache: JsonlCache) -> list[dict[str, Any] | None]:
        top = self.opts.top_logprobs if self.opts.scoring == "auto" else None
        async with LLMClient(dataclasses.replace(self.llm, top_logprobs=top)) as client:
            return await answer_all(prompts, client, cache, self.llm.model, self.template, self.opts, self.stats)

    def info(self) -> dict[str, Any]:
        s = self.stats
        scoring = ("logprobs" if s.by_logprobs and not s.by_text else "text" if s.by_text and not s.by_logprobs
                   else "mixed" if s.by_text else "none")
        return {"kind": self.kind, "model": self.llm.model, "base_url": self.llm.base_url, "k": self.top_k,
                "prompt": self.template.name, "prompt_version": self.template.version, "prompt_path": self.template.path,
                "scoring": scoring, "scoring_requested": self.opts.scoring, "top_logprobs": self.opts.top_logprobs,
                "max_tokens": self.llm.max_tokens, "temperature": self.llm.temperature, "vision": self.opts.vision,
                "malformed": s.malformed, "unanswered": s.unanswered, "counts": s.as_dict(),
                "mentions_per_second": round(s.mentions / s.seconds, 3) if s.seconds else None,
                "estimated_cost_usd": estimate_cost(self.llm.model, s.prompt_tokens, s.completion_tokens,
                                                    self.opts.prices)}

    def dry_run(self, lists: MentionLists, show: int) -> str:
        """The first ``show`` prompts still to ask and the run's size, tokens and cost (from a private copy of the
        cache: nothing asked, no file touched)."""
        prompts = self.prompts(lists)
        with read_only_cache(self.cache_path) as cache:
            pending = [p for p in prompts if cache is None or cached(cache, p.key) is None]
        lines = []
        for i, p in enumerate(pending[:show], 1):
            lines.append(f"===== prompt {i}/{min(show, len(pending))}: mention {p.mention_id} (prompt "
                         f"{self.template.name} @ {self.template.version}, key {p.key[:12]}) =====")
            for m in p.text_messages:
                lines.append(f"--- {m['role']} ---\n{m['content']}")
            if not isinstance(p.messages[-1]["content"], str):
                lines.append("--- image part: data:image/jpeg;base64,... ---")
            lines.append("")
        images = sum(1 for p in pending if not isinstance(p.messages[-1]["content"], str))
        prompt_tokens = sum(messages_tokens(p.text_messages) for p in pending) + images * self.opts.image_tokens
        completion = self.llm.max_tokens * len(pending)
        lines.append(f"dry run: {len(pending)} requests to make ({len(prompts) - len(pending)} of {len(prompts)} "
                     f"already cached), model {self.llm.model}, top {self.top_k} candidates, {images} images")
        lines.append(f"estimated tokens: ~{prompt_tokens} prompt (chars/4 + {self.opts.image_tokens} per image), "
                     f"at most {completion} completion (max_tokens={self.llm.max_tokens})")
        lines.append(f"estimated cost: at most "
                     f"{format_cost(estimate_cost(self.llm.model, prompt_tokens, completion, self.opts.prices))}")
        return "\n".join(lines)


def load_reranker(run: str | Path, retriever: Any = None) -> LLMReranker:
    """The re-ranker a ``dim-mel rerank-llm`` run folder used (model, endpoint, k, prompt, scoring), answering from
    that run's cache first (the linker's ``--rerank RUN``, ``dim-mel evaluate``); the API key comes from
    ``$OPENAI_API_KEY``. ``retriever`` (the linker's loaded run) is not needed: the model reads the candidates'
    names. A hand-damaged ``results.json`` is a :class:`~nel_model.runs.RunError` naming the field."""
    from nel_model.runs import RESULTS_FILE, RunError, two_stage_of

    run = Path(run)
    path = run / RESULTS_FILE
    info = (two_stage_of(run) or {}).get("reranker")
    if not isinstance(info, dict):
        raise RunError(f"{path}: not a two-stage run (no two_stage.reranker)")

    def field_(key: str, kinds: tuple[type, ...], what: str, default: Any = None, ok=lambda v: True) -> Any:
        v = info.get(key, default)
        if v is None and default is None and type(None) in kinds:
            return None
        if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds) or not ok(v):
            raise RunError(f"{path}, field 'two_stage.reranker.{key}': must be {what}, got {v!r:.80}")
        return v

    model = field_("model", (str,), "the model's name", ok=bool)
    k = field_("k", (int,), "the number of candidates shown (1..20)", ok=lambda v: 1 <= v <= 20)
    llm = LLMConfig(model=model, base_url=field_("base_url", (str, type(None)), "a URL or null"),
                    api_key=os.environ.get("OPENAI_API_KEY"),
                    temperature=float(field_("temperature", (int, float), "a number", 0.0)),
                    max_tokens=field_("max_tokens", (int,), "a positive integer", 4, ok=lambda v: v > 0),
                    response_format="none")
    opts = RerankOptions(top_k=k, scoring=field_("scoring_requested", (str,), f"one of {SCORINGS}", "auto",
                                                 ok=lambda v: v in SCORINGS),
                         top_logprobs=field_("top_logprobs", (int,), "a positive integer", 20, ok=lambda v: v > 0),
                         vision=field_("vision", (bool,), "true or false", False),
                         prompt=_repo_path(field_("prompt_path", (str, type(None)), "a path or null")
                                           or "configs/prompts/rerank_v1.txt"), progress=False)
    reranker = LLMReranker(llm, opts, run / CACHE_FILE)
    if reranker.template.version != info.get("prompt_version"):
        raise ValueError(f"{run / RESULTS_FILE}: the run used prompt version {info.get('prompt_version')!r}, "
                         f"{reranker.template.path} is now {reranker.template.version!r}")
    return reranker


# ---------------------------------------------------------------------------------------------
# Flags and configuration (shared with ``dim-mel link --llm``)

CONFIG_ONLY = {"prices": Setting(dict), "image_tokens": Setting(int)}
NOT_SETTINGS = ("config", "help", "api_key", "cache", "progress")


def add_llm_flags(p: argparse.ArgumentParser, model_flag: str = "--model", k_flag: str = "--top-k") -> None:
    """The model, endpoint and re-ranking flags (defaults from ``--config``, ``configs/rerank_llm.yaml``); their
    destinations are the config keys (``model``, ``top_k``, ...) whatever the flags are called."""
    p.add_argument("--config", type=Path, default=None, help=f"YAML defaults (default: {DEFAULT_CONFIG})")
    add_client_flags(p, model_flag=model_flag, cache_help=f"answer cache (default: OUT/{CACHE_FILE})")
    p.add_argument(k_flag, dest="top_k", type=int, help="candidates shown to the model (default 5)")
    p.add_argument("--scoring", choices=SCORINGS, help="auto: first-token log-probabilities where given, else the "
                   "text; text: never ask for log-probabilities")
    p.add_argument("--top-logprobs", type=int, help="alternatives asked per answer token (default 20)")
    add_bool(p, "vision", None, "put the mention image into the message (VLM endpoints)")
    p.add_argument("--prompt", help="prompt template (default configs/prompts/rerank_v1.txt)")


def config_schema() -> dict[str, Setting]:
    """The keys of a re-ranker config: the LLM flags (underscored) plus the config-only ones."""
    p = ToolkitParser(add_help=False)
    add_llm_flags(p)
    return {**settings_from_parser(p, skip=NOT_SETTINGS), **CONFIG_ONLY}


def load_config(path: Path | None) -> dict[str, Any]:
    path = path or DEFAULT_CONFIG
    cfg = load_settings(path, config_schema())
    check_prices(path, cfg)
    return cfg


def _repo_path(value: str | Path) -> Path:
    p = Path(value)
    return p if p.is_absolute() or p.exists() else REPO_ROOT / p


def reranker_from_args(args: argparse.Namespace, default_cache: Path, dry_run: bool = False) -> LLMReranker:
    """The :class:`LLMReranker` the flags of :func:`add_llm_flags` (over the config file) describe; ValueError for
    a bad value."""
    cfg = load_config(args.config)
    pick = picker(args, cfg)

    llm = client_config(pick, args.api_key, dry_run=dry_run, max_tokens=4, response_format="none",
                        model_flag="the model flag")
    top_k, concurrency = int(pick("top_k", 5)), check_concurrency(int(pick("concurrency", 4)))
    if not 1 <= top_k <= 20:
        raise ValueError(f"--top-k must be in 1..20, got {top_k}")
    opts = RerankOptions(top_k=top_k, scoring=pick("scoring", "auto"), top_logprobs=int(pick("top_logprobs", 20)),
                         vision=bool(pick("vision", False)),
                         prompt=_repo_path(pick("prompt", "configs/prompts/rerank_v1.txt")),
                         concurrency=concurrency, max_consecutive_errors=int(pick("max_consecutive_errors", 50)),
                         image_tokens=int(pick("image_tokens", 85)), prices=cfg.get("prices") or {},
                         progress=args.progress)
    return LLMReranker(llm, opts, args.cache or default_cache)


# ---------------------------------------------------------------------------------------------
# Two-stage evaluation on a retriever run's lists


def dataset_lists(retriever, lists, dataset) -> MentionLists:
    """The linker's view of a split's retrieved lists: each mention's text, caption and image from the unified
    dataset, each candidate's name and description from its KB."""
    by_id = {m.id: m for m in dataset.mentions}
    ents = {e.id: e for e in dataset.entities}
    ids = retriever.data.entity_ids
    queries, cands = [], []
    for row, top, scores in zip(lists.rows.tolist(), lists.top.tolist(), lists.scores.tolist()):
        m = by_id[retriever.data.mention_ids[row]]
        queries.append(Query(sentence=m.sentence, mention=m.mention, id=m.id,
                             image=dataset.image_path(m.image) if m.image else None,
                             caption=(m.caption or {}).get("text")))
        cands.append([Candidate(ids[r], ents[ids[r]].name if ids[r] in ents else ids[r],
                                ents[ids[r]].description if ids[r] in ents else "", float(s))
                      for r, s in zip(top, scores)])
    return MentionLists(queries, cands)


def subset(lists, limit: int | None, seed: int | None):
    """The first ``limit`` mentions of ``lists`` (all when None), or with ``seed`` a random ``limit`` of them (kept
    in feature-cache order)."""
    n = len(lists.rows)
    if limit is None or limit >= n:
        return lists
    idx = (np.sort(np.random.default_rng(seed).choice(n, limit, replace=False)) if seed is not None
           else np.arange(limit))
    t = torch.from_numpy(idx)
    return dataclasses.replace(lists, rows=lists.rows[idx], top=lists.top[t], scores=lists.scores[t],
                               gold=lists.gold[t])


def split_lists(retriever, splits: Sequence[str], limit: int | None, seed: int | None):
    """``(lists, views)`` by split: the retriever's lists of ``splits`` (the ``limit`` / ``seed`` sample of
    :func:`subset`) and what the prompts are built from (:func:`dataset_lists`)."""
    if retriever.data.dataset is None:
        raise ValueError(f"{retriever.run}: its feature cache names no dataset folder (needed for the mention texts "
                         "and entity names)")
    dataset = load_dataset(retriever.data.dataset, check_gold=False)
    lists = {s: subset(retriever.lists(s), limit, seed) for s in splits}
    return lists, {s: dataset_lists(retriever, ls, dataset) for s, ls in lists.items()}


def sampled_retriever(retriever, lists):
    """The retriever with each split of ``lists`` cut to its sampled mentions (what the run folder records)."""
    return dataclasses.replace(retriever, data=dataclasses.replace(
        retriever.data, splits={**retriever.data.splits, **{s: ls.rows for s, ls in lists.items()}}))


def build_parser() -> argparse.ArgumentParser:
    p = ToolkitParser(prog="dim-mel rerank-llm", description="Re-rank a retriever run's top-k lists with a chat "
                      "model (OpenAI-compatible endpoint) and evaluate the two-stage ranking.")
    p.add_argument("--retriever", required=True, type=Path, help="run folder with retrieval/ (dim-mel retrieve)")
    p.add_argument("--out", required=True, type=Path, help="output run folder")
    p.add_argument("--split", choices=list(SPLITS), default="test", help="all = dev and test")
    p.add_argument("--limit", type=int, help="only N mentions of each split (the first, or a random N with --seed)")
    p.add_argument("--seed", type=int, help="with --limit: a random subset drawn with this seed")
    p.add_argument("--label", help="label of the output run (default: RETRIEVER-LABEL + llm MODEL)")
    p.add_argument("--device", default="auto")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument("--dry-run", nargs="?", type=int, const=3, default=None, metavar="N",
                   help="print the first N prompts (default 3) and the run's size and cost; no API calls")
    add_llm_flags(p)
    return p


def _same_mentions_metrics(counts: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    from nel_model.evaluation.metrics import TIE_RULES
    return {rule: {proto: {split: metrics_from_counts(c, rule) for split, c in per.items()}
                   for proto, per in counts.items()} for rule in TIE_RULES}


def format_comparison(results: dict[str, Any]) -> str:
    base = results["retriever_same_mentions"]
    lines = [f"{'protocol':<12}{'split':<7}{'ties':<13}{'retriever h@1':>15}{'+ llm h@1':>11}{'retr. mrr':>11}"
             f"{'+ llm mrr':>11}{'n':>7}"]
    for rule, per_proto in results["tie_rules"].items():
        for proto, per_split in per_proto.items():
            for split, m in per_split.items():
                b = base[rule][proto][split]
                lines.append(f"{proto:<12}{split:<7}{rule:<13}{100 * b['hits@1']:15.2f}{100 * m['hits@1']:11.2f}"
                             f"{100 * b['mrr']:11.2f}{100 * m['mrr']:11.2f}{m['n']:>7}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from nel_model.evaluation.evaluate import open_run
    from nel_model.rerank.two_stage import two_stage_counts, write_two_stage_run

    p = build_parser()
    a = p.parse_args(argv)
    quiet_http_logging()
    if a.limit is not None and a.limit < 1:
        p.error("--limit must be at least 1")
    reranker = reranker_from_args(a, a.out / CACHE_FILE, dry_run=a.dry_run is not None)
    retriever = open_run(a.retriever, a.device, a.checkpoint)
    splits = [s for s in SPLITS[a.split] if len(retriever.data.splits[s])]
    per_split, views = split_lists(retriever, splits, a.limit, a.seed)
    if a.dry_run is not None:
        for s, v in views.items():
            print(f"## split {s}\n{reranker.dry_run(v, a.dry_run)}")
        return EXIT_OK
    # One writer per output: a second run on this --out would pay every prompt again.
    with output_lock(a.out):
        counts: dict[str, dict[str, Any]] = {}
        base: dict[str, dict[str, Any]] = {}
        try:
            for s, lists in per_split.items():
                if lists.top_k < reranker.top_k:
                    raise ValueError(f"{a.retriever}: the {s} lists hold {lists.top_k} entities, fewer than --top-k "
                                     f"{reranker.top_k} (rerun dim-mel retrieve with a larger --top-k)")
                scores = reranker.score(views[s])
                for proto, c in two_stage_counts(retriever, lists, scores).items():
                    counts.setdefault(proto, {})[s] = c
                for proto, c in two_stage_counts(retriever, lists, lists.scores).items():
                    base.setdefault(proto, {})[s] = c
        except (LLMFatalError, KeyboardInterrupt) as exc:
            return stopped_early(exc, reranker.cache_path, reranker.stats)
        view = sampled_retriever(retriever, per_split)
        label = a.label or f"{retriever.config.get('label') or retriever.run.name} + llm {reranker.llm.model}"
        sample = {"limit": a.limit, "seed": a.seed, "n": {s: len(l.rows) for s, l in per_split.items()},
                  "rule": "all mentions" if a.limit is None else "first N" if a.seed is None
                  else "numpy default_rng(seed).choice(n, N, replace=False), sorted"}
        results = write_two_stage_run(a.out, view, counts, per_split[splits[0]].top_k if splits else 0,
                                      reranker.info(), label, seed=a.seed,
                                      extra={"retriever_same_mentions": _same_mentions_metrics(base), "sample": sample})
        print(format_comparison(results))
        s = reranker.stats
        print(f"rerank-llm: {s.mentions} mentions, {s.requests} asked, {s.cached} cached, {s.malformed} malformed, "
              f"{s.unanswered} unanswered (retriever order kept); scoring "
              f"{results['two_stage']['reranker']['scoring']}; wrote {a.out}", file=sys.stderr)
        for note in s.notes():
            print(f"  {note}", file=sys.stderr)
        return EXIT_OK


if __name__ == "__main__":
    run_main(main)
