"""The companion text graph (``--with-text-encoder``): token ids in, class weights out.

With unified context, CoOp's learned context is class-agnostic, so the text tower with the
context baked in can weigh class names it never saw. The runtime tokenises prompts with
CLIP's BPE (no torch) and runs this graph; the token layout it must send is described in
:mod:`coopkit.runtime.metadata` (``text_encoder``) and :class:`coopkit.exporters.graphs.TextGraph`.

Zero-shot classifiers export their plain text tower; the runtime fills the templates in and
averages them as :func:`coopkit.classifier.template_features` does.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from coopkit.runtime.classifier import prompt_templates, template_prompts, text_graph_weights
from coopkit.runtime.metadata import TEXT_INPUT, TEXT_OUTPUT

if TYPE_CHECKING:
    from coopkit.classifier import Classifier

logger = logging.getLogger(__name__)

PROMPT_SUFFIX = "."
PLACEHOLDER = "X"


def check_text_encoder_supported(classifier: "Classifier") -> None:
    """Refuse class-specific context: it has no context to give a class name it was not trained on."""
    learner = classifier.learner
    if learner is not None and learner.config.csc:
        raise ValueError(
            "--with-text-encoder needs unified context, but this run learned class-specific context (csc): "
            "one context per training class, so there is none for a new class name. Export without "
            "--with-text-encoder, or fit again without --csc"
        )
    from coopkit.prompts import has_clip_bpe

    tokenizer = classifier.backbone.tokenizer
    if not has_clip_bpe(tokenizer):
        raise ValueError(
            f"--with-text-encoder needs a model with CLIP's BPE tokenizer; {classifier.backbone.name!r} uses "
            f"{type(tokenizer).__name__}"
        )


def text_encoder_metadata(classifier: "Classifier", file: str) -> dict[str, Any]:
    """The ``text_encoder`` entry of the metadata for a text graph written to ``file``."""
    from coopkit.prompts import TextTower
    from coopkit.runtime.tokenizer import VOCAB_NAME

    tokenizer = classifier.backbone.tokenizer
    tower = TextTower.of(classifier.backbone.model)
    entry: dict[str, Any] = {
        "file": file,
        "input": TEXT_INPUT,
        "output": TEXT_OUTPUT,
        "context_length": int(tower.context_length),
        "sot_token_id": int(tokenizer.sot_token_id),
        "eot_token_id": int(tokenizer.eot_token_id),
        "vocab": VOCAB_NAME,
        "prompt_suffix": PROMPT_SUFFIX,
    }
    learner = classifier.learner
    if learner is not None:
        m = int(learner.n_ctx)
        entry.update(
            prompt_template=" ".join([PLACEHOLDER] * m) + " {}" + PROMPT_SUFFIX,
            n_ctx=m,
            class_token_position=learner.config.class_token_position,
            layout="coop_placeholders_v1",
        )
    else:
        entry.update(templates=list(classifier.config.templates or []), n_ctx=0, layout="plain_v1")
    return entry


def export_text_graph(
    classifier: "Classifier",
    path: Path,
    *,
    opset: int,
    size_threshold: int,
) -> tuple[list[Path], dict[str, Any], dict[str, Any]]:
    """Trace, save, check and verify the text graph at ``path`` (a temporary location).

    Returns ``(files written, metadata entry, checks)``.

    Raises:
        ExportVerificationError: the graph's class weights differ from PyTorch's by more than 1e-4.
    """
    import onnx
    import torch

    from coopkit.runtime.tokenizer import ClipTokenizer

    from .graphs import TextGraph
    from .onnx import TEXT_TOLERANCE, ExportVerificationError, _check, _cpu_session, _trace, save_model

    check_text_encoder_supported(classifier)
    entry = text_encoder_metadata(classifier, path.name)
    learner = classifier.learner
    bb = classifier.backbone
    dot = bb.tokenizer.encode(PROMPT_SUFFIX)
    if len(dot) != 1:
        raise RuntimeError(f"the tokenizer splits {PROMPT_SUFFIX!r} into {len(dot)} tokens; expected one")
    module = TextGraph(
        bb.model,
        learner.ctx if learner is not None else None,
        learner.config.class_token_position if learner is not None else "end",
        dot_token_id=dot[0],
    ).eval()
    names = list(classifier.classnames)
    tokenizer = ClipTokenizer(context_length=entry["context_length"])
    example = torch.from_numpy(tokenizer(template_prompts(prompt_templates(entry)[0], names[:2] or names)))
    raw = path.parent / f"raw-{path.name}"
    _trace(module.to(bb.device), example.to(bb.device), raw, opset, TEXT_INPUT, [TEXT_OUTPUT], "n_prompts")
    model = onnx.load(os.fspath(raw))
    model.producer_name = "coopkit"
    model.doc_string = f"coopkit text graph: {TEXT_INPUT} int64 (n, {entry['context_length']}) -> {TEXT_OUTPUT} (n, embed_dim)"
    files = save_model(model, path, size_threshold)
    del model
    raw.unlink()
    _check(path)

    session = _cpu_session(path)
    expected = classifier.class_weights().numpy()  # (n_classes, embed_dim)
    got = text_graph_weights(session, entry, names)
    single = text_graph_weights(session, entry, names[:1])
    diff = float(np.abs(got - expected).max())
    diff_single = float(np.abs(single - expected[:1]).max())
    if not (diff <= TEXT_TOLERANCE and diff_single <= TEXT_TOLERANCE):
        raise ExportVerificationError(
            f"the text graph's class weights differ from PyTorch's by up to {max(diff, diff_single):.3g} "
            f"(tolerance {TEXT_TOLERANCE:g})"
        )
    logger.info("verified text graph: max |class weight diff| %.3g over %d classes", diff, len(names))
    return files, entry, {"text_max_abs_diff": diff, "text_n_classes": len(names)}
