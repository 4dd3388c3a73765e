"""What an exported coopkit ONNX file carries, and how it is read back.

The exporter (``coopkit.exporters``) writes one ``metadata_props`` entry with the key
:data:`METADATA_KEY` whose value is the JSON of :class:`ModelMetadata`. The runtime reads
it back; everything it needs to serve the file (class names, preprocessing, graph names)
is in there. This module imports only the standard library, so both sides can use it.

Graph contract (schema version 1):

* input ``images``: uint8, shape ``(batch, H, W, 3)``, RGB, already resized and
  centre-cropped to ``image_size`` by :mod:`coopkit.runtime.preprocess`;
* outputs ``logits`` ``(batch, n_classes)`` float32, ``probs`` (softmax of logits) and
  ``image_embeds`` ``(batch, embed_dim)``, L2-normalised.

A text graph (exported with ``--with-text-encoder``) is a second file named by
``text_encoder["file"]`` (relative to the image graph): input ``token_ids`` int64
``(n_classes, context_length)`` holding the tokenised class names (see ``text_encoder``
for how prompts are built), output ``class_weights`` ``(n_classes, embed_dim)`` float32,
already multiplied by ``exp(logit_scale)``.

Token layout of the text graph (what ``coopkit.exporters`` writes; ``text_encoder["layout"]``):

* ``coop_placeholders_v1`` (CoOp, unified context): ``prompt_template`` is ``"X X ... X {}."``
  with ``n_ctx`` placeholder words. Each row of ``token_ids`` is exactly
  ``ClipTokenizer()(template.replace("{}", name.replace("_", " ")), context_length)``:
  ``[SOS, X * n_ctx, name tokens, ".", EOT, 0, ...]`` (the same ids coopkit trained with).
  The graph replaces positions ``1 .. n_ctx`` with the learned context and, for
  ``class_token_position`` ``middle`` / ``front``, moves the name tokens in front of the last
  ``n_ctx - n_ctx // 2`` / all context vectors; it finds the EOT as the largest id. The
  runtime needs nothing but the template: the placeholders' own ids are never used.
* ``plain_v1`` (zero-shot): ``templates`` as written by the user; each row is the plain
  tokenisation of one filled-in template, and the graph is open_clip's ``encode_text``
  followed by L2 normalisation and ``exp(logit_scale)``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

SCHEMA_VERSION = 1
METADATA_KEY = "coopkit"
INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probs", "image_embeds")
#: Default input and output names of the companion text graph (``text_encoder`` may name others).
TEXT_INPUT = "token_ids"
TEXT_OUTPUT = "class_weights"
RESIZE_MODES = ("shortest", "longest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
PRECISIONS = ("fp32", "fp16", "int8")


class MetadataError(ValueError):
    """The file is not a coopkit export, or one this runtime cannot read."""


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
        method: ``coop`` or ``zeroshot``.
        prompt: Prompt settings (``n_ctx``, ``csc``, ``class_token_position``, ``ctx_init``
            for CoOp; ``templates`` for zero-shot).
        precision: ``fp32``, ``fp16`` or ``int8``.
        embed_dim: Width of ``image_embeds``.
        weights_sha256: sha256 of the class weight matrix (float32, C order).
        coopkit_version: Version of coopkit that wrote the file.
        text_encoder: ``None``, or a description of the companion text graph: ``file``,
            ``context_length``, ``sot_token_id``, ``eot_token_id``, ``prompt_suffix``
            (text appended to each class name before tokenising, e.g. ``"."``) and
            ``vocab`` (``"clip_bpe_49408"``). Optional, for prompts that are more than
            name + suffix: ``prompt_template`` (one string in which ``{}`` is replaced by the
            class name, e.g. ``"X X X X {}."`` when the graph swaps the learned context in for
            the ``X`` placeholders, as the official CoOp does) or ``templates`` (several such
            strings, zero-shot style: the runtime runs the text graph once per template and
            averages the L2-normalised rows, keeping the scale). Precedence: ``templates``,
            then ``prompt_template``, then ``"{}" + prompt_suffix``. Underscores in class names
            become spaces before formatting, as in training. The runtime tokenises each
            prompt with CLIP's BPE exactly as ``open_clip.tokenize`` does (lower-cased, start
            and end tokens, zero padding, truncated to ``context_length`` with the end token
            last) and feeds the ids as they are. The exporter also records ``input``
            (``"token_ids"``), ``output`` (``"class_weights"``), ``n_ctx``,
            ``class_token_position`` and ``layout`` (see the module docstring); readers may
            ignore them.
        schema_version: Version of this schema.
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
    method: str = "coop"
    prompt: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    embed_dim: int = 0
    weights_sha256: str = ""
    coopkit_version: str = ""
    text_encoder: Optional[dict[str, Any]] = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        self.classnames = [str(c) for c in self.classnames]
        if not self.classnames:
            raise MetadataError("metadata has no class names")
        if len(set(self.classnames)) != len(self.classnames):
            raise MetadataError("metadata has duplicate class names")
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
        if self.resize_mode not in RESIZE_MODES:
            raise MetadataError(f"resize_mode {self.resize_mode!r} is not one of {RESIZE_MODES}")
        if self.interpolation not in INTERPOLATIONS:
            raise MetadataError(f"interpolation {self.interpolation!r} is not one of {INTERPOLATIONS}")
        if self.precision not in PRECISIONS:
            raise MetadataError(f"precision {self.precision!r} is not one of {PRECISIONS}")

    def to_json(self) -> str:
        """Serialise to the JSON string stored in the ONNX file."""
        return json.dumps(asdict(self), sort_keys=True)

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
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise MetadataError(
                f"file has metadata schema version {version}, this coopkit reads up to "
                f"{SCHEMA_VERSION}; upgrade coopkit"
            )
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in raw.items() if k in known})
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
