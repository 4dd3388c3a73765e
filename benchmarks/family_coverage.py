"""Which open_clip models coopkit covers: every name of ``open_clip.list_models()`` sorted into its
family, and each family checked end to end on a shrunken random-init config with a tiny local
tokenizer (load -> exact prompt features -> 1-epoch fit -> fp32 export with the text graph ->
runtime logits; :func:`coopkit.research.families.check_family`). Offline, CPU.

    python benchmarks/family_coverage.py                 # one model per family (97 s on 2 loaded cores)
    python benchmarks/family_coverage.py --all           # every model name (78 s on 2 quiet cores)
    python benchmarks/family_coverage.py --out docs/family_coverage.md

Writes a markdown table: family, model names, status (the largest differences seen), and the
path CoOp takes (the fast paths where exact, else the plain full-length pass).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="check every model name, not one per family")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import logging

    import open_clip
    import torch

    from coopkit.research.families import check_family, representatives

    logging.getLogger().setLevel(logging.ERROR)
    families = representatives()
    total = sum(len(v) for v in families.values())
    rows = []
    started = time.perf_counter()
    for family, names in families.items():
        checked = names if args.all else names[:1]
        results, failures = [], []
        for name in checked:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    results.append(check_family(name, Path(tmp), threads=args.threads))
                except Exception as e:  # report and go on: the table says which step failed
                    failures.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                    traceback.print_exc()
        worst = {k: max((r[k] for r in results), default=float("nan")) for k in (
            "init_vs_encode_text", "random_vs_full_pass", "runtime_logit_diff", "runtime_new_classes_diff")}
        status = ("passes" if not failures else f"FAILS ({'; '.join(failures)})") + (
            f": features {max(worst['init_vs_encode_text'], worst['random_vs_full_pass']):.1e}, runtime logits "
            f"{max(worst['runtime_logit_diff'], worst['runtime_new_classes_diff']):.1e}" if results else "")
        path = sorted({r["path"] for r in results})
        rows.append((family, names, checked, status, ", ".join(path) or "-",
                     any(r["logit_bias"] is not None for r in results)))
        print(f"{family}: {status} ({len(checked)} of {len(names)} checked)", flush=True)
    lines = [
        f"open_clip {open_clip.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} threads; {total} model names in {len(families)} families; "
        f"{'every name' if args.all else 'one name per family (the first listed)'} checked in "
        f"{time.perf_counter() - started:.0f} s.",
        "",
        "| family | names | checked | status (largest difference: features / runtime logits) | CoOp path | logit bias |",
        "|---|---|---|---|---|---|",
    ]
    for family, names, checked, status, path, bias in rows:
        lines.append(f"| {family} | {len(names)}: {', '.join(names)} | {', '.join(checked)} | {status} | {path} | "
                     f"{'yes' if bias else 'no'} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
