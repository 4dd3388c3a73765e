"""Proving an exported graph equal to the PyTorch classifier: public, reusable checks.

:func:`verify_image_graph` and :func:`verify_text_graph` run a written file with onnxruntime on
the CPU against PyTorch and raise :class:`ExportVerificationError` when it does not match;
:func:`compare` holds the rule per precision. The exporter calls them on every file, and the
benchmarks and tests call them directly (as optimum's ``validate_model_outputs``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np

from coopkit.multilabel_data import load_multilabel
from coopkit.userdata import load_dataset
from coopkit.runtime.contract import INPUT_NAME, OUTPUT_NAMES, ModelMetadata, TextEncoderSpec
from coopkit.runtime.session import CPU_DISABLED_OPTIMIZERS, cpu_session
from coopkit.runtime.preprocess import decode, preprocess, resize_and_crop
from coopkit.runtime.text import TextEncoder

from .io import ExportVerificationError
from .preprocess import preprocess_model

if TYPE_CHECKING:
    from coopkit.classifier import Classifier

logger = logging.getLogger(__name__)

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
#: Largest change of an image's logits between batches (alone, or beside other images, some
#: of them extreme), per precision: an image's answer must not depend on what shares its batch.
BATCH_TOLERANCE = {"fp32": 1e-5, "fp16": 1e-5, "int8": 1e-5}
#: Images whose batch invariance each verification checks.
BATCH_CHECK_IMAGES = 4
#: Extreme images that share the batch of a checked image.
BATCH_COMPANIONS = 3
#: Largest absolute class-weight difference of a text graph against PyTorch.
TEXT_TOLERANCE = 1e-4
#: Raw input: largest grey-level difference between the graph's crop and the Pillow path's.
RAW_PIXEL_TOLERANCE = 3
#: Raw input: largest logit difference, as a share of ``exp(logit_scale)`` (so in cosine units),
#: between the file fed decoded images and the same file fed the Pillow path's crops.
RAW_LOGIT_TOLERANCE = 0.005
#: Raw input: share of the verification images whose top-1 class must be the same both ways.
RAW_MIN_TOP1_AGREEMENT = 0.995


@dataclass
class ImageCheck:
    """The proof-of-equality numbers of an image graph against PyTorch (:func:`compare`,
    :func:`verify_image_graph`).

    Attributes:
        max_abs_logit_diff: Largest absolute logit difference.
        mean_abs_logit_diff: Mean absolute logit difference.
        max_abs_embed_diff: Largest absolute difference of the L2-normalised embeddings.
        top1_agreement: Share of the images with the same top-1 class.
        n_images: Images compared.
        finite: Whether every output was finite.
        tolerance: The rule applied: the logit tolerance (fp32, fp16), or int8's agreement rule in words.
        problems: Why it fails; empty when it passes.
        top1_agreement_decisive: int8: the agreement on the images with a clear top class.
        n_decisive: int8: how many images have a clear top class.
        batch_sizes: Batch sizes the file was run at.
        batch_invariance_max_diff: Largest change of an image's logits with what shares its batch.
        accuracy_torch: PyTorch's accuracy on the labelled verification images, if any.
        accuracy_onnx: The file's accuracy on them.
        n_labelled: Labelled verification images.
        label_agreement: Multi-label files: the share of (image, label) decisions (probability at
            or above the label's threshold) the file shares with PyTorch; ``None`` otherwise.
        label_agreement_decisive: Multi-label int8: that share over the decisions PyTorch makes
            clearly (its logit more than :data:`INT8_DECISIVE_MARGIN` cosine units from the threshold's).
        n_decisive_labels: Multi-label int8: how many (image, label) decisions are clear.
    """

    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    max_abs_embed_diff: float
    top1_agreement: float
    n_images: int
    finite: bool
    tolerance: Union[float, str] = 0.0
    problems: list[str] = field(default_factory=list)
    top1_agreement_decisive: Optional[float] = None
    n_decisive: Optional[int] = None
    batch_sizes: list[int] = field(default_factory=list)
    batch_invariance_max_diff: Optional[float] = None
    accuracy_torch: Optional[float] = None
    accuracy_onnx: Optional[float] = None
    n_labelled: Optional[int] = None
    label_agreement: Optional[float] = None
    label_agreement_decisive: Optional[float] = None
    n_decisive_labels: Optional[int] = None


@dataclass(frozen=True)
class TextCheck:
    """A text graph's class weights against PyTorch's (:func:`verify_text_graph`)."""

    max_abs_diff: float
    n_classes: int


@dataclass(frozen=True)
class RawInputCheck:
    """A raw-input file against the runtime's Pillow path (:func:`verify_raw_input`).

    Attributes:
        n_images: Decoded images of many sizes checked.
        max_pixel_diff: Largest grey-level difference between the graph's crop and Pillow's.
        mean_pixel_diff: Mean grey-level difference.
        max_abs_logit_diff: Largest logit difference, decoded image against its Pillow crop.
        logit_tolerance: The tolerance of that difference (in logits).
        top1_agreement: Share of the images with the same top-1 class both ways.
        batch_max_abs_logit_diff: The same difference for a batch of same-size images.
    """

    n_images: int
    max_pixel_diff: int
    mean_pixel_diff: float
    max_abs_logit_diff: float
    logit_tolerance: float
    top1_agreement: float
    batch_max_abs_logit_diff: float


#: onnxruntime 1.31's CPU layout optimiser crashes the process on some fp16 transformer graphs;
#: files are verified with it switched off, as coopkit.runtime always does (see :func:`cpu_session_crashes`).
FP16_CPU_DISABLED_OPTIMIZERS = CPU_DISABLED_OPTIMIZERS


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

    Independent of the traced graph: the images go through the classifier's own torchvision
    transform (``ToTensor`` + ``Normalize``; DualCoOp's stretch leaves an image at its size
    unchanged), the classifier's image encoder run eagerly (not patched for tracing, not wrapped
    in the graph's uint8 normalisation) and its head; ``probs`` is the classifier's own rule
    (softmax, or a multi-label run's sigmoid), ``image_embeds`` a region encoder's pooled token.
    """
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from .graphs import image_encoder

    transform = getattr(classifier, "preprocess", None) or classifier.backbone.preprocess
    encoder = image_encoder(classifier).eval()
    device = next(encoder.parameters()).device
    head = classifier.head().to(device)
    logits, embeds = [], []
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        for start in range(0, len(images), batch_size):
            x = torch.stack([transform(Image.fromarray(a)) for a in images[start : start + batch_size]])
            e = F.normalize(encoder(x.to(device).float()).float(), dim=-1)  # (b, D) or (b, positions, D)
            embeds.append((e[:, 0] if e.dim() == 3 else e).cpu())  # (b, D)
            logits.append(head(e).float().cpu())  # (b, C)
    logit = torch.cat(logits)
    probs = logit.sigmoid() if multilabel_thresholds(classifier) is not None else logit.softmax(-1)
    return {"logits": logit.numpy(), "probs": probs.numpy(), "image_embeds": torch.cat(embeds).numpy()}


def multilabel_thresholds(classifier: "Classifier") -> Optional[np.ndarray]:
    """A multi-label classifier's (``config.task == "multilabel"``) per-label thresholds ``(C,)`` float32
    (0.5 where it records none), else ``None``: what its exported file records and is verified with."""
    if getattr(classifier.config, "task", "classify") != "multilabel":
        return None
    t = getattr(classifier, "thresholds", None)
    return np.full(len(classifier.classnames), 0.5, np.float32) if t is None else np.asarray(t, np.float32)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-logits))`` in float32, without overflow warnings (what a multi-label file's ``probs`` is)."""
    x = np.asarray(logits, dtype=np.float32)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)


