"""The embedded default: coopkit-tiny (a small pretrained CLIP shipped in ``assets/``) and the
synthetic captioned world it was pretrained on (:mod:`coopkit.embedded.world`).

Importing this package imports nothing heavy; :mod:`~coopkit.embedded.pretrain` (torch,
open_clip) reproduces the shipped weights.
"""

from pathlib import Path

#: Folder of the shipped model: ``coopkit-tiny.json`` (open_clip config), ``.safetensors``, ``.sha256``.
ASSETS = Path(__file__).resolve().parent / "assets"
#: Name of the shipped model, registered with open_clip on first use.
EMBEDDED_MODEL = "coopkit-tiny"
#: The ``pretrained`` tag of its shipped weights.
EMBEDDED_PRETRAINED = "synthetic"

__all__ = ["ASSETS", "EMBEDDED_MODEL", "EMBEDDED_PRETRAINED"]
