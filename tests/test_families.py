"""Every open_clip family: shrunken random-init configs with tiny local tokenizers, taken through
load -> exact prompt features -> 1-epoch fit -> fp32 export -> runtime logits; the torch-free
Hugging Face tokenizer against open_clip's; offline errors; SigLIP scoring."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

import coopkit  # noqa: E402
from coopkit.prompts import PromptLearner  # noqa: E402
from coopkit.research.families import (  # noqa: E402
    CHECK_NAMES,
    TOKENIZER_STYLES,
    build_family,
    family_of,
    pipeline,
    tiny_tokenizer,
)
from coopkit.runtime.contract import MetadataError, ModelMetadata, TextEncoderSpec  # noqa: E402
from coopkit.runtime.tokenizers.hf import HFTokenizer  # noqa: E402

#: One model per family (the matrix of the issue), and the path CoOp takes on it.
MATRIX = {
    "ViT-B-16-SigLIP2": "plain",  # SigLIP 2: Gemma tokenizer, pool last, bidirectional, logit bias
    "ViT-B-16-SigLIP": "plain",  # SigLIP: canonicalised text, pad == eos
    "ViT-L-14-CLIPA": "plain",  # CLIPA: BERT WordPiece, [SEP] stripped, pool last
    "ViT-H-14-worldwide": "fast",  # MetaCLIP 2 worldwide: XLM-V tokenizer, eos pooling by id, causal
    "roberta-ViT-B-32": "plain",  # Hugging Face text tower, mean pooling, inputs_embeds
    "coca_ViT-B-32": "plain",  # CoCa: embed_cls with its padding mask
    "MobileCLIP-S1": "plain",  # MobileCLIP: bidirectional text, argmax pooling
}


@pytest.fixture(scope="module", params=list(MATRIX))
def family(request, tmp_path_factory):
    """``(model name, backbone, folder)``: the shrunken config loaded offline with its tiny tokenizer."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    folder = tmp_path_factory.mktemp(request.param)
    config, tok_dir = build_family(request.param, folder)
    bb = coopkit.load_backbone(str(config), pretrained=None, device="cpu",
                               tokenizer=str(tok_dir) if tok_dir else None)
    return request.param, bb, folder


def own_full_pass(model: torch.nn.Module, learner: PromptLearner) -> torch.Tensor:
    """Independent reference: the model's own ``encode_text`` on the full-length token rows, with
    its token-embedding module's output replaced by the learner's prompt embeddings (padding after
    them as the tokens embed it). Nothing of coopkit's tower adapters runs here."""
    text = getattr(model, "text", model)
    hf = getattr(text, "transformer", None)
    module = hf.get_input_embeddings() if hasattr(text, "pooler") else text.token_embedding
    tokens = learner.tokens
    with torch.no_grad():
        padding = module(tokens)[:, learner.length :]  # (n, L - length, width)
    prompts = torch.cat([learner.prompts(), padding.to(learner.token_prefix.dtype)], dim=1)  # (n, L, width)
    handle = module.register_forward_hook(lambda m, args, out: prompts.to(out.dtype))
    try:
        return F.normalize(model.encode_text(tokens).float(), dim=-1)
    finally:
        handle.remove()


def test_word_init_equals_the_models_own_encode_text(family):
    """Context = the init words' embeddings => the model's encode_text of the very sentence,
    with the class name at the end and (where a word's tokens do not depend on what precedes it:
    not for byte-level BPE, whose sentence-initial "a" is another token than " a") at the front."""
    _, bb, _ = family
    names = [n.replace("_", " ") for n in CHECK_NAMES]
    cases = [("end", "a photo of a {}.")]
    if bb.tokenizer.encode("x a photo") == bb.tokenizer.encode("x") + bb.tokenizer.encode("a photo"):
        cases.append(("front", "{} a photo of a."))
    for position, sentence in cases:
        pl = PromptLearner(bb, CHECK_NAMES, ctx_init="a photo of a", class_token_position=position)
        own = bb.model.encode_text(bb.tokenizer([sentence.format(n) for n in names]))
        torch.testing.assert_close(pl.text_features().detach(), F.normalize(own.float(), dim=-1), atol=2e-6, rtol=0)


