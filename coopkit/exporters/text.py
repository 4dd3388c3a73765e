"""The companion text graph (``--with-text-encoder``): token ids in, class weights out.

With unified context, CoOp's learned context is class-agnostic, so the text tower with the
context baked in can weigh class names it never saw; so are the text prompts of IVLP, MaPLe and
PromptSRC (the shallow context at the input and the deep prompts that replace it in the first
text layers), baked in the same way (the classifier's ``text_context()``). The runtime
(:class:`coopkit.runtime.TextEncoder`) tokenises prompts without torch (CLIP's BPE in numpy;
other tokenizers from a ``tokenizer.json`` written beside the graph, through the ``tokenizers``
library) and runs this graph; the token layout is the contract's (:mod:`coopkit.runtime.contract`)
and :class:`coopkit.exporters.graphs.TextGraph` implements it for every text-tower family.

Zero-shot classifiers export their plain text tower; the runtime fills the templates in and
averages them as :func:`coopkit.methods.base.template_features` does.
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
    TOKENIZER_CLIP_BPE,
    TOKENIZER_HF,
    TextEncoderSpec,
    fill_templates,
)
from coopkit.runtime.integrity import tensors_sha256
from coopkit.runtime.tokenizers.clip_bpe import ClipTokenizer
from coopkit.runtime.tokenizers.hf import HFTokenizer
from coopkit.runtime.tokenizers.layout import dot_token_id, is_clip_bpe, token_layout

from .graphs import TextGraph
from .io import check_model, save_model, tokenizer_file_name
from .trace import trace
from .verify import verify_text_graph

if TYPE_CHECKING:
    from coopkit.classifier import Classifier

logger = logging.getLogger(__name__)


def _runtime_tokenizer(tokenizer: Any) -> Any:
    """The torch-free tokenizer behind a backbone's tokenizer, or ``None`` for CLIP's BPE."""
    inner = getattr(tokenizer, "tokenizer", tokenizer)  # coopkit.backbone.TorchTokenizer wraps one
    return inner if isinstance(inner, HFTokenizer) else None


def check_text_encoder_supported(classifier: "Classifier") -> None:
    """Refuse class-specific context (it has no context to give a class name it was not trained
    on), the heads of the few-shot baselines (weights for their training classes only) and
    tokenizers the torch-free runtime cannot run."""
    if not classifier.text_graph:
        raise ValueError(
            f"--with-text-encoder is not available for a {classifier.method} run: its class weights are not "
            "the text encoder over the class names alone (a head learned for its training classes, or prompts "
            "that depend on each image). Export without --with-text-encoder, or build the classifier for the "
            "new names (with_classes) and export that"
        )
    learner = classifier.learner
    if learner is not None and learner.config.csc:
        raise ValueError(
            "--with-text-encoder needs unified context, but this run learned class-specific context (csc): "
            "one context per training class, so there is none for a new class name. Export without "
            "--with-text-encoder, or fit again without --csc"
        )
    tokenizer = classifier.backbone.tokenizer
    if not is_clip_bpe(tokenizer) and _runtime_tokenizer(tokenizer) is None:
        raise ValueError(
            f"--with-text-encoder needs a tokenizer the torch-free runtime can run (CLIP's BPE or a Hugging Face "
            f"tokenizer.json); {classifier.backbone.name!r} uses {type(tokenizer).__name__}. Export without "
            "--with-text-encoder"
        )


def text_encoder_spec(classifier: "Classifier", file: str) -> TextEncoderSpec:
    """The ``text_encoder`` entry of the metadata for a text graph written to ``file``."""
    tokenizer = classifier.backbone.tokenizer
    hf = _runtime_tokenizer(tokenizer)
    n_prefix, _, end_id = token_layout(tokenizer)
    common: dict[str, Any] = {
        "file": file,
        "input": TEXT_INPUT,
        "output": TEXT_OUTPUT,
        "prompt_suffix": PROMPT_SUFFIX,
        "n_prefix": n_prefix,
    }
    if hf is None:
        common.update(context_length=int(getattr(tokenizer, "context_length", None) or classifier.text_tower.context_length),
                      sot_token_id=int(tokenizer.sot_token_id), eot_token_id=int(tokenizer.eot_token_id),
                      vocab=CLIP_BPE_VOCAB, tokenizer=TOKENIZER_CLIP_BPE)
    else:
        common.update(context_length=hf.context_length, sot_token_id=-1, eot_token_id=end_id, vocab=TOKENIZER_HF,
                      tokenizer=TOKENIZER_HF, tokenizer_file=tokenizer_file_name(file), clean=hf.clean,
                      strip_sep_id=hf.strip_sep_id)
    context = classifier.text_context()
    if context is not None:
        return TextEncoderSpec(**common, prompt_template=context.template, n_ctx=int(context.ctx.shape[0]),
                               class_token_position=context.class_token_position, layout=LAYOUT_COOP)
    return TextEncoderSpec(**common, templates=list(classifier.config.templates or []), n_ctx=0, layout=LAYOUT_PLAIN)


def export_text_graph(
    classifier: "Classifier",
    path: Path,
    *,
    opset: int,
    size_threshold: int,
) -> tuple[list[Path], TextEncoderSpec, dict[str, Any]]:
    """Trace, save, check and verify the text graph at ``path`` (a temporary location); with a
    Hugging Face tokenizer, its ``tokenizer.json`` (padding and truncation included) beside it.

    Returns ``(files written, its spec for the metadata, checks)``.

    Raises:
        ExportVerificationError: the graph's class weights differ from PyTorch's by more than 1e-4.
    """
    import onnx
    import torch

    check_text_encoder_supported(classifier)
    spec = text_encoder_spec(classifier, path.name)
    context = classifier.text_context()
    bb = classifier.backbone
    n_prefix, _, end_id = token_layout(bb.tokenizer)
    module = TextGraph(
        classifier.text_tower,
        bb.model.logit_scale,
        context.ctx if context is not None else None,
        context.class_token_position if context is not None else "end",
        n_prefix=n_prefix,
        end_id=end_id,
        dot_id=dot_token_id(bb.tokenizer, PROMPT_SUFFIX),
        deep=context.deep if context is not None else (),
    ).eval()
    files: list[Path] = []
    hf = _runtime_tokenizer(bb.tokenizer)
    if hf is not None:
        assert spec.tokenizer_file is not None
        tokenizer_path = path.parent / spec.tokenizer_file
        hf.save(tokenizer_path)
        files.append(tokenizer_path)
        runtime_tokenizer: Any = HFTokenizer.from_file(tokenizer_path, clean=spec.clean, strip_sep_id=spec.strip_sep_id)
    else:
        runtime_tokenizer = ClipTokenizer(context_length=spec.context_length)
    names = list(classifier.classnames)
    example = torch.from_numpy(runtime_tokenizer(fill_templates(spec.prompt_templates()[0], names[:2])))
    raw = path.parent / f"raw-{path.name}"
    trace(module.to(bb.device), example.to(bb.device), raw, opset, TEXT_INPUT, [TEXT_OUTPUT], "n_prompts")
    model = onnx.load(os.fspath(raw))
    model.producer_name = "coopkit"
    model.doc_string = f"coopkit text graph: {TEXT_INPUT} int64 (n, {spec.context_length}) -> {TEXT_OUTPUT} (n, embed_dim)"
    files = save_model(model, path, size_threshold) + files
    del model
    raw.unlink()
    spec.tensors_sha256 = tensors_sha256(path)  # checked by the runtime when it opens the text graph
    check_model(path)
    return files, spec, verify_text_graph(path, classifier, spec)
