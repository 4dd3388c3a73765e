"""Serve an exported coopkit classifier over HTTP with the standard library only.

Needs ``pip install coopkit[runtime]`` (numpy, Pillow, onnxruntime): no torch.

    python examples/serve_onnx.py model.onnx --port 8000
    curl --data-binary @cat.jpg http://localhost:8000/predict?top_k=3
    # {"labels": ["cat", "lynx", "dog"], "probs": [0.91, 0.05, 0.02]}

One ``Classifier`` serves every request thread: it is thread-safe and runs on the GPU when
onnxruntime's CUDA provider works there, else on the CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from coopkit.runtime import Classifier

MAX_UPLOAD = 20 * 1024 * 1024  # bytes


def make_handler(clf: Classifier) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # health check and the label set
            self._reply(200, {"classes": clf.classnames, "provider": clf.provider})

        def do_POST(self) -> None:
            url = urlparse(self.path)
            if url.path != "/predict":
                return self._reply(404, {"error": "POST an image to /predict"})
            length = int(self.headers.get("Content-Length", 0))
            if not 0 < length <= MAX_UPLOAD:
                return self._reply(413 if length else 400, {"error": f"send 1 to {MAX_UPLOAD} bytes of image"})
            top_k = int(parse_qs(url.query).get("top_k", ["5"])[0])
            # errors="skip": an undecodable upload becomes a result with .error, not an exception
            (result,) = clf.predict(self.rfile.read(length), top_k=max(1, top_k), errors="skip")
            if not result.ok:
                return self._reply(400, {"error": result.error})
            self._reply(200, {"labels": list(result.labels), "probs": list(result.probs)})

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a coopkit ONNX classifier over HTTP.")
    parser.add_argument("model", help="the .onnx file from `coopkit export`")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    clf = Classifier(args.model, device=args.device)
    print(f"{len(clf.classnames)} classes on {clf.provider}; listening on http://{args.host}:{args.port}")
    ThreadingHTTPServer((args.host, args.port), make_handler(clf)).serve_forever()


if __name__ == "__main__":
    main()
