"""export_onnx(): a fitted or zero-shot classifier as one ONNX graph, proven equal on every export.

The graph (contract in :mod:`coopkit.runtime.metadata`): uint8 images ``(batch, H, W, 3)`` ->
``/255`` -> ``(x - mean) / std`` -> NCHW -> open_clip image encoder -> L2 -> ``x W^T`` ->
``logits``, ``probs`` (softmax) and ``image_embeds``. ``W`` (the class weights) is baked in.

How a file is made:

1. the PyTorch module is traced with the TorchScript exporter (``dynamo=False``), with the
   fast path of ``nn.MultiheadAttention`` switched off so attention exports as plain ops;
2. fp16 / int8 variants are derived from that fp32 graph (:mod:`coopkit.exporters.quantize`);
3. the metadata (:class:`~coopkit.runtime.metadata.ModelMetadata`) goes into ``metadata_props``;
4. the file is written (tensors in ``<file>.data`` above ``size_threshold``), checked with
   ``onnx.checker`` (full check) and run by onnxruntime on the CPU against the PyTorch
   classifier on the same inputs; a file that does not match is never moved into place;
5. everything is written in a temporary folder beside the target and renamed into place
   (external data and the text graph first, the image graph last).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

import numpy as np

from coopkit.runtime.metadata import INPUT_NAME, METADATA_KEY, OUTPUT_NAMES, PRECISIONS, ModelMetadata
from coopkit.runtime.session import CPU_DISABLED_OPTIMIZERS

if TYPE_CHECKING:
    import onnx
    import torch

    from coopkit.classifier import Classifier

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
MIN_OPSET = 14  # scaled_dot_product_attention needs 14
MAX_OPSET = 20  # the TorchScript exporter's newest
#: Above this many bytes of tensors, a file keeps them in ``<file>.data`` (protobuf's limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 2_000_000_000
#: Largest absolute logit difference allowed against PyTorch, per precision.
LOGIT_TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2}
#: int8: share of images whose top-1 class must agree with PyTorch.
INT8_MIN_TOP1_AGREEMENT = 0.99
#: int8: the agreement is counted on images whose top two classes PyTorch separates by more
#: than this cosine gap (logit gap / exp(logit_scale)); closer calls may swap within the
#: quantisation noise, and a random-init model has nothing but close calls.
INT8_DECISIVE_MARGIN = 0.02
#: int8: largest accuracy difference (fraction) on labelled verification images ...
INT8_MAX_ACCURACY_DROP = 0.01
#: ... enforced from this many labelled images on (below it, one changed answer exceeds 1 point).
INT8_MIN_LABELLED = 100
TEXT_TOLERANCE = 1e-4
VERIFY_IMAGES = 16


class ExportVerificationError(RuntimeError):
    """The exported graph does not reproduce the PyTorch classifier (nothing was written)."""


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and how it was checked.

    Attributes:
        path: The image graph.
        precision: ``fp32``, ``fp16`` or ``int8``.
        files: Every file written (image graph, external data, text graph).
        size_bytes: Total size of ``files``.
        seconds: Wall time of the export, verification included.
        checks: Numbers of the proof of equality: ``max_abs_logit_diff``, ``top1_agreement``,
            ``n_images``, ``batch_sizes``, ``tolerance`` and, with a text graph,
            ``text_max_abs_diff``.
        metadata: The metadata stored in the file.
        text_path: The text graph, when exported.
        external_data: Whether the tensors live in ``<file>.data``.
    """

    path: Path
    precision: str
    files: list[Path]
    size_bytes: int
    seconds: float
    checks: dict[str, Any]
    metadata: ModelMetadata
    text_path: Optional[Path] = None
    external_data: bool = False


# --- input checks ----------------------------------------------------------------------------


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unsupported precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return precision


def _check_opset(opset: int) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be an integer from {MIN_OPSET} to {MAX_OPSET}, got {opset!r}")
    return opset


