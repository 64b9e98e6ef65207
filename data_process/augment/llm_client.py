"""A bounded, rate-limited, retrying chat-completion client on top of the official ``openai`` client.

Works against the OpenAI API and any OpenAI-compatible server (vLLM, Ollama, llama.cpp server):
only ``POST {base_url}/chat/completions`` is used.

* Transport retries are done here (the ``openai`` client's own retries are switched off so every attempt
  is counted and its delay controlled): 429, 408, 409, 5xx, timeouts and connection errors are retried with
  exponential backoff and jitter, up to ``max_retries`` times. A ``Retry-After`` header (seconds or an HTTP
  date) or ``retry-after-ms`` header is honoured: the next attempt waits at least that long.
* An HTTP 200 whose body is not a chat completion (not JSON, non-string content: a broken proxy or server) is
  retried the same way, then raises :class:`LLMRequestError`.
* 401/403/404 raise :class:`LLMFatalError` (a misconfigured key, model or base URL: retrying cannot help).
  Other 4xx raise :class:`LLMRequestError` with ``retryable=False``.
* Requests-per-minute and tokens-per-minute limits are token buckets (:class:`RateLimiter`).
* What an answer's reading may not do is throw a paid answer away: a ``usage`` block of odd types (a string or list
  token count, null, negative) is unknown usage (:func:`usage_tokens`), not an error; log-probabilities of an odd
  shape are absent ones (:func:`first_token_logprobs`); a lone surrogate (half a character, which no UTF-8 file can
  hold) in the text or a token becomes U+FFFD (:func:`repair_text`), so the answer can be cached.
* Timed-out attempts are counted (``LLMClient.timeouts``): the server may bill a request whose answer never came.

The API key is passed to the ``openai`` client only; it is never part of a repr, a log line or a result.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Sequence

import openai

log = logging.getLogger(__name__)

RESPONSE_FORMATS = ("json_object", "json_object_schema", "json_schema", "none")
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
# What reading an HTTP 200 body that is not a chat completion raises (not JSON, ``choices`` not a list, content not
# a string, ...): retried like a transport error, then a request error for that item; never the end of the run.
MALFORMED_RESPONSE = (ValueError, TypeError, AttributeError, KeyError, IndexError, openai.APIResponseValidationError)
FATAL_STATUS = frozenset({401, 403, 404})


@dataclass(frozen=True)
class LLMConfig:
    """Everything needed to talk to one model. ``api_key`` is excluded from ``repr``."""

    model: str
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    temperature: float = 0.0
    max_tokens: int = 256
    timeout_s: float = 60.0
    max_retries: int = 6
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    response_format: str = "json_object"  # one of RESPONSE_FORMATS
    answer_schema: Mapping[str, Any] | None = None  # for the *_schema formats
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    extra_body: Mapping[str, Any] | None = None
    top_logprobs: int | None = None  # ask for the answer tokens' log-probabilities with this many alternatives

    def public(self) -> dict[str, Any]:
        """A loggable view: no API key."""
        return {
            "model": self.model, "base_url": self.base_url, "temperature": self.temperature,
            "max_tokens": self.max_tokens, "timeout_s": self.timeout_s, "max_retries": self.max_retries,
            "response_format": self.response_format, "requests_per_minute": self.requests_per_minute,
            "tokens_per_minute": self.tokens_per_minute,
        }


@dataclass(frozen=True)
class LLMResult:
    text: str
    prompt_tokens: int | None       # None (both): the server's usage block was absent or malformed (unknown)
    completion_tokens: int | None
    attempts: int  # transport attempts this call took (1 = first try succeeded)
    finish_reason: str | None = None
    top_logprobs: tuple[tuple[str, float], ...] | None = None  # the first answer token's alternatives, if asked

    @property
    def usage_known(self) -> bool:
        return self.prompt_tokens is not None and self.completion_tokens is not None


class LLMRequestError(Exception):
    """A request that did not produce an answer (after retries when ``retryable``)."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = True,
                 attempts: int = 0, body: str | None = None):
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.attempts = attempts
        self.body = body


