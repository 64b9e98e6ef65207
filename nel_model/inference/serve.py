"""``dim-mel serve``: a linking service. The run (and a re-ranker) is loaded once; mentions are linked over HTTP.

    dim-mel serve --run RUN [--rerank RUN] [--index INDEX] [--image-root DIR] [--host 127.0.0.1] [--port 8080] \
        [--token TOKEN] [--max-body-bytes N] [--max-mentions N] [--max-image-bytes N] [--max-top-k N] \
        [--batch-wait-ms MS] [--max-batch N] [--threads N] [--device cpu] [--checkpoint best]

An ASGI application (FastAPI) served by uvicorn. It links with the one :class:`~nel_model.inference.linker.Linker`
of ``dim-mel link`` (a :class:`~nel_model.loaded_run.LoadedRun`, the re-ranker loaded over it), so an answer is the
object ``dim-mel link`` writes for the same mention (docs/CONTRACTS.md, "Linking service"):

* ``GET /health``: 200 ``{"status": "ready"}`` once the run is loaded, 503 ``{"status": "loading"}`` before (the port
  opens first, so a client can poll); never asks for the token.
* ``GET /info``: the run, its label and checkpoint, the KB's size and kind, the re-ranker, the encoders, the limits,
  the version.
* ``POST /link`` ``{"mentions": [mention objects], "top_k": 10}`` -> ``{"results": [one linked mention each]}``.
  A mention object is a line of ``dim-mel link``'s input, checked by the same code (``linker.check_mention``); its
  ``image`` is a name inside ``--image-root`` (the rule of every dataset: ``core.safe_paths.resolve_in_dataset``;
  without ``--image-root`` no image file is read), or ``image_base64`` carries the image's bytes (decoded by
  ``core.images.decode_image``).

Bad input is HTTP 400 with the toolkit's one-line error (``{"error": "error: request, mentions[2] (id 'x'), field
'image': ..."}``) and the server goes on; a body, a mention list or an image over its limit is 413; a missing or
wrong bearer token 401; a request while loading 503.

Concurrent requests are batched for the model: one worker thread owns it and links the requests waiting for it,
with those being received meanwhile (it waits for them up to ``--batch-wait-ms``; a lone request is linked at once),
up to ``--max-batch`` mentions, as one ``Linker.link_many`` call.
New mentions are encoded in fixed shapes (``nel_model.loaded_run``), so a mention's entities do not depend on
what else was in its batch. A bearer token (``--token`` or ``DIM_MEL_TOKEN``) is optional on a loopback host and
required on any other. SIGTERM (or Ctrl-C): the server stops accepting connections, answers the requests in
flight, and exits 0 (130 for Ctrl-C).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import hashlib
import hmac
import ipaddress
import json
import os
import queue
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from data_process.core.entry import error_line, run_main
from data_process.core.images import decode_image
from data_process.core.records import DataError, NestingError, Where, parse_json, record_json_problem
from data_process.core.settings import ToolkitParser
from nel_model.inference.linker import InputMention, Linker, check_mention, provenance
from nel_model.linking import Query

TOKEN_ENV = "DIM_MEL_TOKEN"
MAX_BODY_BYTES = 16 << 20           # a request body larger than this is refused (413)
MAX_MENTIONS = 256                  # mentions in one request
MAX_IMAGE_BYTES = 8 << 20           # one image (a file under --image-root, or image_base64's bytes)
MAX_TOP_K = 100
BATCH_WAIT_MS = 20.0                # how long the model worker waits for requests on their way (being received)
POLL_S = 0.001                      # how often a waiting model worker looks again whether any is still on its way
MAX_BATCH = 64                      # mentions linked in one model call
REQUEST_KEYS = ("mentions", "top_k")


class TooLarge(ValueError):
    """A request over one of the server's limits (HTTP 413)."""


@dataclass(frozen=True)
class ServeSettings:
    """What ``dim-mel serve`` was started with (its flags)."""

    run: Path
    rerank: Path | None = None
    index: Path | None = None
    image_root: Path | None = None
    token: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    max_mentions: int = MAX_MENTIONS
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_top_k: int = MAX_TOP_K
    batch_wait_ms: float = BATCH_WAIT_MS
    max_batch: int = MAX_BATCH
    device: str = "cpu"
    checkpoint: str = "best"


