"""One CoOp training step: coopkit's against a naive step, same model, same machine, same run.

coopkit's step trains on cached image features and passes prompts cut at their EOT token,
with the shared context positions computed once (unified context) and large label sets in
checkpointed chunks. The naive step runs the image encoder on the batch every step and the
full 77-token prompt of every class through the text tower, as the official CoOp does.

Each (method, K) runs in its own subprocess so that its peak memory (max RSS) is its own.
The step's peak is reported above the process's memory after loading the model.

    python benchmarks/bench_train_step.py                 # K = 10, 100, 1000 on ViT-B-32 (random init)
    python benchmarks/bench_train_step.py --classes 10 --steps 2
    python benchmarks/bench_train_step.py --model siglip2-shaped --classes 10 100
    python benchmarks/bench_train_step.py --model metaclip2-shaped --classes 10 100

``siglip2-shaped`` is ViT-B-16-SigLIP2 as open_clip configures it (its timm image tower; text
768 wide, 12 blocks, 64 tokens, bidirectional, pooled at the last position: the plain pass)
with the vocabulary cut to a tiny local Gemma-style tokenizer's (the embedding table's size does
not change a step's time). ``metaclip2-shaped`` is ViT-B-32's image tower with the text tower
of ViT-H-14-worldwide at ViT-B-32's text size (512 wide, 12 blocks; XLM-V-style tokenizer,
pooled at ``</s>`` by id, causal: the fast paths), vocabulary cut likewise.

    python benchmarks/bench_train_step.py --contention --model coopkit-tiny --classes 10   # one CPU kept busy

``--contention`` times coopkit's step with and without a second process spinning on one CPU,
with torch's own thread count (one per CPU: what fit used before) and with fit's default (one
per CPU that other processes leave idle, measured when training starts).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _classnames(k: int) -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    names, seen = [], set()
    for i, n in enumerate(IMAGENET_CLASSNAMES):
        n = n if n not in seen else f"{n} {i}"
        seen.add(n)
        names.append(n)
    return names[:k]


SHAPED = ("siglip2-shaped", "metaclip2-shaped")


def _backbone(model: str, folder: str):
    """A random-init backbone: an open_clip name, or one of :data:`SHAPED` (see the docstring)."""
    import json
    from pathlib import Path

    import open_clip

    import coopkit
    from coopkit.research.families import tiny_tokenizer
    from coopkit.runtime.tokenizers.hf import HFTokenizer

    if model not in SHAPED:
        return coopkit.load_backbone(model, pretrained=None, device="cpu")
    style, base = ("gemma", "ViT-B-16-SigLIP2") if model == "siglip2-shaped" else ("xlm", "ViT-H-14-worldwide")
    tok = tiny_tokenizer(style, Path(folder) / "tokenizer")
    cfg = open_clip.get_model_config(base)
    cfg["text_cfg"].update(hf_tokenizer_name=str(tok), vocab_size=HFTokenizer.from_pretrained(tok, 16).vocab_size)
    if model == "metaclip2-shaped":
        b32 = open_clip.get_model_config("ViT-B-32")
        cfg.update(embed_dim=b32["embed_dim"], vision_cfg=b32["vision_cfg"])
        cfg["text_cfg"].update(width=512, heads=8, layers=12)
    path = Path(folder) / f"{model}.json"
    path.write_text(json.dumps(cfg))
    return coopkit.load_backbone(str(path), pretrained=None, device="cpu", tokenizer=str(tok))


def worker(method: str, k: int, steps: int, model: str, batch: int, threads: str = "torch") -> dict:
    import tempfile

    import torch
    import torch.nn.functional as F

    from coopkit.prompts import PromptLearner, reference_text_features
    from coopkit.runtime.session import default_threads

    torch.set_num_threads(default_threads() if threads == "auto" else os.cpu_count() or 1)
    torch.manual_seed(0)
    bb = _backbone(model, tempfile.mkdtemp())
    learner = PromptLearner(bb, _classnames(k), n_ctx=16)
    opt = torch.optim.SGD([learner.ctx], lr=0.002, momentum=0.9, weight_decay=5e-4)
    scale = bb.model.logit_scale.exp()
    size = bb.image_size
    images = torch.randn(batch, 3, *size)
    with torch.no_grad():
        dim = learner.text_features().shape[1]
    cached = F.normalize(torch.randn(batch, dim), dim=-1)
    labels = torch.randint(k, (batch,))
    base_rss = _current_rss_mb()

    def step() -> None:
        if method == "coopkit":
            x, text = cached, learner.text_features()
        else:
            with torch.no_grad():
                x = F.normalize(bb.model.encode_image(images), dim=-1)
            text = reference_text_features(learner)
        loss = F.cross_entropy(scale * x @ text.T, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    result = {"method": method, "K": k, "step_s": statistics.median(times), "peak_mb": _rss_mb() - base_rss,
              "process_peak_mb": _rss_mb(), "path": "fast" if learner.packed else "plain",
              "threads": torch.get_num_threads()}
    if method == "coopkit":
        with torch.no_grad():
            result["max_abs_diff_vs_full"] = float((learner.text_features() - reference_text_features(learner)).abs().max())
    return result


def run(method: str, k: int, steps: int, model: str, batch: int, threads: str = "torch") -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--classes", str(k), "--steps", str(steps),
           "--model", model, "--batch", str(batch), "--threads", threads]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"method": method, "K": k, "error": (out.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def contention(args: argparse.Namespace) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from machine import busy_core, describe, load

    print(f"# coopkit training step under contention, {args.model}, batch {args.batch}, n_ctx 16, median of "
          f"{args.steps} steps; machine: {describe()}")
    print("\n| K | threads | setting | step, no extra process | step, one CPU busy | throughput busy / idle |")
    print("|---|---|---|---|---|---|")
    for k in args.classes:
        for setting, label in (("torch", "before: torch's default (one per CPU)"), ("auto", "now: fit's default (idle CPUs)")):
            idle = run("coopkit", k, args.steps, args.model, args.batch, setting)
            with busy_core():
                busy = run("coopkit", k, args.steps, args.model, args.batch, setting)
            if "error" in idle or "error" in busy:
                print(f"| {k} | | {label} | {idle.get('error', '')} | {busy.get('error', '')} | |")
                continue
            print(f"| {k} | {idle['threads']} / {busy['threads']} | {label} | {1000 * idle['step_s']:.1f} ms "
                  f"| {1000 * busy['step_s']:.1f} ms | {100 * idle['step_s'] / busy['step_s']:.0f}% |")
    print(f"\n# {load()} after")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--naive-max-classes", type=int, default=100,
                    help="Skip the naive step above this K (at K=1000 it needs tens of GB).")
    ap.add_argument("--contention", action="store_true", help="time coopkit's step with one CPU kept busy")
    ap.add_argument("--threads", default="torch", choices=["torch", "auto"], help=argparse.SUPPRESS)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.classes[0], args.steps, args.model, args.batch, args.threads)))
        return
    if args.contention:
        contention(args)
        return

    import torch

    print(f"# one training step, {args.model} random init, batch {args.batch}, n_ctx 16, unified context")
    print("# text path: the fast paths where exact (causal towers), else the plain full-length pass")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from machine import cpu_model, isa, load

    print(f"# machine: {cpu_model()} ({isa()}), {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {load()} before; ImageNet class names; median of {args.steps} steps")
    print()
    print("| K | coopkit step (s) | naive step (s) | speed-up | coopkit step peak (MB) | naive step peak (MB) "
          "| coopkit process peak (MB) | max abs diff of text features |")
    print("|---|---|---|---|---|---|---|---|")
    for k in args.classes:
        ours = run("coopkit", k, args.steps, args.model, args.batch)
        naive = (run("naive", k, args.steps, args.model, args.batch) if k <= args.naive_max_classes
                 else {"error": f"not run (K > {args.naive_max_classes})"})
        if "error" in ours:
            print(f"| {k} | error: {ours['error']} | | | | | | |")
            continue
        if "error" in naive:
            print(f"| {k} | {ours['step_s']:.3f} | {naive['error']} | - | {ours['peak_mb']:.0f} | - | "
                  f"{ours['process_peak_mb']:.0f} | {ours['max_abs_diff_vs_full']:.1e} |")
            continue
        print(f"| {k} | {ours['step_s']:.3f} | {naive['step_s']:.3f} | {naive['step_s'] / ours['step_s']:.1f}x | "
              f"{ours['peak_mb']:.0f} | {naive['peak_mb']:.0f} | {ours['process_peak_mb']:.0f} | "
              f"{ours['max_abs_diff_vs_full']:.1e} |")
    print(f"\n# {load()} after")


if __name__ == "__main__":
    main()
