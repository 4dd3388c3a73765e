"""``Classifier``: images in, labels and probabilities out, from an exported coopkit ONNX file.

Data flow: image inputs -> :func:`~coopkit.runtime.preprocess.preprocess` (decode, resize and
crop as open_clip does, per the file's metadata) -> uint8 batch ``(n, H, W, 3)`` -> the graph
(normalise, image encoder, L2, x W^T) -> logits / probabilities / embeddings.

A multi-label file (``task="multilabel"``: DualCoOp and the multi-label baselines) gives each
label's own probability (``sigmoid(logits)``, the region aggregation inside the graph), and its
predictions carry every label at or above its threshold (:attr:`Classifier.thresholds`) and every
label's probability (:attr:`Prediction.label_probs`).

A raw-input file (``input_kind="raw"``) resizes and crops in its graph: the runtime only decodes
(:func:`~coopkit.runtime.preprocess.decode`: EXIF orientation, RGB) and runs images of the same
size together. Where onnxruntime's resize kernel is known to be wrong (CUDA, cubic with
antialias: :data:`CUDA_WRONG_RESIZE`), it crops with Pillow instead and feeds the crop, which
the graph passes through unchanged; a warning says so.
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

from .contract import INPUT_NAME, INPUT_RAW, OUTPUT_NAMES, ModelMetadata, check_classnames
from .modelfile import check_output_width, open_checked
from .preprocess import (
    MAX_PIXELS,
    ImageDecodeError,
    ImageInput,
    as_image_list,
    decode,
    describe,
    preprocess,
)
from .results import Prediction, check_predict_args, rank, softmax
from .engine_choice import open_engine
from .engines import CUDA_WRONG_RESIZE, resizes_in_graph  # noqa: F401 - public here as before
from .session import CPU, CPU_IO_BINDING, CUDA, TENSORRT, ProviderSpec, default_workers, run_bound
from .text import TextEncoder

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class _Head:
    """The current classes; replaced as a whole, so a running call sees one consistent set."""

    classnames: tuple[str, ...]
    weights: Optional[np.ndarray] = field(default=None)  # (n_classes, embed_dim); None: the graph's own


def prepare_image(source: ImageInput, metadata: ModelMetadata, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode one image and resize/crop it as the file's ``metadata`` says: uint8 ``(H, W, 3)``.

    What :meth:`Classifier.prepare` does, without a session: for decoding in other processes
    (Ray tasks, a Triton Python backend) that only have the metadata.
    """
    m = metadata
    return preprocess(source, m.image_size, m.resize_mode, m.interpolation, m.fill_color, max_pixels=max_pixels)


#: Prepared images: a uint8 batch ``(n, H, W, 3)``, or decoded images of any sizes (raw input).
Batch = Union[np.ndarray, list[np.ndarray]]