class LLMFatalError(LLMRequestError):
    """A configuration problem (bad key, unknown model, wrong URL): the whole run must stop."""


# ---------------------------------------------------------------------------------------------
# Helpers


def estimate_tokens(text: str) -> int:
    """Rough token count (~4 characters per token for English); used for TPM budgeting and dry runs."""
    return max(1, math.ceil(len(text) / 4))


def messages_tokens(messages: Sequence[Mapping[str, str]]) -> int:
    return sum(estimate_tokens(m["content"]) + 4 for m in messages) + 2


MAX_REQUEST_TOKENS = 10**9  # a token count above this is no count of one request


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def usage_tokens(usage: Any) -> tuple[int, int] | None:
    """``(prompt_tokens, completion_tokens)`` of a response's ``usage`` block; None (unknown) when it is absent or
    either count is not an integer in 0..MAX_REQUEST_TOKENS (a string, a list, null, a boolean, negative)."""
    try:
        counts = (_field(usage, "prompt_tokens"), _field(usage, "completion_tokens")) if usage is not None else ()
    except Exception:  # noqa: BLE001 - an object whose attributes raise: usage unknown, the answer kept
        return None
    if len(counts) == 2 and all(type(c) is int and 0 <= c <= MAX_REQUEST_TOKENS for c in counts):
        return counts[0], counts[1]
    return None


def repair_text(text: str) -> str:
    """``text`` with every lone surrogate (a JSON ``\\ud800`` escape of half a character: no UTF-8 file can hold
    it) replaced by U+FFFD; surrogate pairs and all other text unchanged."""
    if text.isascii():
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def first_token_logprobs(choice: Any) -> tuple[tuple[str, float], ...] | None:
    """``((token, logprob), ...)`` of the first answer token: the OpenAI form (``logprobs.content[0].top_logprobs``)
    or the legacy completion form (``logprobs.top_logprobs[0]``: ``{token: logprob}``); None when absent or of any
    other shape. Tokens are :func:`repair_text`'ed; alternatives whose log-probability is no finite number are
    left out. Never raises: the answer's text is kept whatever its log-probabilities look like."""
    try:
        lp = getattr(choice, "logprobs", None)
        if lp is None:
            return None
        lp = lp.model_dump(warnings=False) if hasattr(lp, "model_dump") else lp  # odd values: no warning
        if not isinstance(lp, dict):
            return None
        content = lp.get("content")
        if isinstance(content, list) and content and isinstance(content[0], dict):
            alts = content[0].get("top_logprobs") or [{"token": content[0].get("token"),
                                                       "logprob": content[0].get("logprob")}]
            out = [(a.get("token"), a.get("logprob")) for a in alts if isinstance(a, dict)]
        elif isinstance(lp.get("top_logprobs"), list) and lp["top_logprobs"] and isinstance(lp["top_logprobs"][0],
                                                                                             dict):
            out = list(lp["top_logprobs"][0].items())
        else:
            return None
        good = []
        for tok, value in out:
            if isinstance(tok, str) and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = float(value)
                if math.isfinite(value):
                    good.append((repair_text(tok), value))
        return tuple(good) or None
    except Exception:  # noqa: BLE001 - e.g. a log-probability too large for a float: none usable, text kept
        return None


def parse_retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms``, or ``Retry-After`` as seconds or an HTTP date; None if absent."""
    if not headers:
        return None
    lower = {k.lower(): v for k, v in headers.items()}
    ms = lower.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = lower.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with 'equal jitter': uniform in [d/2, d] where d = min(cap, base * 2**(attempt-1))."""
    d = min(cap, base * (2 ** max(0, attempt - 1)))
    return d / 2 + rng.random() * d / 2


