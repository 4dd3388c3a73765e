"""``Classifier``: serve an exported coopkit ONNX file with numpy, Pillow and onnxruntime.

Data flow: image inputs -> :func:`~coopkit.runtime.preprocess.preprocess` (decode, resize and
crop as open_clip does, per the file's metadata) -> uint8 batch ``(n, H, W, 3)`` -> the graph
(normalise, image encoder, L2, x W^T) -> logits / probabilities / embeddings.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
from PIL import Image

from .metadata import INPUT_NAME, OUTPUT_NAMES, TEXT_INPUT, TEXT_OUTPUT, MetadataError, ModelMetadata
from .preprocess import MAX_PIXELS, ImageDecodeError, ImageInput, describe, preprocess
from .session import CPU, CUDA, TENSORRT, ProviderSpec, create_session

logger = logging.getLogger(__name__)

ERROR_MODES = ("raise", "skip")


@dataclass(frozen=True)
class Prediction:
    """The result for one image: labels and probabilities, best first.

    Attributes:
        source: A short name of the input (its path, or e.g. ``<array (480, 640, 3) uint8>``).
        labels: The ``top_k`` most probable class names, best first.
        probs: Their probabilities.
        index: Position of the image in the input list.
        error: ``None``, or why the image could not be read (only with ``errors="skip"``);
            ``labels`` and ``probs`` are then empty.
    """

    source: str
    labels: tuple[str, ...] = ()
    probs: tuple[float, ...] = ()
    index: int = 0
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        """True when the image was classified."""
        return self.error is None

    @property
    def label(self) -> Optional[str]:
        """The best label (``None`` for an unreadable image)."""
        return self.labels[0] if self.labels else None

    @property
    def prob(self) -> Optional[float]:
        """Probability of the best label (``None`` for an unreadable image)."""
        return self.probs[0] if self.probs else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``{"source", "labels", "probs"}`` plus ``"error"`` when unreadable."""
        out: dict[str, Any] = {"source": self.source, "labels": list(self.labels), "probs": list(self.probs)}
        if self.error is not None:
            out["error"] = self.error
        return out


@dataclass(frozen=True)
class _Head:
    """The current classes; replaced as a whole, so a running call sees one consistent set."""

    classnames: tuple[str, ...]
    weights: Optional[np.ndarray] = field(default=None)  # (n_classes, embed_dim); None: the graph's own


def _is_single(images: Any) -> bool:
    if isinstance(images, np.ndarray):
        return images.ndim in (2, 3)
    return isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image))


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