@pytest.mark.parametrize("csc,position", [(False, "end"), (False, "middle"), (True, "front")])
def test_random_context_equals_an_independent_full_length_pass(family, csc, position):
    name, bb, _ = family
    torch.manual_seed(0)
    pl = PromptLearner(bb, CHECK_NAMES, n_ctx=4, csc=csc, class_token_position=position, text_chunk_size=2)
    with torch.no_grad():
        pl.ctx.add_(torch.randn_like(pl.ctx) * 0.3)
    assert pl.packed == (MATRIX[name] == "fast")
    fast = pl.text_features()
    ref = own_full_pass(bb.model, pl)
    torch.testing.assert_close(fast, ref, atol=2e-6, rtol=0)
    w = torch.randn_like(ref)
    (g_fast,) = torch.autograd.grad((fast * w).sum(), pl.ctx)
    (g_ref,) = torch.autograd.grad((own_full_pass(bb.model, pl) * w).sum(), pl.ctx)
    torch.testing.assert_close(g_fast, g_ref, atol=1e-5, rtol=1e-4)


def test_fit_export_and_runtime_agree(family):
    name, bb, folder = family
    out = pipeline(bb, folder)
    assert out["export_logit_diff"] < 1e-4 and out["text_graph_diff"] < 1e-4
    assert out["runtime_logit_diff"] < 1e-4, out  # the file's classes
    assert out["runtime_new_classes_diff"] < 1e-4, out  # unseen names through the exported text graph
    runtime, clf = out["runtime"], out["classifier"]
    assert runtime.metadata.logit_bias == bb.logit_bias
    if bb.logit_bias is not None:  # SigLIP: logits carry the bias; probs are the softmax; scores the sigmoid
        runtime.reset_classes()
        logits = clf.logits(out["images"])
        cos = clf.embed(out["images"]) @ clf.class_weights().numpy().T
        np.testing.assert_allclose(logits, cos + bb.logit_bias, atol=1e-5)
        np.testing.assert_allclose(runtime.scores(out["images"]), 1 / (1 + np.exp(-logits)), atol=1e-6)
        np.testing.assert_allclose(clf.scores(out["images"]), 1 / (1 + np.exp(-logits)), atol=1e-6)
        np.testing.assert_allclose(runtime.probs(out["images"]), torch.from_numpy(cos).softmax(-1).numpy(), atol=1e-6)
    else:
        with pytest.raises(ValueError, match="softmax"):
            runtime.scores(out["images"])


def _method_cells(bb) -> dict[str, bool]:
    """Whether each method (in the settings a cell of docs/families.md names) accepts ``bb``: its
    ``check_backbone``, with depths of 1 so that only the family decides."""
    from coopkit import methods

    settings = {"cocoop": ("cocoop", {}), "ivlp": ("ivlp", dict(prompt_depth_text=1, prompt_depth_vision=1)),
                "ivlp-text": ("ivlp", dict(prompt_depth_text=1, prompt_depth_vision=0, n_ctx_vision=0)),
                "maple": ("maple", dict(prompt_depth=1)),
                "promptsrc": ("promptsrc", dict(prompt_depth_text=1, prompt_depth_vision=1)),
                "lora": ("clip-lora", {}), "lora-vision": ("clip-lora", dict(encoder="vision")),
                "lora-text": ("clip-lora", dict(encoder="text")), "dualcoop": ("dualcoop", {})}
    cells = {}
    for cell, (name, kw) in settings.items():
        spec = methods.get(name)
        try:
            spec.check_backbone(bb, spec.config(**kw))
            cells[cell] = True
        except ValueError as e:
            assert "\n" not in str(e)  # one line
            cells[cell] = False
    return cells


#: docs/families.md's method table, text-side cells (the shrunken configs give timm families a ViT image tower).
TEXT_CELLS = {"ViT-B-16-SigLIP2": True, "ViT-B-16-SigLIP": True, "ViT-L-14-CLIPA": True, "ViT-H-14-worldwide": True,
              "MobileCLIP-S1": True, "roberta-ViT-B-32": False, "coca_ViT-B-32": False}


