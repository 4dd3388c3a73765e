"""Serve the web demo and an exported model on 127.0.0.1, cross-origin isolated so that
onnxruntime-web can use WebAssembly threads.

    (cd web && npm ci)                                     # once: the pinned onnxruntime-web
    coopkit export runs/mine --out model.onnx              # writes model.onnx and model.json
    python examples/web/serve.py model.onnx                # then open the printed URL

Any static server works for the page itself (single-threaded); this one adds the two headers
that make a page cross-origin isolated (``Cross-Origin-Opener-Policy: same-origin``,
``Cross-Origin-Embedder-Policy: require-corp``), serves the repository root (the page, web/
and its node_modules) and mounts the model's folder at ``/models/``. Standard library only.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import posixpath
import urllib.parse
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[2]
MODELS = "/models/"
PAGE = "/examples/web/"

TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm",
         ".json": "application/json", ".onnx": "application/octet-stream", ".data": "application/octet-stream"}


class Handler(http.server.SimpleHTTPRequestHandler):
    """Static files from ``directory``, plus ``models`` under ``/models/``."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, **TYPES}

    def __init__(self, *args: Any, models: Optional[Path], isolated: bool, quiet: bool, **kwargs: Any) -> None:
        self.models, self.isolated, self.quiet = models, isolated, quiet
        super().__init__(*args, **kwargs)

    def translate_path(self, path: str) -> str:
        clean = urllib.parse.unquote(urllib.parse.urlsplit(path).path)
        if self.models is not None and clean.startswith(MODELS):
            rest = posixpath.normpath(clean[len(MODELS):]).lstrip("/")
            if rest.startswith(".."):
                return os.fspath(self.models / "__outside__")
            return os.fspath(self.models / rest)
        return super().translate_path(path)

    def end_headers(self) -> None:
        if self.isolated:
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        if not self.quiet:
            super().log_message(format, *args)


def make_server(models: Optional[Path] = None, port: int = 8000, host: str = "127.0.0.1", *,
                isolated: bool = True, quiet: bool = False) -> http.server.ThreadingHTTPServer:
    """A server (not yet started) for the repository root and ``models`` under ``/models/``."""
    handler = functools.partial(Handler, directory=os.fspath(ROOT), models=models, isolated=isolated, quiet=quiet)
    return http.server.ThreadingHTTPServer((host, port), handler)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="The .onnx file written by coopkit export (model.json beside it).")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--no-isolation", action="store_true", help="Leave out the COOP/COEP headers (one thread).")
    args = parser.parse_args(argv)
    model = args.model.resolve()
    if not model.is_file():
        parser.error(f"model not found: {model}")
    if not (ROOT / "web" / "node_modules" / "onnxruntime-web").is_dir():
        parser.error(f"onnxruntime-web is not installed: run `npm ci` in {ROOT / 'web'}")
    server = make_server(model.parent, args.port, args.host, isolated=not args.no_isolation)
    print(f"http://{args.host}:{server.server_address[1]}{PAGE}?model={MODELS}{urllib.parse.quote(model.name)}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