# ---------------------------------------------------------------------------------------------
# The model worker: one thread owns the linker and links the requests' mentions in batches


@dataclass
class _Job:
    mentions: list[InputMention]
    top_k: int
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class ModelWorker:
    """The one thread that runs the model: it takes the first waiting request and the others already queued, and
    while requests are on their way (received, not yet checked: :attr:`arriving`, kept by the application) waits
    up to ``wait_s`` for them; up to ``max_batch`` mentions (a request is never split). It links them with one
    ``link_many`` call per ``top_k`` and resolves each request's future with its own results (``provenance`` set
    as ``link`` sets it). A lone request is linked at once."""

    def __init__(self, linker: Linker, wait_s: float, max_batch: int):
        self.linker, self.wait_s, self.max_batch = linker, wait_s, max_batch
        self.arriving = 0                         # requests being received or checked (written by the event loop)
        self.batches = self.mentions = 0          # model calls made, mentions linked (GET /info)
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self._provenance: dict[int, dict[str, Any]] = {}
        self.thread = threading.Thread(target=self._run, name="dim-mel-model", daemon=True)
        self.thread.start()

    def submit(self, mentions: list[InputMention], top_k: int) -> concurrent.futures.Future:
        job = _Job(mentions, top_k)
        self.jobs.put(job)
        return job.future

    def close(self) -> None:
        """Finish the jobs already queued, then stop the thread."""
        self.jobs.put(None)
        self.thread.join()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            batch, stop = self._gather(job)
            self._link(batch)
            if stop:
                return

    def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        batch, n = [first], len(first.mentions)
        deadline = time.monotonic() + self.wait_s
        while n < self.max_batch:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if self.arriving <= 0 or remaining <= 0:
                    break
                try:
                    job = self.jobs.get(timeout=min(remaining, POLL_S))
                except queue.Empty:
                    continue
            if job is None:
                return batch, True
            batch.append(job)
            n += len(job.mentions)
        return batch, False

    def _link(self, batch: list[_Job]) -> None:
        self.batches += 1
        self.mentions += sum(len(j.mentions) for j in batch)
        for top_k in sorted({j.top_k for j in batch}):
            self._link_jobs([j for j in batch if j.top_k == top_k], top_k)

    def _link_jobs(self, jobs: list[_Job], top_k: int) -> None:
        """Link the jobs' mentions in one call; when it fails, each job alone (the same answers: a mention's do
        not depend on its batch), so one request's failure is that request's only."""
        try:
            results = self.linker.link_many([m.query for j in jobs for m in j.mentions], top_k)
            base = self._provenance.setdefault(top_k, provenance(self.linker, top_k))
        except Exception as exc:  # noqa: BLE001 - the waiting request is answered with the error
            if len(jobs) > 1:
                for j in jobs:
                    self._link_jobs([j], top_k)
            else:
                jobs[0].future.set_exception(exc)
            return
        start = 0
        for j in jobs:
            part = results[start:start + len(j.mentions)]
            start += len(j.mentions)
            for m, rec in zip(j.mentions, part):
                rec.provenance = {**base, "input_sha256": m.sha256}
            j.future.set_result([rec.as_dict() for rec in part])


# ---------------------------------------------------------------------------------------------
# A request's mentions, checked as dim-mel link checks its input lines


def _uploaded_image(obj: dict[str, Any], fail: Where, folder: Path, limit: int) -> dict[str, Any]:
    """The mention object with its ``image_base64`` decoded into a file of ``folder`` and named by ``image``."""
    bad = record_json_problem(obj)          # before the object is copied (a copy forgets a repeated key)
    if bad is not None:
        fail(*bad)
    obj = dict(obj)
    data = obj.pop("image_base64")
    if obj.get("image") is not None:
        fail("image_base64", "give image (a file under --image-root) or image_base64, not both")
    if not isinstance(data, str) or not data:
        fail("image_base64", "must be a non-empty string of base64 (the image file's bytes)")
    if len(data) * 3 // 4 > limit + 3:
        raise TooLarge(f"{fail.path}, {fail.where}, field 'image_base64': the image is larger than {limit} bytes "
                       "(--max-image-bytes)")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        fail("image_base64", f"not base64 ({exc})")
    if len(raw) > limit:
        raise TooLarge(f"{fail.path}, {fail.where}, field 'image_base64': the image is larger than {limit} bytes "
                       "(--max-image-bytes)")
    name = f"upload-{hashlib.sha256(raw).hexdigest()[:32]}"
    (folder / name).write_bytes(raw)
    decoded, why = decode_image(folder / name)
    if decoded is None:
        fail("image_base64", f"cannot read the image ({why})")
    return {**obj, "image": name}


