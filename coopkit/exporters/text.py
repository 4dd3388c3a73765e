"""The companion text graph (``--with-text-encoder``): token ids in, class weights out.

With unified context, CoOp's learned context is class-agnostic, so the text tower with the
context baked in can weigh class names it never saw. The runtime
(:class:`coopkit.runtime.TextEncoder`) tokenises prompts with CLIP's BPE (no torch) and runs
this graph; the token layout is the contract's (:mod:`coopkit.runtime.contract`) and
:class:`coopkit.exporters.graphs.TextGraph` implements it.

Zero-shot classifiers export their plain text tower; the runtime fills the templates in and
averages them as :func:`coopkit.classifier.template_features` does.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coopkit.runtime.contract import (
    CLIP_BPE_VOCAB,
    LAYOUT_COOP,
    LAYOUT_PLAIN,
    PROMPT_SUFFIX,
    TEXT_INPUT,
    TEXT_OUTPUT,
    TextEncoderSpec,
    coop_prompt_template,
    fill_templates,
)
from coopkit.runtime.integrity import tensors_sha256
from coopkit.runtime.tokenizer import ClipTokenizer, is_clip_bpe

from .graphs import TextGraph
from .io import check_model, save_model
from .trace import trace
from .verify import verify_text_graph

if TYPE_CHECKING:
    from coopkit.classifier import Classifier

logger = logging.getLogger(__name__)


def check_text_encoder_supported(classifier: "Classifier") -> None:
    """Refuse class-specific context: it has no context to give a class name it was not trained on."""
    learner = classifier.learner
    if learner is not None and learner.config.csc:
        raise ValueError(
            "--with-text-encoder needs unified context, but this run learned class-specific context (csc): "
            "one context per training class, so there is none for a new class name. Export without "
            "--with-text-encoder, or fit again without --csc"
        )
    tokenizer = classifier.backbone.tokenizer
    if not is_clip_bpe(tokenizer):
        raise ValueError(
            f"--with-text-encoder needs a model with CLIP's BPE tokenizer; {classifier.backbone.name!r} uses "
            f"{type(tokenizer).__name__}"
        )


def text_encoder_spec(classifier: "Classifier", file: str) -> TextEncoderSpec:
    """The ``text_encoder`` entry of the metadata for a text graph written to ``file``."""
    tokenizer = classifier.backbone.tokenizer
    tower = classifier.text_tower
    common: dict[str, Any] = {
        "file": file,
        "input": TEXT_INPUT,
        "output": TEXT_OUTPUT,
        "context_length": int(tower.context_length),
        "sot_token_id": int(tokenizer.sot_token_id),
        "eot_token_id": int(tokenizer.eot_token_id),
        "vocab": CLIP_BPE_VOCAB,
        "prompt_suffix": PROMPT_SUFFIX,
    }
    learner = classifier.learner
    if learner is not None:
        return TextEncoderSpec(**common, prompt_template=coop_prompt_template(learner.n_ctx), n_ctx=int(learner.n_ctx),
                               class_token_position=learner.config.class_token_position, layout=LAYOUT_COOP)
    return TextEncoderSpec(**common, templates=list(classifier.config.templates or []), n_ctx=0, layout=LAYOUT_PLAIN)


def export_text_graph(
    classifier: "Classifier",
    path: Path,
    *,
    opset: int,
    size_threshold: int,
) -> tuple[list[Path], TextEncoderSpec, dict[str, Any]]:
    """Trace, save, check and verify the text graph at ``path`` (a temporary location).

    Returns ``(files written, its spec for the metadata, checks)``.

    Raises:
        ExportVerificationError: the graph's class weights differ from PyTorch's by more than 1e-4.
    """
    import onnx
    import torch

    check_text_encoder_supported(classifier)
    spec = text_encoder_spec(classifier, path.name)
    learner = classifier.learner
    bb = classifier.backbone
    dot = bb.tokenizer.encode(PROMPT_SUFFIX)
    if len(dot) != 1:
        raise RuntimeError(f"the tokenizer splits {PROMPT_SUFFIX!r} into {len(dot)} tokens; expected one")
    module = TextGraph(
        classifier.text_tower,
        bb.model.logit_scale,
        learner.ctx if learner is not None else None,
        learner.config.class_token_position if learner is not None else "end",
        dot_token_id=dot[0],
    ).eval()
    names = list(classifier.classnames)
    tokenizer = ClipTokenizer(context_length=spec.context_length)
    example = torch.from_numpy(tokenizer(fill_templates(spec.prompt_templates()[0], names[:2])))
    raw = path.parent / f"raw-{path.name}"
    trace(module.to(bb.device), example.to(bb.device), raw, opset, TEXT_INPUT, [TEXT_OUTPUT], "n_prompts")
    model = onnx.load(os.fspath(raw))
    model.producer_name = "coopkit"
    model.doc_string = f"coopkit text graph: {TEXT_INPUT} int64 (n, {spec.context_length}) -> {TEXT_OUTPUT} (n, embed_dim)"
    files = save_model(model, path, size_threshold)
    del model
    raw.unlink()
    spec.tensors_sha256 = tensors_sha256(path)  # checked by the runtime when it opens the text graph
    check_model(path)
    return files, spec, verify_text_graph(path, classifier, spec)