def _check_target(path: Union[str, os.PathLike]) -> Path:
    """The output file: its folder is created; a folder or an unwritable place is refused."""
    target = Path(path).expanduser()
    if not target.name or target.is_dir():
        raise ValueError(f"output {str(path)!r} is a folder; give a file name such as model.onnx")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (PermissionError, FileExistsError, NotADirectoryError) as e:
        raise ValueError(f"cannot create the output folder {target.parent}: {e.strerror or e}") from None
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write to {target.parent}: permission denied")
    if target.exists() and not os.access(target, os.W_OK) and not os.access(target.parent, os.W_OK):
        raise ValueError(f"cannot replace {target}: permission denied")
    return target


def _check_classifier(classifier: "Classifier") -> None:
    for attr in ("backbone", "config", "class_weights"):
        if not hasattr(classifier, attr):
            raise ValueError(
                f"export_onnx needs a coopkit Classifier (from coopkit.fit, coopkit.zero_shot or coopkit.load), "
                f"got {type(classifier).__name__}"
            )


def text_graph_name(image_file: str) -> str:
    """``model.onnx`` -> ``model.text.onnx`` (the companion text graph's file name)."""
    stem = image_file[: -len(".onnx")] if image_file.endswith(".onnx") else image_file
    return f"{stem}.text.onnx"


# --- metadata -----------------------------------------------------------------------------------


def weights_sha256(weights: "torch.Tensor") -> str:
    """sha256 of the class weight matrix as float32, C order (the value stored in the metadata)."""
    array = np.ascontiguousarray(weights.detach().to("cpu").float().numpy(), dtype=np.float32)
    return hashlib.sha256(array.tobytes()).hexdigest()


def _recorded_pretrained(pretrained: Optional[str]) -> Optional[str]:
    if pretrained is None:
        return None
    path = Path(pretrained)
    return path.name if (os.sep in pretrained or path.suffix) else pretrained


def build_metadata(
    classifier: "Classifier", precision: str, text_encoder: Optional[dict[str, Any]] = None
) -> ModelMetadata:
    """The :class:`ModelMetadata` of an export of ``classifier``."""
    from coopkit import __version__

    bb = classifier.backbone
    cfg = bb.preprocess_cfg
    weights = classifier.class_weights()
    if classifier.learner is not None:
        p = classifier.learner.config
        prompt: dict[str, Any] = {
            "n_ctx": int(classifier.learner.n_ctx),
            "csc": bool(p.csc),
            "class_token_position": p.class_token_position,
            "ctx_init": p.ctx_init,
        }
    else:
        prompt = {"templates": list(classifier.config.templates or [])}
    interpolation = str(cfg.get("interpolation", "bicubic"))
    resize_mode = str(cfg.get("resize_mode", "shortest"))
    fill = cfg.get("fill_color", 0)
    try:
        return ModelMetadata(
            classnames=list(classifier.classnames),
            image_size=bb.image_size,
            resize_mode=resize_mode,
            interpolation=interpolation,
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            fill_color=int(fill if isinstance(fill, (int, float)) else 0),
            model=bb.name,
            pretrained=_recorded_pretrained(bb.pretrained),
            method=classifier.method,
            prompt=prompt,
            precision=precision,
            embed_dim=int(weights.shape[1]),
            weights_sha256=weights_sha256(weights),
            coopkit_version=__version__,
            text_encoder=text_encoder,
        )
    except ValueError as e:  # MetadataError: e.g. an interpolation the runtime cannot reproduce
        raise ValueError(f"cannot export {bb.name}: {e}") from None


# --- tracing ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _exporting() -> Iterator[None]:
    """No grad, MultiheadAttention's fused fast path off, tracer chatter to the debug log."""
    import torch

    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        seen = sorted({str(w.message).splitlines()[0][:160] for w in caught})
        for message in seen:
            logger.debug("exporter warning: %s", message)
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def _trace(module: "torch.nn.Module", example: "torch.Tensor", path: Path, opset: int,
           input_name: str, output_names: Sequence[str], batch_axis: str) -> None:
    import torch

    from .graphs import export_friendly

    module.eval()
    dynamic = {input_name: {0: batch_axis}, **{name: {0: batch_axis} for name in output_names}}
    with _exporting(), export_friendly(module):
        torch.onnx.export(
            module,
            (example,),
            os.fspath(path),
            dynamo=False,
            input_names=[input_name],
            output_names=list(output_names),
            dynamic_axes=dynamic,
            opset_version=opset,
            do_constant_folding=True,
        )