class Classifier:
    """An exported coopkit classifier, ready to label images.

    Args:
        path: The ``.onnx`` file written by ``coopkit export``.
        device: ``auto`` (CUDA when a GPU and its libraries really work, else CPU), ``cpu``,
            ``cuda`` or ``cuda:N``.
        threads: CPU threads for onnxruntime (``None``: one per core).
        providers: Explicit onnxruntime execution providers (e.g. TensorRT first); overrides
            ``device``.
        batch_size: Images per graph run; longer inputs are processed in chunks.
        workers: Threads that decode and resize images in parallel (``None``: up to 8, one per
            core; ``1``: in the calling thread).
        max_pixels: Larger images are refused as decompression bombs.

    One instance may be shared by many threads: calls do not share mutable state.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        MetadataError: not an ONNX file, not a coopkit export, or a newer schema.
        RuntimeError: ``device="cuda"`` where CUDA cannot run.
    """

    def __init__(
        self,
        path: Union[str, os.PathLike],
        device: str = "auto",
        threads: Optional[int] = None,
        providers: Optional[Sequence[ProviderSpec]] = None,
        *,
        batch_size: int = 32,
        workers: Optional[int] = None,
        max_pixels: int = MAX_PIXELS,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"model file not found: {self.path}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if workers is not None and int(workers) < 1:
            raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
        self._device, self._threads, self._providers = device, threads, providers
        self.session = self._open(self.path, device, threads, providers)
        self.metadata = self._read_metadata(self.session, self.path)
        self._check_graph()
        fixed = self.session.get_inputs()[0].shape[0]
        self._fixed_batch = fixed if isinstance(fixed, int) and fixed > 0 else None
        self.batch_size = self._fixed_batch or int(batch_size)
        self.max_pixels = int(max_pixels)
        self._workers = int(workers) if workers is not None else max(1, min(8, os.cpu_count() or 1))
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pool_lock = threading.Lock()
        self._text_session: Any = None
        self._text_lock = threading.Lock()
        self._head = _Head(tuple(self.metadata.classnames))
        self.provider: str = self.session.get_providers()[0]
        self._use_io_binding = self.provider in (CUDA, TENSORRT)
        out_dim = {o.name: o.shape for o in self.session.get_outputs()}["image_embeds"][-1]
        self._embed_dim = self.metadata.embed_dim or (out_dim if isinstance(out_dim, int) else 0)
        logger.info("loaded %s (%d classes) on %s", self.path, len(self._head.classnames), self.provider)

    # --- loading -----------------------------------------------------------------------------

    @staticmethod
    def _open(path: Path, device: str, threads: Optional[int], providers: Optional[Sequence[ProviderSpec]]) -> Any:
        try:
            return create_session(path, device=device, threads=threads, providers=providers)
        except Exception as e:
            if not type(e).__module__.startswith("onnxruntime"):
                raise
            text = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            if "protobuf" in text.lower():
                raise MetadataError(f"{path} is not an ONNX file (onnxruntime: {text})") from None
            raise MetadataError(f"{path}: onnxruntime cannot load this model: {text}") from None

    @staticmethod
    def _read_metadata(session: Any, path: Path) -> ModelMetadata:
        props = session.get_modelmeta().custom_metadata_map
        try:
            return ModelMetadata.from_props(props)
        except MetadataError as e:
            raise MetadataError(f"{path}: {e}") from None

    def _check_graph(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        missing = [n for n in OUTPUT_NAMES if n not in outputs]
        if INPUT_NAME not in inputs or missing or len(inputs) != 1:
            raise MetadataError(
                f"{self.path}: graph does not follow the coopkit contract: inputs {sorted(inputs)} "
                f"(expected [{INPUT_NAME!r}]), outputs {sorted(outputs)} (expected {list(OUTPUT_NAMES)})"
            )
        node = inputs[INPUT_NAME]
        if node.type != "tensor(uint8)" or len(node.shape) != 4:
            raise MetadataError(f"{self.path}: input {INPUT_NAME!r} must be uint8 (batch, H, W, 3), got {node.type} {node.shape}")
        h, w = self.metadata.image_size
        for got, want in zip(node.shape[1:], (h, w, 3)):
            if isinstance(got, int) and got != want:
                raise MetadataError(f"{self.path}: graph input is {node.shape} but metadata says image_size {self.metadata.image_size}")

    # --- public properties --------------------------------------------------------------------

    @property
    def classnames(self) -> list[str]:
        """Class names, in the order of the logits' columns."""
        return list(self._head.classnames)

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` of the graph's input."""
        return self.metadata.image_size

    @property
    def device(self) -> str:
        """``cuda`` or ``cpu``: where the graph really runs."""
        return "cpu" if self.provider == CPU else "cuda"

    def __repr__(self) -> str:
        return f"Classifier({str(self.path)!r}, classes={len(self._head.classnames)}, provider={self.provider!r})"

    # --- preprocessing ------------------------------------------------------------------------

    def _prepare_one(self, source: ImageInput) -> np.ndarray:
        m = self.metadata
        return preprocess(source, m.image_size, m.resize_mode, m.interpolation, m.fill_color, max_pixels=self.max_pixels)

    def _map(self, fn: Any, items: list[Any]) -> list[Any]:
        if self._workers <= 1 or len(items) <= 1:
            return [fn(x) for x in items]
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="coopkit-preprocess")
            pool = self._pool
        return list(pool.map(fn, items))

    def _prepare_batch(self, sources: list[Any], skip: bool) -> tuple[np.ndarray, list[Optional[str]]]:
        """Decode and crop; returns the uint8 batch of readable images and one error per input."""

        def one(src: Any) -> Union[np.ndarray, str]:
            try:
                return self._prepare_one(src)
            except (ImageDecodeError, FileNotFoundError) as e:
                if not skip:
                    raise
                return str(e)

        done = self._map(one, sources)
        errors = [d if isinstance(d, str) else None for d in done]
        arrays = [d for d in done if not isinstance(d, str)]
        h, w = self.metadata.image_size
        batch = np.stack(arrays) if arrays else np.zeros((0, h, w, 3), np.uint8)  # (n, H, W, 3)
        return batch, errors

    def preprocess(self, images: Union[ImageInput, Iterable[ImageInput]]) -> np.ndarray:
        """The uint8 batch ``(n, H, W, 3)`` the graph receives for ``images``."""
        return self._prepare_batch(self._as_list(images), skip=False)[0]

    # --- running the graph --------------------------------------------------------------------

    def _run(self, batch: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
        """Run the image graph on a prepared uint8 batch; returns float32 outputs."""
        n = batch.shape[0]
        if self._fixed_batch and n != self._fixed_batch:  # a static-batch export: pad the last chunk
            pad = np.zeros((self._fixed_batch - n, *batch.shape[1:]), np.uint8)
            batch = np.concatenate([batch, pad])
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        if self._use_io_binding:
            # one host->device copy of the batch, one device->host copy per requested output
            binding = self.session.io_binding()
            binding.bind_cpu_input(INPUT_NAME, batch)
            for name in names:
                binding.bind_output(name, "cpu")
            self.session.run_with_iobinding(binding)
            outs = binding.copy_outputs_to_cpu()
        else:
            outs = self.session.run(list(names), {INPUT_NAME: batch})
        return [np.asarray(o[:n], dtype=np.float32) for o in outs]

    def _chunks(self, sources: list[Any]) -> Iterable[list[Any]]:
        for start in range(0, len(sources), self.batch_size):
            yield sources[start : start + self.batch_size]

    @staticmethod
    def _as_list(images: Any) -> list[Any]:
        if _is_single(images):
            return [images]
        if isinstance(images, np.ndarray) and images.ndim == 4:
            return list(images)  # (n, H, W, C): a batch of arrays
        try:
            return list(images)
        except TypeError:
            raise ImageDecodeError(f"unsupported images argument {describe(images)}: expected an image or a list of images") from None

    def _scores(self, batch: np.ndarray, head: _Head, want: str) -> np.ndarray:
        """``want`` is ``logits``, ``probs`` or ``image_embeds`` for a prepared batch."""
        if want == "image_embeds":
            return self._run(batch, ["image_embeds"])[0]
        if head.weights is None:
            return self._run(batch, [want])[0]
        logits = self._run(batch, ["image_embeds"])[0] @ head.weights.T  # (n, n_classes)
        return logits if want == "logits" else _softmax(logits)

    def _collect(self, images: Any, want: str) -> np.ndarray:
        sources = self._as_list(images)
        head = self._head
        parts = [self._scores(self._prepare_batch(chunk, skip=False)[0], head, want) for chunk in self._chunks(sources)]
        if parts:
            return np.concatenate(parts)
        width = self._embed_dim if want == "image_embeds" else len(head.classnames)
        return np.zeros((0, width), np.float32)

    def logits(self, images: Union[ImageInput, Iterable[ImageInput]]) -> np.ndarray:
        """Logits ``(n_images, n_classes)`` (scaled cosine similarities), float32."""
        return self._collect(images, "logits")

    def probs(self, images: Union[ImageInput, Iterable[ImageInput]]) -> np.ndarray:
        """Class probabilities ``(n_images, n_classes)`` (softmax of the logits), float32."""
        return self._collect(images, "probs")

    def embed(self, images: Union[ImageInput, Iterable[ImageInput]]) -> np.ndarray:
        """L2-normalised image embeddings ``(n_images, embed_dim)``, float32."""
        return self._collect(images, "image_embeds")

    def predict(
        self,
        images: Union[ImageInput, Iterable[ImageInput]],
        top_k: int = 5,
        *,
        errors: str = "raise",
    ) -> list[Prediction]:
        """Label images: one :class:`Prediction` per input, in input order.

        Args:
            images: One image or a list of them: paths, encoded bytes, PIL images, uint8 HWC
                arrays (or a uint8 ``(n, H, W, C)`` array), in any mix.
            top_k: How many labels to return per image (at most the number of classes).
            errors: ``raise`` (the first unreadable image raises, naming it) or ``skip``
                (unreadable images get a result with ``error`` set; the others are classified).

        Raises:
            ImageDecodeError: an unreadable image, with ``errors="raise"``.
            FileNotFoundError: a missing image path, with ``errors="raise"``.
        """
        if errors not in ERROR_MODES:
            raise ValueError(f"errors {errors!r} is not one of {ERROR_MODES}")
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        sources = self._as_list(images)
        head = self._head
        k = min(int(top_k), len(head.classnames))
        results: list[Prediction] = []
        for start, chunk in zip(range(0, len(sources), self.batch_size), self._chunks(sources)):
            batch, errs = self._prepare_batch(chunk, skip=errors == "skip")
            probs = self._scores(batch, head, "probs") if len(batch) else np.zeros((0, len(head.classnames)), np.float32)
            rows = iter(probs)
            for offset, (src, err) in enumerate(zip(chunk, errs)):
                index = start + offset
                if err is not None:
                    results.append(Prediction(describe(src), index=index, error=err))
                    continue
                p = next(rows)
                order = np.argsort(-p, kind="stable")[:k]
                results.append(
                    Prediction(
                        describe(src),
                        tuple(head.classnames[i] for i in order),
                        tuple(float(p[i]) for i in order),
                        index=index,
                    )
                )
        return results

    # --- new classes through the exported text graph ------------------------------------------

    def _text_graph(self) -> Any:
        te = self.metadata.text_encoder
        if not te:
            raise RuntimeError(
                f"{self.path} was exported without a text encoder; re-export with "
                "`coopkit export --with-text-encoder` to use set_classes()"
            )
        with self._text_lock:
            if self._text_session is None:
                file = self.path.parent / str(te.get("file", ""))
                if not file.is_file():
                    raise FileNotFoundError(f"text encoder graph not found: {file} (named in {self.path}'s metadata)")
                session = self._open(file, self._device, self._threads, self._providers)
                names_in = [i.name for i in session.get_inputs()]
                names_out = [o.name for o in session.get_outputs()]
                want_in, want_out = te.get("input", TEXT_INPUT), te.get("output", TEXT_OUTPUT)
                if want_in not in names_in or want_out not in names_out:
                    raise MetadataError(
                        f"{file}: text graph must map {want_in!r} to {want_out!r}; it has inputs "
                        f"{names_in} and outputs {names_out}"
                    )
                self._text_session = session
            return self._text_session

    def class_weights(self, classnames: Sequence[str]) -> np.ndarray:
        """Class weights ``(n, embed_dim)`` for ``classnames`` from the exported text graph,
        scaled like the file's own. Prompts are built as ``metadata.text_encoder`` says, with
        ``_`` in class names read as spaces (as coopkit does when training)."""
        from .tokenizer import VOCAB_NAME, ClipTokenizer, default_tokenizer

        names = [str(c) for c in classnames]
        if not names:
            raise ValueError("set_classes needs at least one class name")
        if len(set(names)) != len(names):
            dup = sorted({c for c in names if names.count(c) > 1})
            raise ValueError(f"duplicate class names: {dup}")
        session = self._text_graph()
        te = self.metadata.text_encoder or {}
        vocab = te.get("vocab", VOCAB_NAME)
        if vocab != VOCAB_NAME:
            raise MetadataError(f"{self.path}: text encoder vocabulary {vocab!r} is not supported (only {VOCAB_NAME!r})")
        tokenizer: ClipTokenizer = default_tokenizer()
        if (te.get("sot_token_id", tokenizer.sot_token_id), te.get("eot_token_id", tokenizer.eot_token_id)) != (
            tokenizer.sot_token_id,
            tokenizer.eot_token_id,
        ):
            raise MetadataError(f"{self.path}: text encoder special token ids differ from CLIP's BPE")
        return text_graph_weights(session, te, names, tokenizer)

    def set_classes(self, classnames: Sequence[str]) -> None:
        """Replace the classes: new class weights are computed through the exported text graph.

        Needs a file exported with ``--with-text-encoder``. Calls already running finish with
        the previous classes. :meth:`reset_classes` restores the file's own.
        """
        weights = self.class_weights(classnames)
        self._head = _Head(tuple(str(c) for c in classnames), weights)

    def reset_classes(self) -> None:
        """Go back to the classes and weights stored in the file."""
        self._head = _Head(tuple(self.metadata.classnames))

    # --- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the preprocessing threads (the instance stays usable and restarts them)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> "Classifier":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def template_prompts(template: str, classnames: Sequence[str]) -> list[str]:
    """One template filled with each class name, ``_`` read as a space (as coopkit trains)."""
    return [template.replace("{}", str(name).replace("_", " ")) for name in classnames]


def text_graph_weights(session: Any, text_encoder: dict[str, Any], classnames: Sequence[str],
                       tokenizer: Any = None) -> np.ndarray:
    """Class weights ``(n, embed_dim)`` through an exported text graph session.

    One pass per prompt template; several templates (zero-shot ensembles) average the
    directions and keep the scale ``exp(logit_scale)``.
    """
    from .tokenizer import default_tokenizer

    tokenizer = tokenizer or default_tokenizer()
    context_length = int(text_encoder.get("context_length", 77))
    weights = []
    for template in prompt_templates(text_encoder):
        tokens = tokenizer(template_prompts(template, classnames), context_length)  # (n, context_length)
        (w,) = session.run([text_encoder.get("output", TEXT_OUTPUT)], {text_encoder.get("input", TEXT_INPUT): tokens})
        weights.append(np.asarray(w, dtype=np.float32))  # (n, embed_dim)
    if len(weights) == 1:
        return weights[0]
    scale = np.linalg.norm(weights[0], axis=1, keepdims=True)  # (n, 1) = exp(logit_scale)
    mean = np.mean([w / np.linalg.norm(w, axis=1, keepdims=True) for w in weights], axis=0)
    return (mean / np.linalg.norm(mean, axis=1, keepdims=True) * scale).astype(np.float32)


def prompt_templates(text_encoder: dict[str, Any]) -> list[str]:
    """The prompt templates of a text encoder description (``{}`` marks the class name):
    ``templates`` (a list, averaged), else ``prompt_template``, else ``"{}" + prompt_suffix``."""
    templates = text_encoder.get("templates")
    if templates:
        out = [str(t) for t in templates]
    elif text_encoder.get("prompt_template"):
        out = [str(text_encoder["prompt_template"])]
    else:
        out = ["{}" + str(text_encoder.get("prompt_suffix", ""))]
    bad = [t for t in out if "{}" not in t]
    if bad:
        raise MetadataError(f"prompt templates must contain '{{}}' for the class name, got {bad}")
    return out
