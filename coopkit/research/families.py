"""Every open_clip model family, taken end to end on a shrunken random-init config, offline.

:func:`family_of` sorts an open_clip model name into its family (what its text tower and
tokenizer are, which decides how CoOp runs on it); :func:`shrunk_config` cuts a registered
config down (1 block, width 32, 32-pixel images, every text-tower switch kept);
:func:`tiny_tokenizer` trains a small tokenizer of the family's kind in memory (the
``tokenizers`` library) and :func:`tiny_text_model` writes a small Hugging Face config, so no
hub is needed. :func:`check_family` then runs load -> exact prompt features -> a 1-epoch
``fit`` -> fp32 export (with the open-vocabulary text graph) -> runtime logits, and
:func:`coverage` does it for every family of ``open_clip.list_models()``
(``benchmarks/family_coverage.py`` writes the README's table).

Vision towers built by timm are replaced by a 1-block open_clip ViT in the shrunken configs
(timm offers no depth switch through open_clip's config); CoOp never touches the image tower,
and the image graph export of those towers is what the export tests and benchmarks cover.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

logger = logging.getLogger(__name__)

#: Words every tiny tokenizer knows as whole tokens (placeholder, init words, class names).
WORDS = ("x a photo of the cat dog golden retriever red panda sports car tabby kitten water lily green "
         "blue yellow orange purple pink brown circle square triangle star heart cross diamond hexagon "
         "sketch drawing picture painting one two three small large bird fish tree house").split()
#: Class names of the exactness checks (several words, an underscore, one-token names).
CHECK_NAMES = ["cat", "golden retriever", "red_panda", "sports car", "x"]
#: Class names the exported text graph is asked about (never trained on).
NEW_NAMES = ["tabby kitten", "water lily", "dog"]
TINY_WIDTH = 32

#: Tiny tokenizer kinds: the model, its special tokens (in id order), the template that adds
#: them, the pad / eos / bos / sep tokens, and the lower-casing of the real tokenizer.
TOKENIZER_STYLES: dict[str, dict[str, Any]] = {
    # SigLIP (c4-en / mc4 sentencepiece, as open_clip's SigLipTokenizer saves it: pad is </s>)
    "siglip": {"model": "sentencepiece", "special": ["<pad>", "</s>", "<unk>"], "template": "$A </s>",
               "pad": "</s>", "eos": "</s>"},
    # SigLIP 2 (Gemma sentencepiece: <pad> 0, <eos> 1, <bos> 2 not added, eos appended)
    "gemma": {"model": "sentencepiece", "special": ["<pad>", "<eos>", "<bos>", "<unk>"], "template": "$A <eos>",
              "pad": "<pad>", "eos": "<eos>", "bos": "<bos>"},
    # CLIPA (bert-base-uncased WordPiece; open_clip strips [SEP])
    "bert": {"model": "wordpiece", "special": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
             "template": "[CLS] $A [SEP]", "pad": "[PAD]", "sep": "[SEP]", "lower": True},
    # MetaCLIP 2 worldwide (XLM-V sentencepiece: <s> 0, <pad> 1, </s> 2; eos_id 2)
    "xlm": {"model": "sentencepiece", "special": ["<s>", "<pad>", "</s>", "<unk>"], "template": "<s> $A </s>",
            "pad": "<pad>", "eos": "</s>", "bos": "<s>"},
    # mT5 (MetaCLIP 2 worldwide ViT-L, mt5 text towers: <pad> 0, </s> 1, no bos)
    "mt5": {"model": "sentencepiece", "special": ["<pad>", "</s>", "<unk>"], "template": "$A </s>",
            "pad": "<pad>", "eos": "</s>"},
    # RoBERTa / XLM-R (byte-level BPE or sentencepiece with <s> 0, <pad> 1, </s> 2)
    "roberta": {"model": "bpe", "special": ["<s>", "<pad>", "</s>", "<unk>"], "template": "<s> $A </s>",
                "pad": "<pad>", "eos": "</s>", "bos": "<s>"},
    # NLLB (a language code before the text, </s> after it)
    "nllb": {"model": "sentencepiece", "special": ["<s>", "<pad>", "</s>", "<unk>", "eng_Latn"],
             "template": "eng_Latn $A </s>", "pad": "<pad>", "eos": "</s>", "bos": "<s>"},
}


@dataclass(frozen=True)
class Family:
    """A family of open_clip models, as far as CoOp is concerned.

    Attributes:
        name: The family's label (the README's table).
        tokenizer: ``clip_bpe`` or a :data:`TOKENIZER_STYLES` key.
        text_model: The Hugging Face architecture of the text tower (``roberta``, ``xlm-roberta``,
            ``mt5``, ``m2m_100``), or ``None`` for open_clip's own text transformer.
    """

    name: str
    tokenizer: str = "clip_bpe"
    text_model: Optional[str] = None


def _config(name: str) -> dict[str, Any]:
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown model {name!r}; see open_clip.list_models()")
    return copy.deepcopy(cfg)


def family_of(name: str) -> Family:
    """The family of open_clip model ``name`` (its text tower and tokenizer decide it)."""
    cfg = _config(name)
    text, vision = cfg.get("text_cfg", {}), cfg.get("vision_cfg", {})
    hf_model = text.get("hf_model_name") or ""
    hf_tok = text.get("hf_tokenizer_name") or ""
    if hf_model:
        arch = ("mt5" if "mt5" in hf_model else "m2m_100" if "nllb" in hf_model
                else "xlm-roberta" if "xlm-roberta" in hf_model else "roberta")
        style = {"mt5": "mt5", "m2m_100": "nllb"}.get(arch, "roberta")
        label = {"roberta": "RoBERTa", "xlm-roberta": "XLM-RoBERTa", "mt5": "mT5", "m2m_100": "NLLB"}[arch]
        prefix = "CoCa, " if "multimodal_cfg" in cfg else ""
        return Family(f"{prefix}Hugging Face text tower ({label})", style, arch)
    if "multimodal_cfg" in cfg:
        return Family("CoCa (embed_cls)")
    if "SigLIP2" in name:
        return Family("SigLIP 2", "gemma")
    if "SigLIP" in name:
        return Family("SigLIP", "siglip")
    if "CLIPA" in name:
        return Family("CLIPA", "bert")
    if "worldwide" in name:
        return Family("MetaCLIP 2 worldwide (mT5 tokenizer)", "mt5") if "mt5" in hf_tok else \
            Family("MetaCLIP 2 worldwide (XLM-V tokenizer)", "xlm")
    timm_name = vision.get("timm_model_name") or ""
    for prefix, label in (("MobileCLIP", "MobileCLIP"), ("EVA", "EVA"), ("PE-", "PE"), ("ViTamin", "ViTamin")):
        if name.startswith(prefix):
            causal = "" if label != "MobileCLIP" else (", bidirectional text" if text.get("no_causal_mask")
                                                       else ", causal text")
            return Family(label + causal)
    if timm_name:
        return Family("timm image tower (ConvNeXt, Swin, ViT)")
    if isinstance(vision.get("layers"), (list, tuple)):
        return Family("ModifiedResNet (RN50...)")
    return Family("CLIP ViT (OpenAI, LAION, DataComp, MetaCLIP)")


def tiny_tokenizer(style: str, folder: Path) -> Path:
    """Train a small tokenizer of kind ``style`` in memory; write ``tokenizer.json`` and
    ``tokenizer_config.json`` (as a Hugging Face repo has them) to ``folder``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    spec = TOKENIZER_STYLES[style]
    special = list(spec["special"])
    unk = next(t for t in special if "unk" in t.lower())
    corpus = [" ".join(WORDS), " ".join(WORDS[::-1]), "x x x x x x x x", "X X X X X X X X", "a photo of a cat"] * 20
    kind = spec["model"]
    if kind == "sentencepiece":  # sentencepiece-style BPE over "▁word" pieces (as Gemma's)
        tok = Tokenizer(models.BPE(unk_token=unk))
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer: Any = trainers.BpeTrainer(vocab_size=600, special_tokens=special)
    elif kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=unk))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=special)
    else:
        tok = Tokenizer(models.BPE(unk_token=unk))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    used = [t for t in special if t in spec["template"].split()]
    tok.post_processor = processors.TemplateProcessing(
        single=spec["template"], special_tokens=[(t, tok.token_to_id(t)) for t in used])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "padding_side": "right", "unk_token": unk,
              "model_max_length": 512}
    for key in ("pad", "eos", "bos", "sep"):
        if key in spec:
            config[f"{key}_token"] = spec[key]
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return folder