def _image_module(classifier: "Classifier") -> "torch.nn.Module":
    from .graphs import ImageGraph

    bb = classifier.backbone
    weights = classifier.class_weights().to(next(bb.model.parameters()).device)
    return ImageGraph(bb.model, weights, bb.preprocess_cfg["mean"], bb.preprocess_cfg["std"]).eval()


# --- saving -------------------------------------------------------------------------------------


def tensor_bytes(model: "onnx.ModelProto") -> int:
    """Bytes of initializer data of the model, whether held in it or in external files
    (what decides on external data)."""
    import onnx

    total = 0
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
            total += int(np.prod(init.dims, dtype=np.int64)) * itemsize
        elif init.raw_data:
            total += len(init.raw_data)
        else:
            total += init.ByteSize()
    return total


def save_model(model: "onnx.ModelProto", path: Path, size_threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    """Write ``model``; tensors go to ``<path>.data`` when they exceed ``size_threshold`` bytes.

    Returns the files written (the model, then its data file if any).
    """
    import onnx

    if tensor_bytes(model) <= size_threshold:
        onnx.save_model(model, os.fspath(path))
        return [path]
    data_name = f"{path.name}.data"
    onnx.save_model(
        model,
        os.fspath(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=1024,
    )
    logger.info("%s: tensors written to external data %s", path.name, data_name)
    return [path, path.parent / data_name]


def _set_metadata(model: "onnx.ModelProto", meta: ModelMetadata) -> None:
    from coopkit import __version__

    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, meta.to_json()
    model.producer_name = "coopkit"
    model.producer_version = __version__
    model.doc_string = (
        f"coopkit {meta.method} classifier over {meta.model} ({len(meta.classnames)} classes, {meta.precision}): "
        f"uint8 images (batch, {meta.image_size[0]}, {meta.image_size[1]}, 3) -> logits, probs, image_embeds"
    )


def _check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(os.fspath(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportVerificationError(f"onnx.checker rejected the exported graph {path.name}: {e}") from None


# --- verification -------------------------------------------------------------------------------


#: onnxruntime 1.31's CPU layout optimiser crashes the process on some fp16 transformer graphs;
#: files are verified with it switched off, as coopkit.runtime always does (see :func:`cpu_session_crashes`).
FP16_CPU_DISABLED_OPTIMIZERS = CPU_DISABLED_OPTIMIZERS


def _cpu_session(path: Path, precision: str = "fp32") -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    disabled = list(FP16_CPU_DISABLED_OPTIMIZERS) if precision == "fp16" else None
    return ort.InferenceSession(
        os.fspath(path), opts, providers=["CPUExecutionProvider"], disabled_optimizers=disabled
    )


def cpu_session_crashes(path: Path, timeout: float = 300.0) -> bool:
    """Whether opening ``path`` with onnxruntime's CPU provider at default settings kills the
    process (tried in a child process, so a crash costs nothing here)."""
    import subprocess
    import sys

    code = (
        "import sys, onnxruntime as ort; o = ort.SessionOptions(); o.log_severity_level = 4; "
        "ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider'])"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code, os.fspath(path)], capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode < 0 or proc.returncode > 1


def random_images(n: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """``n`` uint8 test images ``(n, H, W, 3)``: half uniform noise, half smooth colour fields."""
    rng = np.random.default_rng(seed)
    h, w = size
    out = rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n // 2, n):
        a, b, c = rng.uniform(0.5, 6.0, 3)
        phase = rng.uniform(0, 2 * np.pi, 3)
        field = np.stack(
            [128 + 100 * np.sin(a * xx / w * np.pi + phase[0]),
             128 + 100 * np.cos(b * yy / h * np.pi + phase[1]),
             128 + 100 * np.sin(c * (xx + yy) / (w + h) * np.pi + phase[2])], axis=-1)  # (H, W, 3)
        out[i] = np.clip(field + rng.normal(0, 8, field.shape), 0, 255).astype(np.uint8)
    return out


def torch_reference(classifier: "Classifier", images: np.ndarray, batch_size: int = 32) -> dict[str, np.ndarray]:
    """The PyTorch classifier on uint8 images already at the model's size, in fp32.

    Independent of the traced module: the images go through the backbone's own torchvision
    transform (``ToTensor`` + ``Normalize``), ``encode_image`` and the classifier's weights.
    """
    import torch
    import torch.nn.functional as F
    from PIL import Image

    bb = classifier.backbone
    device = next(bb.model.parameters()).device
    weights = classifier.class_weights().to(device)
    logits, embeds = [], []
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        for start in range(0, len(images), batch_size):
            x = torch.stack([bb.preprocess(Image.fromarray(a)) for a in images[start : start + batch_size]])
            e = F.normalize(bb.model.encode_image(x.to(device).float()).float(), dim=-1)  # (b, D)
            embeds.append(e.cpu())
            logits.append((e @ weights.T).cpu())  # (b, C)
    logit = torch.cat(logits)
    return {"logits": logit.numpy(), "probs": logit.softmax(-1).numpy(), "image_embeds": torch.cat(embeds).numpy()}


def run_image_graph(session: Any, images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """Run the image graph in batches of ``batch_size``; outputs as float32 arrays."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in OUTPUT_NAMES}
    for start in range(0, len(images), batch_size):
        outs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(images[start : start + batch_size])})
        for name, value in zip(OUTPUT_NAMES, outs):
            parts[name].append(np.asarray(value, dtype=np.float32))
    return {name: np.concatenate(v) for name, v in parts.items()}


def compare(
    reference: dict[str, np.ndarray], got: dict[str, np.ndarray], precision: str, scale: float = 1.0
) -> dict[str, Any]:
    """The proof-of-equality numbers of one precision, and whether they pass.

    fp32: logits within 1e-4. fp16: within 5e-2 and the same top-1 wherever PyTorch's top
    two logits are more than twice that apart (closer pairs may swap within the tolerance).
    int8: the same top-1 on at least 99% of the images whose top two classes PyTorch
    separates by a cosine gap above :data:`INT8_DECISIVE_MARGIN` (``scale`` is
    ``exp(logit_scale)``); the agreement over all images is reported as well.
    """
    ref, out = reference["logits"], got["logits"]
    diff = float(np.abs(ref - out).max()) if ref.size else 0.0
    top_ref, top_out = ref.argmax(1), out.argmax(1)
    agreement = float((top_ref == top_out).mean()) if len(ref) else 1.0
    ordered = np.sort(ref, axis=1)
    margin = ordered[:, -1] - ordered[:, -2] if ref.shape[1] > 1 else np.full(len(ref), np.inf)
    result: dict[str, Any] = {
        "max_abs_logit_diff": diff,
        "mean_abs_logit_diff": float(np.abs(ref - out).mean()) if ref.size else 0.0,
        "max_abs_embed_diff": float(np.abs(reference["image_embeds"] - got["image_embeds"]).max()),
        "top1_agreement": agreement,
        "n_images": int(len(ref)),
        "finite": bool(all(np.isfinite(v).all() for v in got.values())),
    }
    problems = []
    if not result["finite"]:
        problems.append("non-finite outputs")
    if precision in LOGIT_TOLERANCE:
        tol = LOGIT_TOLERANCE[precision]
        result["tolerance"] = tol
        if diff > tol:
            problems.append(f"logits differ by up to {diff:.3g} (tolerance {tol:g})")
        clear = margin > 2 * tol
        flips = int((top_ref[clear] != top_out[clear]).sum())
        if flips:
            problems.append(f"top-1 differs on {flips} image(s) whose top-2 margin exceeds {2 * tol:g}")
    else:
        decisive = margin > INT8_DECISIVE_MARGIN * scale
        n_decisive = int(decisive.sum())
        agree_decisive = float((top_ref[decisive] == top_out[decisive]).mean()) if n_decisive else 1.0
        result.update(top1_agreement_decisive=agree_decisive, n_decisive=n_decisive)
        result["tolerance"] = (
            f"top-1 agreement >= {INT8_MIN_TOP1_AGREEMENT:.0%} where the cosine margin > {INT8_DECISIVE_MARGIN:g}"
        )
        if agree_decisive < INT8_MIN_TOP1_AGREEMENT:
            problems.append(
                f"top-1 agrees on only {agree_decisive:.1%} of the {n_decisive} images with a clear top class "
                f"(need {INT8_MIN_TOP1_AGREEMENT:.0%})"
            )
    if not np.allclose(got["probs"].sum(1), 1.0, atol=1e-3):
        problems.append("probs do not sum to 1")
    result["problems"] = problems
    return result


def verify_image_graph(
    path: Path,
    classifier: "Classifier",
    precision: str,
    images: np.ndarray,
    batch_size: int = 8,
    labels: Optional[np.ndarray] = None,
) -> dict[str, Any]:
    """Run the file with onnxruntime (CPU) against PyTorch; raise if it does not match.

    ``labels`` (``-1`` for unlabelled images) adds both accuracies; for int8 they must be
    within 1 point of each other when at least :data:`INT8_MIN_LABELLED` images are labelled."""
    session = _cpu_session(path, precision)
    inp = session.get_inputs()[0]
    if inp.name != INPUT_NAME or inp.type != "tensor(uint8)":
        raise ExportVerificationError(f"graph input is {inp.name} {inp.type}, expected {INPUT_NAME} tensor(uint8)")
    reference = torch_reference(classifier, images)
    got = run_image_graph(session, images, batch_size)
    single = run_image_graph(session, images[:1], 1)  # the batch axis really is dynamic
    scale = float(classifier.class_weights().norm(dim=1).mean())  # exp(logit_scale)
    result = compare(reference, got, precision, scale)
    result["batch_sizes"] = sorted({1, min(batch_size, len(images)), len(images) % batch_size or batch_size})
    if not np.allclose(single["logits"], got["logits"][:1], atol=1e-4 if precision == "fp32" else 5e-2):
        result["problems"].append("batch of 1 and a larger batch give different logits")
    if labels is not None and (labels >= 0).any():
        known = labels >= 0
        acc_ref = float((reference["logits"][known].argmax(1) == labels[known]).mean())
        acc_out = float((got["logits"][known].argmax(1) == labels[known]).mean())
        result.update(accuracy_torch=acc_ref, accuracy_onnx=acc_out, n_labelled=int(known.sum()))
        if precision == "int8" and known.sum() >= INT8_MIN_LABELLED and abs(acc_ref - acc_out) > INT8_MAX_ACCURACY_DROP:
            result["problems"].append(
                f"accuracy {acc_out:.2%} differs from PyTorch's {acc_ref:.2%} by more than {INT8_MAX_ACCURACY_DROP:.0%}"
            )
    if result["problems"]:
        raise ExportVerificationError(
            f"the {precision} ONNX graph does not match the PyTorch classifier on {len(images)} test images: "
            + "; ".join(result["problems"])
        )
    return result


# --- the export ---------------------------------------------------------------------------------


def _file_size(files: Sequence[Path]) -> int:
    return sum(f.stat().st_size for f in files if f.exists())


def _verification_data(data: Any, classifier: "Classifier", meta: ModelMetadata) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """uint8 images at the model's size (decoded and cropped as the runtime does) and labels if known."""
    if isinstance(data, np.ndarray) and data.ndim == 4:
        h, w = meta.image_size
        if data.dtype != np.uint8 or data.shape[1:] != (h, w, 3):
            raise ValueError(f"verification images must be uint8 (n, {h}, {w}, 3), got {data.dtype} {data.shape}")
        return data, None
    from coopkit.runtime.preprocess import preprocess

    labels = None
    if isinstance(data, (str, os.PathLike)) or hasattr(data, "relabel"):
        from coopkit.data import load_dataset

        dataset = load_dataset(data, split="test").relabel(classifier.classnames)
        sources: Sequence[Any] = dataset.paths
        labels = np.asarray(dataset.labels)
    else:
        sources = list(data)
    if len(sources) == 0:
        raise ValueError("verification data has no images")
    arrays = [
        preprocess(src, meta.image_size, meta.resize_mode, meta.interpolation, meta.fill_color) for src in sources
    ]
    return np.stack(arrays), labels  # (n, H, W, 3)


def _fix_output_dims(model: "onnx.ModelProto", n_classes: int, embed_dim: int) -> None:
    """Write the static widths of the outputs into the graph (the tracer leaves some symbolic)."""
    width = {"logits": n_classes, "probs": n_classes, "image_embeds": embed_dim}
    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        if out.name in width and len(dims) == 2:
            dims[1].Clear()
            dims[1].dim_value = width[out.name]


def export_onnx(
    classifier: "Classifier",
    path: Union[str, os.PathLike],
    precision: str = "fp32",
    *,
    opset: int = DEFAULT_OPSET,
    with_text_encoder: bool = False,
    verify_data: Optional[Any] = None,
    n_verify: int = VERIFY_IMAGES,
    verify_batch: int = 8,
    size_threshold: int = EXTERNAL_DATA_THRESHOLD,
    seed: int = 0,
) -> ExportResult:
    """Export a fitted or zero-shot classifier as one ONNX graph, verified against PyTorch.

    Args:
        classifier: From :func:`coopkit.fit`, :func:`coopkit.zero_shot` or :func:`coopkit.load`.
        path: The ``.onnx`` file to write (its folder is created).
        precision: ``fp32``; ``fp16`` (weights and most activations in half precision; inputs,
            outputs, LayerNorm, softmax and the head in fp32: for GPUs); ``int8`` (dynamic
            quantisation of the MatMul/Gemm weights: for CPUs).
        opset: ONNX opset, 14 to 20.
        with_text_encoder: Also write the text tower with the learned context baked in, as
            ``<name>.text.onnx`` beside ``path`` (unified-context CoOp and zero-shot runs; a
            class-specific context has nothing to give a new class name). It stays fp32.
        verify_data: More images to verify on, besides ``n_verify`` generated ones: a labelled
            set (ImageFolder, CSV or CoOp split path, or a :class:`coopkit.Dataset`, whose
            ``test`` split is used), a list of images, or a uint8 ``(n, H, W, 3)`` batch at the
            model's size. With labels, both accuracies are reported and, for int8, must be
            within 1 point (from 100 labelled images on). The int8 criteria are meant for a
            task's real test images; see :func:`compare` for how close calls are counted.
        n_verify: Generated test images (uniform noise and smooth colour fields).
        verify_batch: Batch size of the verification runs (a batch of 1 is always run too).
        size_threshold: Tensors above this many bytes are written to ``<file>.data``.
        seed: Seed of the generated test images.

    Returns:
        An :class:`ExportResult`: the files, their size, the time taken and the numbers of the
        proof of equality.

    Raises:
        ValueError: bad precision or opset, an output that cannot be written, a class-specific
            context with ``with_text_encoder``, unreadable verification data.
        ExportVerificationError: the graph did not match PyTorch (nothing was written).
        RuntimeError: the exporter or a converter failed.
    """
    import onnx

    started = time.perf_counter()
    _check_classifier(classifier)
    _check_precision(precision)
    _check_opset(opset)
    if n_verify < 1 or verify_batch < 1:
        raise ValueError(f"n_verify and verify_batch must be >= 1, got {n_verify} and {verify_batch}")
    if with_text_encoder:
        from .text import check_text_encoder_supported

        check_text_encoder_supported(classifier)
    target = _check_target(path)
    meta = build_metadata(classifier, precision)  # validates the preprocessing settings early
    images = random_images(n_verify, meta.image_size, seed)
    labels = None
    if verify_data is not None:
        extra, labels = _verification_data(verify_data, classifier, meta)
        images = np.concatenate([images, extra])
        if labels is not None:
            labels = np.concatenate([np.full(n_verify, -1), labels])

    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except PermissionError:
        raise ValueError(f"cannot write to {target.parent}: permission denied") from None
    try:
        checks: dict[str, Any] = {}
        text_files: list[Path] = []
        if with_text_encoder:
            from .text import export_text_graph

            text_files, text_meta, text_checks = export_text_graph(
                classifier, tmp / text_graph_name(target.name), opset=opset, size_threshold=size_threshold
            )
            meta.text_encoder = text_meta
            checks.update(text_checks)

        raw = tmp / "raw-fp32.onnx"
        module = _image_module(classifier)
        _trace(module, torch_tensor(images[: min(2, len(images))], module), raw, opset, INPUT_NAME, OUTPUT_NAMES, "batch")
        del module
        final = tmp / target.name
        if precision == "int8":
            from .quantize import to_int8

            big = tensor_bytes(onnx.load(os.fspath(raw), load_external_data=False)) > size_threshold
            quantised = tmp / "raw-int8.onnx"
            to_int8(raw, quantised, external_data=big)
            model = onnx.load(os.fspath(quantised))
        else:
            model = onnx.load(os.fspath(raw))
            if precision == "fp16":
                from .quantize import to_fp16

                model = to_fp16(model)
        _fix_output_dims(model, len(meta.classnames), meta.embed_dim)
        _set_metadata(model, meta)
        files = save_model(model, final, size_threshold)
        del model
        _check(final)
        checks.update(verify_image_graph(final, classifier, precision, images, verify_batch, labels))
        if precision == "fp16":
            crashes = cpu_session_crashes(final)
            checks["cpu_default_session_crashes"] = crashes
            if crashes:
                logger.warning(
                    "onnxruntime's CPU provider crashes on this fp16 file at its default optimisation level; "
                    "serve fp16 on CUDA, or on the CPU with disabled_optimizers=%s (fp32/int8 are the CPU choices)",
                    list(FP16_CPU_DISABLED_OPTIMIZERS),
                )
        logger.info(
            "verified %s against PyTorch: max |logit diff| %.3g, top-1 agreement %.1f%% on %d images",
            precision, checks["max_abs_logit_diff"], 100 * checks["top1_agreement"], checks["n_images"],
        )
        # into place: external data and the text graph first, the image graph (which names them) last
        written: list[Path] = []
        for f in [*text_files, *files[1:], files[0]]:
            dest = target.parent / f.name
            os.replace(f, dest)
            written.append(dest)
        _remove_stale_companions(target, written)
    except PermissionError as e:
        raise ValueError(f"cannot write {target}: permission denied ({e.filename or target})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    main_file = written[-1]
    result = ExportResult(
        path=main_file,
        precision=precision,
        files=[main_file, *written[:-1]],
        size_bytes=_file_size(written),
        seconds=time.perf_counter() - started,
        checks=checks,
        metadata=meta,
        text_path=next((w for w in written if w.name == text_graph_name(target.name)), None),
        external_data=len(files) > 1,
    )
    logger.info("exported %s (%s, %.1f MB) in %.1fs", main_file, precision, result.size_bytes / 1e6, result.seconds)
    return result


def _remove_stale_companions(target: Path, written: Sequence[Path]) -> None:
    """Delete the data file and text graph an earlier export to ``target`` left, if this one wrote none.

    The new image graph is already in place and names only what it uses; an old ``<file>.data``
    or text graph next to it would be dead weight that a later copy might ship by mistake.
    """
    text = target.parent / text_graph_name(target.name)
    for stale in (target.parent / f"{target.name}.data", text, text.parent / f"{text.name}.data"):
        if stale not in written and stale.is_file():
            stale.unlink()
            logger.info("removed %s, left by an earlier export to %s", stale.name, target.name)


def torch_tensor(images: np.ndarray, module: "torch.nn.Module") -> "torch.Tensor":
    """A uint8 example batch on the module's device."""
    import torch

    device = next(module.parameters()).device
    return torch.from_numpy(np.ascontiguousarray(images)).to(device)