def threshold_logits(thresholds: Any) -> np.ndarray:
    """The logit of each probability threshold ``(C,)`` (``-inf`` at or below 0: the label always
    applies; ``inf`` at or above 1): a label's decision is ``logit >= threshold_logit``, up to float
    rounding at the boundary."""
    t = np.asarray(thresholds, dtype=np.float64)
    out = np.where(t <= 0, -np.inf, np.inf)
    inside = (t > 0) & (t < 1)
    out[inside] = np.log(t[inside]) - np.log1p(-t[inside])
    return out


def label_agreement(reference: np.ndarray, got: np.ndarray, thresholds: Any) -> tuple[float, float]:
    """``(measured, estimated)``: the share of (image, label) decisions (probability at or above the
    label's threshold) the logits ``got`` share with the logits ``reference`` (both ``(n, C)``), the
    multi-label counterpart of :func:`coopkit.exporters.int8.top1_agreement`.

    ``estimated`` pairs, per label, every image's margin (its reference logit's distance to the
    threshold's logit) with every image's move towards the threshold, and counts the pairs in
    which the decision survives: what a few images that all keep their decisions do not vouch for.
    """
    n, classes = reference.shape
    if n == 0 or classes == 0:
        return 1.0, 1.0
    t = np.asarray(thresholds, dtype=np.float32)
    measured = float(((sigmoid(reference) >= t) == (sigmoid(got) >= t)).mean())
    edge = threshold_logits(t)[None, :]  # (1, C)
    side = np.where(reference >= edge, 1.0, -1.0)  # (n, C)
    margin = np.abs(reference - edge)  # (n, C)
    move = (reference - got) * side  # (n, C): how far towards the threshold the decision moved
    estimated = float(np.mean([(move[None, :, c] < margin[:, None, c]).mean() for c in range(classes)]))
    return measured, estimated