def tiny_text_model(arch: str, folder: Path, vocab_size: int, max_positions: int = 80) -> Path:
    """Write a small Hugging Face text-model ``config.json`` of ``arch`` (1 layer, width 32)."""
    import transformers

    common: dict[str, Any] = {"vocab_size": vocab_size}
    if arch in ("roberta", "xlm-roberta"):
        cls = transformers.RobertaConfig if arch == "roberta" else transformers.XLMRobertaConfig
        cfg = cls(**common, hidden_size=TINY_WIDTH, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=max_positions + 4, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                  type_vocab_size=1)
    elif arch == "mt5":
        cfg = transformers.MT5Config(**common, d_model=TINY_WIDTH, d_kv=16, d_ff=64, num_layers=1,
                                     num_decoder_layers=1, num_heads=2, pad_token_id=0, eos_token_id=1,
                                     decoder_start_token_id=0)
    elif arch == "m2m_100":
        cfg = transformers.M2M100Config(**common, d_model=TINY_WIDTH, encoder_layers=1, decoder_layers=1,
                                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                        decoder_ffn_dim=64, max_position_embeddings=max_positions + 4,
                                        pad_token_id=1, bos_token_id=0, eos_token_id=2, scale_embedding=True)
    else:
        raise ValueError(f"no tiny config for Hugging Face architecture {arch!r}")
    cfg.save_pretrained(folder)
    return folder


