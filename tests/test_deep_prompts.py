"""IVLP, MaPLe and PromptSRC through the rest of coopkit: the registry, the command line, export to ONNX,
refused families."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import coopkit
from coopkit import methods

SMALL = {
    "ivlp": dict(n_ctx_vision=2, prompt_depth_text=2, prompt_depth_vision=2, epochs=2),
    "maple": dict(prompt_depth=2, epochs=2),
    "promptsrc": dict(prompt_depth_text=2, prompt_depth_vision=2, epochs=2, gpa_mean=2, gpa_std=1),
}


@pytest.mark.parametrize("name", list(SMALL))
def test_registered(name):
    spec = methods.get(name)
    assert spec.tensors_file == "prompts.safetensors" and spec.importer is not None
    assert set(spec.protocols) == {"fewshot", "base2new", "shift"} and spec.text_graph  # deep text prompts baked in


TIMM_TINY = {"embed_dim": 64, "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                                             "timm_pool": "token", "timm_proj": "linear", "image_size": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


@pytest.mark.parametrize("name", list(SMALL))
def test_other_families_are_refused_in_one_line(name, tmp_path):
    import json

    resnet = coopkit.load_backbone("coopkit-tiny", pretrained=None, device="cpu")
    (tmp_path / "timm-tiny.json").write_text(json.dumps(TIMM_TINY))
    timm = coopkit.load_backbone(str(tmp_path / "timm-tiny.json"), pretrained=None, device="cpu")
    spec = methods.get(name)
    for bb, tower in ((resnet, "ModifiedResNet"), (timm, "TimmModel")):
        with pytest.raises(ValueError) as e:
            spec.check_backbone(bb, spec.make_config(SMALL[name]))
        assert f"image tower ({tower}) is not open_clip's VisionTransformer" in str(e.value)
        assert "\n" not in str(e.value)


def test_language_only_ivlp_runs_on_a_resnet():
    resnet = coopkit.load_backbone("coopkit-tiny", pretrained=None, device="cpu")
    config = methods.get("ivlp").make_config(dict(n_ctx_vision=0, prompt_depth_vision=0, prompt_depth_text=4))
    methods.get("ivlp").check_backbone(resnet, config)  # the image tower stays as it is
    with pytest.raises(ValueError, match="text prompt depth 5 exceeds the text transformer's 4 layers"):
        methods.get("ivlp").check_backbone(resnet, methods.get("ivlp").make_config(
            dict(n_ctx_vision=0, prompt_depth_vision=0, prompt_depth_text=5)))


def test_cli_fits_and_saves_a_run(tiny_config, image_folder, tmp_path):
    from coopkit.cli import main

    out = tmp_path / "run"
    args = ["fit", str(image_folder / "train"), "--method", "ivlp", "--model", str(tiny_config), "--pretrained",
            "none", "--device", "cpu", "--shots", "2", "--ivlp-epochs", "1", "--prompt-depth-text", "2",
            "--prompt-depth-vision", "2", "--out", str(out), "-q"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    clf = coopkit.load(out, device="cpu")
    assert clf.method == "ivlp" and clf.model.config.prompt_depth_vision == 2
    res = CliRunner().invoke(main, args[:-3] + ["--prompt-depth-vision", "3", "--out", str(tmp_path / "bad"),
                                                "-q"])
    assert res.exit_code != 0 and "vision prompt depth 3 exceeds the image transformer's 2 layers" in res.output
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("name", ["ivlp", "maple"])
def test_export_carries_the_deep_prompts(name, tiny_backbone, image_folder, tmp_path):
    from coopkit.exporters import graphs

    if not hasattr(graphs, "image_encoder"):
        pytest.skip("the exporter on this branch traces the frozen encode_image; the classifier-interface "
                    "exporter (wip-export: graphs.image_encoder) exports image_encoder()")
    from coopkit.exporters import export_onnx
    from coopkit.runtime.session import cpu_session

    clf = coopkit.fit(image_folder / "train", method=name, backbone=tiny_backbone, shots=2, seed=1, progress=False,
                      **SMALL[name])
    report = export_onnx(clf, tmp_path / "m.onnx", "fp32", verify_data=image_folder / "test")
    images = np.random.default_rng(0).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    sess = cpu_session(report.path)
    logits = sess.run(None, {sess.get_inputs()[0].name: images})[0]
    ref = clf.logits(list(images))  # PyTorch, the prompted image encoder
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)
    frozen = coopkit.zero_shot(tiny_backbone, clf.classnames)  # the prompts make a difference
    assert np.abs(clf.image_features(list(images)).numpy() - frozen.image_features(list(images)).numpy()).max() > 1e-3
    assert torch.equal(torch.as_tensor(clf.class_weights()), clf.model.class_weights())


# --- official checkpoints ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openai_tiny(tmp_path_factory):
    from reference.harness import load_tiny, openai_config

    return load_tiny(tmp_path_factory.mktemp("official"), "deep-official-tiny", openai_config(layers=4))


NAMES = ["red car", "green_apple", "blue sky"]


def _dassl_checkpoint(path, model, epoch):
    """``Dassl SimpleTrainer.save_model``: the registered model's whole state dict, epoch, optimizer, scheduler."""
    optim = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0035, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, 5.0)
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": model.state_dict(), "epoch": epoch, "optimizer": optim.state_dict(),
                "scheduler": sched.state_dict(), "val_result": None}, path)


