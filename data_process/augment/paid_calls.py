"""One machinery for paid LLM calls: LLM enrichment (:mod:`data_process.augment.enrich`) and the LLM re-ranker
(:mod:`nel_model.rerank.llm`) both ask through it, so "an LLM call is never paid twice, never lost without saying
so" is kept in one place.

* **The client and its settings**: :func:`add_client_flags` (the model, endpoint, retry, rate-limit, parallelism and
  cache flags both commands take), :func:`client_config` (an :class:`~data_process.augment.llm_client.LLMConfig`
  from them), :func:`check_prices`. The client itself (:class:`~data_process.augment.llm_client.LLMClient`) does
  the transport retries, the rate limits and the reading of an answer that may not throw it away.
* **The answer cache**: :func:`open_cache` (an append-only :class:`~data_process.core.durable_io.JsonlCache`, one
  writer at a time: ``output_lock`` on it, released by the kernel when the holder dies), :func:`read_only_cache`
  (a private copy, for dry runs and re-evaluation: no file touched).
* **The worker pool**: :class:`PaidCalls` keeps ``concurrency`` requests in flight (asyncio), saves every answer to
  the cache (fsync'ed, off the event loop) before anything that can fail after the payment, counts what was paid
  (:class:`CallCounts`: answers, tokens, unknown usage, transport retries, timed-out requests, answers that could
  not be saved), stops after ``max_consecutive_errors`` requests in a row without an answer, and stops *asking* at
  the first failed cache write (a full disk): the requests in flight are finished and saved if the disk lets them,
  then :class:`CacheWriteError` says how many paid answers were not saved (a rerun asks for them again).
* **The cost**: :func:`model_price`, :func:`estimate_cost`, :func:`format_cost` (USD per 1M tokens from a price table).
* **The end of a run**: :func:`stopped_early` (a fatal request error or Ctrl-C: one message, the cache named) and
  :meth:`CallCounts.notes` (timed-out requests and unknown usage, for the summary).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, Mapping, Sequence, TypeVar

from tqdm import tqdm

from data_process.augment.llm_client import LLMClient, LLMConfig, LLMFatalError, LLMRequestError, LLMResult
from data_process.core.durable_io import JsonlCache
from data_process.core.entry import error_line
from data_process.core.locks import output_lock
from data_process.core.settings import ConfigError, add_bool

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130
HTTP_LOGGERS = ("httpx", "httpx2", "openai", "httpcore", "httpcore2")


def quiet_http_logging() -> None:
    """Never DEBUG for the HTTP stack, even with ``-v``: its debug lines may include request headers (the key)."""
    for name in HTTP_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------
# The client's settings


def add_client_flags(p: argparse.ArgumentParser, *, model_flag: str = "--model", cache_help: str = "answer cache",
                     concurrency_help: str = "requests in flight (1-256)") -> None:
    """The flags of a paid-call command's client, pool and cache; their destinations are the config keys."""
    p.add_argument(model_flag, dest="model", help="model name at the endpoint")
    p.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", help="API key (default: $OPENAI_API_KEY); never written anywhere")
    p.add_argument("--temperature", type=float)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--timeout-s", type=float, help="per-request timeout (a timed-out request may still be billed)")
    p.add_argument("--concurrency", type=int, help=concurrency_help)
    p.add_argument("--max-retries", type=int, help="transport retries per request")
    p.add_argument("--backoff-base-s", type=float)
    p.add_argument("--backoff-max-s", type=float)
    p.add_argument("--requests-per-minute", type=float)
    p.add_argument("--tokens-per-minute", type=float)
    p.add_argument("--max-consecutive-errors", type=int, help="stop when this many requests in a row get no answer")
    p.add_argument("--cache", type=Path, help=cache_help)
    add_bool(p, "progress", True, "progress bars")


def picker(args: argparse.Namespace, cfg: Mapping[str, Any]) -> Callable[..., Any]:
    """``pick(name, default=None)``: the flag's value when given, else the config's, else ``default``."""
    def pick(name: str, default: Any = None) -> Any:
        v = getattr(args, name, None)
        return v if v is not None else cfg.get(name, default)
    return pick