def logit_scale(classifier: "Classifier") -> float:
    """``exp(logit_scale)`` of the classifier: the mean norm of its class weight rows (the model's
    own ``exp(logit_scale)`` when the weights depend on the image)."""
    weights = classifier.class_weights()
    if weights is None:
        return float(classifier.backbone.model.logit_scale.exp())
    return float(weights.norm(dim=1).mean())


def run_image_graph(session: Any, images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """Run the image graph in batches of ``batch_size``; outputs as float32 arrays."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in OUTPUT_NAMES}
    for start in range(0, len(images), batch_size):
        outs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(images[start : start + batch_size])})
        for name, value in zip(OUTPUT_NAMES, outs):
            parts[name].append(np.asarray(value, dtype=np.float32))
    return {name: np.concatenate(v) for name, v in parts.items()}


def batch_companions(size: tuple[int, int], n: int = BATCH_COMPANIONS, seed: int = 1) -> np.ndarray:
    """uint8 images ``(n, H, W, 3)`` with extreme statistics: all white, all black, then full-range
    noise (what would move a scale computed over the batch)."""
    h, w = size
    out = np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)
    out[0] = 255
    if n > 1:
        out[1] = 0
    return out


def batch_invariance(session: Any, images: np.ndarray, batched_logits: np.ndarray, n: int = BATCH_CHECK_IMAGES) -> float:
    """Largest difference between the logits of the first ``n`` images in ``batched_logits`` and
    those of the same images run alone and run first in a batch of :func:`batch_companions`."""
    n = min(n, len(images))
    companions = batch_companions(images.shape[1:3])
    worst = 0.0
    for i in range(n):
        (alone,) = session.run(["logits"], {INPUT_NAME: np.ascontiguousarray(images[i : i + 1])})
        (mixed,) = session.run(["logits"], {INPUT_NAME: np.concatenate([images[i : i + 1], companions])})
        for got in (alone[0], mixed[0]):
            worst = max(worst, float(np.abs(got - batched_logits[i]).max()))
    return worst


def compare(
    reference: dict[str, np.ndarray], got: dict[str, np.ndarray], precision: str, scale: float = 1.0,
    thresholds: Optional[np.ndarray] = None,
) -> ImageCheck:
    """The proof-of-equality numbers of one precision, and whether they pass (``problems``).

    fp32: logits within 1e-4. fp16: within 5e-2 and the same top-1 wherever PyTorch's top
    two logits are more than twice that apart (closer pairs may swap within the tolerance).
    int8: the same top-1 on at least 99% of the images whose top two classes PyTorch
    separates by a cosine gap above :data:`INT8_DECISIVE_MARGIN` (``scale`` is
    ``exp(logit_scale)``); the agreement over all images is reported as well.

    Multi-label (``thresholds``, one per label): the same rules on each label's decision
    (probability at or above its threshold) instead of the top-1 class: fp32 and fp16, the same
    decision wherever PyTorch's logit is more than twice the tolerance from the threshold's;
    int8, the same decision on at least 99% of the (image, label) pairs PyTorch decides by more
    than :data:`INT8_DECISIVE_MARGIN` cosine units; and ``probs`` must be ``sigmoid(logits)``.
    """
    ref, out = reference["logits"], got["logits"]
    diff = float(np.abs(ref - out).max()) if ref.size else 0.0
    if thresholds is None:  # the answer is the top-1 class; its margin, the gap to the runner-up
        answer_ref, answer_out = ref.argmax(1), out.argmax(1)  # (n,)
        ordered = np.sort(ref, axis=1)
        margin = ordered[:, -1] - ordered[:, -2] if ref.shape[1] > 1 else np.full(len(ref), np.inf)
    else:  # the answers are the label decisions; a margin, the logit's distance to its threshold's
        t = np.asarray(thresholds, dtype=np.float32)
        answer_ref, answer_out = sigmoid(ref) >= t, sigmoid(out) >= t  # (n, C)
        margin = np.abs(ref - threshold_logits(t)[None, :])  # (n, C)
    agreement = float((answer_ref == answer_out).mean()) if answer_ref.size else 1.0
    result = ImageCheck(
        max_abs_logit_diff=diff,
        mean_abs_logit_diff=float(np.abs(ref - out).mean()) if ref.size else 0.0,
        max_abs_embed_diff=float(np.abs(reference["image_embeds"] - got["image_embeds"]).max()),
        top1_agreement=float((ref.argmax(1) == out.argmax(1)).mean()) if len(ref) else 1.0,
        n_images=int(len(ref)),
        finite=bool(all(np.isfinite(v).all() for v in got.values())),
        label_agreement=None if thresholds is None else agreement,
    )
    problems = result.problems
    if not result.finite:
        problems.append("non-finite outputs")
    if precision in LOGIT_TOLERANCE:
        tol = LOGIT_TOLERANCE[precision]
        result.tolerance = tol
        if diff > tol:
            problems.append(f"logits differ by up to {diff:.3g} (tolerance {tol:g})")
        clear = margin > 2 * tol
        flips = int((answer_ref[clear] != answer_out[clear]).sum())
        if flips and thresholds is None:
            problems.append(f"top-1 differs on {flips} image(s) whose top-2 margin exceeds {2 * tol:g}")
        elif flips:
            problems.append(f"{flips} label decision(s) differ whose logit is more than {2 * tol:g} from the threshold")
    else:
        decisive = margin > INT8_DECISIVE_MARGIN * scale
        n_decisive = int(decisive.sum())
        agree_decisive = float((answer_ref[decisive] == answer_out[decisive]).mean()) if n_decisive else 1.0
        need = f"(need {INT8_MIN_TOP1_AGREEMENT:.0%})"
        if thresholds is None:
            result.top1_agreement_decisive, result.n_decisive = agree_decisive, n_decisive
            result.tolerance = (
                f"top-1 agreement >= {INT8_MIN_TOP1_AGREEMENT:.0%} where the cosine margin > {INT8_DECISIVE_MARGIN:g}"
            )
            failure = f"top-1 agrees on only {agree_decisive:.1%} of the {n_decisive} images with a clear top class {need}"
        else:
            result.label_agreement_decisive, result.n_decisive_labels = agree_decisive, n_decisive
            result.tolerance = (f"per-label decision agreement >= {INT8_MIN_TOP1_AGREEMENT:.0%} where the cosine "
                                f"margin to the threshold > {INT8_DECISIVE_MARGIN:g}")
            failure = (f"label decisions agree on only {agree_decisive:.1%} of the {n_decisive} clear (image, label) "
                       f"pairs {need}")
        if agree_decisive < INT8_MIN_TOP1_AGREEMENT:
            problems.append(failure)
    if thresholds is None and not np.allclose(got["probs"].sum(1), 1.0, atol=1e-3):
        problems.append("probs do not sum to 1")
    if thresholds is not None and not np.allclose(got["probs"], sigmoid(out), atol=1e-5):
        problems.append("probs are not the sigmoid of the logits")
    return result


def verify_image_graph(
    path: Path,
    classifier: "Classifier",
    precision: str,
    images: np.ndarray,
    batch_size: int = 8,
    labels: Optional[np.ndarray] = None,
) -> ImageCheck:
    """Run the file with onnxruntime (CPU) against PyTorch; raise if it does not match.

    ``labels`` (``-1`` for unlabelled images) adds both accuracies; for int8 they must be
    within 1 point of each other when at least :data:`INT8_MIN_LABELLED` images are labelled."""
    session = cpu_session(path)
    inp = session.get_inputs()[0]
    if inp.name != INPUT_NAME or inp.type != "tensor(uint8)":
        raise ExportVerificationError(f"graph input is {inp.name} {inp.type}, expected {INPUT_NAME} tensor(uint8)")
    reference = torch_reference(classifier, images)
    got = run_image_graph(session, images, batch_size)
    result = compare(reference, got, precision, logit_scale(classifier), multilabel_thresholds(classifier))
    result.batch_sizes = sorted({1, 1 + BATCH_COMPANIONS, min(batch_size, len(images)), len(images) % batch_size or batch_size})
    result.batch_invariance_max_diff = invariance = batch_invariance(session, images, got["logits"])
    if not invariance <= BATCH_TOLERANCE[precision]:
        result.problems.append(
            f"an image's logits change by up to {invariance:.3g} with the images that share its batch "
            f"(tolerance {BATCH_TOLERANCE[precision]:g})"
        )
    if labels is not None and (labels >= 0).any():
        known = labels >= 0
        right_ref = int((reference["logits"][known].argmax(1) == labels[known]).sum())
        right_out = int((got["logits"][known].argmax(1) == labels[known]).sum())
        n = int(known.sum())
        acc_ref, acc_out = right_ref / n, right_out / n
        result.accuracy_torch, result.accuracy_onnx, result.n_labelled = acc_ref, acc_out, n
        # counted in images: 2 of 200 is 1% exactly, which 0.865 - 0.855 in floating point exceeds
        if precision == "int8" and n >= INT8_MIN_LABELLED and abs(right_ref - right_out) > INT8_MAX_ACCURACY_DROP * n:
            result.problems.append(
                f"accuracy {acc_out:.2%} differs from PyTorch's {acc_ref:.2%} by more than {INT8_MAX_ACCURACY_DROP:.0%}"
            )
    if result.problems:
        raise ExportVerificationError(
            f"the {precision} ONNX graph does not match the PyTorch classifier on {len(images)} test images: "
            + "; ".join(result.problems)
        )
    return result



def verify_text_graph(path: Path, classifier: "Classifier", spec: TextEncoderSpec) -> TextCheck:
    """Class weights of the text graph at ``path`` against PyTorch's, for all classes and for one.

    Raises:
        ExportVerificationError: they differ by more than :data:`TEXT_TOLERANCE`.
    """
    encoder = TextEncoder(cpu_session(path), spec, folder=path.parent)
    names = list(classifier.classnames)
    expected = classifier.class_weights().numpy()  # (n_classes, embed_dim)
    diff = float(np.abs(encoder.class_weights(names) - expected).max())
    diff_single = float(np.abs(encoder.class_weights(names[:1]) - expected[:1]).max())
    if not (diff <= TEXT_TOLERANCE and diff_single <= TEXT_TOLERANCE):
        raise ExportVerificationError(
            f"the text graph's class weights differ from PyTorch's by up to {max(diff, diff_single):.3g} "
            f"(tolerance {TEXT_TOLERANCE:g})"
        )
    logger.info("verified text graph: max |class weight diff| %.3g over %d classes", diff, len(names))
    return TextCheck(max_abs_diff=diff, n_classes=len(names))


def verification_data(data: Any, classifier: "Classifier", meta: ModelMetadata) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """uint8 images at the model's size (decoded and cropped as the runtime does) and labels if known."""
    if isinstance(data, np.ndarray) and data.ndim == 4:
        h, w = meta.image_size
        if data.dtype != np.uint8 or data.shape[1:] != (h, w, 3):
            raise ValueError(f"verification images must be uint8 (n, {h}, {w}, 3), got {data.dtype} {data.shape}")
        return data, None

    sources, labels = _sources(data, classifier)
    arrays = [
        preprocess(src, meta.image_size, meta.resize_mode, meta.interpolation, meta.fill_color) for src in sources
    ]
    return np.stack(arrays), labels  # (n, H, W, 3)


def synthetic_image(h: int, w: int, seed: int, photo: bool = False) -> np.ndarray:
    """A uint8 RGB image ``(h, w, 3)``: uniform noise (the worst case for resampling), or with
    ``photo`` smooth colour fields with one sharp edge and grain."""
    rng = np.random.default_rng(seed)
    if not photo:
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a, b = rng.uniform(1.0, 9.0, 2)
    field = np.stack([128 + 100 * np.sin(a * xx / w * np.pi), 128 + 100 * np.cos(b * yy / h * np.pi),
                      np.where((xx / w + yy / h) > 1.0, 230.0, 25.0)], axis=-1)  # (h, w, 3)
    return np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)