@pytest.mark.parametrize("name", ["ivlp", "maple"])
def test_official_checkpoints_import_with_the_official_logits(name, openai_tiny, tmp_path):
    """The official trainer's model in its default precision (fp16 CLIP), random prompts, saved as Dassl saves
    it; imported through the safe unpickler, the logits equal the official module's on the file's weights."""
    from coopkit.research.compat import import_official, read_official_checkpoint
    from reference import harness

    bb = openai_tiny
    spec = methods.get(name)
    small = dict(n_ctx_text=2, n_ctx_vision=2, prompt_depth_text=3, prompt_depth_vision=2) if name == "ivlp" \
        else dict(n_ctx=2, prompt_depth=3)
    config = spec.make_config(small)
    torch.manual_seed(0)
    from coopkit.methods.ivlp import IVLPModel
    from coopkit.methods.maple import MaPLeModel

    ours = (IVLPModel if name == "ivlp" else MaPLeModel)(bb, NAMES, config)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    make = harness.official_ivlp if name == "ivlp" else harness.official_maple
    copy = harness.copy_into_official_ivlp if name == "ivlp" else harness.copy_into_official_maple
    official = make(bb, config, NAMES, fp16=True)
    copy(ours, official)
    official.prompt_learner.ctx.data = official.prompt_learner.ctx.data.half()  # fp16, as in their trainer
    folder = {"ivlp": "VLPromptLearner", "maple": "MultiModalPromptLearner"}[name]
    path = tmp_path / "output" / folder / "model.pth.tar-5"
    _dassl_checkpoint(path, official, 5)
    assert read_official_checkpoint(path).method == name
    clf = import_official(path, NAMES, backbone=bb)
    assert clf.method == name and clf.config.metrics["official_epoch"] == 5
    reference = make(bb, config, NAMES)  # fp32, loaded from the file's state dict (MaPLe: its widths first)
    copy(ours, reference)
    reference.load_state_dict(torch.load(path, weights_only=False)["state_dict"], strict=False)
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), harness.half_casts_off():
        expected = reference.eval()(pixels)
        got = clf.model.logits(pixels)
    assert harness.rel(got, expected) <= 1e-5
    clf.save(tmp_path / "run")
    assert coopkit.load(tmp_path / "run", backbone=bb).method == name
    # the command line: the same file, the backbone built by the command (random init of the same config)
    from PIL import Image

    from coopkit.cli import main

    for c in NAMES:
        (tmp_path / "classes" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "classes" / c / "a.png")
    res = CliRunner().invoke(main, ["import-official", str(path), "--classes-from", str(tmp_path / "classes"),
                                    "--model", bb.name, "--pretrained", "none", "--device", "cpu",
                                    "--out", str(tmp_path / "cli-run")])
    assert res.exit_code == 0, res.output
    assert f"imported {'IVLP' if name == 'ivlp' else 'MaPLe'} prompts ctx (2, 128)" in res.output
    assert coopkit.load(tmp_path / "cli-run", device="cpu").method == name