def request_mentions(objs: Sequence[Any], settings: ServeSettings, uploads: Path) -> list[InputMention]:
    """The request's mention objects, each checked by ``linker.check_mention`` (the reader of ``dim-mel link``):
    an ``image`` inside ``--image-root``, an ``image_base64`` written into ``uploads``; ids unique."""
    out, seen = [], {}
    for i, obj in enumerate(objs):
        fail = Where("request", f"mentions[{i}]" + (f" (id {obj['id']!r})" if isinstance(obj, dict) and
                                                    isinstance(obj.get("id"), str) else ""))
        root = settings.image_root
        if isinstance(obj, dict) and "image_base64" in obj:
            obj, root = _uploaded_image(obj, fail, uploads, settings.max_image_bytes), uploads
        elif isinstance(obj, dict) and obj.get("image") is not None and root is None:
            fail("image", "this server reads no image files (start it with --image-root DIR), or send the image's "
                          "bytes as image_base64")
        query, sha = check_mention(obj, fail, root or uploads)
        if query.image is not None and query.image.stat().st_size > settings.max_image_bytes:
            raise TooLarge(f"request, {fail.where}, field 'image': {obj['image']}: larger than "
                           f"{settings.max_image_bytes} bytes (--max-image-bytes)")
        if query.id in seen:
            fail("id", f"duplicate id, first seen as mentions[{seen[query.id]}]")
        seen[query.id] = i
        out.append(InputMention(query, i, sha))
    return out