def shrunk_config(name: str, tokenizer: Optional[Path] = None, vocab_size: Optional[int] = None) -> dict[str, Any]:
    """open_clip's config of ``name`` cut to 1 block of width 32 at 32 pixels; every switch of
    the text tower (pooling, causal mask, CLS embedding, projection, norms, activation, logit
    bias) is kept. ``tokenizer``: the local tokenizer (and Hugging Face config) folder the
    config then names; ``vocab_size``: its vocabulary."""
    cfg = _config(name)
    cfg["embed_dim"] = TINY_WIDTH
    vision = cfg["vision_cfg"]
    if vision.get("timm_model_name"):  # see the module docstring
        vision = {"image_size": 32, "layers": 1, "width": TINY_WIDTH, "patch_size": 8, "head_width": 16}
    elif isinstance(vision.get("layers"), (list, tuple)):  # ModifiedResNet
        vision.update(image_size=32, layers=[1, 1, 1, 1], width=8, head_width=16)
    else:
        vision.update(image_size=32, layers=1, width=TINY_WIDTH, patch_size=8, head_width=16)
        if "attn_pooler_heads" in vision:
            vision["attn_pooler_heads"] = 2
    cfg["vision_cfg"] = vision
    text = cfg["text_cfg"]
    if text.get("hf_model_name"):
        assert tokenizer is not None, "a Hugging Face text tower needs its tiny config folder"
        text.update(hf_model_name=str(tokenizer), hf_tokenizer_name=str(tokenizer))
    else:
        text.update(layers=1, width=TINY_WIDTH, heads=2)
        if tokenizer is not None:
            text.update(hf_tokenizer_name=str(tokenizer), vocab_size=int(vocab_size or text["vocab_size"]))
    if "multimodal_cfg" in cfg:
        cfg["multimodal_cfg"].update(width=TINY_WIDTH, layers=1, heads=2, attn_pooler_heads=2)
        if vocab_size and text.get("hf_model_name"):
            cfg["multimodal_cfg"]["vocab_size"] = int(vocab_size)
    return cfg


def build_family(name: str, folder: Path) -> tuple[Path, Optional[Path]]:
    """Write the shrunken config of ``name`` (and its tiny tokenizer and Hugging Face config) to
    ``folder``; returns ``(config path, tokenizer folder or None)``."""
    from coopkit.runtime.tokenizers.hf import HFTokenizer

    family = family_of(name)
    folder.mkdir(parents=True, exist_ok=True)
    tok_dir, vocab = None, None
    if family.tokenizer != "clip_bpe":
        tok_dir = tiny_tokenizer(family.tokenizer, folder / "tokenizer")
        vocab = HFTokenizer.from_pretrained(tok_dir, 16).vocab_size
        if family.text_model:
            tiny_text_model(family.text_model, tok_dir, vocab)
    path = folder / f"tiny-{name}.json"
    path.write_text(json.dumps(shrunk_config(name, tok_dir, vocab)))
    return path, tok_dir


