"""Throughput and latency of ``coopkit serve`` (micro-batching on and off) and the standard-library example.

Each server runs as its own process on 127.0.0.1 with the same exported model (the embedded
``coopkit-tiny``, or a ViT-B-32-sized random-init model); ``--clients`` threads in this process
(one keep-alive connection each) send ``--requests`` JPEG uploads each, as fast as answers come
back. Reported per server: images per second over the whole run, and p50 / p99 latency of a
request. The clients share the machine's cores with the server (loopback only), so on a small
machine they take part of its CPU; every server is measured under the same load, in turns.

* ``serve, batching``: ``coopkit serve --max-batch-size 32 --max-wait-ms W``;
* ``serve, no batching``: ``coopkit serve --max-batch-size 1`` (one session run per image);
* ``example``: ``examples/serve_onnx.py`` (a thread per connection, one ``predict`` per request,
  concurrent session runs).

A benchmark, not a test: it prints a table and never fails on a ratio.

    python benchmarks/bench_serve.py                                    # coopkit-tiny, 16 clients x 50
    python benchmarks/bench_serve.py --model ViT-B-32 --precision fp32 --requests 20
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import export_model, machine_info, write_photos  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for _ in range(300):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read())
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def load(port: int, payloads: list[bytes], clients: int, requests: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        mine = []
        barrier.wait()
        for r in range(requests):
            body = payloads[(c * requests + r) % len(payloads)]
            t = time.perf_counter()
            try:
                conn.request("POST", "/predict?top_k=3", body, {"Content-Type": "image/jpeg"})
                resp = conn.getresponse()
                data = resp.read()
                ok = resp.status == 200 and "labels" in json.loads(data)
                problem = f"{resp.status} {data[:100]!r}"
            except (OSError, http.client.HTTPException) as e:  # counted, and the client goes on
                conn.close()
                ok, problem = False, f"{type(e).__name__}: {e}"
            mine.append(time.perf_counter() - t)
            if not ok:
                with lock:
                    errors.append(problem)
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start_t = time.perf_counter()
    for t in threads:
        t.join()
    total = time.perf_counter() - start_t
    lat = np.array(latencies) * 1000
    return {"img_s": (len(lat) - len(errors)) / total, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "errors": len(errors), "n": len(lat), "first_error": errors[:1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="coopkit-tiny")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=50, help="requests per client")
    parser.add_argument("--size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2, help="turns of all servers; the best turn of each is shown")
    args = parser.parse_args()

    before = machine_info(None)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = export_model(args.model, args.precision, root / "model.onnx")
        paths = write_photos(root / "photos", 32, tuple(args.size))
        payloads = [Path(p).read_bytes() for p in paths]
        py = sys.executable
        servers = {
            "serve, batching": lambda port: [py, "-m", "coopkit", "serve", str(model), "--port", str(port), "--device",
                                             "cpu", "--max-batch-size", "32", "--max-wait-ms", str(args.max_wait_ms)],
            "serve, no batching": lambda port: [py, "-m", "coopkit", "serve", str(model), "--port", str(port),
                                                "--device", "cpu", "--max-batch-size", "1"],
            "example (stdlib)": lambda port: [py, str(ROOT / "examples" / "serve_onnx.py"), str(model), "--port",
                                              str(port), "--device", "cpu", "--max-connections", "64"],
        }
        for _ in range(args.rounds):
            for name, cmd in servers.items():
                port = _port()
                proc = start(cmd(port), port)
                try:
                    load(port, payloads, 2, 3)  # warm-up
                    got = load(port, payloads, args.clients, args.requests)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(60)
                if name not in results or got["img_s"] > results[name]["img_s"]:
                    results[name] = got
    print(f"\nbefore: {before}\nafter:  {machine_info(None)}")
    print(f"{args.model} {args.precision}; {args.clients} clients x {args.requests} JPEG requests "
          f"({args.size[0]}x{args.size[1]}), loopback, best of {args.rounds} turns\n")
    print("| server | images/s | p50 latency | p99 latency | errors |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['img_s']:.1f} | {r['p50_ms']:.0f} ms | {r['p99_ms']:.0f} ms | {r['errors']} of {r['n']} |")
    for name, r in results.items():
        if r["first_error"]:
            print(f"first error, {name}: {r['first_error'][0]}")


if __name__ == "__main__":
    main()
