"""The papers' protocols on the official datasets, and the published numbers they are compared with.

Settings come from the official code's configs and scripts; every published number carries the
source it was typed in from (a file in a paper's own repository, read at the commit named, or a
later paper that reprints the table, named with its table). A cell with no number here was not
verifiable from a readable source and is left out rather than remembered: CoOp's own few-shot
numbers on the datasets other than ImageNet (a figure and a spreadsheet on Google Drive) and
CoOp's Table 1 (domain shift) are such cells.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import epochs_for_shots
from ..methods.tip_adapter import TipAdapterConfig
from ..methods import coop, for_protocol, method_names

#: CoOp's few-shot and domain-shift experiments use ResNet-50 (its figure and Table 1 also show
#: other backbones); CoCoOp's and KgCoOp's base-to-new experiments use ViT-B/16. OpenAI weights.
PAPER_BACKBONES = {"fewshot": ("RN50", "openai"), "shift": ("RN50", "openai"), "base2new": ("ViT-B-16", "openai")}
SHOTS = (1, 2, 4, 8, 16)
#: Methods of the few-shot experiment (``coopkit bench fewshot --methods``): the registry's rows of the
#: ``fewshot`` protocol (methods and their variants), and its default set.
METHODS = for_protocol("fewshot")
DEFAULT_METHODS = for_protocol("fewshot", default=True)
#: The methods registered for each protocol (``coopkit bench shift`` / ``base2new --methods``), and those
#: it runs by default (each method's ``bench_default``: zero-shot, CoOp, CoCoOp; the deep-prompt
#: methods and CLIP-LoRA only when named).
PROTOCOL_METHODS = {p: method_names(p) for p in ("shift", "base2new")}
PROTOCOL_DEFAULTS = {p: method_names(p, default=True) for p in ("shift", "base2new")}
#: The base-to-new row of CoOp fitted with KgCoOp's regulariser (``kg_weight`` > 0).
KGCOOP = "kgcoop"
SEEDS = (1, 2, 3)


def coop_epochs(dataset: str, shots: int) -> int:
    """CoOp's epochs: 50 on ImageNet at every shot count (``*_ep50`` configs), else 50 / 100 / 200
    for 1 / 2-4 / 8-16 shots (``scripts/coop/README.md``: ``rn50_ep50``, ``rn50_ep100``, ``rn50``)."""
    return 50 if dataset == "imagenet" else epochs_for_shots(shots)


def base2new_settings(dataset: str) -> dict[str, dict]:
    """fit() settings of the base-to-new methods.

    CoOp as CoCoOp runs it (``scripts/cocoop/base2new_train.sh`` with ``CFG=vit_b16_ctxv1``:
    context "a photo of a", 200 epochs, ``vit_b16_ep50_ctxv1`` on ImageNet); KgCoOp as its
    ``scripts/base2new_train.sh`` (``vit_b16_ep100_ctxv1``: 4 context vectors from "a photo of
    a", 100 epochs, batch 128, weight 8, the dataset's KgCoOp template).
    """
    from ..official_datasets import dataset_spec

    plain = {"ctx_init": "a photo of a", "n_ctx": 4, "epochs": 50 if dataset == "imagenet" else 200}
    kg = {"ctx_init": "a photo of a", "n_ctx": 4, "epochs": 100, "batch_size": 128, "kg_weight": 8.0,
          "kg_template": dataset_spec(dataset).kg_template}
    return {coop.NAME: plain, KGCOOP: kg}


#: Tip-Adapter's per-dataset settings (``configs/<dataset>.yaml`` of gaopengcuhk/Tip-Adapter@d0e2d6f):
#: init_alpha, init_beta, search_scale (beta, alpha), train_epoch; search_step is (200, 20) for all.
_TIP = {
    "imagenet": (1.17, 1, (7, 3), 20), "caltech101": (3, 1, (12, 5), 20), "dtd": (2, 1, (13, 13), 20),
    "eurosat": (2, 1, (12, 10), 100), "fgvc_aircraft": (5, 1, (30, 30), 20), "food101": (1.17, 1, (10, 10), 20),
    "oxford_flowers": (10, 1, (50, 50), 20), "oxford_pets": (1.17, 1, (7, 3), 20),
    "stanford_cars": (3, 1, (20, 10), 20), "sun397": (1.17, 1, (12, 10), 20), "ucf101": (3, 1, (7, 3), 20),
}


def tip_settings(dataset: str) -> TipAdapterConfig:
    """Tip-Adapter's configuration for one of the 11 datasets (see ``_TIP``'s source)."""
    alpha, beta, scale, epochs = _TIP[dataset]
    return TipAdapterConfig(alpha=float(alpha), beta=float(beta), search_scale=(float(scale[0]), float(scale[1])),
                            epochs=epochs)


@dataclass(frozen=True)
class Published:
    """Published numbers of one method on one dataset (percent), with where they were read.

    ``method`` is the method as its paper names it (``CoOp``, ``Tip-Adapter-F``, ...)."""

    method: str
    backbone: str
    values: dict  # shots -> accuracy (few-shot) or {"base", "new", "hm"} (base-to-new)
    source: str
    note: str = ""


_TIP_LOG = "Tip-Adapter exp.log (gaopengcuhk/Tip-Adapter@d0e2d6f, the numbers of its paper's Figures 4 and 5)"
#: gaopengcuhk/Tip-Adapter exp.log: "<dataset>: <zero-shot>" then rows for 16, 8, 4, 2, 1 shots (RN50).
_TIP_NUMBERS = {
    "imagenet": (60.32, (62.01, 61.45, 60.98, 60.96, 60.70), (65.51, 64.00, 62.52, 61.69, 61.13)),
    "sun397": (58.52, (66.85, 65.62, 64.15, 62.70, 61.30), (71.47, 68.87, 66.21, 63.64, 62.50)),
    "oxford_pets": (85.83, (88.14, 87.03, 86.45, 87.03, 86.10), (89.70, 88.09, 87.54, 87.03, 87.00)),
    "eurosat": (37.52, (70.54, 67.95, 65.32, 61.68, 54.38), (84.54, 77.93, 74.12, 66.15, 59.53)),
    "caltech101": (85.92, (90.18, 89.83, 89.39, 88.44, 87.18), (92.86, 91.44, 90.56, 89.74, 89.33)),
    "dtd": (42.20, (60.93, 58.63, 53.96, 49.47, 46.22), (66.55, 62.71, 57.39, 53.72, 49.65)),
    "fgvc_aircraft": (17.10, (29.76, 25.59, 22.41, 21.21, 19.05), (35.55, 30.21, 25.80, 23.19, 20.22)),
    "food101": (77.32, (77.83, 77.76, 77.54, 77.52, 77.42), (79.43, 78.64, 78.24, 77.81, 77.51)),
    "oxford_flowers": (66.02, (89.89, 87.98, 83.80, 79.13, 73.12), (94.80, 91.51, 88.83, 82.30, 79.98)),
    "ucf101": (61.35, (70.58, 68.68, 66.46, 64.74, 62.60), (78.03, 74.25, 70.55, 66.43, 64.87)),
    "stanford_cars": (55.74, (66.77, 62.93, 61.45, 57.93, 57.54), (75.74, 69.25, 64.57, 61.50, 58.86)),
}
_LOG_SHOTS = (16, 8, 4, 2, 1)

_TIP_TABLE2 = "Tip-Adapter (Zhang et al., ECCV 2022, arXiv 2207.09519), Table 2, ImageNet"
#: 1, 2, 4, 8, 16 shots, RN50 (the only dataset whose CoOp few-shot numbers were readable here).
_IMAGENET_LP = (22.17, 31.90, 41.20, 49.52, 56.13)
_IMAGENET_COOP = (57.15, 57.81, 59.99, 61.56, 62.95)


def published_fewshot(dataset: str) -> list[Published]:
    """Published few-shot accuracies for ``dataset`` that could be verified here (RN50)."""
    if dataset not in _TIP_NUMBERS:
        return []
    zs, tip, tip_f = _TIP_NUMBERS[dataset]
    note = "Tip-Adapter-F's number is its best epoch on the test set"
    rows = [
        Published("Zero-shot CLIP", "RN50", {0: zs}, _TIP_LOG, "zero-shot CLIP with Tip-Adapter's prompts"),
        Published("Tip-Adapter", "RN50", dict(zip(_LOG_SHOTS, tip)), _TIP_LOG),
        Published("Tip-Adapter-F", "RN50", dict(zip(_LOG_SHOTS, tip_f)), _TIP_LOG, note),
    ]
    if dataset == "imagenet":
        rows += [Published("Linear-probe CLIP", "RN50", dict(zip(SHOTS, _IMAGENET_LP)), _TIP_TABLE2),
                 Published("CoOp", "RN50", dict(zip(SHOTS, _IMAGENET_COOP)), _TIP_TABLE2,
                           "CoOp's own scores, as Tip-Adapter's Table 2 reprints them")]
    return rows


_MAPLE = "MaPLe README (muzairkhattak/multimodal-prompt-learning@69bce21), average over the 11 datasets"
_KGCOOP = "KgCoOp readme.md (htyao89/KgCoOp@c43ccc3), average over the 11 datasets"
#: Base-to-new averages over the 11 datasets (ViT-B/16, 16 shots).
BASE2NEW_AVERAGES = [
    Published("CLIP", "ViT-B/16", {"base": 69.34, "new": 74.22, "hm": 71.70}, _MAPLE),
    Published("CoOp", "ViT-B/16", {"base": 82.69, "new": 63.22, "hm": 71.66}, _MAPLE,
              "KgCoOp's readme gives CoOp 82.63 / 67.99 / 74.60 for the same average"),
    Published("CoCoOp", "ViT-B/16", {"base": 80.47, "new": 71.69, "hm": 75.83}, _MAPLE),
    Published("KgCoOp", "ViT-B/16", {"base": 80.73, "new": 73.6, "hm": 77.0}, _KGCOOP),
    Published("MaPLe", "ViT-B/16", {"base": 82.28, "new": 75.14, "hm": 78.55}, _MAPLE),
]


_RMADAPTER = ("CoCoOp's Table 1 as RMAdapter (AAAI 2026, ojs.aaai.org/index.php/AAAI/article/view/39532) "
              "reprints it in its Table 1")
_IPO = "CoCoOp's Table 1 as IPO (NeurIPS 2024) reprints it in its Table 8"
#: CoCoOp's Table 1 per dataset (ViT-B/16, 16 shots): (base, new, H) of CLIP, CoOp, CoCoOp. CLIP and
#: CoOp as RMAdapter reprints them (IPO's CoOp rows are the same); CoCoOp as IPO reprints it: in four
#: cells (Cars new, Flowers H, Food base, Aircraft H) RMAdapter prints other values, which fit neither
#: their row's harmonic mean nor the published average, while IPO's fit both. Checked: the rows'
#: base and new columns average to the published averages above (69.34 / 74.22, 82.69 / 63.22,
#: 80.47 / 71.69).
_B2N = {
    "imagenet": ((72.43, 68.14, 70.22), (76.47, 67.88, 71.92), (75.98, 70.43, 73.10)),
    "caltech101": ((96.84, 94.00, 95.40), (98.00, 89.81, 93.73), (97.96, 93.81, 95.84)),
    "oxford_pets": ((91.17, 97.26, 94.12), (93.67, 95.29, 94.47), (95.20, 97.69, 96.43)),
    "stanford_cars": ((63.37, 74.89, 68.65), (78.12, 60.40, 68.13), (70.49, 73.59, 72.01)),
    "oxford_flowers": ((72.08, 77.80, 74.83), (97.60, 59.67, 74.06), (94.87, 71.75, 81.71)),
    "food101": ((90.10, 91.22, 90.66), (88.33, 82.26, 85.19), (90.70, 91.29, 90.99)),
    "fgvc_aircraft": ((27.19, 36.29, 31.09), (40.44, 22.30, 28.75), (33.41, 23.71, 27.74)),
    "sun397": ((69.36, 75.35, 72.23), (80.60, 65.89, 72.51), (79.74, 76.86, 78.27)),
    "dtd": ((53.24, 59.90, 56.37), (79.44, 41.18, 54.24), (77.01, 56.00, 64.85)),
    "eurosat": ((56.48, 64.05, 60.03), (92.19, 54.74, 68.69), (87.49, 60.04, 71.21)),
    "ucf101": ((70.53, 77.50, 73.85), (84.69, 56.05, 67.46), (82.33, 73.45, 77.64)),
}


def published_base2new(dataset: Optional[str]) -> list[Published]:
    """CoCoOp's Table 1 rows for ``dataset`` (when it is one of the 11), then the 11-dataset averages."""
    rows = []
    if dataset in _B2N:
        for method, values, source in zip(("CLIP", "CoOp", "CoCoOp"), _B2N[dataset],
                                          (_RMADAPTER, _RMADAPTER, _IPO)):
            rows.append(Published(method, "ViT-B/16", dict(zip(("base", "new", "hm"), values)), source))
    return rows + list(BASE2NEW_AVERAGES)


def published_for(experiment: str, dataset: Optional[str]) -> list[Published]:
    """What can be printed beside coopkit's numbers for ``experiment`` on ``dataset``."""
    if experiment == "fewshot" and dataset:
        return published_fewshot(dataset)
    if experiment == "base2new":
        return published_base2new(dataset)
    return []