class Classifier:
    """An exported coopkit classifier, ready to label images.

    Args:
        path: The ``.onnx`` file written by ``coopkit export``.
        device: ``auto`` (CUDA when a GPU and its libraries really work, else CPU), ``cpu``,
            ``cuda`` or ``cuda:N``.
        threads: CPU threads for onnxruntime (``None``: one per CPU that other processes leave
            idle when the file is opened; see :func:`~coopkit.runtime.session.default_threads`).
        providers: Explicit onnxruntime execution providers (e.g. TensorRT first); overrides
            ``device``.
        batch_size: Images per graph run; longer inputs are processed in chunks.
        workers: Threads that decode and resize images in parallel (``None``: one per usable
            CPU, at most 8, :func:`~coopkit.runtime.session.default_workers`; ``1``: in the
            calling thread).
        max_pixels: Larger images are refused as decompression bombs.
        check_tensors: Check every stored tensor against the sha256 recorded at export
            (``tensors_sha256``; reading and hashing a 353 MB ViT-B-32 file took 0.3-0.6 s on 2
            busy cores, 30-45% of opening it).
            ``False`` skips it; the class weights and the output widths are checked anyway.
        strict: Refuse a file whose metadata records no ``metadata_sha256`` (exported by coopkit
            0.2.0 or older), which otherwise opens with a warning naming what cannot be verified.
            A file that records one is always checked against it (an edited class name, template
            or preprocessing field is refused).
        spinning: Let idle onnxruntime threads spin (off by default: faster only on a machine
            that runs nothing else).
        engine: ``onnxruntime`` (the default), ``openvino`` (the ``openvino`` extra) or ``auto``
            (the fastest installed engine and device whose answers equal onnxruntime's on the
            CPU, measured on the file once per machine and cached; see
            :mod:`~coopkit.runtime.engine_choice`). :attr:`engine` says what runs the graph.
        compute: ``fp32`` (the file's own precision; OpenVINO's bf16 default is switched off)
            or ``bf16`` (OpenVINO computes float ops in bfloat16 where the CPU can; its agreement
            with fp32 is measured by ``auto``).

    :attr:`use_io_binding` (set for CUDA and TensorRT) runs the graph through onnxruntime's IO
    binding, one copy of the batch to the device and one copy back per output; it gives the same
    answers on any provider, the CPU included.

    One instance may be shared by many threads: calls do not share mutable state.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        MetadataError: not an ONNX file, not a coopkit export, or a newer schema; a file whose
            output widths, class weights or tensors do not match its metadata (edited or corrupted).
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
        check_tensors: bool = True,
        strict: bool = False,
        spinning: bool = False,
        engine: str = "onnxruntime",
        compute: str = "fp32",
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"model file not found: {self.path}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if workers is not None and int(workers) < 1:
            raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
        self._device, self._threads, self._providers = device, threads, providers
        self._check_tensors = bool(check_tensors)
        self._spinning = bool(spinning)
        self.session, self.engine = open_engine(self.path, engine, compute, device, threads, providers,
                                                spinning=spinning, batch_size=int(batch_size))
        self.metadata = open_checked(self.session, self.path, self._check_tensors, strict)
        fixed = self.session.get_inputs()[0].shape[0]
        self._fixed_batch = fixed if isinstance(fixed, int) and fixed > 0 else None
        self.batch_size = self._fixed_batch or int(batch_size)
        self.max_pixels = int(max_pixels)
        self._workers = int(workers) if workers is not None else default_workers()
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pool_lock = threading.Lock()
        self._text_encoder: Optional[TextEncoder] = None
        self._text_lock = threading.Lock()
        self._head = _Head(tuple(self.metadata.classnames))
        self.provider: str = self.session.get_providers()[0]
        self.use_io_binding = self.provider in (CUDA, TENSORRT)
        # onnxruntime on the CPU: outputs written straight into numpy arrays where their widths are fixed
        widths = {o.name: o.shape[-1] for o in self.session.get_outputs()}
        fixed = all(isinstance(w, int) for w in widths.values())
        floats = all(o.type == "tensor(float)" for o in self.session.get_outputs())
        self._bound_widths = widths if CPU_IO_BINDING and self.provider == CPU and fixed and floats else None
        self._feed_raw = resizes_in_graph(self.metadata, self.provider)
        if self.metadata.input_kind == INPUT_RAW and not self._feed_raw and self.provider in (CUDA, TENSORRT):
            logger.warning(
                "%s: onnxruntime's CUDA kernel for this file's antialiased resize is wrong (onnxruntime issue "
                "25264); Pillow crops this raw-input file's images on the CPU, the model still runs on CUDA",
                self.path.name,
            )
        out_dim = {o.name: o.shape for o in self.session.get_outputs()}["image_embeds"][-1]
        self._embed_dim = self.metadata.embed_dim or (out_dim if isinstance(out_dim, int) else 0)
        logger.info("loaded %s (%d classes) on %s (engine %s, %s compute)", self.path, len(self._head.classnames),
                    self.provider, self.engine.label, self.engine.compute)

    # --- public properties --------------------------------------------------------------------

    @property
    def classnames(self) -> list[str]:
        """Class names, in the order of the logits' columns."""
        return list(self._head.classnames)

    @property
    def task(self) -> str:
        """``classify`` (one label per image, softmax) or ``multilabel`` (each label's own
        probability; every label at or above its threshold applies): see :class:`ModelMetadata`."""
        return self.metadata.task

    @property
    def multilabel(self) -> bool:
        """Whether the file answers every label that applies (``task == "multilabel"``)."""
        return self.metadata.multilabel

    @property
    def thresholds(self) -> Optional[np.ndarray]:
        """Multi-label files: each label's decision threshold on its probability ``(n_classes,)``
        float32, in the order of :attr:`classnames`; ``None`` for single-label files."""
        t = self.metadata.thresholds
        return None if t is None else np.asarray(t, dtype=np.float32)

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` of the crop the model sees (a raw-input file makes it in its graph)."""
        return self.metadata.image_size

    @property
    def input_kind(self) -> str:
        """``cropped`` or ``raw``: what the file's graph takes (see :class:`ModelMetadata`)."""
        return self.metadata.input_kind

    @property
    def resizes_in_graph(self) -> bool:
        """True when decoded images go to the graph, which resizes and crops them (a raw-input
        file, except on CUDA for the filters in :data:`CUDA_WRONG_RESIZE`, and on OpenVINO); False
        when Pillow crops them first."""
        return self._feed_raw

    @property
    def device(self) -> str:
        """``cuda``, ``gpu`` (OpenVINO's GPUs) or ``cpu``: where the graph really runs."""
        return self.engine.where

    def __repr__(self) -> str:
        return f"Classifier({str(self.path)!r}, classes={len(self._head.classnames)}, provider={self.provider!r})"

    # --- preprocessing ------------------------------------------------------------------------

    def _crop_one(self, source: ImageInput) -> np.ndarray:
        return prepare_image(source, self.metadata, self.max_pixels)

    def _prepare_one(self, source: ImageInput) -> np.ndarray:
        """What the graph receives for one image: the decoded image (raw input) or its crop."""
        if self._feed_raw:
            m = self.metadata
            return decode(source, max_pixels=self.max_pixels, image_size=m.image_size,
                          resize_mode=m.resize_mode)  # (H, W, 3), any size
        return self._crop_one(source)

    def prepare(self, source: ImageInput) -> np.ndarray:
        """One image decoded and cropped as open_clip's transform does: uint8 ``(H, W, 3)``.

        The first half of :meth:`predict` for pipelines that decode in their own threads or
        processes and batch images themselves (then :meth:`run_batch` and :func:`rank`). Always
        the crop, whatever the file's input kind, so a queue of prepared images holds
        ``H * W * 3`` bytes each (a raw-input graph's own resize then meets an image already at
        its size; :meth:`predict` hands such a graph the decoded image instead).

        Raises:
            ImageDecodeError: the image is unreadable, of an unsupported type or too large.
            FileNotFoundError: a path that does not exist.
        """
        return self._crop_one(source)

    def _map(self, fn: Any, items: list[Any]) -> list[Any]:
        if self._workers <= 1 or len(items) <= 1:
            return [fn(x) for x in items]
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="coopkit-preprocess")
            pool = self._pool
        return list(pool.map(fn, items))

    def _prepare_batch(self, sources: list[Any], skip: bool, crop: bool = False) -> tuple[Batch, list[Optional[str]]]:
        """Decode (and crop); returns the readable images and one error per input.

        The images are one uint8 batch ``(n, H, W, 3)`` of crops, or, for a raw-input file, a
        list of decoded ``(H, W, 3)`` images of any sizes (``crop=True``: crops in any case).
        """
        prepare = self._crop_one if crop else self._prepare_one

        def one(src: Any) -> Union[np.ndarray, str]:
            try:
                return prepare(src)
            except (ImageDecodeError, FileNotFoundError) as e:
                if not skip:
                    raise
                return str(e)

        done = self._map(one, sources)
        errors = [d if isinstance(d, str) else None for d in done]
        arrays = [d for d in done if not isinstance(d, str)]
        if self._feed_raw and not crop:
            return arrays, errors
        h, w = self.metadata.image_size
        batch = np.stack(arrays) if arrays else np.zeros((0, h, w, 3), np.uint8)  # (n, H, W, 3)
        return batch, errors

    def preprocess(self, images: Union[ImageInput, Iterable[ImageInput]]) -> np.ndarray:
        """The uint8 crops ``(n, H, W, 3)`` open_clip's transform makes of ``images``: what a
        cropped-input file receives (a raw-input file makes the same crops in its graph)."""
        return self._prepare_batch(as_image_list(images), skip=False, crop=True)[0]

    # --- running the graph --------------------------------------------------------------------

    def _run(self, batch: Batch, names: Sequence[str]) -> list[np.ndarray]:
        """Run the image graph on a prepared uint8 batch; returns float32 outputs.

        A list of decoded images of several sizes (raw input) runs as one graph call per size,
        the outputs put back in input order.
        """
        if isinstance(batch, list):
            return self._run_by_size(batch, names)
        n = batch.shape[0]
        if self._fixed_batch and n != self._fixed_batch:  # a static-batch export: pad the last chunk
            pad = np.zeros((self._fixed_batch - n, *batch.shape[1:]), np.uint8)
            batch = np.concatenate([batch, pad])
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        if self.use_io_binding:
            # one host->device copy of the batch, one device->host copy per requested output
            binding = self.session.io_binding()
            binding.bind_cpu_input(INPUT_NAME, batch)
            for name in names:
                binding.bind_output(name, "cpu")
            self.session.run_with_iobinding(binding)
            outs = binding.copy_outputs_to_cpu()
        elif self._bound_widths is not None:
            outs = run_bound(self.session, {INPUT_NAME: batch}, [(k, (len(batch), self._bound_widths[k])) for k in names])
        else:
            outs = self.session.run(list(names), {INPUT_NAME: batch})
        for name, out in zip(names, outs):  # graphs with symbolic output widths are checked here
            check_output_width(self.path, self.metadata, name, out.shape[-1])
        return [np.asarray(o[:n], dtype=np.float32) for o in outs]

    def _run_by_size(self, images: list[np.ndarray], names: Sequence[str]) -> list[np.ndarray]:
        if not images:
            width = {"image_embeds": self._embed_dim}
            return [np.zeros((0, width.get(name, len(self._head.classnames))), np.float32) for name in names]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(img.shape, []).append(i)
        outs: list[Optional[np.ndarray]] = [None] * len(names)
        for shape, idx in groups.items():
            results = self._run(np.stack([images[i] for i in idx]), names)  # (k, H, W, 3) of one size
            for j, result in enumerate(results):
                if outs[j] is None:
                    outs[j] = np.zeros((len(images), *result.shape[1:]), np.float32)
                outs[j][idx] = result  # type: ignore[index]
        return [o for o in outs if o is not None]

    def _infer(self, images: Batch, head: _Head, wanted: Sequence[str]) -> dict[str, np.ndarray]:
        """The one way the graph runs: prepared ``images`` in chunks of ``batch_size``, the
        requested outputs for the classes of ``head`` (replaced classes score the image
        embeddings against their own weights), float32, one row per image."""
        names = tuple(wanted) if head.weights is None else ("image_embeds",)
        parts = [self._run(images[s : s + self.batch_size], names) for s in range(0, len(images), self.batch_size)]
        widths = {"image_embeds": self._embed_dim, "logits": len(head.classnames), "probs": len(head.classnames)}
        got = {
            name: np.concatenate([p[i] for p in parts]) if parts else np.zeros((0, widths[name]), np.float32)
            for i, name in enumerate(names)
        }
        if head.weights is not None:
            logits = self._head_logits(got["image_embeds"], head)
            got = {"image_embeds": got["image_embeds"], "logits": logits, "probs": softmax(logits)}
        return {name: got[name] for name in wanted}

    def _head_logits(self, embeds: np.ndarray, head: _Head) -> np.ndarray:
        """Logits of replaced classes (:meth:`set_classes`) from image embeddings."""
        assert head.weights is not None
        logits = embeds @ head.weights.T  # (n, n_classes)
        if self.metadata.logit_bias is not None:  # as the graph's own logits (SigLIP-family models)
            logits = logits + np.float32(self.metadata.logit_bias)
        return logits

    def run_batch(
        self, images: Batch, outputs: Sequence[str] = ("probs",)
    ) -> tuple[tuple[str, ...], dict[str, np.ndarray]]:
        """Run the graph on images prepared by :meth:`prepare`: a uint8 batch ``(n, H, W, 3)``, or
        a list of prepared images (a raw-input file's decoded images may differ in size).

        The second half of :meth:`predict`: one consistent set of classes (a concurrent
        :meth:`set_classes` takes effect on the next call), chunks of ``batch_size``.

        Returns:
            The class names the columns of ``logits``/``probs`` follow, and a dict with the
            requested ``outputs`` (any of ``logits``, ``probs``, ``image_embeds``), float32.
        """
        wanted = tuple(outputs)
        unknown = [o for o in wanted if o not in OUTPUT_NAMES]
        if unknown or not wanted:
            raise ValueError(f"outputs must be a non-empty subset of {OUTPUT_NAMES}, got {list(outputs)}")
        h, w = self.metadata.image_size
        items = list(images) if not isinstance(images, np.ndarray) else images
        bad = [x for x in items if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 3 and
                                        x.shape[2] == 3 and (self._feed_raw or x.shape[:2] == (h, w)))]
        if bad:
            raise ValueError(f"images must be what prepare() gives: uint8 ({h}, {w}, 3) crops"
                             f"{' or decoded (H, W, 3) images' if self._feed_raw else ''}, got {bad[0]!r:.80}")
        if isinstance(items, list) and not self._feed_raw:
            items = np.stack(items) if items else np.zeros((0, h, w, 3), np.uint8)  # (n, H, W, 3)
        head = self._head
        return head.classnames, self._infer(items, head, wanted)

    def _chunks(self, sources: list[Any]) -> Iterable[list[Any]]:
        for start in range(0, len(sources), self.batch_size):
            yield sources[start : start + self.batch_size]

    def _collect(self, images: Any, want: str) -> np.ndarray:
        """One output for every image of ``images``, decoded chunk by chunk (unreadable images raise)."""
        sources = as_image_list(images)
        head = self._head
        parts = [self._infer(self._prepare_batch(chunk, skip=False)[0], head, (want,))[want]
                 for chunk in self._chunks(sources)]
        if parts:
            return np.concatenate(parts)
        width = self._embed_dim if want == "image_embeds" else len(head.classnames)
        return np.zeros((0, width), np.float32)

    def logits(self, images: Union[ImageInput, Iterable[ImageInput]]) -> np.ndarray:
        """Logits ``(n_images, n_classes)`` (scaled cosine similarities, plus the logit bias of
        SigLIP-family models), float32."""
        return self._collect(images, "logits")

    def probs(self, images: Union[ImageInput, Iterable[ImageInput]]) -> np.ndarray:
        """Class probabilities ``(n_images, n_classes)``, float32: the softmax of the logits over the
        label set, or for a multi-label file every label's own probability (``sigmoid(logits)``,
        rows need not sum to 1; label ``c`` applies where ``probs[:, c] >= thresholds[c]``)."""
        return self._collect(images, "probs")

    def scores(self, images: Union[ImageInput, Iterable[ImageInput]]) -> np.ndarray:
        """Per-class match probabilities ``sigmoid(logits)`` ``(n_images, n_classes)`` of a model
        trained with a sigmoid loss (SigLIP family: its file records a logit bias); each class on
        its own, as the model was trained to output them.

        A multi-label file's scores are its probabilities (:meth:`probs`: it was trained with a
        sigmoid per label).

        Raises:
            ValueError: a softmax-trained model (no logit bias); use :meth:`probs`.
        """
        if self.multilabel:
            return self.probs(images)
        if self.metadata.logit_bias is None:
            raise ValueError(
                f"{self.path} is a softmax-trained model (no logit bias), so sigmoid scores mean nothing for it; "
                "use probs()"
            )
        logits = self._collect(images, "logits")
        return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)

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
            top_k: How many labels to return per image (at most the number of classes). A
                multi-label file returns every label at or above its threshold instead, and
                every label's probability in :attr:`Prediction.label_probs`.
            errors: ``raise`` (the first unreadable image raises, naming it) or ``skip``
                (unreadable images get a result with ``error`` set; the others are classified).

        Raises:
            ImageDecodeError: an unreadable image, with ``errors="raise"``.
            FileNotFoundError: a missing image path, with ``errors="raise"``.
        """
        k = check_predict_args(top_k, errors)
        sources = as_image_list(images)
        head = self._head
        results: list[Prediction] = []
        for start, chunk in zip(range(0, len(sources), self.batch_size), self._chunks(sources)):
            batch, errs = self._prepare_batch(chunk, skip=errors == "skip")
            probs = self._infer(batch, head, ("probs",))["probs"]
            results += rank(probs, head.classnames, [describe(s) for s in chunk], errs, k, start, self.thresholds)
        return results

    # --- new classes through the exported text graph ------------------------------------------

    @property
    def text_encoder(self) -> TextEncoder:
        """The file's companion text graph (opened on first use, on this classifier's device).

        Raises:
            RuntimeError: the file was exported without ``--with-text-encoder``.
            FileNotFoundError: the text graph named in the metadata is missing.
        """
        spec = self.metadata.text_encoder
        if spec is None:
            raise RuntimeError(
                f"{self.path} was exported without a text encoder; re-export with "
                "`coopkit export --with-text-encoder` to use set_classes()"
            )
        with self._text_lock:
            if self._text_encoder is None:
                self._text_encoder = TextEncoder.open(
                    self.path.parent / spec.file, spec, threads=self._threads, check_tensors=self._check_tensors,
                    **self.engine.reopen,
                )
            return self._text_encoder

    def set_classes(self, classnames: Sequence[str]) -> None:
        """Replace the classes: new class weights are computed through the exported text graph.

        Needs a file exported with ``--with-text-encoder``. Calls already running finish with
        the previous classes. :meth:`reset_classes` restores the file's own.
        """
        names = check_classnames(classnames)
        weights = self.text_encoder.class_weights(names)
        self._head = _Head(tuple(names), weights)

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