def client_config(pick: Callable[..., Any], api_key: str | None, *, dry_run: bool, max_tokens: int,
                  response_format: str, answer_schema: Mapping[str, Any] | None = None,
                  model_flag: str = "--model") -> LLMConfig:
    """The :class:`LLMConfig` the flags of :func:`add_client_flags` describe (``pick``: a :func:`picker`); ValueError
    for a missing model or key."""
    model, base_url = pick("model"), pick("base_url")
    if not model:
        raise ValueError(f"no model: give {model_flag} or set 'model' in the config")
    api_key = api_key or os.environ.get("OPENAI_API_KEY")
    if not api_key and not base_url and not dry_run:
        raise ValueError("the OpenAI API needs a key: set OPENAI_API_KEY or give --api-key "
                         "(local servers: give --base-url)")
    return LLMConfig(
        model=model, base_url=base_url, api_key=api_key, temperature=float(pick("temperature", 0.0)),
        max_tokens=int(pick("max_tokens", max_tokens)), timeout_s=float(pick("timeout_s", 60)),
        max_retries=int(pick("max_retries", 6)), backoff_base_s=float(pick("backoff_base_s", 1.0)),
        backoff_max_s=float(pick("backoff_max_s", 60.0)), response_format=response_format,
        answer_schema=answer_schema, requests_per_minute=pick("requests_per_minute"),
        tokens_per_minute=pick("tokens_per_minute"))


def check_concurrency(value: int) -> int:
    if not 1 <= value <= 256:
        raise ValueError(f"--concurrency must be in 1..256, got {value}")
    return value


def check_prices(path: Path, cfg: Mapping[str, Any]) -> None:
    """A config's ``prices`` table: ``{model: {prompt: N, completion: N}}`` (USD per 1M tokens), else ConfigError."""
    for name, price in (cfg.get("prices") or {}).items():
        if not (isinstance(price, dict) and set(price) == {"prompt", "completion"} and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in price.values())):
            raise ConfigError(path, f"prices.{name}", f"expected {{prompt: N, completion: N}} (USD per 1M tokens), "
                                                      f"got {price!r}")


# ---------------------------------------------------------------------------------------------
# Cost


def model_price(model: str, prices: Mapping[str, Mapping[str, float]]) -> Mapping[str, float] | None:
    """The price entry for ``model``: exact name, else the longest table name that prefixes it."""
    if model in prices:
        return prices[model]
    matches = [name for name in prices if model.lower().startswith(name.lower())]
    return prices[max(matches, key=len)] if matches else None


def estimate_cost(model: str, prompt_tokens: int, completion_tokens: int,
                  prices: Mapping[str, Mapping[str, float]]) -> float | None:
    p = model_price(model, prices)
    if p is None:
        return None
    return (prompt_tokens * float(p["prompt"]) + completion_tokens * float(p["completion"])) / 1e6


def format_cost(c: float | None) -> str:
    return "unknown (model not in the price table)" if c is None else f"${c:.4f}"


# ---------------------------------------------------------------------------------------------
# What was paid