def raw_test_images(image_size: tuple[int, int], n_random: int = 16, seed: int = 0) -> list[np.ndarray]:
    """Decoded uint8 RGB images ``(H, W, 3)`` of many sizes for verifying a raw-input graph.

    Tiny (1x1, 2x3, 5x7), odd sizes around and at the model's size, extreme aspect ratios
    (1x300, 1000x3, 20x2000), two large photos (2000x1333, 4000x3000) and ``n_random`` sizes
    drawn log-uniformly from 8 to 1200 pixels a side; contents alternate between uniform noise
    and photo-like fields (:func:`synthetic_image`).
    """
    rng = np.random.default_rng(seed)
    h, w = image_size
    sizes = [(1, 1), (2, 3), (3, 2), (5, 7), (33, 47), (99, 640), (640, 99), (479, 641),
             (h, w), (h + 1, w), (h - 1 or 1, w + 1), (2 * h + 1, 2 * w - 1 or 1),
             (1, 300), (300, 1), (3, 1000), (1000, 3), (20, 2000), (1333, 2000), (3000, 4000)]
    sizes += [tuple(int(x) for x in np.exp(rng.uniform(np.log(8), np.log(1200), 2))) for _ in range(n_random)]
    return [synthetic_image(hh, ww, seed * 1000 + i, photo=i % 2 == 1) for i, (hh, ww) in enumerate(sizes)]