def test_method_family_table_text_side(family):
    """The cells of docs/families.md's method table that the text tower decides: deep prompts need
    open_clip's text transformer without CoCa's CLS; CLIP-LoRA's text adapters need its blocks."""
    name, bb, _ = family
    cells = _method_cells(bb)
    assert cells["cocoop"]
    assert cells["ivlp-text"] == TEXT_CELLS[name]
    assert cells["lora-text"] == (name != "roberta-ViT-B-32")  # CoCa's text blocks are plain: adapted
    assert not cells["dualcoop"]
    if name == "coca_ViT-B-32":  # open_clip ViT with attentional pooling: LoRA yes, deep prompts no
        assert cells["lora"] and not cells["ivlp"] and not cells["maple"]
    if name == "roberta-ViT-B-32":  # Hugging Face text: only CLIP-LoRA's image adapters
        assert cells["lora-vision"] and not cells["lora"] and not any(cells[c] for c in ("ivlp", "maple", "promptsrc"))


def test_deep_prompt_text_graph_on_every_family_ivlp_runs_on(family, tmp_path):
    """IVLP's text graph (context and deep text prompts baked in) on each text family it runs on, with the
    family's own tokenizer (no start token for SigLIP, eos pooling by id, bidirectional towers): class
    weights of unseen names equal to PyTorch's."""
    from coopkit.config import RunConfig
    from coopkit.exporters import export_onnx
    from coopkit.methods.deep_prompts import build_seeded
    from coopkit.methods.ivlp import IVLPConfig, IVLPModel
    from coopkit.runtime import Classifier as RuntimeClassifier

    name, _, _ = family
    if not TEXT_CELLS[name]:
        pytest.skip(f"IVLP refuses {name}'s text tower")
    path, tok_dir = build_family(name, tmp_path)
    raw = json.loads(path.read_text())
    raw["text_cfg"]["layers"] = 2  # the shrunken tower has 1: deep prompts need a second layer
    path.write_text(json.dumps(raw))
    bb = coopkit.load_backbone(str(path), pretrained=None, device="cpu", tokenizer=str(tok_dir) if tok_dir else None)
    config = IVLPConfig(ctx_init=None, prompt_depth_text=2, prompt_depth_vision=0, n_ctx_vision=0)
    model = build_seeded(IVLPModel, bb, ["cat", "dog", "red fox"], config, 3)  # random prompts: all non-zero
    clf = coopkit.Classifier(bb, RunConfig(method="ivlp", classnames=model.classnames, method_config=config.to_dict(),
                                           **bb.run_fields()), model)
    report = export_onnx(clf, tmp_path / "model.onnx", "fp32", with_text_encoder=True, n_verify=2)
    new = ["sea turtle", "golden retriever"]
    want = model.with_classes(new).class_weights().numpy()
    got = RuntimeClassifier(report.path, device="cpu").text_encoder.class_weights(new)
    assert float(np.abs(got - want).max() / np.abs(want).max()) <= 1e-5


@pytest.mark.parametrize("vision", ["timm", "resnet"])
def test_method_family_table_image_side(vision, tmp_path):
    """The cells the image tower decides, on a timm tower (timm's ``test_vit``) and a ModifiedResNet:
    image prompts and image adapters are refused, the text-side settings work; DualCoOp needs the ResNet."""
    config, tok = build_family("ViT-B-16-SigLIP" if vision == "timm" else "RN50", tmp_path)
    if vision == "timm":
        cfg = json.loads(config.read_text())
        cfg["vision_cfg"] = {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "",
                             "timm_proj": "linear", "image_size": 32}
        config.write_text(json.dumps(cfg))
    bb = coopkit.load_backbone(str(config), pretrained=None, device="cpu", tokenizer=str(tok) if tok else None)
    assert type(bb.model.visual).__name__ == ("TimmModel" if vision == "timm" else "ModifiedResNet")
    cells = _method_cells(bb)
    assert cells["cocoop"] and cells["ivlp-text"] and cells["lora-text"]
    assert not any(cells[c] for c in ("ivlp", "maple", "promptsrc", "lora", "lora-vision"))
    assert cells["dualcoop"] == (vision == "resnet")