def exactness(bb: Any) -> tuple[float, float]:
    """``(word init vs encode_text, random context vs full pass)``: the largest feature differences.

    With ``ctx_init="a photo of a"`` the learner's untrained features against the model's own
    ``encode_text`` of the sentence; with random context (unified and class-specific, every
    class position) against :func:`coopkit.prompts.reference_text_features`.
    """
    import torch
    import torch.nn.functional as F

    from coopkit.prompts import PromptLearner, reference_text_features

    names = [n.replace("_", " ") for n in CHECK_NAMES]
    with torch.no_grad():
        learner = PromptLearner(bb, CHECK_NAMES, ctx_init="a photo of a")
        own = F.normalize(bb.model.encode_text(bb.tokenizer([f"a photo of a {n}." for n in names])).float(), dim=-1)
        init_diff = float((learner.text_features() - own).abs().max())
        random_diff = 0.0
        for csc, position in ((False, "end"), (True, "middle"), (False, "front")):
            torch.manual_seed(0)
            pl = PromptLearner(bb, CHECK_NAMES, n_ctx=4, csc=csc, class_token_position=position, text_chunk_size=2)
            pl.ctx.add_(torch.randn_like(pl.ctx) * 0.3)
            random_diff = max(random_diff, float((pl.text_features() - reference_text_features(pl)).abs().max()))
    return init_diff, random_diff


def pipeline(bb: Any, folder: Path, threads: int = 2) -> dict[str, Any]:
    """A 1-epoch ``fit`` on a small generated task, fp32 export with the text graph, and the
    torch-free runtime against PyTorch (the file's classes and classes never trained on)."""
    import numpy as np

    import coopkit
    from coopkit.embedded.world import write_task
    from coopkit.exporters import export_onnx
    from coopkit.runtime import Classifier as RuntimeClassifier

    data = write_task("colors", folder / "data", shots_per_class=2, test_per_class=1, size=32)
    clf = coopkit.fit(data / "train", backbone=bb, epochs=1, shots=2, n_views=1, augment=False, n_ctx=4,
                      progress=False)
    result = export_onnx(clf, folder / "model.onnx", with_text_encoder=True, n_verify=4)
    images = sorted((data / "test").rglob("*.png"))
    runtime = RuntimeClassifier(result.path, device="cpu", threads=threads)
    runtime_diff = float(np.abs(runtime.logits(images) - clf.logits(images)).max())
    runtime.set_classes(NEW_NAMES)
    text_diff = float(np.abs(runtime.logits(images) - clf.with_classes(NEW_NAMES).logits(images)).max())
    learner = clf.learner
    assert learner is not None
    return {
        "path": "fast (cut, shared prefix, packed)" if learner.packed else
                "cut after the end token" if learner.tower.exact_cut else "plain full-length pass",
        "tower": type(learner.tower).__name__,
        "logit_bias": bb.logit_bias,
        "export_logit_diff": float(result.image.max_abs_logit_diff),
        "text_graph_diff": float(result.text.max_abs_diff),
        "runtime_logit_diff": runtime_diff,
        "runtime_new_classes_diff": text_diff,
        "classifier": clf,
        "runtime": runtime,
        "images": images,
    }


def check_family(name: str, folder: Path, *, threads: int = 2) -> dict[str, Any]:
    """Load -> exact features (:func:`exactness`) -> 1-epoch fit -> fp32 export -> runtime logits
    (:func:`pipeline`) for ``name``'s shrunken config; the numbers of each step (a failing step raises)."""
    import torch

    import coopkit

    torch.set_num_threads(threads)
    started = time.perf_counter()
    config, tok_dir = build_family(name, folder)
    bb = coopkit.load_backbone(str(config), pretrained=None, device="cpu",
                               tokenizer=str(tok_dir) if tok_dir else None)
    init_diff, random_diff = exactness(bb)
    steps = {k: v for k, v in pipeline(bb, folder, threads).items() if k not in ("classifier", "runtime", "images")}
    return {"model": name, "family": family_of(name).name, "init_vs_encode_text": init_diff,
            "random_vs_full_pass": random_diff, **steps, "seconds": round(time.perf_counter() - started, 1)}


def representatives(names: Optional[Sequence[str]] = None) -> dict[str, list[str]]:
    """``{family: [model names]}`` over ``names`` (default: ``open_clip.list_models()``), in order."""
    import open_clip

    out: dict[str, list[str]] = {}
    for n in names if names is not None else open_clip.list_models():
        out.setdefault(family_of(n).name, []).append(n)
    return out