def _n(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


@dataclass
class CallCounts:
    """What one run paid for; each command's statistics extend it."""

    requests: int = 0           # answers received this run (paid)
    prompt_tokens: int = 0      # as the server reported them (answers with unknown usage not included)
    completion_tokens: int = 0
    usage_unknown: int = 0      # answers whose usage block was absent or malformed: kept, their tokens unknown
    transport_retries: int = 0
    timed_out: int = 0          # attempts that timed out: the server may bill them, their answers never came
    unsaved: int = 0            # answers received whose cache write failed (a full disk): a rerun asks again

    def received(self, result: LLMResult) -> None:
        self.requests += 1
        if result.usage_known:
            self.prompt_tokens += result.prompt_tokens
            self.completion_tokens += result.completion_tokens
        else:
            self.usage_unknown += 1

    def notes(self) -> list[str]:
        """The summary's lines about what may have been paid without an answer or without a known price."""
        out = []
        if self.timed_out:
            n = self.timed_out
            out.append(f"{_n(n, 'request', 'requests')} timed out (the server may bill "
                       f"{'it; its answer' if n == 1 else 'them; their answers'} never came)")
        if self.usage_unknown:
            out.append(f"{_n(self.usage_unknown, 'answer', 'answers')} came without a usable token count (usage "
                       "recorded as unknown: not in the token totals or the cost)")
        return out


def record_usage(usage: Mapping[str, int] | None, result: LLMResult) -> dict[str, int]:
    """A cache record's ``usage`` after one more answer: token counts summed over its answers, and ``unknown``: how
    many of them came without a usable count (the key is absent while there is none)."""
    out = {"prompt_tokens": 0, "completion_tokens": 0, **(usage or {})}
    if result.usage_known:
        out["prompt_tokens"] += result.prompt_tokens
        out["completion_tokens"] += result.completion_tokens
    else:
        out["unknown"] = out.get("unknown", 0) + 1
    return out


# ---------------------------------------------------------------------------------------------
# The answer cache


@contextlib.contextmanager
def open_cache(path: Path) -> Iterator[JsonlCache]:
    """The answer cache at ``path`` for writing, with its one-writer lock held (``OutputLocked`` for a second
    process). Closing it after a failed write does not hide that failure."""
    with output_lock(path):
        cache = JsonlCache(path)
        try:
            yield cache
        except BaseException:
            with contextlib.suppress(OSError):   # the failure in flight is the one to report
                cache.close()
            raise
        cache.close()


class read_only_cache:  # noqa: N801 - a context manager used like a function
    """The cache at ``path`` (None when there is none) read from a private copy: opening a :class:`JsonlCache`
    repairs a torn tail, and a dry run or a re-evaluation must leave every file as it is."""

    def __init__(self, path: Path):
        self.path = path
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._cache: JsonlCache | None = None

    def __enter__(self) -> JsonlCache | None:
        if not self.path.exists():
            return None
        self._tmp = tempfile.TemporaryDirectory(prefix="paid-calls-copy-")
        copy = Path(self._tmp.name) / self.path.name
        shutil.copyfile(self.path, copy)
        self._cache = JsonlCache(copy)
        self._cache.path = self.path  # errors name the real file (its lines are the copy's lines)
        return self._cache

    def __exit__(self, *exc) -> None:
        if self._cache is not None:
            self._cache.close()
        if self._tmp is not None:
            self._tmp.cleanup()


class CacheWriteError(OSError):
    """The answer cache could not be written (a full disk, an I/O error): the run stopped asking. The message says
    how many answers received (paid) this run were not saved; the original error is ``cause``."""

    def __init__(self, cause: OSError, unsaved: int, path: Path):
        reason = ("no space left on device (free some space and rerun)" if cause.errno == errno.ENOSPC
                  else cause.strerror or str(cause))
        if unsaved:
            them = "it" if unsaved == 1 else "them"
            note = (f"{_n(unsaved, 'answer', 'answers')} received this run could not be saved: a rerun asks for "
                    f"{them} again, and pays again; the answers saved before are kept")
        else:
            note = "every answer received this run was saved"
        super().__init__(None, f"{reason}; {note}", str(cause.filename or path))
        self.cause = cause
        self.unsaved = unsaved

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


class _StopAsking(Exception):
    """Raised in a worker once the cache cannot be written: no more paid requests."""


def _leaf_errors(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaf_errors(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


# ---------------------------------------------------------------------------------------------
# The worker pool


class PaidCalls:
    """One run's paid requests: ``ask`` through ``client``, ``save`` to ``cache``, ``run`` a pool of workers; what
    was paid is counted in ``counts``."""

    def __init__(self, client: LLMClient, cache: JsonlCache, counts: CallCounts):
        self.client = client
        self.cache = cache
        self.counts = counts
        self.write_error: OSError | None = None
        self._write_lock = asyncio.Lock()

    async def ask(self, messages: Sequence[Mapping[str, Any]]) -> LLMResult:
        """One answer (paid; counted); LLMRequestError when none came. Refused once the cache cannot be written."""
        if self.write_error is not None:
            raise _StopAsking
        result = await self.client.complete(messages)
        self.counts.received(result)
        return result

    async def save(self, key: str, record: dict[str, Any], *, answer: bool = False) -> None:
        """Append ``record`` to the cache (fsync'ed in a worker thread, so requests keep flowing); the caller resumes
        once it is on disk. ``answer``: the record holds an answer received now, not yet saved anywhere (counted as
        unsaved when the write fails). A cancelled caller (a fatal error, Ctrl-C) still finishes the write."""
        write = asyncio.ensure_future(self._write(key, record, answer))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            await write
            raise

    async def _write(self, key: str, record: dict[str, Any], answer: bool) -> None:
        async with self._write_lock:
            try:
                await asyncio.to_thread(self.cache.put, key, record)
            except OSError as exc:
                self.counts.unsaved += int(answer)
                if self.write_error is None:
                    self.write_error = exc
                    log.error("%s: cache write failed (%s): asking nothing more", self.cache.path,
                              exc.strerror or exc)
                raise _StopAsking from exc

    async def run(self, items: Sequence[T], answer: Callable[[T], Awaitable[R]], *, concurrency: int,
                  max_consecutive_errors: int, no_answer: Callable[[T, LLMRequestError], None],
                  progress: bool = True, desc: str = "", unit: str = "item",
                  postfix: Callable[[], Mapping[str, Any]] | None = None) -> list[R | None]:
        """``answer(item)`` for every item, ``concurrency`` at a time; the results in the items' order (None: no
        answer, reported to ``no_answer``). Raises LLMFatalError (a misconfiguration, or ``max_consecutive_errors``
        requests in a row without an answer) and :class:`CacheWriteError`; other errors end the run as they are."""
        out: list[R | None] = [None] * len(items)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(items)):
            queue.put_nowait(i)
        bar = tqdm(total=len(items), desc=desc, unit=unit, disable=not progress, dynamic_ncols=True,
                   file=sys.stderr)
        retries, timeouts = self.client.retries, self.client.timeouts
        consecutive = 0

        async def worker() -> None:
            nonlocal consecutive
            while self.write_error is None:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                try:
                    out[i] = await answer(items[i])
                    consecutive = 0
                except _StopAsking:
                    return
                except LLMFatalError:
                    raise
                except LLMRequestError as exc:
                    no_answer(items[i], exc)
                    consecutive += 1
                    if consecutive >= max_consecutive_errors:
                        raise LLMFatalError(f"{consecutive} requests in a row got no answer; last: {exc}") from None
                bar.update(1)
                if postfix is not None:
                    bar.set_postfix(postfix(), refresh=False)

        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(max(1, min(concurrency, len(items)))):
                    tg.create_task(worker())
        except BaseExceptionGroup as eg:  # a fatal request error ...: the first one, LLMFatalError first
            errors = _leaf_errors(eg)
            raise next((e for e in errors if isinstance(e, LLMFatalError)), errors[0]) from None
        finally:
            bar.close()
            self.counts.transport_retries += self.client.retries - retries
            self.counts.timed_out += self.client.timeouts - timeouts
        if self.write_error is not None:
            raise CacheWriteError(self.write_error, self.counts.unsaved, self.cache.path) from self.write_error
        return out


def stopped_early(exc: BaseException, cache: Path, counts: CallCounts | None = None) -> int:
    """Say why a paid-call command stopped before its end (a fatal error, or Ctrl-C), that every answer it got is
    in ``cache``, and what may have been paid without an answer; return its exit status."""
    if isinstance(exc, KeyboardInterrupt):
        print(f"interrupted: answers received so far are cached in {cache}; rerun to resume", file=sys.stderr)
        code = EXIT_INTERRUPTED
    else:
        print(f"{error_line(exc)}\n(the answers received so far are cached in {cache})", file=sys.stderr)
        code = EXIT_USAGE
    for note in counts.notes() if counts is not None else ():
        print(f"({note})", file=sys.stderr)
    return code