class TokenBucket:
    """A bucket of ``rate_per_min`` units, refilled continuously; ``acquire`` waits for enough units.

    ``clock`` and ``sleep`` are injectable for tests. ``adjust`` corrects an estimate after the fact
    (the level may go negative, delaying later callers).
    """

    def __init__(self, rate_per_min: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        if rate_per_min <= 0:
            raise ValueError(f"rate must be positive, got {rate_per_min}")
        self.capacity = float(rate_per_min)
        self.per_s = float(rate_per_min) / 60.0
        self.level = self.capacity
        self._clock = clock
        self._sleep = sleep
        self._t = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self.level = min(self.capacity, self.level + (now - self._t) * self.per_s)
        self._t = now

    async def acquire(self, amount: float) -> float:
        """Take ``amount`` units (capped at capacity), waiting as needed; returns seconds waited."""
        amount = min(float(amount), self.capacity)
        waited = 0.0
        async with self._lock:  # FIFO: callers are served in order
            while True:
                self._refill()
                if self.level >= amount:
                    self.level -= amount
                    return waited
                wait = (amount - self.level) / self.per_s
                waited += wait
                await self._sleep(wait)

    def adjust(self, delta: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level - delta)


class RateLimiter:
    """Requests-per-minute and tokens-per-minute limits (either may be None = unlimited)."""

    def __init__(self, rpm: float | None, tpm: float | None, **bucket_kw):
        self.requests = TokenBucket(rpm, **bucket_kw) if rpm else None
        self.tokens = TokenBucket(tpm, **bucket_kw) if tpm else None

    async def acquire(self, est_tokens: int) -> float:
        waited = 0.0
        if self.requests:
            waited += await self.requests.acquire(1)
        if self.tokens:
            waited += await self.tokens.acquire(est_tokens)
        return waited

    def settle(self, est_tokens: int, actual_tokens: int) -> None:
        if self.tokens:
            self.tokens.adjust(actual_tokens - est_tokens)


def response_format_body(kind: str, schema: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The ``response_format`` request field.

    ``json_object``: JSON mode (OpenAI, vLLM, Ollama, llama.cpp). ``json_object_schema``: JSON mode constrained
    by ``schema`` in the llama-cpp-python / Anyscale form. ``json_schema``: OpenAI structured outputs form
    (OpenAI, vLLM, Ollama, llama.cpp's C++ server). ``none``: no field (plain text; the answer is still parsed).
    """
    if kind not in RESPONSE_FORMATS:
        raise ValueError(f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, got {kind!r}")
    if kind == "none":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if not schema:
        raise ValueError(f"response_format {kind!r} needs a schema")
    if kind == "json_object_schema":
        return {"type": "json_object", "schema": dict(schema)}
    return {"type": "json_schema", "json_schema": {"name": "enrichment", "schema": dict(schema)}}


# ---------------------------------------------------------------------------------------------
# Client


class LLMClient:
    """Async chat-completion calls with retries and rate limits. Use as ``async with LLMClient(cfg) as c``."""

    def __init__(self, config: LLMConfig, *, rng: random.Random | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 client: openai.AsyncOpenAI | None = None):
        self.config = config
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._client = client or openai.AsyncOpenAI(
            api_key=config.api_key or "sk-no-key-required",
            base_url=config.base_url,
            timeout=config.timeout_s,
            max_retries=0,
        )
        self.limiter = RateLimiter(config.requests_per_minute, config.tokens_per_minute)
        self.retries = 0   # transport retries done by this client (for the summary)
        self.timeouts = 0  # attempts that timed out: the server may bill them, their answers never came

    async def __aenter__(self) -> "LLMClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._client.close()

    def _request_kwargs(self, messages: Sequence[Mapping[str, str]]) -> dict[str, Any]:
        cfg = self.config
        kw: dict[str, Any] = {
            "model": cfg.model,
            "messages": [dict(m) for m in messages],
            "temperature": cfg.temperature,
            "max_tokens": cfg.max_tokens,
        }
        body = response_format_body(cfg.response_format, cfg.answer_schema)
        if body is not None:
            kw["response_format"] = body
        if cfg.extra_body:
            kw["extra_body"] = dict(cfg.extra_body)
        if cfg.top_logprobs:
            kw["logprobs"] = True
            kw["top_logprobs"] = cfg.top_logprobs
        return kw

    async def complete(self, messages: Sequence[Mapping[str, str]]) -> LLMResult:
        """One chat completion; transport errors are retried; raises :class:`LLMRequestError` when out of tries."""
        cfg = self.config
        est = messages_tokens(messages) + cfg.max_tokens
        kwargs = self._request_kwargs(messages)
        attempt = 0
        while True:
            attempt += 1
            await self.limiter.acquire(est)
            retry_after: float | None = None
            try:
                resp = await self._client.chat.completions.create(**kwargs)
                return self._result(resp, attempt, est)
            except openai.APIStatusError as exc:
                status = exc.status_code
                body = self._redact(_body_text(exc))  # some servers echo the key they were sent
                if status in FATAL_STATUS:
                    raise LLMFatalError(f"HTTP {status} from the server: {body[:300]}", status=status,
                                        retryable=False, attempts=attempt, body=body) from None
                if status not in RETRYABLE_STATUS:
                    raise LLMRequestError(f"HTTP {status}: {body[:300]}", status=status, retryable=False,
                                          attempts=attempt, body=body) from None
                retry_after = parse_retry_after(exc.response.headers)
                reason = f"HTTP {status}"
            except openai.APITimeoutError:
                self.timeouts += 1
                status, reason = None, f"timeout after {cfg.timeout_s:g}s"
            except openai.APIConnectionError as exc:
                status, reason = None, f"connection error ({_cause(exc)})"
            except MALFORMED_RESPONSE as exc:  # an HTTP 200 whose body is not a chat completion
                status, reason = None, f"malformed response ({type(exc).__name__}: {str(exc)[:200]})"
            if attempt > cfg.max_retries:
                raise LLMRequestError(f"gave up after {attempt} attempts; last: {reason}", status=status,
                                      retryable=True, attempts=attempt)
            delay = backoff_delay(attempt, cfg.backoff_base_s, cfg.backoff_max_s, self._rng)
            if retry_after is not None:
                delay = max(delay, retry_after)
            self.retries += 1
            log.debug("attempt %d: %s; retrying in %.2fs", attempt, reason, delay)
            await self._sleep(delay)

    def _redact(self, text: str) -> str:
        key = self.config.api_key
        return text.replace(key, "***") if key and text else text

    def _result(self, resp: Any, attempt: int, est: int) -> LLMResult:
        choices = getattr(resp, "choices", None) or []
        if not choices:
            raise LLMRequestError("the server answered with no choices", retryable=False, attempts=attempt)
        choice = choices[0]
        text = (choice.message.content if choice.message else None) or ""
        if not isinstance(text, str):
            raise TypeError(f"the message content is a {type(text).__name__}, not a string")
        # From here on nothing may raise: this is a paid answer (module docstring).
        usage = usage_tokens(getattr(resp, "usage", None))
        self.limiter.settle(est, sum(usage) if usage else est)
        reason = getattr(choice, "finish_reason", None)
        return LLMResult(text=repair_text(text), prompt_tokens=usage[0] if usage else None,
                         completion_tokens=usage[1] if usage else None, attempts=attempt,
                         finish_reason=reason if isinstance(reason, str) else None,
                         top_logprobs=first_token_logprobs(choice) if self.config.top_logprobs else None)


def _body_text(exc: openai.APIStatusError) -> str:
    try:
        return exc.response.text
    except Exception:  # noqa: BLE001 - a streamed or closed body
        return str(exc.message)


def _cause(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    return type(cause).__name__ if cause else type(exc).__name__
