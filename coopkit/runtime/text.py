"""``TextEncoder``: class names in, class weights out, through an exported text graph.

The open-vocabulary half of the runtime. A file exported with ``--with-text-encoder`` has a
companion graph (``<name>.text.onnx``) described by :class:`~coopkit.runtime.contract.TextEncoderSpec`;
this class builds the prompts the way training did (:mod:`coopkit.runtime.contract`),
tokenises them (CLIP's BPE in numpy, or the ``tokenizer.json`` beside the graph through the
``tokenizers`` library, an optional extra) and runs the graph. No torch, no transformers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from .contract import (
    CLIP_BPE_VOCAB,
    TOKENIZER_HF,
    TOKENIZERS,
    MetadataError,
    TextEncoderSpec,
    check_classnames,
    check_prompts_fit,
    fill_templates,
)
from .integrity import verify_tensors
from .engine_choice import open_engine
from .engines import ONNXRUNTIME
from .session import ProviderSpec
from .tokenizers.clip_bpe import default_tokenizer
from .tokenizers.hf import HFTokenizer
from .tokenizers.layout import token_layout

logger = logging.getLogger(__name__)


class TextEncoder:
    """Class weights ``(n, embed_dim)`` for any class names, scaled like the image graph's own.

    Args:
        session: An onnxruntime session of the text graph.
        spec: How the graph is called (from the image graph's metadata).
        tokenizer: The tokenizer (default: CLIP's shared BPE, or the spec's ``tokenizer_file``
            in ``folder``).
        folder: Where the spec's files are (the image graph's folder).

    Use :meth:`open` to create the session from a file. Thread-safe: calls share no mutable state.

    Raises:
        MetadataError: the graph does not have the inputs and outputs ``spec`` names, or
            ``spec`` asks for a tokenizer this runtime cannot run.
        ImportError: the file's tokenizer needs the ``tokenizers`` library (the message says
            what to install).
    """

    def __init__(self, session: Any, spec: TextEncoderSpec, tokenizer: Optional[Any] = None,
                 folder: Optional[Union[str, os.PathLike]] = None) -> None:
        self.session = session
        self.spec = TextEncoderSpec.from_dict(spec)
        names_in = [i.name for i in session.get_inputs()]
        names_out = [o.name for o in session.get_outputs()]
        if self.spec.input not in names_in or self.spec.output not in names_out:
            raise MetadataError(
                f"text graph must map {self.spec.input!r} to {self.spec.output!r}; it has inputs "
                f"{names_in} and outputs {names_out}"
            )
        if self.spec.tokenizer not in TOKENIZERS:
            raise MetadataError(
                f"text encoder tokenizer {self.spec.tokenizer!r} cannot be run by this runtime (it runs "
                f"{', '.join(TOKENIZERS)}); upgrade coopkit"
            )
        if self.spec.tokenizer == TOKENIZER_HF:
            self.tokenizer = tokenizer or self._hf_tokenizer(folder)
            return
        if self.spec.vocab != CLIP_BPE_VOCAB:
            raise MetadataError(f"text encoder vocabulary {self.spec.vocab!r} is not supported (only {CLIP_BPE_VOCAB!r})")
        self.tokenizer = tokenizer or default_tokenizer()
        special = (self.tokenizer.sot_token_id, self.tokenizer.eot_token_id)
        if (self.spec.sot_token_id, self.spec.eot_token_id) != special:
            raise MetadataError(
                f"text encoder special token ids {(self.spec.sot_token_id, self.spec.eot_token_id)} differ "
                f"from CLIP's BPE {special}"
            )

    def _hf_tokenizer(self, folder: Optional[Union[str, os.PathLike]]) -> HFTokenizer:
        if not self.spec.tokenizer_file:
            raise MetadataError(f"text encoder tokenizer {TOKENIZER_HF!r} needs tokenizer_file in the metadata")
        path = Path(folder or ".") / self.spec.tokenizer_file
        if not path.is_file():
            raise FileNotFoundError(f"text encoder tokenizer not found: {path} (it is exported beside the model)")
        tok = HFTokenizer.from_file(path, clean=self.spec.clean, strip_sep_id=self.spec.strip_sep_id)
        if tok.context_length != self.spec.context_length:
            raise MetadataError(f"{path} pads to {tok.context_length} tokens, the graph takes {self.spec.context_length}")
        return tok

    @classmethod
    def open(
        cls,
        path: Union[str, os.PathLike],
        spec: TextEncoderSpec,
        device: str = "auto",
        threads: Optional[int] = None,
        providers: Optional[Sequence[ProviderSpec]] = None,
        *,
        check_tensors: bool = True,
        engine: str = ONNXRUNTIME,
        compute: str = "fp32",
    ) -> "TextEncoder":
        """Open the text graph at ``path`` (see :func:`~coopkit.runtime.session.create_session`),
        after checking its tensors against ``spec.tensors_sha256`` (unless ``check_tensors=False``),
        on ``engine`` (``onnxruntime`` or ``openvino``: see :func:`~coopkit.runtime.engine_choice.open_engine`)."""
        if engine == "auto":
            raise ValueError("a text graph runs on the engine of its image graph: engine must be 'onnxruntime' or 'openvino'")
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"text encoder graph not found: {file}")
        if check_tensors:
            verify_tensors(file, TextEncoderSpec.from_dict(spec).tensors_sha256)
        try:
            return cls(open_engine(file, engine, compute, device, threads, providers)[0], spec, folder=file.parent)
        except MetadataError as e:
            raise MetadataError(f"{file}: {e}") from None

    def tokens(self, template: str, classnames: Sequence[str]) -> np.ndarray:
        """Token ids ``(n, context_length)`` of ``template`` filled with each class name; a
        prompt that does not fit the context is refused (ValueError), not cut."""
        prompts = fill_templates(template, classnames)
        n_prefix, n_suffix, _ = token_layout(self.tokenizer)
        check_prompts_fit(prompts, [len(self.tokenizer.encode(p)) for p in prompts], self.spec.context_length,
                          n_prefix + n_suffix)
        return self.tokenizer(prompts, self.spec.context_length)

    def class_weights(self, classnames: Sequence[str]) -> np.ndarray:
        """Class weights ``(n, embed_dim)`` float32 for ``classnames``.

        One graph run per prompt template; several templates (zero-shot ensembles) average the
        L2-normalised rows and keep the scale ``exp(logit_scale)``.
        """
        names = check_classnames(classnames)
        weights = []
        for template in self.spec.prompt_templates():
            (w,) = self.session.run([self.spec.output], {self.spec.input: self.tokens(template, names)})
            weights.append(np.asarray(w, dtype=np.float32))  # (n, embed_dim)
        if len(weights) == 1:
            return weights[0]
        scale = np.linalg.norm(weights[0], axis=1, keepdims=True)  # (n, 1) = exp(logit_scale)
        mean = np.mean([w / np.linalg.norm(w, axis=1, keepdims=True) for w in weights], axis=0)
        return (mean / np.linalg.norm(mean, axis=1, keepdims=True) * scale).astype(np.float32)
