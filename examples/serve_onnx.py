"""Serve an exported coopkit classifier over HTTP with the standard library only.

Needs ``pip install coopkit`` (numpy, Pillow, onnxruntime): no torch, no web framework. For
production use ``coopkit serve`` (Starlette + uvicorn, micro-batching, metrics); this file
is the minimal baseline it is benchmarked against, hardened against bad clients:

    python examples/serve_onnx.py model.onnx --port 8000
    curl --data-binary @cat.jpg http://localhost:8000/predict?top_k=3
    # {"labels": ["cat", "lynx", "dog"], "probs": [0.91, 0.05, 0.02]}

Limits (what one client can cost the server):

* bad ``?top_k=`` or ``Content-Length`` values get 400 with a JSON error; bodies over
  ``--max-upload`` bytes get 413 and the connection is closed (the body is never read);
* every connection has a socket timeout (``--timeout`` seconds for each read), so a stalled
  upload frees its thread; at most ``--max-connections`` connections are served at once
  (more get 503 straight away), so stalled clients cannot pile up threads;
* at most ``--max-decodes`` images are decoded at once, each of at most ``--max-pixels`` pixels
  (refused from the header, 413, before decoding): decoding holds at most about
  ``max_decodes * max_pixels * 8`` bytes (8-bit images, measured by
  ``benchmarks/bench_decode_memory.py``), returned to the OS after each large image.

One ``Classifier`` serves every request thread: it is thread-safe and runs on the GPU when
onnxruntime's CUDA provider works there, else on the CPU. Each request is one session run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from coopkit.runtime import Classifier
from coopkit.runtime.preprocess import TRIM_AFTER_PIXELS, ImageTooLargeError, check_image_header, release_memory
from coopkit.runtime.session import default_workers

MAX_UPLOAD = 20 * 1024 * 1024  # bytes


def make_handler(clf: Classifier, max_upload: int = MAX_UPLOAD, max_pixels: int = 40_000_000,
                 max_decodes: int = 2, timeout: float = 30.0) -> type[BaseHTTPRequestHandler]:
    decodes = threading.BoundedSemaphore(max_decodes)

    class Handler(BaseHTTPRequestHandler):
        def setup(self) -> None:
            self.timeout = timeout  # socket timeout for every read of this connection
            super().setup()

        def log_message(self, format: str, *args: Any) -> None:  # quiet per-request log lines
            logging.getLogger("serve_onnx").debug(format, *args)

        def _reply(self, status: int, body: dict, close: bool = False) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if close:  # the request body was not read: do not parse it as the next request
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # health check and the label set
            if urlparse(self.path).path not in ("/", "/health"):
                return self._reply(404, {"error": "GET / or /health; POST an image to /predict"})
            self._reply(200, {"classes": clf.classnames, "provider": clf.provider})

        def do_POST(self) -> None:
            url = urlparse(self.path)
            if url.path != "/predict":
                return self._reply(404, {"error": "POST an image to /predict"}, close=True)
            text = self.headers.get("Content-Length", "")
            if not text.strip().isdigit():
                return self._reply(400 if text else 411, {"error": f"Content-Length must be a byte count, got {text[:40]!r}"},
                                   close=True)
            length = int(text)
            if not 0 < length <= max_upload:
                return self._reply(413 if length else 400, {"error": f"send 1 to {max_upload} bytes of image"}, close=True)
            top = parse_qs(url.query, keep_blank_values=True).get("top_k", ["5"])[-1]
            if not top.isdigit() or int(top) < 1:
                return self._reply(400, {"error": f"top_k must be a positive integer, got {top[:40]!r}"}, close=True)
            try:
                data = self.rfile.read(length)  # each read times out after `timeout` seconds
            except TimeoutError:
                return self._reply(408, {"error": f"request body not received within {timeout:g} s"}, close=True)
            if len(data) < length:
                self.close_connection = True
                return  # the client left
            with decodes:  # bounded decoding memory
                try:  # a huge image (Pillow's decompression bombs too) is refused from its header
                    size = check_image_header(data, max_pixels)
                except ImageTooLargeError as e:
                    return self._reply(413, {"error": str(e)})
                # errors="skip": an undecodable upload becomes a result with .error, not an exception
                (result,) = clf.predict(data, top_k=min(int(top), len(clf.classnames)), errors="skip")
                if size is not None and size[0] * size[1] >= TRIM_AFTER_PIXELS:
                    release_memory()  # each thread's allocator would keep the decoded image's memory
            if not result.ok:
                return self._reply(400, {"error": result.error})
            answer = result.to_dict()  # a multi-label file: every label that applies, and "label_probs"
            del answer["source"]
            self._reply(200, answer)

    return Handler


class BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` at once (more get 503 and are closed)."""

    daemon_threads = True
    request_queue_size = 128  # listen backlog (socketserver's 5 reset connections under 16 concurrent clients)

    def __init__(self, address: tuple[str, int], handler: type, max_connections: int = 64) -> None:
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            body = b'{"error": "server busy: too many connections; retry shortly"}'
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a coopkit ONNX classifier over HTTP.")
    parser.add_argument("model", help="the .onnx file from `coopkit export`")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--max-upload", type=int, default=MAX_UPLOAD, help="largest body in bytes")
    parser.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image in pixels")
    parser.add_argument("--max-decodes", type=int, default=default_workers(),
                        help="images decoded at once")
    parser.add_argument("--max-connections", type=int, default=64, help="connections served at once")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds for each socket read")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    clf = Classifier(args.model, device=args.device)
    handler = make_handler(clf, args.max_upload, args.max_pixels, args.max_decodes, args.timeout)
    server = BoundedServer((args.host, args.port), handler, args.max_connections)
    print(f"{len(clf.classnames)} classes on {clf.provider}; listening on http://{args.host}:{args.port}", flush=True)
    with server, contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: close the socket, exit quietly
        server.serve_forever()


if __name__ == "__main__":
    main()
