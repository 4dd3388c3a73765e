"""One CLIP-LoRA training step: coopkit's against the official one, same model, same batch, same run.

The official step is ``run_lora``'s loop body (MaxZanella/CLIP-LoRA ``lora.py``, vendored in
``tests/reference/clip_lora_official.py``) on its own model: OpenAI CLIP built by its
``clip/model.py`` from the same weights, adapted by its ``apply_lora`` (``PlainMultiheadAttentionLoRA``:
separate q / k / v / o linears, ``B A`` formed and multiplied per call), every class's full
77-token prompt through the text tower every step, fp16 autocast with a GradScaler on CUDA.
coopkit's step is :func:`coopkit.methods.clip_lora.train_step` (what ``fit`` runs): the fused
q/k/v product plus the low-rank branch ``B (A x)``, prompts cut after their end token.

Both steps run alternately on the same random images, labels and adapters, after warm-up; the
ratio is official / coopkit (above 1: coopkit is faster).

    python benchmarks/bench_clip_lora.py                      # ViT-B-16 (random init), K = 10 and 100, batch 32
    python benchmarks/bench_clip_lora.py --classes 1000 --encoder both --steps 10
    python benchmarks/bench_clip_lora.py --smoke              # tiny model, CPU, 2 steps: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

#: A tiny OpenAI-architecture model for --smoke (12 blocks per tower, as the official position tables need).
SMOKE = {"embed_dim": 64, "quick_gelu": True,
         "vision_cfg": {"image_size": 32, "layers": 12, "width": 128, "patch_size": 8, "head_width": 64},
         "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 12}}


def _backbone(model: str, device: str):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import random_backbone

    return random_backbone(model, device, 'smoke', SMOKE)


def run(model: str, k: int, encoder: str, batch: int, steps: int, warmup: int, device: str) -> dict:
    import torch

    from bench_train_step import _classnames
    from coopkit.methods.clip_lora import CLIPLoRA, LoRAConfig, official_state, train_step
    from reference import clip_lora_official as official

    torch.manual_seed(0)
    bb = _backbone(model, device)
    names = _classnames(k)
    cfg = LoRAConfig(encoder=encoder)
    ours = CLIPLoRA(bb, names, cfg)
    with torch.no_grad():
        for p in ours.lora_parameters():
            p.normal_(std=0.02)

    sd = {n: t.detach().clone() for n, t in bb.model.state_dict().items()}
    ref = official.build_model(dict(sd))  # fp16 weights, as clip.load gives on CUDA
    ref = ref.to(device) if device != "cpu" else ref.float()  # clip.load: model.float() on the CPU
    args = types.SimpleNamespace(encoder=encoder, position=cfg.position, params=list(cfg.projections), r=cfg.r,
                                 alpha=cfg.alpha, dropout_rate=cfg.dropout_rate, backbone="ViT-B/16", n_iters=500,
                                 shots=16, lr=cfg.lr)
    with _quiet():
        layers = official.apply_lora(args, ref)
    ref = ref.to(device)
    with tempfile.TemporaryDirectory() as tmp, _quiet():  # the same adapters in both, read by the official load_lora
        args.save_path, args.dataset, args.seed, args.filename = tmp, "bench", 1, "lora"
        path = Path(tmp) / "vitb16" / "bench" / "16shots" / "seed1" / "lora.pt"
        path.parent.mkdir(parents=True)
        torch.save(official_state(ours), path)
        official.load_lora(args, layers)
    opt_ref, sched_ref, scaler_ref = official.official_optimizer(args, ref)
    dataset = types.SimpleNamespace(template=[cfg.template], classnames=names)
    textual = None
    if encoder == "vision":
        with torch.no_grad():
            tokens = torch.as_tensor(bb.tokenizer([cfg.template.format(n) for n in names])).to(device)
            textual = torch.nn.functional.normalize(ref.encode_text(tokens).float(), dim=-1).t()  # (D, C)

    params = ours.lora_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 500 * 16, eta_min=cfg.eta_min)
    precision = "fp16" if device != "cpu" else "fp32"  # the official autocast dtype
    scaler = torch.amp.GradScaler("cuda", enabled=device != "cpu")
    ref.train()
    ours.train()
    images = torch.randn(batch, 3, *bb.image_size, device=device)
    labels = torch.randint(k, (batch,), device=device)
    tokenize = lambda texts: torch.as_tensor(bb.tokenizer(texts))  # noqa: E731 - stands for clip.tokenize

    def official_step() -> None:
        official.official_train_step(args, ref, 100, dataset, images, labels, textual, opt_ref, sched_ref, scaler_ref,
                                     tokenize)

    def coopkit_step() -> None:
        train_step(ours, images, labels, opt, sched, scaler, precision)

    def timed(fn) -> float:
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for _ in range(warmup):
        official_step()
        coopkit_step()
    times: dict[str, list[float]] = {"official": [], "coopkit": []}
    for _ in range(steps):  # alternate, so that both see the same machine state
        times["official"].append(timed(official_step))
        times["coopkit"].append(timed(coopkit_step))
    med = {m: statistics.median(v) for m, v in times.items()}
    return {"model": model, "classes": k, "encoder": encoder, "batch": batch, "device": device, "steps": steps,
            "official_ms": round(1000 * med["official"], 2), "coopkit_ms": round(1000 * med["coopkit"], 2),
            "ratio": round(med["official"] / med["coopkit"], 2)}


class _quiet:
    """Silence the official apply_lora's print of every block."""

    def __enter__(self) -> None:
        self.stdout, sys.stdout = sys.stdout, open(os.devnull, "w")

    def __exit__(self, *exc: object) -> None:
        sys.stdout.close()
        sys.stdout = self.stdout


def main() -> None:
    import torch

    from machine import describe

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-16-quickgelu", help="open_clip name (OpenAI architecture), random init")
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--encoder", nargs="+", default=["both"], choices=["text", "vision", "both"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny model, CPU, K=4, 2 steps: checks the script runs")
    a = parser.parse_args()
    if a.smoke:
        a.model, a.classes, a.batch, a.steps, a.warmup, a.device = "smoke", [4], 2, 2, 1, "cpu"
        a.encoder = ["text", "vision", "both"]
    print(json.dumps({"machine": describe(torch.get_num_threads()),
                      "gpu": torch.cuda.get_device_name() if a.device != "cpu" else None}))
    for k in a.classes:
        for encoder in a.encoder:
            if encoder == "vision" and a.device == "cpu":  # run_lora casts its text features to fp16
                print(json.dumps({"classes": k, "encoder": encoder, "skipped": "the official vision-only step "
                                  "multiplies fp32 image features by fp16 text features: CUDA only"}))
                continue
            print(json.dumps(run(a.model, k, encoder, a.batch, a.steps, a.warmup, a.device)), flush=True)


if __name__ == "__main__":
    main()
