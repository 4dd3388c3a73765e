"""What an export is asked to do: :class:`ExportConfig` and its int8 part, :class:`QuantizationConfig`.

Typed, validated dataclasses (as optimum's ``OnnxConfig`` describes an export before it runs):
every setting of :func:`coopkit.exporters.export_onnx` is a field here, with its default and its
``help`` written once; ``coopkit export`` generates its options from these fields
(:func:`coopkit.cli.base.config_options`), and ``export_onnx``'s keyword arguments override them.
A bad value fails when the config is built, in one ``ValueError`` naming it and what is valid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from coopkit.runtime.configbase import ConfigMixin, check_bool, check_choice, check_float, check_int
from coopkit.runtime.contract import FILE_PRECISIONS

from .io import EXTERNAL_DATA_THRESHOLD
from .preprocess import RAW_INPUT_OPSET

DEFAULT_OPSET = 17
MIN_OPSET = 14  # scaled_dot_product_attention needs 14
MAX_OPSET = 20  # the TorchScript exporter's newest
#: Generated verification images per export (besides any labelled ones).
VERIFY_IMAGES = 16
#: int8: calibration images used at most (an even spread over those given).
CALIBRATION_MAX_IMAGES = 256
#: int8: images fed per calibration batch (the ranges do not depend on it).
CALIBRATION_BATCH = 8
#: How much of the activations' per-channel outliers the int8 export may move into the weights before
#: fixing the activations' scales (SmoothQuant's alpha; 0.5 is its paper's default, 0 is none):
#: each is tried and the one closest to fp32 on the calibration images is kept.
SMOOTH_ALPHA = 0.5
SMOOTH_ALPHAS = (0.0, SMOOTH_ALPHA)
#: int8: the share of calibration images that must keep fp32's top-1 class
#: (:func:`coopkit.exporters.int8.top1_agreement`); the products that move the answers most stay
#: fp32 until it holds (Intel Neural Compressor's accuracy-aware tuning, by product).
MIN_AGREEMENT = 0.995
#: int8: the agreement the file must be estimated to keep on the images it will serve
#: (:func:`coopkit.exporters.int8.top1_agreement`'s estimate from the calibration images' margins):
#: a few calibration images that all agree do not vouch for the others, and the estimate does.
MIN_ESTIMATED_AGREEMENT = 0.99
#: int8: how weights are rounded to their integers (:func:`coopkit.exporters.int8.round_weights`).
WEIGHT_ROUNDINGS = ("gptq", "nearest")


def check_opset(opset: Any) -> int:
    """``opset`` if it is an integer from :data:`MIN_OPSET` to :data:`MAX_OPSET`; else a ValueError."""
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be an integer from {MIN_OPSET} to {MAX_OPSET}, got {opset!r}")
    return opset


@dataclass(frozen=True)
class QuantizationConfig(ConfigMixin):
    """How the int8 variant is calibrated and quantised (:func:`coopkit.exporters.int8.to_int8`)."""

    calibration: Optional[Any] = field(default=None, metadata={
        "help": "int8: images to calibrate activation ranges on (a folder of images, an ImageFolder, CSV or "
                "CoOp split); default: the run's own training images, found where the run recorded them."})
    calibration_max_images: int = field(default=CALIBRATION_MAX_IMAGES, metadata={
        "help": "int8: calibration images used at most (an even spread over those given)."})
    calibration_batch: int = field(default=CALIBRATION_BATCH, metadata={
        "help": "int8: images per calibration run (the ranges do not depend on it)."})
    smooth_alphas: tuple[float, ...] = field(default=SMOOTH_ALPHAS, metadata={
        "help": "int8: SmoothQuant strengths tried (0: none, 1: all outliers into the weights); the file closest "
                "to fp32 on the calibration images is kept (one value: no trial)."})
    convolutions: bool = field(default=True, metadata={
        "help": "int8: convolutions too (int8 in and out, QLinearConv: ResNet image towers such as coopkit-tiny's), "
                "with their ReLUs folded; off: matrix products only (their outputs stay float)."})
    reduce_range: bool = field(default=True, metadata={
        "help": "int8: 7-bit weights, safe on every x86 CPU (off: full 8 bits, for AVX-512 VNNI machines only)."})
    weight_rounding: str = field(default=WEIGHT_ROUNDINGS[0], metadata={
        "help": "int8: gptq (each weight's rounding error is made up by the weights after it, from the calibration "
                "inputs: closer to fp32 at the same speed) or nearest (plain rounding).", "choices": WEIGHT_ROUNDINGS})
    min_agreement: float = field(default=MIN_AGREEMENT, metadata={
        "help": "int8: share of calibration images that must keep fp32's top-1 class; the products that move "
                "the answers most stay fp32 until they do (0: quantise every product). More calibration images "
                "make the check closer to the images served."})
    min_estimated_agreement: float = field(default=MIN_ESTIMATED_AGREEMENT, metadata={
        "help": "int8: share of other images the file is estimated to keep fp32's top-1 class on (from the "
                "calibration images' margins); products stay fp32 until it holds too (0: no such bar)."})

    def __post_init__(self) -> None:
        check_int("calibration_max_images", self.calibration_max_images, 1)
        check_int("calibration_batch", self.calibration_batch, 1)
        check_bool("reduce_range", self.reduce_range)
        check_choice("weight_rounding", self.weight_rounding, WEIGHT_ROUNDINGS)
        check_float("min_agreement", self.min_agreement, maximum=1.0)
        check_float("min_estimated_agreement", self.min_estimated_agreement, maximum=1.0)
        alphas = self.smooth_alphas
        if isinstance(alphas, (int, float)) and not isinstance(alphas, bool):
            alphas = (alphas,)
        try:
            alphas = tuple(dict.fromkeys(float(check_float("smooth_alphas", a)) for a in alphas))  # type: ignore[union-attr]
        except (TypeError, ValueError):
            alphas = ()
        if not alphas or any(a > 1.0 for a in alphas):
            raise ValueError(f"smooth_alphas must be one or more numbers in [0, 1], got {self.smooth_alphas!r}")
        object.__setattr__(self, "smooth_alphas", alphas)


@dataclass(frozen=True)
class ExportConfig(ConfigMixin):
    """Everything :func:`coopkit.exporters.export_onnx` does besides the classifier and the path."""

    precision: str = field(default="fp32", metadata={
        "help": "fp32; fp16 (GPU: fp32 inputs, outputs and sensitive ops); int8 (CPU: static quantisation, "
                "calibrated; an image's answer does not depend on its batch).", "choices": FILE_PRECISIONS})
    opset: Optional[int] = field(default=None, metadata={
        "help": f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} [default: {DEFAULT_OPSET}; {RAW_INPUT_OPSET} with "
                "--raw-input, which needs it]."})
    raw_input: bool = field(default=False, metadata={
        "help": "The file takes decoded RGB images of any size and resizes and crops them itself, as open_clip "
                "does (clients only decode); verified against the Pillow path on images of many sizes."})
    with_text_encoder: bool = field(default=False, metadata={
        "help": "Also export the text tower with the learned context (new class names at run time; "
                "single-label unified-context and zero-shot runs only)."})
    fused_attention: bool = field(default=False, metadata={
        "help": "fp32 files: write each unmasked self-attention of a ViT as one com.microsoft Attention node "
                "(onnxruntime's fused operator; OpenVINO and onnxruntime-web read it too). Same answers, a little "
                "faster on the CPU (ViT-B-32: onnxruntime 1.00-1.07x, OpenVINO 1.01-1.02x); off by default, as "
                "engines that read only standard ONNX cannot run it."})
    verify_data: Optional[Any] = field(default=None, metadata={
        "help": "Labelled images (ImageFolder, CSV or CoOp split) to verify on as well; int8 must agree "
                "on 99% of the clear calls and, from 100 images on, stay within 1 accuracy point."})
    n_verify: int = field(default=VERIFY_IMAGES, metadata={
        "help": "Generated verification images (uniform noise and smooth colour fields)."})
    verify_batch: int = field(default=8, metadata={
        "help": "Batch size of the verification runs (a batch of 1 is always run too)."})
    size_threshold: int = field(default=EXTERNAL_DATA_THRESHOLD, metadata={
        "help": "Tensors above this many bytes are written to <file>.data beside the graph."})
    seed: int = field(default=0, metadata={"help": "Seed of the generated verification images."})
    int8: QuantizationConfig = field(default_factory=QuantizationConfig, metadata={
        "help": "int8 calibration and quantisation settings."})

    def __post_init__(self) -> None:
        if self.precision not in FILE_PRECISIONS:  # worded as before the config existed
            raise ValueError(f"unsupported precision {self.precision!r}; valid: {', '.join(FILE_PRECISIONS)}")
        if self.opset is not None:
            check_opset(self.opset)
        check_bool("raw_input", self.raw_input)
        check_bool("with_text_encoder", self.with_text_encoder)
        check_bool("fused_attention", self.fused_attention)
        if self.fused_attention and self.precision != "fp32":
            raise ValueError(f"fused_attention is for fp32 files (int8 quantises the attention's products one by "
                             f"one; fp16's conversion handles standard operators only); precision is {self.precision}")
        if self.raw_input and self.resolved_opset < RAW_INPUT_OPSET:
            raise ValueError(f"raw input needs opset {RAW_INPUT_OPSET} or newer (Resize with antialias), "
                             f"got {self.opset}")
        check_int("n_verify", self.n_verify, 1)
        check_int("verify_batch", self.verify_batch, 1)
        check_int("size_threshold", self.size_threshold, 0)
        check_int("seed", self.seed, 0)
        object.__setattr__(self, "int8", QuantizationConfig.from_dict(self.int8))
        if self.int8.calibration is not None and self.precision != "int8":
            raise ValueError(f"calibration images are for int8 exports; precision is {self.precision}")

    @property
    def resolved_opset(self) -> int:
        """The opset used: :attr:`opset`, else 17, or 18 with :attr:`raw_input` (which needs it)."""
        if self.opset is not None:
            return self.opset
        return RAW_INPUT_OPSET if self.raw_input else DEFAULT_OPSET

    @classmethod
    def build(cls, config: Optional["ExportConfig"] = None, **overrides: Any) -> "ExportConfig":
        """``config`` (default: every default) with fields replaced by keyword, those of its
        :class:`QuantizationConfig` included (``calibration=...``, ``smooth_alphas=...``), as
        open_clip's ``create_model`` keyword arguments override a model config. An unknown name
        is a ValueError listing the valid ones."""
        base = cls() if config is None else config
        if not isinstance(base, cls):
            raise ValueError(f"config must be an ExportConfig, got {type(base).__name__}")
        if not overrides:
            return base
        mine = {f.name for f in dataclasses.fields(cls)} - {"int8"}
        quantisation = {f.name for f in dataclasses.fields(QuantizationConfig)}
        unknown = sorted(set(overrides) - mine - quantisation)
        if unknown:
            raise ValueError(f"unknown export settings {unknown}; valid: {', '.join(sorted(mine | quantisation))}")
        int8 = dataclasses.replace(base.int8, **{k: v for k, v in overrides.items() if k in quantisation})
        return dataclasses.replace(base, int8=int8, **{k: v for k, v in overrides.items() if k in mine})