@pytest.mark.parametrize("style", sorted(TOKENIZER_STYLES))
def test_torch_free_tokenizer_equals_open_clips(style, tmp_path):
    """coopkit's HFTokenizer (tokenizers only) against open_clip's HFTokenizer (transformers)."""
    from open_clip.tokenizer import HFTokenizer as OpenClipHF

    folder = tiny_tokenizer(style, tmp_path / style)
    texts = ["X X X golden retriever.", "a photo of a Red_Panda!", "cat " * 40, "  tabby\tkitten  ", "café & <b>",
             "sports car (red)."]
    for clean in ("whitespace", "lower", "canonicalize"):
        strip = style == "bert"
        ours = HFTokenizer.from_pretrained(folder, 16, clean=clean, strip_sep_token=strip)
        theirs = OpenClipHF(str(folder), context_length=16, clean=clean, strip_sep_token=strip)
        np.testing.assert_array_equal(ours(texts), theirs(texts).numpy())
        saved = tmp_path / f"{style}-{clean}.json"
        ours.save(saved)  # what the exporter writes beside a text graph
        again = HFTokenizer.from_file(saved, clean=clean, strip_sep_id=ours.strip_sep_id)
        np.testing.assert_array_equal(again(texts), ours(texts))


def test_family_of_sorts_the_issue_families():
    assert family_of("ViT-B-16-SigLIP2").tokenizer == "gemma"
    assert family_of("ViT-bigG-14-CLIPA").name == "CLIPA"
    assert family_of("ViT-bigG-14-worldwide").tokenizer == "xlm"
    assert family_of("ViT-L-14-worldwide").tokenizer == "mt5"
    assert family_of("nllb-clip-large").text_model == "m2m_100"
    assert family_of("coca_ViT-L-14").name.startswith("CoCa")
    assert family_of("ViT-B-32").tokenizer == "clip_bpe"


def test_offline_errors_name_the_files_and_the_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"ViT-B-16-SigLIP2.*tokenizer.*--tokenizer.*tokenizer\.json"):
        coopkit.load_backbone("ViT-B-16-SigLIP2", pretrained=None, device="cpu")
    tok = tiny_tokenizer("roberta", tmp_path / "tok")  # a tokenizer, but no config.json for the text tower
    with pytest.raises(RuntimeError, match=r"roberta-ViT-B-32.*config.*--text-model"):
        coopkit.load_backbone("roberta-ViT-B-32", pretrained=None, device="cpu", tokenizer=str(tok))
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        coopkit.load_backbone("ViT-B-16-SigLIP2", pretrained=None, device="cpu", tokenizer=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="did you mean.*ViT-B-16-SigLIP2"):
        coopkit.load_backbone("ViT-B-16-SigLIP-2", pretrained=None)


def test_missing_tokenizers_library_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match=r"pip install 'coopkit\[tokenizers\]'"):
        HFTokenizer.from_file(tmp_path / "tokenizer.json")


def test_random_init_never_fetches_hf_weights(family):
    """pretrained=None is random init for every tower (HF towers too), seeded and reproducible."""
    name, bb, folder = family
    if not family_of(name).text_model:
        pytest.skip("open_clip's own text tower")
    config, tok_dir = build_family(name, folder / "again")
    again = coopkit.load_backbone(str(config), pretrained=None, device="cpu", tokenizer=str(tok_dir))
    assert again.weights_sha256 == bb.weights_sha256


def test_old_metadata_still_loads_and_unknown_tokenizers_are_refused():
    spec = TextEncoderSpec.from_dict({"file": "m.text.onnx", "context_length": 77})  # written before issue 10
    assert (spec.tokenizer, spec.n_prefix, spec.clean) == ("clip_bpe", 1, "lower")
    meta = json.loads(ModelMetadata(classnames=["a", "b"], image_size=(32, 32)).to_json())
    meta.pop("logit_bias"), meta.pop("metadata_sha256")  # files written before either existed
    assert ModelMetadata.from_json(json.dumps(meta)).logit_bias is None
    from coopkit.runtime.text import TextEncoder

    class Session:
        def get_inputs(self):
            return [type("I", (), {"name": "token_ids"})()]

        def get_outputs(self):
            return [type("O", (), {"name": "class_weights"})()]

    with pytest.raises(MetadataError, match="cannot be run by this runtime"):
        TextEncoder(Session(), TextEncoderSpec(file="m.text.onnx", tokenizer="sentencepiece_v9"))
    with pytest.raises(MetadataError, match="file name beside the model"):
        TextEncoderSpec(file="m.text.onnx", tokenizer="hf_tokenizers", tokenizer_file="../etc/x.json")
