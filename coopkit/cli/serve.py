"""``coopkit serve``: an HTTP server with dynamic micro-batching for an exported ONNX file (torch-free)."""

from __future__ import annotations

from typing import Any, Optional

import click

from ..runtime.engines import EngineConfig
from ..runtime.serve import ServeConfig
from .base import command, config_options, pop_config


@command("serve")
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@config_options(ServeConfig)
@config_options(EngineConfig)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "gpu"]), default="auto", show_default=True,
              help="auto: CUDA when it really works, else CPU (with --runtime-engine auto: every device is measured); "
                   "gpu: OpenVINO's GPU.")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="CPU threads for onnxruntime (default: one per CPU that other processes leave idle).")
def serve_cmd(model: str, device: str, threads: Optional[int], **kwargs: Any) -> None:
    """Serve the exported MODEL (.onnx) over HTTP until SIGTERM or Ctrl-C.

    POST /predict with the bytes of an image (or multipart/form-data with several), ?top_k=K;
    GET /health, /ready, /metadata, /metrics (Prometheus). Concurrent requests are grouped into
    one session run (--max-batch-size, --max-wait-ms); a full queue answers 503.
    --runtime-engine picks what runs the graph (auto: measured once per file and machine at
    --max-batch-size); /health names it. Needs the serve extra (pip install 'coopkit[serve]'), no torch.
    """
    from ..runtime.serve import create_app, serve

    cfg = pop_config(ServeConfig, kwargs)
    eng = pop_config(EngineConfig, kwargs)
    # load errors before the banner
    app = create_app(model, cfg, device=device, threads=threads, engine=eng.engine, compute=eng.compute)
    what = "labels (multi-label)" if app.clf.multilabel else "classes"
    click.echo(f"{len(app.clf.classnames)} {what} on {app.clf.engine.describe()}; listening on "
               f"http://{cfg.host}:{cfg.port} (max batch {cfg.max_batch_size}, max wait {cfg.max_wait_ms:g} ms)", err=True)
    serve(app)
