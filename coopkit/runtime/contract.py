"""The contract between training and serving, written once: both sides import it.

Everything an exported file promises, and every rule that must be applied the same way when
coopkit trains a prompt and when the runtime rebuilds it, lives here:

* **graph names**: the image graph maps ``images`` (uint8 ``(batch, H, W, 3)``, RGB; of the
  :data:`INPUT_CROPPED` kind already resized and cropped to ``image_size``, of the
  :data:`INPUT_RAW` kind decoded images of any size, resized and cropped inside the graph, the
  images of one run all of one size) to ``logits`` ``(batch, n_classes)``, ``probs``
  (softmax of the logits; in a :data:`TASK_MULTILABEL` file each label's own probability,
  ``sigmoid(logits)``, so a row need not sum to 1) and ``image_embeds`` ``(batch, embed_dim)``
  (L2-normalised);
* **scores**: ``logits = exp(logit_scale) * cos(image, class) + logit_bias`` where the model
  was trained with a logit bias (SigLIP's sigmoid loss; :attr:`ModelMetadata.logit_bias`),
  else without; ``probs`` is the softmax over the label set (classification: the bias cancels);
  for sigmoid-trained models, ``scores = sigmoid(logits)`` is each class's own match
  probability, as the model was trained to output it (:data:`SCORE_RULE`);
* **tasks**: a file answers one label per image (:data:`TASK_CLASSIFY`: ``probs`` is a softmax,
  the best labels win) or every label that applies (:data:`TASK_MULTILABEL`: ``probs`` holds
  independent sigmoids, and label ``c`` applies where ``probs[:, c] >= thresholds[c]``, the
  per-label thresholds chosen on validation data and stored, sealed, in the metadata); a
  multi-label file is written with schema version :data:`MULTILABEL_SCHEMA_VERSION` and its
  sidecar with sidecar version 2 (:data:`TASK_SCHEMA_VERSIONS`), which readers older than the
  task refuse instead of reading its sigmoids as a softmax;
* **the text graph**: the optional text graph maps ``token_ids`` int64 ``(n, context_length)`` to ``class_weights``
  ``(n, embed_dim)``, already multiplied by ``exp(logit_scale)``;
* **class names**: a list of distinct, non-blank strings; ``_`` is read as a space when a
  name goes into a prompt (:func:`prompt_name`);
* **templates**: strings with exactly one ``{}`` for the class name, filled by
  :func:`fill_template` (no ``str.format``: other braces stay as written);
* **token layout of CoOp prompts**: ``[prefix] + context + class tokens + "." + [end]`` with the
  class tokens at the ``end``, in the ``middle`` (after ``n_ctx // 2`` context vectors) or
  at the ``front`` (:func:`context_before_name`, :func:`prompt_order`); ``prefix`` is the
  ``n_prefix`` special tokens the tokenizer puts before the text (CLIP's start token, BERT's
  ``[CLS]``, ``<s>``; none for SigLIP and mT5), ``end`` the token after it (:func:`name_length`
  reads the class name's length off the ids); a text graph is fed the tokenisation of
  :func:`coop_prompt_template` (``n_ctx`` placeholder words ``X`` then the name and ``"."``)
  and swaps the learned context in for the placeholders;
* **metadata**: :class:`ModelMetadata`, stored as JSON under :data:`METADATA_KEY` in the
  file's ``metadata_props``, with the text graph described by :class:`TextEncoderSpec` and the
  resolved resize plan by :class:`ResizeSpec`;
* **the sidecar**: the same metadata as a JSON file beside the graph (:func:`sidecar_name`,
  :func:`build_sidecar`) with each file's size and sha256, for clients that cannot read ONNX
  metadata (onnxruntime-web); :func:`sidecar_mismatches` says where one disagrees with a file.

Standard library only, so the torch-free runtime and the training side share it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Sequence, Union

from .atomic import sha256_hex

#: The schema version of single-label files (every coopkit reads it; files before the field existed
#: count as 0).
SCHEMA_VERSION = 1
#: What a file answers: one label per image (softmax) or every label that applies (per-label sigmoids
#: and thresholds); a run's ``task`` takes the same values (:class:`coopkit.config.RunConfig`).
TASK_CLASSIFY = "classify"
TASK_MULTILABEL = "multilabel"
TASKS = (TASK_CLASSIFY, TASK_MULTILABEL)
#: The schema version of multi-label files: readers that do not know ``task`` (coopkit 0.2 and
#: every runtime before multi-label files, which read up to :data:`SCHEMA_VERSION`) refuse them,
#: instead of ranking their independent sigmoids as one softmax and ignoring the thresholds.
MULTILABEL_SCHEMA_VERSION = 2
#: The version each task's files (and sidecars) are written with: the oldest whose readers know the
#: task, so that a single-label file stays readable by older runtimes.
TASK_SCHEMA_VERSIONS = {TASK_CLASSIFY: SCHEMA_VERSION, TASK_MULTILABEL: MULTILABEL_SCHEMA_VERSION}
#: The newest schema this coopkit reads.
NEWEST_SCHEMA_VERSION = max(TASK_SCHEMA_VERSIONS.values())
METADATA_KEY = "coopkit"
INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probs", "image_embeds")
TEXT_INPUT = "token_ids"
TEXT_OUTPUT = "class_weights"
RESIZE_MODES = ("shortest", "longest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
#: How the resized size of an image follows from its size (:class:`ResizeSpec`): ``exact`` (stretch
#: to the target), ``shortest_edge`` (torchvision ``Resize(int)``: short side to the target, long
#: side truncated), ``keep_ratio_shortest`` / ``keep_ratio_longest`` (open_clip ``ResizeKeepRatio``:
#: the short or the long side fits, both sides rounded).
RESIZE_RULES = ("exact", "shortest_edge", "keep_ratio_shortest", "keep_ratio_longest")
#: Precisions of an exported file's weights (metadata ``precision``); training computes in
#: :data:`coopkit.config.COMPUTE_PRECISIONS`.
FILE_PRECISIONS = ("fp32", "fp16", "int8")
#: What a file's ``images`` input takes: crops at ``image_size`` (every file before this field
#: existed), or decoded RGB images of any size that the graph resizes and crops itself.
INPUT_CROPPED = "cropped"
INPUT_RAW = "raw"
INPUT_KINDS = (INPUT_CROPPED, INPUT_RAW)

#: Where the class-name tokens sit relative to the learned context.
CLASS_TOKEN_POSITIONS = ("end", "middle", "front")
#: The hand-written prompt of the zero-shot baseline (CLIP's).
DEFAULT_TEMPLATE = "a photo of a {}."
#: Text that ends every CoOp prompt, after the class name.
PROMPT_SUFFIX = "."
#: The placeholder word whose embeddings a text graph replaces with the learned context.
PLACEHOLDER = "X"
#: Token layouts a text graph may declare (see :class:`TextEncoderSpec`).
LAYOUT_COOP = "coop_placeholders_v1"
LAYOUT_PLAIN = "plain_v1"
LAYOUTS = (LAYOUT_COOP, LAYOUT_PLAIN)
CLIP_BPE_VOCAB = "clip_bpe_49408"
#: Tokenizers a text graph may declare: CLIP's BPE (numpy, always there) or a Hugging Face
#: ``tokenizer.json`` beside the model, run by the ``tokenizers`` library (an optional extra).
TOKENIZER_CLIP_BPE = "clip_bpe"
TOKENIZER_HF = "hf_tokenizers"
TOKENIZERS = (TOKENIZER_CLIP_BPE, TOKENIZER_HF)
#: What ``scores`` means (per-class sigmoid of the logits), offered where ``logit_bias`` is set.
SCORE_RULE = "sigmoid(logits)"


class MetadataError(ValueError):
    """The file is not a coopkit export, or one this runtime cannot read."""


# --- class names and templates -------------------------------------------------------------------


def check_classnames(classnames: Any, what: str = "classnames") -> list[str]:
    """``classnames`` as a list of distinct, non-blank strings, or a ValueError naming the problem.

    A single string is refused (``"cat"`` would otherwise become the classes c, a, t).
    """
    if isinstance(classnames, (str, bytes)) or not isinstance(classnames, Sequence):
        raise ValueError(f"{what} must be a list of strings, got {type(classnames).__name__} {classnames!r:.80}")
    names = list(classnames)
    bad = [c for c in names if not isinstance(c, str)]
    if bad:
        raise ValueError(f"{what} must be strings, got {bad[:3]!r}")
    if len(names) < 1:
        raise ValueError(f"{what} is empty; give at least one class name")
    blank = [i for i, c in enumerate(names) if not c.strip()]
    if blank:
        raise ValueError(f"{what} has empty or blank names at positions {blank[:5]}")
    seen: set[str] = set()
    dupes = sorted({c for c in names if c in seen or seen.add(c)})  # type: ignore[func-returns-value]
    if dupes:
        raise ValueError(f"{what} has duplicate class names {dupes[:5]}; class names must be unique")
    return names


def prompt_name(classname: str) -> str:
    """A class name as it goes into a prompt: ``_`` read as a space (``"sea_turtle"`` -> ``"sea turtle"``)."""
    return str(classname).replace("_", " ")


def check_templates(templates: Union[str, Sequence[str]]) -> list[str]:
    """Templates as a non-empty list of strings with exactly one ``{}`` each."""
    if isinstance(templates, str):
        templates = [templates]
    templates = list(templates)
    if not templates:
        raise ValueError(f"templates is empty; give at least one, like {DEFAULT_TEMPLATE!r}")
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
    if bad:
        raise ValueError(f"templates must contain '{{}}' exactly once for the class name; got {bad[:3]!r}")
    return templates


def fill_template(template: str, classname: str) -> str:
    """``template`` with its ``{}`` replaced by the prompt form of ``classname``."""
    return template.replace("{}", prompt_name(classname))


def fill_templates(template: str, classnames: Sequence[str]) -> list[str]:
    """One filled-in template per class name."""
    return [fill_template(template, c) for c in classnames]


def check_prompts_fit(prompts: Sequence[str], n_tokens: Sequence[int], context_length: int, n_special: int = 2) -> None:
    """Refuse prompts whose ``n_tokens``, with the tokenizer's ``n_special`` tokens (CLIP's
    start and end tokens), exceed ``context_length``.

    A tokenizer cuts them silently, so two long names that share their beginning would get
    identical class weights.
    """
    room = context_length - n_special
    too_long = [p for p, n in zip(prompts, n_tokens) if n > room]
    if too_long:
        raise ValueError(
            f"prompts {too_long[:3]!r:.200} need more than the {room} tokens a text context of "
            f"{context_length} holds (they would be cut); shorten the class names or the template"
        )


# --- CoOp token layout ---------------------------------------------------------------------------


def check_position(position: str) -> str:
    if position not in CLASS_TOKEN_POSITIONS:
        raise ValueError(f"unknown class_token_position {position!r}; valid: {', '.join(map(repr, CLASS_TOKEN_POSITIONS))}")
    return position


def context_before_name(position: str, n_ctx: int) -> int:
    """How many context vectors come before the class name: all (end), half (middle), none (front)."""
    return {"end": n_ctx, "middle": n_ctx // 2, "front": 0}[check_position(position)]


def prompt_order(position: str, n_ctx: int, name_len: int, length: int, n_prefix: int = 1) -> list[int]:
    """Positions, in prompt order, of the "end" layout ``[prefix, ctx * n_ctx, name, rest]``.

    The prompt at position ``j`` takes the end-layout token ``order[j]``: the ``n_prefix``
    special tokens, the first :func:`context_before_name` context vectors, the ``name_len``
    name tokens, the remaining context vectors, then ``"."``, the end token and padding up to
    ``length``.
    """
    s = context_before_name(position, n_ctx)
    sos, ctx = list(range(n_prefix)), list(range(n_prefix, n_prefix + n_ctx))
    name = list(range(n_prefix + n_ctx, n_prefix + n_ctx + name_len))
    rest = list(range(n_prefix + n_ctx + name_len, length))
    return sos + ctx[:s] + name + ctx[s:] + rest


def name_length(ids: Sequence[int], n_prefix: int, n_ctx: int, end_id: int, dot_id: Optional[int]) -> int:
    """Tokens of the class name in an end-layout row ``[prefix, ctx, name, ".", end, ...]``.

    The name runs from ``n_prefix + n_ctx`` to the first ``end_id`` after it, less the last
    token when it is ``dot_id`` (a name whose last token swallowed the full stop, like ``").``",
    keeps it; ``dot_id`` is ``None`` where the tokenizer drops the full stop). A text graph
    applies the same rule to the ids it is fed (:class:`coopkit.exporters.graphs.TextGraph`).
    """
    start = n_prefix + n_ctx
    rest = list(ids[start:])
    end = start + (rest.index(end_id) if end_id in rest else len(rest))
    return end - start - int(dot_id is not None and end > start and ids[end - 1] == dot_id)


def coop_prompt_template(n_ctx: int) -> str:
    """``"X X ... X {}."``: the prompt a CoOp text graph is fed, ``n_ctx`` placeholders first."""
    return " ".join([PLACEHOLDER] * int(n_ctx)) + " {}" + PROMPT_SUFFIX


# --- metadata ------------------------------------------------------------------------------------


def _known(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in raw.items() if k in names}


def _entry(cls: type, raw: Any, what: str) -> Any:
    """A metadata entry ``what`` (a JSON object, or already a ``cls``) as a ``cls``; MetadataError otherwise."""
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        raise MetadataError(f"{what} must be a JSON object, got {type(raw).__name__}")
    try:
        return cls(**_known(cls, raw))
    except TypeError as e:
        raise MetadataError(f"{what} is incomplete: {e}") from None


@dataclass
class TextEncoderSpec:
    """How to call a file's companion text graph (``--with-text-encoder``).

    Attributes:
        file: The text graph's file name, relative to the image graph.
        input: Name of its int64 token-id input.
        output: Name of its class-weight output.
        context_length: Length of each row of token ids.
        sot_token_id: Start-of-text token id of the tokenizer.
        eot_token_id: End-of-text token id; the graph reads the feature at the largest id.
        vocab: Tokenizer vocabulary (``clip_bpe_49408``: CLIP's BPE, as ``open_clip.tokenize``).
        prompt_suffix: Text after the class name when no template is given.
        prompt_template: One template (``{}`` = class name); CoOp files use
            :func:`coop_prompt_template`.
        templates: Several templates (zero-shot ensembles): the runtime runs the graph once
            per template and averages the L2-normalised rows, keeping the scale.
        n_ctx: Learned context vectors baked into the graph (0 for zero-shot).
        class_token_position: Where the graph puts the class name (CoOp files).
        layout: :data:`LAYOUT_COOP` or :data:`LAYOUT_PLAIN`.
        tokenizer: :data:`TOKENIZER_CLIP_BPE` (files written before it existed) or
            :data:`TOKENIZER_HF` (``tokenizer_file`` run by the ``tokenizers`` library).
        tokenizer_file: The ``tokenizer.json`` beside the model (Hugging Face tokenizers; it
            records the padding and truncation to ``context_length``).
        clean: open_clip's text cleaning before tokenising (``lower``, ``whitespace`` or
            ``canonicalize``; CLIP's BPE always lower-cases).
        strip_sep_id: Token id replaced by 0 after tokenising (open_clip's ``strip_sep_token``).
        n_prefix: Special tokens before the text; the context follows them.
        tensors_sha256: sha256 of every stored tensor of the text graph
            (:func:`coopkit.runtime.integrity.tensors_sha256`), checked when it is opened.
    """

    file: str
    input: str = TEXT_INPUT
    output: str = TEXT_OUTPUT
    context_length: int = 77
    sot_token_id: int = 49406
    eot_token_id: int = 49407
    vocab: str = CLIP_BPE_VOCAB
    prompt_suffix: str = PROMPT_SUFFIX
    prompt_template: Optional[str] = None
    templates: Optional[list[str]] = None
    n_ctx: int = 0
    class_token_position: str = "end"
    layout: str = LAYOUT_PLAIN
    tokenizer: str = TOKENIZER_CLIP_BPE
    tokenizer_file: Optional[str] = None
    clean: str = "lower"
    strip_sep_id: Optional[int] = None
    n_prefix: int = 1
    tensors_sha256: str = ""

    def __post_init__(self) -> None:
        for name in ("file", "tokenizer_file"):
            value = getattr(self, name)
            if (name == "file" or value is not None) and (
                    not isinstance(value, str) or not value or "/" in value or "\\" in value):
                raise MetadataError(f"text_encoder.{name} must be a file name beside the model, got {value!r}")
        if not isinstance(self.context_length, int) or self.context_length < 2:
            raise MetadataError(f"text_encoder.context_length must be an integer >= 2, got {self.context_length!r}")
        if self.layout not in LAYOUTS:
            raise MetadataError(f"text_encoder.layout {self.layout!r} is not one of {LAYOUTS}")
        if self.class_token_position not in CLASS_TOKEN_POSITIONS:
            raise MetadataError(f"text_encoder.class_token_position {self.class_token_position!r} is not one of "
                                f"{CLASS_TOKEN_POSITIONS}")
        try:
            self.prompt_templates()
        except ValueError as e:
            raise MetadataError(f"text_encoder: {e}") from None

    def prompt_templates(self) -> list[str]:
        """``templates``, else ``[prompt_template]``, else ``["{}" + prompt_suffix]``."""
        if self.templates:
            return check_templates([str(t) for t in self.templates])
        if self.prompt_template:
            return check_templates([str(self.prompt_template)])
        return ["{}" + str(self.prompt_suffix)]

    @classmethod
    def from_dict(cls, raw: Any) -> "TextEncoderSpec":
        return _entry(cls, raw, "text_encoder")


@dataclass
class ResizeSpec:
    """The resolved resize plan of a file: open_clip's eval-time resize and crop for its model,
    with every choice made (:func:`coopkit.runtime.preprocess.resize_plan` resolves it from
    ``resize_mode``, ``interpolation``, ``image_size`` and ``fill_color``), so that a client
    applies it instead of deriving it again (``web/coopkit.js`` reads it from the sidecar).

    Attributes:
        rule: How the resized size follows from the image's size (:data:`RESIZE_RULES`).
        interpolation: The filter really used (open_clip resizes non-square ``shortest`` models
            bicubic whatever the configured interpolation).
        size: ``(height, width)`` of the result (the model's ``image_size``).
        crop: Whether a centre crop-or-pad to ``size`` follows the resize (not after ``exact``).
        fill: Grey level of the padding of that crop-or-pad.
    """

    rule: str
    interpolation: str
    size: tuple[int, int]
    crop: bool
    fill: int = 0

    def __post_init__(self) -> None:
        if self.rule not in RESIZE_RULES:
            raise MetadataError(f"resize_plan.rule {self.rule!r} is not one of {RESIZE_RULES}")
        if self.interpolation not in INTERPOLATIONS:
            raise MetadataError(f"resize_plan.interpolation {self.interpolation!r} is not one of {INTERPOLATIONS}")
        try:
            h, w = (int(v) for v in self.size)
        except (TypeError, ValueError):
            raise MetadataError(f"resize_plan.size must be (height, width), got {self.size!r}") from None
        if min(h, w) < 1:
            raise MetadataError(f"resize_plan.size must be positive, got {self.size!r}")
        self.size = (h, w)
        if not isinstance(self.crop, bool) or self.crop == (self.rule == "exact"):
            raise MetadataError(f"resize_plan.crop must be {self.rule != 'exact'} for rule {self.rule!r}, "
                                f"got {self.crop!r}")
        if isinstance(self.fill, bool) or not isinstance(self.fill, int) or not 0 <= self.fill <= 255:
            raise MetadataError(f"resize_plan.fill must be a grey level 0-255, got {self.fill!r}")

    @classmethod
    def from_dict(cls, raw: Any) -> "ResizeSpec":
        return _entry(cls, raw, "resize_plan")


#: What a file without ``metadata_sha256`` cannot prove unedited (the warning's words).
UNSEALED_FIELDS = ("class names, templates, input size, mean and std, the resize and crop rule, logit bias, "
                   "method, prompt and class-token position")


def metadata_checksum(entries: dict[str, Any]) -> str:
    """sha256 of an exported file's metadata: every entry but ``metadata_sha256`` itself, as
    canonical JSON (sorted keys, no spaces, ASCII), so that parsing and re-serialising the
    stored text gives the same digest."""
    body = {k: v for k, v in entries.items() if k != "metadata_sha256"}
    return sha256_hex(b"coopkit metadata v1\n", json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True))


@dataclass
class ModelMetadata:
    """Everything an exported file says about itself.

    Attributes:
        classnames: Label of each output column, in order.
        image_size: ``(height, width)`` the graph expects.
        resize_mode: open_clip's resize mode: ``shortest`` (resize the short side, then
            centre-crop), ``longest`` (resize the long side, then pad) or ``squash``.
        interpolation: PIL filter used for resizing.
        mean: Per-channel mean, applied inside the graph (recorded for reference).
        std: Per-channel standard deviation, applied inside the graph.
        fill_color: Padding value for ``resize_mode="longest"``.
        model: open_clip model name (or config file name) of the backbone.
        pretrained: open_clip pretrained tag or checkpoint file name; ``None`` for random init.
        method: The method that fitted the classifier (informational, any non-empty string:
            :mod:`coopkit.methods` names them; ``unknown`` when not given).
        prompt: Prompt settings (``n_ctx``, ``csc``, ``class_token_position``, ``ctx_init``
            for CoOp; ``templates`` for zero-shot).
        precision: ``fp32``, ``fp16`` or ``int8``.
        embed_dim: Width of ``image_embeds``.
        weights_sha256: sha256 of the class weight matrix ``(n_classes, embed_dim)``, float32,
            C order; the graph stores it as a float32 initializer of that shape or its
            transpose, and the runtime checks it on load.
        tensors_sha256: sha256 of every stored tensor of the graph
            (:func:`coopkit.runtime.integrity.tensors_sha256`); the runtime checks it on load
            unless told not to.
        coopkit_version: Version of coopkit that wrote the file.
        text_encoder: The companion text graph (:class:`TextEncoderSpec`), or ``None``.
        schema_version: Version of the schema the file needs its reader to know: derived from
            ``task`` when not given (:data:`TASK_SCHEMA_VERSIONS`: 1 for single-label files, 2 for
            multi-label ones, which older readers refuse).
        logit_bias: The model's logit bias (SigLIP-family models), baked into the graph's
            ``logits`` and added to logits computed from text-graph class weights; ``None``
            for models without one (files written before it existed).
        input_kind: :data:`INPUT_CROPPED` (``images`` are crops at ``image_size``; files
            without this field) or :data:`INPUT_RAW` (decoded uint8 RGB images of any size; the
            graph applies ``resize_mode``, ``interpolation`` and ``fill_color`` itself). A raw
            file fed crops at ``image_size`` returns the same answers: its resize and crop
            leave such an image unchanged.
        resize_plan: The resolved resize plan (:class:`ResizeSpec`) of ``resize_mode``,
            ``interpolation``, ``image_size`` and ``fill_color``, for clients that apply it rather
            than derive it; ``None`` in files written before it existed (coopkit 0.2.0 and
            older), whose plan is derived from those fields as before.
        task: :data:`TASK_CLASSIFY` (files without this field: ``probs`` is a softmax) or
            :data:`TASK_MULTILABEL` (``probs`` holds each label's own probability,
            ``sigmoid(logits)``; the labels that apply are those at or above their threshold).
        thresholds: Multi-label files: each label's decision threshold on its probability, in
            class order (chosen on validation data when the run was fitted; 0.5 otherwise): finite
            numbers, below 0 for a label that always applies (every validation image had it);
            ``None`` for single-label files.
        metadata_sha256: sha256 of every other field as stored (:func:`metadata_checksum`),
            written by :meth:`to_json` and checked by :meth:`from_json`: class names, templates,
            input size, mean and std, the resize and crop rule, logit bias, method, prompt
            (class-token position), precision, the text graph's description, and any field a
            newer schema adds. ``""`` in files written before it existed (coopkit 0.2.0 and
            older): those open with a warning naming what cannot be verified, or are refused
            with ``strict=True``.
    """

    classnames: list[str]
    image_size: tuple[int, int]
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    fill_color: int = 0
    model: str = ""
    pretrained: Optional[str] = None
    method: str = "unknown"
    prompt: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    embed_dim: int = 0
    weights_sha256: str = ""
    tensors_sha256: str = ""
    coopkit_version: str = ""
    text_encoder: Optional[TextEncoderSpec] = None
    schema_version: Optional[int] = None  # None: the version of the task (TASK_SCHEMA_VERSIONS)
    logit_bias: Optional[float] = None
    input_kind: str = INPUT_CROPPED
    resize_plan: Optional[ResizeSpec] = None
    task: str = TASK_CLASSIFY
    thresholds: Optional[list[float]] = None
    metadata_sha256: str = field(default="", compare=False)  # derived from the others: not part of equality

    def __post_init__(self) -> None:
        if self.logit_bias is not None:
            self.logit_bias = float(self.logit_bias)
        try:
            self.classnames = check_classnames(self.classnames, "metadata classnames")
        except ValueError as e:
            raise MetadataError(str(e)) from None
        size = self.image_size
        if isinstance(size, int):
            size = (size, size)
        self.image_size = (int(size[0]), int(size[1]))
        if min(self.image_size) < 1:
            raise MetadataError(f"image_size must be positive, got {self.image_size}")
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]
        if len(self.mean) != 3 or len(self.std) != 3:
            raise MetadataError("mean and std must have 3 values (RGB)")
        for name, value, valid in (("resize_mode", self.resize_mode, RESIZE_MODES),
                                   ("interpolation", self.interpolation, INTERPOLATIONS),
                                   ("precision", self.precision, FILE_PRECISIONS),
                                   ("input_kind", self.input_kind, INPUT_KINDS)):
            if value not in valid:
                raise MetadataError(f"{name} {value!r} is not one of {valid}")
        if not isinstance(self.method, str) or not self.method.strip():
            raise MetadataError(f"method must be a non-empty string, got {self.method!r}")
        self._check_task()
        if self.text_encoder is not None:
            self.text_encoder = TextEncoderSpec.from_dict(self.text_encoder)
        if self.resize_plan is not None:
            self.resize_plan = ResizeSpec.from_dict(self.resize_plan)
            if self.resize_plan.size != self.image_size:
                raise MetadataError(f"resize_plan.size {self.resize_plan.size} differs from image_size {self.image_size}")

    def _check_task(self) -> None:
        """``task``, ``thresholds`` and ``schema_version`` agree with each other and the class names."""
        if self.task not in TASKS:
            raise MetadataError(f"task {self.task!r} is not one of {TASKS}")
        needed = TASK_SCHEMA_VERSIONS[self.task]
        if self.schema_version is None:
            self.schema_version = needed
        elif isinstance(self.schema_version, bool) or not isinstance(self.schema_version, int) \
                or (self.schema_version < needed and self.task != TASK_CLASSIFY):  # classify: 0 before the field
            raise MetadataError(f"a {self.task} file needs schema_version {needed} or newer, got {self.schema_version!r}")
        if self.task == TASK_CLASSIFY:
            if self.thresholds is not None:
                raise MetadataError(f"thresholds are for {TASK_MULTILABEL} files; this one's task is {self.task!r}")
            return
        t = self.thresholds
        n = len(self.classnames)
        if isinstance(t, (str, bytes)) or not isinstance(t, Sequence) or len(t) != n:
            raise MetadataError(f"a {TASK_MULTILABEL} file needs thresholds: one per class ({n}), got {t!r:.80}")
        bad = [v for v in t if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)]
        if bad:
            raise MetadataError(f"thresholds must be finite numbers, got {bad[:3]!r}")
        self.thresholds = [float(v) for v in t]

    @property
    def multilabel(self) -> bool:
        """Whether the file answers every label that applies (:data:`TASK_MULTILABEL`)."""
        return self.task == TASK_MULTILABEL

    def to_json(self) -> str:
        """Serialise to the JSON string stored in the ONNX file, sealed by ``metadata_sha256``."""
        entries = asdict(self)
        entries["metadata_sha256"] = metadata_checksum(entries)
        return json.dumps(entries, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelMetadata":
        """Parse the stored JSON; refuse newer schemas; ignore unknown keys of this schema."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise MetadataError(f"coopkit metadata is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise MetadataError("coopkit metadata is not a JSON object")
        version = raw.get("schema_version", 0)
        if not isinstance(version, int) or version > NEWEST_SCHEMA_VERSION:
            raise MetadataError(
                f"file has metadata schema version {version}, this coopkit reads up to "
                f"{NEWEST_SCHEMA_VERSION}; upgrade coopkit"
            )
        recorded = raw.get("metadata_sha256")
        if recorded and recorded != metadata_checksum(raw):  # absent or empty: unsealed, see check_sealed
            raise MetadataError("the coopkit metadata changed after export (metadata_sha256 does not match: class "
                                "names, templates, preprocessing or another field was edited); export the file again")
        try:
            return cls(**_known(cls, raw))
        except TypeError as e:
            raise MetadataError(f"coopkit metadata is incomplete: {e}") from None

    @classmethod
    def from_props(cls, props: dict[str, str]) -> "ModelMetadata":
        """Read from an ONNX ``metadata_props`` mapping (e.g. ``session.get_modelmeta().custom_metadata_map``)."""
        if METADATA_KEY not in props:
            raise MetadataError(
                f"not a coopkit model: no {METADATA_KEY!r} entry in the ONNX metadata "
                "(export one with `coopkit export`)"
            )
        return cls.from_json(props[METADATA_KEY])


# --- the sidecar ---------------------------------------------------------------------------------

#: ``format`` of a sidecar, and the version of single-label sidecars (every coopkit.js reads it).
SIDECAR_FORMAT = "coopkit-sidecar"
SIDECAR_VERSION = 1
#: The sidecar version of multi-label files: web clients older than the task (which read up to
#: :data:`SIDECAR_VERSION`) refuse it instead of ranking its sigmoids as a softmax.
MULTILABEL_SIDECAR_VERSION = 2
#: The newest sidecar version this coopkit reads.
NEWEST_SIDECAR_VERSION = MULTILABEL_SIDECAR_VERSION
#: What each file listed in a sidecar is: the image graph (always first), its external data, the
#: companion text graph, its external data and its tokenizer.
SIDECAR_ROLES = ("model", "external_data", "text_model", "text_external_data", "tokenizer")


def sidecar_name(model_file: str) -> str:
    """``model.onnx`` -> ``model.json``: the sidecar's file name beside an exported image graph."""
    stem = model_file[: -len(".onnx")] if model_file.endswith(".onnx") else model_file
    return f"{stem}.json"


def build_sidecar(meta: ModelMetadata, files: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The sidecar of an export: everything a client needs that cannot read ONNX metadata.

    Args:
        meta: The metadata stored in the image graph; it is copied whole under ``metadata``
            (class names, ``image_size``, resize and crop rule, precision, ``weights_sha256``...).
        files: One ``{"name", "role", "bytes", "sha256"}`` per file of the export, the image
            graph (role ``model``) first; roles from :data:`SIDECAR_ROLES`.

    Returns:
        A JSON-ready dict: ``format``, ``sidecar_version`` (2 for a multi-label file, else 1),
        ``files``, the graph's ``input``
        (name, dtype, shape, kind: crops at ``image_size`` or raw images of any size) and
        ``outputs``, and ``metadata``.
    """
    listed = [dict(f) for f in files]
    if not listed or listed[0].get("role") != "model":
        raise ValueError("a sidecar lists the image graph (role 'model') first")
    for f in listed:
        if set(f) != {"name", "role", "bytes", "sha256"} or f["role"] not in SIDECAR_ROLES:
            raise ValueError(f"sidecar file entries need name, role (one of {SIDECAR_ROLES}), bytes and sha256; got {f}")
    h, w = meta.image_size
    shape = ["batch", h, w, 3] if meta.input_kind == INPUT_CROPPED else ["batch", "height", "width", 3]
    return {
        "format": SIDECAR_FORMAT,
        "sidecar_version": MULTILABEL_SIDECAR_VERSION if meta.multilabel else SIDECAR_VERSION,
        "files": listed,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": shape, "channels": "RGB", "kind": meta.input_kind},
        "outputs": list(OUTPUT_NAMES),
        "metadata": json.loads(meta.to_json()),  # as stored in the graph: sealed by its metadata_sha256
    }


def is_sidecar(raw: Any) -> bool:
    """Whether parsed JSON claims to be a coopkit sidecar (any version)."""
    return isinstance(raw, dict) and raw.get("format") == SIDECAR_FORMAT


def sidecar_mismatches(raw: Any, meta: ModelMetadata, model_bytes: Optional[int] = None) -> list[str]:
    """Where a parsed sidecar disagrees with an image graph's metadata (and size): empty when it
    describes that file. Cheap: the file's sha256 is not recomputed."""
    if not is_sidecar(raw):
        return [f"not a coopkit sidecar (no format {SIDECAR_FORMAT!r})"]
    version = raw.get("sidecar_version")
    if not isinstance(version, int) or version > NEWEST_SIDECAR_VERSION:
        return [f"sidecar version {version!r}, this coopkit reads up to {NEWEST_SIDECAR_VERSION}"]
    try:
        theirs = ModelMetadata.from_json(json.dumps(raw.get("metadata")))
    except MetadataError as e:
        return [f"sidecar metadata unreadable: {e}"]
    mine = asdict(meta)
    problems = [f"{k} differs" for k, v in asdict(theirs).items() if v != mine.get(k) and k != "metadata_sha256"]
    files = raw.get("files")
    if model_bytes is not None:
        listed = files[0].get("bytes") if isinstance(files, list) and files and isinstance(files[0], dict) else None
        if listed != model_bytes:
            problems.append(f"the model file has {model_bytes} bytes, the sidecar says {listed}")
    return problems