def verify_raw_input(path: Path, meta: ModelMetadata, precision: str, images: Sequence[np.ndarray],
                     scale: float) -> RawInputCheck:
    """Check a raw-input file against the runtime's Pillow path on decoded images of any size.

    For each image: the graph's crop (its preprocessing alone, built as in the file) against
    :func:`~coopkit.runtime.preprocess.resize_and_crop`, within :data:`RAW_PIXEL_TOLERANCE`
    grey levels; the file's logits for the image against its logits for the Pillow crop, within
    :data:`RAW_LOGIT_TOLERANCE` x ``scale`` (``exp(logit_scale)``), with the same top-1 on at
    least :data:`RAW_MIN_TOP1_AGREEMENT` of the images; and a batch of same-size images against
    the batch of their crops, within the same tolerance. The file itself is proven equal to PyTorch on crops by
    :func:`verify_image_graph` (a raw file passes crops through unchanged).

    Raises:
        ExportVerificationError: any of these fails.
    """
    from PIL import Image

    session = cpu_session(path)
    pre = cpu_session(preprocess_model(meta).SerializeToString())
    pixel_max, pixel_sum, n_values = 0, 0.0, 0
    raw_logits, crop_logits = [], []
    for img in images:
        ours = pre.run(None, {INPUT_NAME: img[None]})[0][0]  # (h, w, 3)
        pillow = resize_and_crop(Image.fromarray(img), meta.image_size, meta.resize_mode, meta.interpolation,
                                 meta.fill_color)
        diff = np.abs(ours.astype(np.int16) - pillow.astype(np.int16))
        pixel_max, pixel_sum, n_values = max(pixel_max, int(diff.max())), pixel_sum + float(diff.sum()), n_values + diff.size
        raw_logits.append(session.run(["logits"], {INPUT_NAME: img[None]})[0][0])
        crop_logits.append(session.run(["logits"], {INPUT_NAME: pillow[None]})[0][0])
    raw, crop = np.stack(raw_logits), np.stack(crop_logits)  # (n, n_classes)
    logit_diff = float(np.abs(raw - crop).max())
    agreement = float((raw.argmax(1) == crop.argmax(1)).mean())
    # a batch of same-size images against the batch of their Pillow crops (the same batch, so that
    # int8's per-batch activation scales see the same company on both sides)
    same_size = [images[-1], images[-1][::-1], images[-1][:, ::-1]]
    crops = np.stack([resize_and_crop(Image.fromarray(x), meta.image_size, meta.resize_mode, meta.interpolation,
                                      meta.fill_color) for x in same_size])  # (3, h, w, 3)
    batched = session.run(["logits"], {INPUT_NAME: np.stack(same_size)})[0]  # (3, n_classes)
    batched_crops = session.run(["logits"], {INPUT_NAME: crops})[0]
    result = RawInputCheck(
        n_images=len(images),
        max_pixel_diff=pixel_max,
        mean_pixel_diff=pixel_sum / max(n_values, 1),
        max_abs_logit_diff=logit_diff,
        logit_tolerance=RAW_LOGIT_TOLERANCE * scale,
        top1_agreement=agreement,
        batch_max_abs_logit_diff=float(np.abs(batched - batched_crops).max()),
    )
    problems = []
    if pixel_max > RAW_PIXEL_TOLERANCE:
        problems.append(f"the in-graph crop differs from Pillow's by up to {pixel_max} grey levels "
                        f"(tolerance {RAW_PIXEL_TOLERANCE})")
    if not logit_diff <= RAW_LOGIT_TOLERANCE * scale:
        problems.append(f"logits on decoded images differ from those on Pillow crops by up to {logit_diff:.3g} "
                        f"(tolerance {RAW_LOGIT_TOLERANCE * scale:.3g})")
    if agreement < RAW_MIN_TOP1_AGREEMENT:
        problems.append(f"top-1 agrees with the Pillow path on only {agreement:.1%} of the images "
                        f"(need {RAW_MIN_TOP1_AGREEMENT:.1%})")
    if not result.batch_max_abs_logit_diff <= RAW_LOGIT_TOLERANCE * scale:
        problems.append(f"a batch of same-size images differs from the batch of their Pillow crops by up to "
                        f"{result.batch_max_abs_logit_diff:.3g}")
    if problems:
        raise ExportVerificationError(
            f"the raw-input graph does not match the Pillow path on {len(images)} images: " + "; ".join(problems))
    return result


def _sources(data: Any, classifier: "Classifier") -> tuple[Sequence[Any], Optional[np.ndarray]]:
    """The image sources of ``verify_data`` (a labelled set's test split, or a list) and their labels."""
    labels = None
    sources: Sequence[Any]
    if multilabel_thresholds(classifier) is not None and (isinstance(data, (str, os.PathLike)) or hasattr(data, "relabel")):
        sources = load_multilabel(data, classnames=classifier.classnames).paths  # a multi-label set: its images
    elif isinstance(data, (str, os.PathLike)) or hasattr(data, "relabel"):
        dataset = load_dataset(data, split="test").relabel(classifier.classnames)
        sources = dataset.paths
        labels = np.asarray(dataset.labels)
    else:
        sources = list(data)
    if len(sources) == 0:
        raise ValueError("verification data has no images")
    return sources, labels


def decoded_images(data: Any, classifier: "Classifier") -> list[np.ndarray]:
    """The images of ``verify_data`` decoded as the runtime decodes them (EXIF, RGB), at full size."""
    if isinstance(data, np.ndarray) and data.ndim == 4:
        return list(data)
    return [decode(src) for src in _sources(data, classifier)[0]]