def test_official_checkpoint_on_other_weights_is_refused(openai_tiny, tmp_path):
    from coopkit.research.compat import import_official
    from reference import harness

    config = methods.get("ivlp").make_config(dict(prompt_depth_text=2, prompt_depth_vision=2))
    official = harness.official_ivlp(openai_tiny, config, NAMES, fp16=True)
    with torch.no_grad():
        official.image_encoder.conv1.weight.mul_(1.5)
    path = tmp_path / "VLPromptLearner" / "model.pth.tar-5"
    _dassl_checkpoint(path, official, 5)
    with pytest.raises(ValueError, match=r"\(IVLP\): its frozen CLIP weights \(image_encoder.conv1.weight\) differ"):
        import_official(path, NAMES, backbone=openai_tiny)


# --- other open_clip families (shrunken configs of coopkit.research.families) ------------------------


@pytest.mark.parametrize("family", ["ViT-B-16", "ViT-L-14-CLIPA", "ViT-H-14-worldwide"])
def test_families_beyond_openai_clip(family, tmp_path):
    """LAION-style GELU ViT, CLIPA (BERT tokenizer, bidirectional text pooled last, average-pooled image
    tower) and MetaCLIP 2 (XLM-V tokenizer, pooled at </s>): the text side with the context at the input
    equals the model's own encode_text of the words; a fit, the exported encoder and the head agree."""
    import torch.nn.functional as F
    from PIL import Image

    from coopkit.methods.ivlp import IVLPConfig, IVLPModel
    from coopkit.research.families import CHECK_NAMES, build_family

    config_path, tok = build_family(family, tmp_path / "family")
    bb = coopkit.load_backbone(str(config_path), pretrained=None, device="cpu", tokenizer=str(tok) if tok else None)
    model = IVLPModel(bb, CHECK_NAMES, IVLPConfig(n_ctx_text=4, prompt_depth_text=1, n_ctx_vision=2,
                                                  prompt_depth_vision=1))
    names = [n.replace("_", " ") for n in CHECK_NAMES]
    with torch.no_grad():
        own = F.normalize(bb.model.encode_text(bb.tokenizer([f"a photo of a {n}." for n in names])).float(), dim=-1)
        assert float((model.text_features() - own).abs().max()) <= 1e-5
    from coopkit.embedded.world import write_task

    data = write_task("colors", tmp_path / "data", shots_per_class=2, test_per_class=1, size=32)
    for name in ("ivlp", "maple", "promptsrc"):
        small = {"ivlp": dict(n_ctx_vision=2, prompt_depth_text=1, prompt_depth_vision=1),
                 "maple": dict(prompt_depth=1),
                 "promptsrc": dict(prompt_depth_text=1, prompt_depth_vision=1, gpa_mean=1, gpa_std=1)}[name]
        clf = coopkit.fit(data / "train", method=name, backbone=bb, shots=2, epochs=1, progress=False, **small)
        images = sorted((data / "test").rglob("*.png"))
        pixels = torch.stack([bb.preprocess(Image.open(p).convert("RGB")) for p in images])
        with torch.no_grad():
            feats = F.normalize(clf.image_encoder()(pixels), dim=-1)
            np.testing.assert_allclose(clf.head()(feats).numpy(), clf.logits(images), atol=1e-4, rtol=0)


def test_only_unprompted_image_towers_share_frozen_features(tiny_backbone):
    from coopkit.methods.ivlp import IVLPConfig, IVLPModel
    from coopkit.methods.maple import MaPLeConfig, MaPLeModel

    names = ["a", "b"]
    assert not IVLPModel(tiny_backbone, names, IVLPConfig(prompt_depth_text=2, prompt_depth_vision=2)).frozen_encoder
    assert not MaPLeModel(tiny_backbone, names, MaPLeConfig(prompt_depth=2)).frozen_encoder
    language = IVLPModel(tiny_backbone, names, IVLPConfig(prompt_depth_text=2, prompt_depth_vision=0, n_ctx_vision=0))
    assert language.frozen_encoder
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(language.image_encoder()(pixels), tiny_backbone.model.encode_image(pixels))