def parse_request(body: bytes, settings: ServeSettings) -> tuple[list[Any], int]:
    """``(mention objects, top_k)`` of a ``POST /link`` body; a bad body raises :class:`DataError` (or
    :class:`TooLarge` for too many mentions)."""
    fail = Where("request", "body")
    try:
        obj = parse_json(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        fail(None, f"not UTF-8 text ({exc.reason} at byte {exc.start})")
    except json.JSONDecodeError as exc:
        fail(None, f"invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})")
    except NestingError as exc:
        fail(exc.member if isinstance(exc.member, str) else None, exc.problem)
    if not isinstance(obj, dict):
        fail(None, f"must be a JSON object {{\"mentions\": [...], \"top_k\": K}}, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(REQUEST_KEYS))
    if unknown:
        fail(unknown[0], f"is not a field of a link request (fields: {', '.join(REQUEST_KEYS)})")
    mentions, top_k = obj.get("mentions"), obj.get("top_k", 10)
    if not isinstance(mentions, list):
        fail("mentions", "must be a list of mention objects")
    if len(mentions) > settings.max_mentions:
        raise TooLarge(f"request, body, field 'mentions': {len(mentions)} mentions, more than "
                       f"{settings.max_mentions} (--max-mentions)")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= settings.max_top_k:
        fail("top_k", f"must be an integer in [1, {settings.max_top_k}] (--max-top-k), got {top_k!r}")
    return mentions, top_k


# ---------------------------------------------------------------------------------------------
# The application


class ServerState:
    """What the application serves from: the settings, and once loaded the linker and its model worker."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.linker: Linker | None = None
        self.worker: ModelWorker | None = None
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.requests = self.in_flight = 0          # POST /link requests answered or waiting; waiting now
        self.uploads = tempfile.TemporaryDirectory(prefix="dim-mel-serve-")

    def load(self) -> None:
        """Load the run (and re-ranker), its KB embeddings and its encoders, link one mention to warm them up,
        and start the model worker; a failure is kept in :attr:`error`."""
        s = self.settings
        try:
            linker = Linker.from_run(s.run, s.rerank, s.device, s.checkpoint, index=s.index)
            linker.link_many([Query("A warm-up sentence.", "warm-up", id="warm-up")], 1)
            self.linker = linker
            self.worker = ModelWorker(linker, s.batch_wait_ms / 1000.0, s.max_batch)
            self.ready.set()
        except BaseException as exc:  # noqa: BLE001 - reported by main as the command's one error line
            self.error = exc

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
        self.uploads.cleanup()

    def info(self) -> dict[str, Any]:
        linker, s = self.linker, self.settings
        r = linker.retriever
        rr = linker.reranker
        return {"run": str(r.run.resolve()), "label": r.config.get("label"), "checkpoint": r.checkpoint,
                "checkpoint_sha256": r.checkpoint_sha256, "kb": kb_info(linker),
                "reranker": None if rr is None else rr.info(),
                "encoders": {"text": r.data.meta.get("text_encoder"), "image": r.data.meta.get("image_encoder")},
                "limits": {"max_body_bytes": s.max_body_bytes, "max_mentions": s.max_mentions,
                           "max_image_bytes": s.max_image_bytes, "max_top_k": s.max_top_k},
                "batching": {"batch_wait_ms": s.batch_wait_ms, "max_batch": s.max_batch},
                "image_root": None if s.image_root is None else str(s.image_root.resolve()),
                "stats": {"requests": self.requests, "arriving": self.worker.arriving, "in_flight": self.in_flight,
                          "batches": self.worker.batches, "mentions": self.worker.mentions},
                "version": package_version()}


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dim-mel")
    except PackageNotFoundError:
        return "unknown"


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI application over ``state`` (module docstring)."""
    app = FastAPI(title="dim-mel serve", docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, exc: BaseException | str, **headers: str) -> JSONResponse:
        line = exc if isinstance(exc, str) else error_line(exc)
        return JSONResponse({"error": line}, status_code=status, headers=headers or None)

    def refused(request: Request) -> JSONResponse | None:
        token = state.settings.token
        if token is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return error(401, "error: missing or wrong bearer token (Authorization: Bearer TOKEN)",
                             **{"WWW-Authenticate": "Bearer"})
        if not state.ready.is_set():
            return error(503, "error: the run is still loading (GET /health says when it is ready)")
        return None

    async def body_of(request: Request) -> bytes:
        limit = state.settings.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise TooLarge(f"request, body: {length} bytes, more than {limit} (--max-body-bytes)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"request, body: more than {limit} bytes (--max-body-bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = state.ready.is_set()
        return JSONResponse({"status": "ready" if ready else "loading"}, status_code=200 if ready else 503)

    @app.get("/info")
    async def info(request: Request) -> JSONResponse:
        return refused(request) or JSONResponse(state.info())

    @app.post("/link")
    async def link(request: Request) -> JSONResponse:
        if (no := refused(request)) is not None:
            return no
        uploads = Path(tempfile.mkdtemp(dir=state.uploads.name))
        state.worker.arriving += 1
        try:
            objs, top_k = parse_request(await body_of(request), state.settings)
            mentions = await run_in_threadpool(request_mentions, objs, state.settings, uploads)
        except TooLarge as exc:
            _remove(uploads)
            return error(413, exc)
        except (DataError, ValueError, OSError) as exc:
            _remove(uploads)
            return error(400, exc)
        finally:
            state.worker.arriving -= 1
        future = state.worker.submit(mentions, top_k)
        future.add_done_callback(lambda _: _remove(uploads))
        state.requests += 1
        state.in_flight += 1
        try:
            results = await asyncio.wrap_future(future)
        except (ValueError, OSError) as exc:
            return error(400, exc)
        except Exception as exc:  # noqa: BLE001 - the server stays up; the client gets the reason
            return error(500, f"error: {type(exc).__name__}: {exc}")
        finally:
            state.in_flight -= 1
        return JSONResponse({"results": results})

    return app


def _remove(folder: Path) -> None:
    for f in folder.iterdir():
        f.unlink(missing_ok=True)
    folder.rmdir()


# ---------------------------------------------------------------------------------------------
# The command


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``localhost``, ``127.0.0.0/8``, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one), opened before the run is loaded."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def build_parser():
    p = ToolkitParser(prog="dim-mel serve", description="Serve a run (and a re-ranker) over HTTP: POST /link links "
                      "mentions as dim-mel link does; the run is loaded once.")
    p.add_argument("--run", required=True, type=Path, help="retriever run folder (dim-mel train)")
    p.add_argument("--rerank", type=Path, help="a re-ranker run folder (e.g. the feature re-ranker's)")
    p.add_argument("--index", type=Path, help="a KB index folder built with the run (dim-mel index; default: the run's own KB)")
    p.add_argument("--image-root", type=Path, help="folder the requests' image names are read from (nothing "
                   "outside it is read; without it, images come as image_base64 only)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (any but loopback needs a token)")
    p.add_argument("--port", type=int, default=8080, help="port (0: a free one, printed)")
    p.add_argument("--token", default=None, help=f"bearer token the requests must carry (default: ${TOKEN_ENV})")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="larger bodies get 413")
    p.add_argument("--max-mentions", type=int, default=MAX_MENTIONS, help="mentions per request (more: 413)")
    p.add_argument("--max-image-bytes", type=int, default=MAX_IMAGE_BYTES, help="one image's bytes (more: 413)")
    p.add_argument("--max-top-k", type=int, default=MAX_TOP_K, help="the largest top_k a request may ask")
    p.add_argument("--batch-wait-ms", type=float, default=BATCH_WAIT_MS,
                   help="the longest the model waits for requests being received to join its batch (none when "
                        "no other request is on its way)")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH, help="mentions linked in one model call")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    return p


def kb_info(linker: Linker) -> dict[str, Any]:
    """``/info``'s KB: the run's own (exact, float32) or the index's path, kind, size and recall."""
    if linker.index is None:
        return {"entities": linker.retriever.data.num_entities, "index": "run (exact, float32)"}
    i = linker.index.info()
    return {"entities": i["entities"], "index": {k: i[k] for k in ("path", "kind", "dtype", "faiss", "recall")}}


def settings_of(a) -> ServeSettings:
    token = a.token if a.token is not None else os.environ.get(TOKEN_ENV) or None
    if not is_loopback(a.host) and not token:
        raise ValueError(f"--host {a.host}: a server other machines can reach needs a bearer token (--token TOKEN "
                         f"or ${TOKEN_ENV}); on 127.0.0.1 it is optional")
    if a.image_root is not None and not a.image_root.is_dir():
        raise ValueError(f"{a.image_root}: --image-root is not a folder")
    for flag in ("max_body_bytes", "max_mentions", "max_image_bytes", "max_top_k", "max_batch"):
        if getattr(a, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(a, flag)}")
    if a.batch_wait_ms < 0 or a.threads < 0:
        raise ValueError("--batch-wait-ms and --threads must not be negative")
    return ServeSettings(run=a.run, rerank=a.rerank, index=a.index, image_root=a.image_root, token=token,
                         max_body_bytes=a.max_body_bytes, max_mentions=a.max_mentions,
                         max_image_bytes=a.max_image_bytes, max_top_k=a.max_top_k, batch_wait_ms=a.batch_wait_ms,
                         max_batch=a.max_batch, device=a.device, checkpoint=a.checkpoint)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    settings = settings_of(a)
    import torch
    import uvicorn

    if a.threads:
        torch.set_num_threads(a.threads)
    sock = bind(a.host, a.port)
    state = ServerState(settings)
    server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=None))

    def load() -> None:
        state.load()
        if state.error is not None:
            server.should_exit = True
        else:
            print("dim-mel serve: ready", file=sys.stderr, flush=True)

    host, port = sock.getsockname()[:2]
    print(f"dim-mel serve: listening on http://{host}:{port} (loading {settings.run})", file=sys.stderr, flush=True)
    # uvicorn stops gracefully on SIGTERM, then raises it again for the handler it found: make that one a no-op,
    # so a graceful stop exits 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    threading.Thread(target=load, name="dim-mel-load", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        state.close()
    if state.error is not None:
        raise state.error
    print("dim-mel serve: stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
