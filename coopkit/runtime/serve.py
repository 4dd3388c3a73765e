"""``coopkit serve``: an HTTP server for an exported classifier, with dynamic micro-batching.

Built on Starlette under uvicorn (the ``serve`` extra: ``pip install 'coopkit[serve]'``; no
torch). Starlette rather than FastAPI: the endpoints take raw image bytes or multipart
uploads and answer small JSON documents, so FastAPI's request models (and its pydantic
dependency) would add install weight and nothing used; Starlette is the ASGI toolkit FastAPI
itself is built on, and uvicorn is the server both recommend.

Endpoints:

* ``POST /predict[?top_k=K]``: the body is one encoded image (any ``Content-Type`` but
  multipart), answered ``{"labels": [...], "probs": [...]}``; or ``multipart/form-data`` with
  one or more file parts, answered ``{"results": [{"name", "labels", "probs"} or {"name",
  "error"}, ...]}`` (400 when no part was readable). A multi-label file answers every label at
  or above its threshold in ``labels`` / ``probs`` (``top_k`` does not cut them; empty when none
  applies) and every label's own probability in ``label_probs`` (``{label: probability}``).
* ``GET /health`` (the process answers; it names the task, ``classify`` or ``multilabel``, and
  the engine that runs the graph and, for ``engine="auto"``, every engine's figures), ``/ready``
  (the model is loaded and the server is not shutting down; 503 otherwise), ``/metadata``
  (classes, task and per-label thresholds, precision, provider, input size, limits),
  ``/metrics`` (Prometheus text: requests, errors, batch sizes, latency).

**Micro-batching**: every decoded image waits in one bounded queue; a single batcher takes up
to ``max_batch_size`` images, waiting at most ``max_wait_ms`` after the first for more, and
runs them through the session in one call (one call at a time; onnxruntime uses its own
threads inside it). A full queue answers 503 with ``Retry-After``. ``max_batch_size=1`` is
one session run per image. Each image's answer is what :meth:`Classifier.predict` gives for
that image alone (the rows of a batch do not interact; fp32 results agree to float rounding).

**Limits** (memory stays bounded whatever clients send):

* bodies over ``max_body_bytes`` are refused with 413 (by ``Content-Length`` before reading,
  or while streaming); a body not received within ``read_timeout_s`` gets 408, and the
  connection is closed; headers not complete within ``header_timeout_s`` get 408 and the
  connection is closed (:func:`json_400_protocol`: uvicorn has no header timeout);
* at most ``max_decodes`` images are decoded at once (default: one per usable CPU, at most 8,
  the runtime's one decoding-thread default), each of at most ``max_pixels`` pixels
  (larger ones are refused from their header, 413, Pillow's decompression bombs included). Decoding an 8-bit image peaks at about
  8 bytes per pixel (measured by ``benchmarks/bench_decode_memory.py``; RGB photos about 4.3), so
  decoding holds at most about ``max_decodes * max_pixels * 8`` bytes (16-bit greyscale x 12); after a
  large image, once no decode runs, freed memory goes back to the OS (:func:`~coopkit.runtime.preprocess.release_memory`);
* at most ``queue_size`` decoded crops (``H * W * 3`` bytes each) wait for the session;
* at most ``max_connections`` connections and requests are served at once (uvicorn's
  ``limit_concurrency``; more get 503), so bodies held in memory are at most
  ``max_connections * max_body_bytes``, and slow clients cannot hold unbounded resources;
* bad query values (``top_k=abc``) and bad headers (``Content-Length: abc``) get 400 JSON.

**Graceful shutdown** (SIGTERM or Ctrl-C): uvicorn stops accepting connections and waits up to
``graceful_timeout_s`` for requests in flight, which the batcher keeps serving until its queue
is empty; ``/ready`` answers 503 meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional, Union
from urllib.parse import parse_qs

import numpy as np

from .classifier import Classifier
from .configbase import ConfigMixin, check_float, check_int, check_text
from .extras import require
from .preprocess import TRIM_AFTER_PIXELS, ImageTooLargeError, check_image_header, release_memory
from .results import rank
from .session import default_workers

logger = logging.getLogger(__name__)

#: Histogram buckets of the request latency (seconds) and of the batch size.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class ServeConfig(ConfigMixin):
    """How ``coopkit serve`` listens, batches and limits (every field is a ``--flag``)."""

    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (0.0.0.0: every interface)."})
    port: int = field(default=8000, metadata={"help": "TCP port."})
    max_batch_size: int = field(default=32, metadata={
        "help": "Most images per session run (1: one run per image, no micro-batching)."})
    max_wait_ms: float = field(default=5.0, metadata={
        "help": "How long the batcher waits after the first image for more to fill a batch."})
    queue_size: int = field(default=256, metadata={"help": "Images waiting for the session; more are answered 503."})
    top_k: int = field(default=5, metadata={"help": "Labels per image when the request has no ?top_k=."})
    max_body_bytes: int = field(default=20 * 1024 * 1024, metadata={"help": "Largest request body (413 beyond)."})
    max_images: int = field(default=16, metadata={"help": "Most images in one multipart request."})
    max_pixels: int = field(default=40_000_000, metadata={"help": "Largest image, in pixels (413 beyond)."})
    max_decodes: Optional[int] = field(default=None, metadata={
        "help": "Images decoded at once (default: one per usable CPU, at most 8); bounds decoding memory."})
    max_connections: int = field(default=256, metadata={
        "help": "Connections and requests served at once; more get 503 (uvicorn's limit_concurrency)."})
    read_timeout_s: float = field(default=30.0, metadata={
        "help": "Time to receive a whole request body (408 beyond; a body no endpoint reads: the connection is closed)."})
    header_timeout_s: float = field(default=10.0, metadata={
        "help": "Time to receive a request's headers, from the connection or the previous answer (408 and closed beyond)."})
    graceful_timeout_s: float = field(default=30.0, metadata={
        "help": "On shutdown, how long requests in flight may take to finish."})

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "queue_size", "top_k", "max_body_bytes", "max_images", "max_pixels",
                     "max_connections"):
            check_int(name, getattr(self, name))
        check_int("port", self.port, 0, maximum=65535)
        check_int("max_decodes", self.max_decodes, optional=True, hint="one per usable CPU, at most 8")
        for name in ("max_wait_ms", "read_timeout_s", "header_timeout_s", "graceful_timeout_s"):
            check_float(name, getattr(self, name), below=1e6)
        check_text("host", self.host, "an address")

    @property
    def decodes(self) -> int:
        """The concurrent-decode bound in force."""
        return self.max_decodes or default_workers()


class HTTPError(Exception):
    """An answer other than 200: status code and one-line message (sent as ``{"error": message}``)."""

    def __init__(self, status: int, message: str, headers: Optional[dict[str, str]] = None, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, dict(headers or {})
        if close:  # the rest of the body is not read: end the connection after the answer
            self.headers["Connection"] = "close"


def _imports() -> Any:
    """``prometheus_client``, after checking that the server's packages (the ``serve`` extra) are installed."""
    for module in ("starlette", "uvicorn"):
        require(module, "serve", "coopkit serve")
    return require("prometheus_client", "serve", "coopkit serve")


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several apps in one process stay apart)."""

    def __init__(self) -> None:
        prom = _imports()
        self.prom = prom
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter("coopkit_requests", "HTTP requests answered, by path and status code",
                                     ["path", "status"], registry=r)
        self.images = prom.Counter("coopkit_images", "Images received, by outcome (ok, error)", ["outcome"], registry=r)
        self.latency = prom.Histogram("coopkit_request_seconds", "Time to answer POST /predict", registry=r,
                                      buckets=LATENCY_BUCKETS)
        self.batch = prom.Histogram("coopkit_batch_size", "Images per session run", registry=r, buckets=BATCH_BUCKETS)
        self.queue = prom.Gauge("coopkit_queue_depth", "Images waiting for the session", registry=r)
        self.decoding = prom.Gauge("coopkit_decodes_in_flight", "Images being decoded now", registry=r)
        self.decoding_peak = prom.Gauge("coopkit_decodes_in_flight_max", "Most images decoded at once so far", registry=r)
        self.rejected = prom.Counter("coopkit_rejected", "Requests refused for a limit, by reason", ["reason"], registry=r)

    def exposition(self) -> bytes:
        return self.prom.generate_latest(self.registry)


class MicroBatcher:
    """One bounded queue of decoded images and one task that runs them through the session in batches."""

    def __init__(self, clf: Classifier, config: ServeConfig, metrics: Metrics) -> None:
        self.clf, self.config, self.metrics = clf, config, metrics
        self.queue: Optional[asyncio.Queue] = None
        self.task: Optional[asyncio.Task] = None
        self.session = ThreadPoolExecutor(1, thread_name_prefix="coopkit-session")

    def start(self) -> None:
        """Start the batching task on the running event loop."""
        if self.queue is None:
            self.queue = asyncio.Queue(self.config.queue_size)
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Serve what is queued, then stop."""
        if self.queue is not None:
            while not self.queue.empty() and self.task is not None and not self.task.done():
                await asyncio.sleep(0.01)
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.session.shutdown(wait=True)

    async def submit(self, crop: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
        """The class names and probability row of one prepared image; HTTPError 503 when the queue is full."""
        assert self.queue is not None, "the batcher is not started"
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((crop, future))
        except asyncio.QueueFull:
            self.metrics.rejected.labels("queue_full").inc()
            raise HTTPError(503, f"server busy: {self.config.queue_size} images are waiting; retry shortly",
                            {"Retry-After": "1"}) from None
        self.metrics.queue.set(self.queue.qsize())
        return await future

    async def _loop(self) -> None:
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        wait = self.config.max_wait_ms / 1000.0
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + wait
            while len(items) < self.config.max_batch_size:
                try:
                    items.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            self.metrics.queue.set(self.queue.qsize())
            items = [(crop, fut) for crop, fut in items if not fut.done()]  # clients that left
            if not items:
                continue
            batch = np.stack([crop for crop, _ in items])  # (n, H, W, 3)
            self.metrics.batch.observe(len(items))
            try:
                classnames, out = await loop.run_in_executor(self.session, self.clf.run_batch, batch, ("probs",))
            except Exception as e:  # noqa: BLE001 - the session's failure is each waiting request's 500
                logger.exception("session run failed")
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(HTTPError(500, f"inference failed: {type(e).__name__}: {e}"))
                continue
            for i, (_, fut) in enumerate(items):
                if not fut.done():
                    fut.set_result((classnames, out["probs"][i]))


class PeakCounter:
    """A count of work in flight that remembers its highest value (for the decode bound's metric)."""

    def __init__(self) -> None:
        self.now = self.peak = 0
        self.lock = threading.Lock()

    def __enter__(self) -> int:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
            return self.now

    def __exit__(self, *exc: Any) -> None:
        with self.lock:
            self.now -= 1


def _top_k(query: str, default: int, n_classes: int) -> int:
    values = parse_qs(query, keep_blank_values=True).get("top_k")
    if not values:
        return min(default, n_classes)
    text = values[-1]
    if not text.isdigit() or int(text) < 1:
        raise HTTPError(400, f"top_k must be a positive integer, got {text[:40]!r}")
    return min(int(text), n_classes)


def _content_length(headers: Any, limit: int) -> Optional[int]:
    text = headers.get("content-length")
    if text is None:
        return None
    if not text.strip().isdigit():
        raise HTTPError(400, f"Content-Length must be a non-negative integer, got {text[:40]!r}", close=True)
    length = int(text)
    if length > limit:
        raise HTTPError(413, f"request body of {length} bytes is over the limit of {limit} bytes", close=True)
    return length


class App:
    """The ASGI application (:attr:`asgi`) around one :class:`Classifier`."""

    def __init__(self, clf: Classifier, config: ServeConfig) -> None:
        _imports()
        from starlette.applications import Starlette
        from starlette.routing import Route

        self.clf, self.config = clf, config
        self.metrics = Metrics()
        self.batcher = MicroBatcher(clf, config, self.metrics)
        self.decode_slots: Optional[asyncio.Semaphore] = None
        self.decoding = PeakCounter()
        self.ready = False
        self.asgi = Starlette(
            routes=[
                Route("/predict", self.predict, methods=["POST"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/ready", self.ready_check, methods=["GET"]),
                Route("/metadata", self.metadata, methods=["GET"]),
                Route("/metrics", self.metrics_text, methods=["GET"]),
            ],
            lifespan=self.lifespan,
            exception_handlers={404: self.not_found, 405: self.not_allowed},
        )

    # --- lifetime ------------------------------------------------------------------------------

    def lifespan(self, app: Any) -> Any:
        import contextlib

        @contextlib.asynccontextmanager
        async def span(_: Any) -> Any:
            self.decode_slots = asyncio.Semaphore(self.config.decodes)
            self.batcher.start()
            self.ready = True
            logger.info("serving %s (%d classes) on %s", self.clf.path, len(self.clf.classnames),
                        self.clf.engine.describe())
            try:
                yield
            finally:
                self.ready = False
                await self.batcher.stop()

        return span(app)

    # --- answers -------------------------------------------------------------------------------

    def _json(self, path: str, status: int, body: dict[str, Any], headers: Optional[dict[str, str]] = None) -> Any:
        from starlette.responses import Response

        self.metrics.requests.labels(path, str(status)).inc()
        return Response(json.dumps(body, ensure_ascii=False), status, headers=headers, media_type="application/json")

    async def not_found(self, request: Any, exc: Any) -> Any:
        return self._json("other", 404, {"error": f"no such endpoint {request.url.path}; see /metadata"})

    async def not_allowed(self, request: Any, exc: Any) -> Any:
        return self._json("other", 405, {"error": f"{request.method} is not allowed on {request.url.path}"})

    async def health(self, request: Any) -> Any:
        return self._json("/health", 200, {"status": "ok", "task": self.clf.task, "engine": self.clf.engine.to_dict()})

    async def ready_check(self, request: Any) -> Any:
        if not self.ready:
            return self._json("/ready", 503, {"status": "not ready"})
        return self._json("/ready", 200, {"status": "ready"})

    async def metadata(self, request: Any) -> Any:
        m, c = self.clf.metadata, self.config
        return self._json("/metadata", 200, {
            "classes": self.clf.classnames, "task": m.task, "thresholds": m.thresholds,
            "precision": m.precision, "provider": self.clf.provider,
            "device": self.clf.device, "input_size": list(self.clf.image_size), "model": m.model,
            "max_batch_size": c.max_batch_size, "max_wait_ms": c.max_wait_ms, "queue_size": c.queue_size,
            "max_body_bytes": c.max_body_bytes, "max_images": c.max_images, "max_pixels": c.max_pixels,
            "max_decodes": c.decodes,
        })

    async def metrics_text(self, request: Any) -> Any:
        from starlette.responses import Response

        self.metrics.decoding_peak.set(self.decoding.peak)
        self.metrics.requests.labels("/metrics", "200").inc()
        return Response(self.metrics.exposition(), 200, media_type=self.metrics.prom.CONTENT_TYPE_LATEST)

    # --- POST /predict -------------------------------------------------------------------------

    async def predict(self, request: Any) -> Any:
        start = time.perf_counter()
        try:
            status, body, headers = 200, await self._predict(request), None
        except HTTPError as e:
            status, body, headers = e.status, {"error": e.message}, e.headers
            if e.status in (408, 413):
                self.metrics.rejected.labels("timeout" if e.status == 408 else "too_large").inc()
        self.metrics.latency.observe(time.perf_counter() - start)
        return self._json("/predict", status, body, headers)

    async def _predict(self, request: Any) -> dict[str, Any]:
        c = self.config
        top_k = _top_k(request.url.query, c.top_k, len(self.clf.classnames))
        _content_length(request.headers, c.max_body_bytes)
        try:
            body = await asyncio.wait_for(self._read_body(request), c.read_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPError(408, f"request body not received within {c.read_timeout_s:g} s", close=True) from None
        if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            parts = await self._parts(request, body)
            answers = await asyncio.gather(*(self._one(data, top_k) for _, data in parts))
            results = [{"name": name, **{k: v for k, v in a.items() if k != "status"}} for (name, _), a in zip(parts, answers)]
            if all("error" in r for r in results):
                raise HTTPError(400, f"no readable image among {len(results)} parts: {results[0]['error']}")
            return {"results": results}
        if not body:
            raise HTTPError(400, "empty body: POST the bytes of an image (or multipart/form-data with image files)")
        answer = await self._one(body, top_k)
        if "error" in answer:
            raise HTTPError(answer.pop("status", 400), answer["error"])
        return answer

    async def _read_body(self, request: Any) -> bytes:
        from starlette.requests import ClientDisconnect

        limit, chunks, size = self.config.max_body_bytes, [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HTTPError(413, f"request body is over the limit of {limit} bytes", close=True)
                chunks.append(chunk)
        except ClientDisconnect:
            raise HTTPError(400, "client disconnected before the body was complete") from None
        return b"".join(chunks)

    async def _parts(self, request: Any, body: bytes) -> list[tuple[str, bytes]]:
        from starlette.requests import Request

        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.request", "body": b"", "more_body": False}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        c = self.config
        try:
            form = await Request(request.scope, replay).form(max_files=c.max_images, max_fields=c.max_images,
                                                             max_part_size=c.max_body_bytes)
        except Exception as e:  # noqa: BLE001 - Starlette raises its own parse errors with a useful text
            raise HTTPError(400, f"malformed multipart body: {getattr(e, 'detail', None) or e}") from None
        parts = []
        for key, value in form.multi_items():
            if isinstance(value, str):
                continue  # a plain form field, not a file
            parts.append((value.filename or key, await value.read()))
        await form.close()
        if not parts:
            raise HTTPError(400, "multipart body holds no file part; send images as files")
        if len(parts) > c.max_images:
            raise HTTPError(413, f"{len(parts)} images in one request; the limit is {c.max_images}")
        return parts

    async def _one(self, data: bytes, top_k: int) -> dict[str, Any]:
        """Decode (bounded), queue for the batcher, rank: ``{"labels", "probs"}`` (and a multi-label file's
        ``"label_probs"``) or ``{"error", "status"}``."""
        assert self.decode_slots is not None
        from starlette.concurrency import run_in_threadpool

        async with self.decode_slots:
            try:
                crop = await run_in_threadpool(self._decode, data)
            except HTTPError as e:
                self.metrics.images.labels("error").inc()
                return {"error": e.message, "status": e.status}
        classnames, probs = await self.batcher.submit(crop)
        self.metrics.images.labels("ok").inc()
        (pred,) = rank(probs[None], classnames, [""], [None], top_k, thresholds=self.clf.thresholds)
        answer = pred.to_dict()
        del answer["source"]
        return answer

    def _decode(self, data: bytes) -> np.ndarray:
        size: Optional[tuple[int, int]] = None
        try:
            with self.decoding:
                self.metrics.decoding.inc()
                try:
                    size = check_image_header(data, self.config.max_pixels)  # refused before any pixel is decoded
                    return self.clf.prepare(data)
                except Exception as e:  # noqa: BLE001 - every rejected input is the client's 4xx
                    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    raise HTTPError(413 if isinstance(e, ImageTooLargeError) else 400, text) from None
                finally:
                    self.metrics.decoding.dec()
        finally:
            if size is not None and size[0] * size[1] >= TRIM_AFTER_PIXELS and self.decoding.now == 0:
                release_memory()  # the burst is over: hand the decoders' freed memory back to the OS


#: The answer to a client whose request headers did not arrive in time (sent as raw bytes: h11 has
#: no request to answer yet).
_HEADER_TIMEOUT_ANSWER = b'{"error": "request headers not received within %g s"}'


def json_400_protocol(header_timeout_s: Optional[float] = None, body_timeout_s: Optional[float] = None) -> type:
    """uvicorn's h11 protocol, answering requests it cannot parse (a bad request line, a
    ``Content-Length: abc``) with a JSON error like every other answer, instead of plain text,
    and freeing connections whose clients are too slow (uvicorn has no header timeout).

    Args:
        header_timeout_s: A request's headers must be complete this long after the connection
            opened or the previous answer was sent; otherwise 408 (JSON) and the connection is
            closed. ``None``: no limit.
        body_timeout_s: A request's body must be complete this long after its headers; otherwise
            the connection is closed (the app answers ``/predict`` 408 first, at its own
            ``read_timeout_s``; this frees connections whose body no endpoint reads). ``None``: no limit.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class JSON400Protocol(H11Protocol):
        deadline: Optional[asyncio.TimerHandle] = None
        phase = ""  # what the deadline waits for: "headers", "body" or "" (nothing)

        def send_400_response(self, msg: str) -> None:
            body = json.dumps({"error": "invalid HTTP request: malformed request line or header (for example a "
                                        "Content-Length that is not a non-negative integer)"}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

        # --- deadlines: one timer per connection, for the phase the client is in ------------------

        def _arm(self, phase: str) -> None:
            seconds = {"headers": header_timeout_s, "body": body_timeout_s}.get(phase)
            if phase == self.phase and (self.deadline is not None or seconds is None):
                return
            if self.deadline is not None:
                self.deadline.cancel()
            self.deadline, self.phase = None, phase
            if seconds is not None and not self.transport.is_closing():
                self.deadline = self.loop.call_later(seconds, self._expired, phase)

        def _follow(self) -> None:
            """Arm the deadline of the phase the client is in now (h11's view of its side)."""
            state = self.conn.their_state
            self._arm("headers" if state is h11.IDLE else "body" if state is h11.SEND_BODY else "")

        def _expired(self, phase: str) -> None:
            self.deadline = None
            if self.transport.is_closing():
                return
            if phase == "headers" and self.conn.our_state is h11.IDLE:
                body = _HEADER_TIMEOUT_ANSWER % header_timeout_s
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                     b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
            logger.info("closing a connection whose request %s did not arrive in time", phase)
            self.transport.close()

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm("headers")

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._follow()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._follow()

        def connection_lost(self, exc: Optional[Exception]) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None
            super().connection_lost(exc)

    return JSON400Protocol


def create_app(model: Union[str, "os.PathLike[str]", Classifier], config: Optional[ServeConfig] = None, *,
               device: str = "auto", threads: Optional[int] = None, engine: str = "onnxruntime",
               compute: str = "fp32", **overrides: Any) -> App:
    """The server for ``model`` (a path, opened on ``device`` with ``engine`` and ``compute``, or
    an open :class:`Classifier`).

    A path is opened with batches of ``max_batch_size`` (what the batcher runs; ``engine="auto"``
    measures at it). ``app.asgi`` is the ASGI application: run it with :func:`serve`, or mount it
    in another ASGI server (its lifespan starts the batcher). Keyword ``overrides`` replace
    fields of ``config``.
    """
    cfg = dataclasses.replace(config or ServeConfig(), **overrides)
    clf = model if isinstance(model, Classifier) else Classifier(
        model, device=device, threads=threads, batch_size=cfg.max_batch_size, engine=engine, compute=compute)
    return App(clf, cfg)


def serve(model: Union[str, "os.PathLike[str]", Classifier, App], config: Optional[ServeConfig] = None, *,
          device: str = "auto", threads: Optional[int] = None, engine: str = "onnxruntime", compute: str = "fp32",
          **overrides: Any) -> None:
    """Run the server until SIGTERM or Ctrl-C (then finish the requests in flight).

    ``model`` is a path (opened by :func:`create_app`), an open :class:`Classifier`, or an
    :class:`App` from :func:`create_app` (then ``config`` and ``overrides`` are its own).
    """
    _imports()
    import uvicorn

    if isinstance(model, App):
        app, cfg = model, model.config
    else:
        cfg = dataclasses.replace(config or ServeConfig(), **overrides)
        app = create_app(model, cfg, device=device, threads=threads, engine=engine, compute=compute)
    server = uvicorn.Server(uvicorn.Config(
        app.asgi, host=cfg.host, port=cfg.port, http=json_400_protocol(cfg.header_timeout_s, cfg.read_timeout_s + 1.0),
        log_level="warning", access_log=False, server_header=False,
        limit_concurrency=cfg.max_connections, timeout_keep_alive=5,
        timeout_graceful_shutdown=cfg.graceful_timeout_s, lifespan="on",
    ))
    server.run()
