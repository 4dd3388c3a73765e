"""CoCoOp against the official modules (KaiyangZhou/CoOp ``trainers/cocoop.py``, vendored in
``tests/reference``), on tiny random-init open_clip models whose weights the official
``clip.build_model`` loads: image features, logits, loss and gradients, in every configuration
of the official configs (N_CTX 4 / 8 / 16, CTX_INIT "a photo of a" or none), ViT (QuickGELU) and
ModifiedResNet image towers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import coopkit
from coopkit.config import RunConfig, TrainConfig
from coopkit.methods.cocoop import (
    CoCoOpConfig,
    CoCoOpPromptLearner,
    build,
    import_official,
    load_learner_state,
    train_loop,
)
from reference import cocoop_official, coop_clip_model, dassl_checkpoint, dassl_lr_scheduler

NAMES = ["cat", "golden retriever", "red_panda", "a rather long multi word class name", "x"]
TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}
FAMILIES = {  # OpenAI-architecture configs: one head per 64 channels, as clip.build_model assumes
    "vit-quickgelu": {"embed_dim": 64, "quick_gelu": True, "text_cfg": TEXT,
                      "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 64}},
    "resnet": {"embed_dim": 64, "quick_gelu": True, "text_cfg": TEXT,
               "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 64}},
}
#: The official configs (configs/trainers/CoCoOp/*.yaml): (N_CTX, CTX_INIT).
OFFICIAL_CONFIGS = [(4, "a photo of a"), (4, ""), (8, ""), (16, "")]


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max() / b.detach().double().abs().max().clamp_min(1e-30))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    """(coopkit backbone, official CLIP) holding the same weights (the official build rounds to fp16)."""
    path = tmp_path_factory.mktemp("cfg") / f"coopkit-test-cocoop-{request.param}.json"
    path.write_text(json.dumps(FAMILIES[request.param]))
    torch.manual_seed(0)
    bb = coopkit.load_backbone(str(path), pretrained=None, device="cpu")
    official = coop_clip_model.build_model(dict(bb.model.state_dict())).float().eval()
    bb.model.load_state_dict(official.state_dict())
    return bb, official


def _official_and_ours(bb, official_clip, n_ctx, ctx_init, chunk=256):
    torch.manual_seed(1)
    size = official_clip.visual.input_resolution
    ref = cocoop_official.CustomCLIP(cocoop_official.cfg(n_ctx, ctx_init, "fp32", size), NAMES, official_clip)
    with torch.no_grad():  # move away from the init, so that the context and every meta-net weight matter
        for p in ref.prompt_learner.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        ref.prompt_learner.meta_net.linear1.bias.add_(1.0)  # hidden units alive for every image (ReLU)
    ours = CoCoOpPromptLearner(bb, NAMES, CoCoOpConfig(n_ctx=n_ctx, ctx_init=ctx_init or None), text_chunk_size=chunk)
    state = cocoop_official.load_model_state_dict({"state_dict": dict(ref.prompt_learner.state_dict())})
    load_learner_state(ours, state, "the official prompt learner's tensors")
    return ref, ours


@pytest.mark.parametrize("n_ctx,ctx_init", OFFICIAL_CONFIGS)
def test_equal_to_the_official_modules(pair, n_ctx, ctx_init):
    bb, official_clip = pair
    ref, ours = _official_and_ours(bb, official_clip, n_ctx, ctx_init)
    assert ours.n_ctx == n_ctx and ours.use_shared_prefix and ours.packed
    size = official_clip.visual.input_resolution
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 3, 1])
    scale = bb.model.logit_scale.exp()

    # forward: image features (cached in training, from the frozen open_clip tower) and logits
    ref.eval()
    with torch.no_grad():
        ref_logits = ref(images)
        ref_feats = F.normalize(official_clip.visual(images), dim=-1)
        feats = F.normalize(bb.model.encode_image(images), dim=-1)
        logits = ours.logits(feats, scale)
    assert rel_diff(feats, ref_feats) <= 1e-5
    assert rel_diff(logits, ref_logits) <= 1e-5

    # training: the official module returns the loss in train mode; gradients of every trained tensor
    ref.prompt_learner.train()
    ref_loss = ref(images, labels)
    ref_loss.backward()
    loss = F.cross_entropy(ours.logits(feats, scale), labels)
    loss.backward()
    assert rel_diff(loss.detach(), ref_loss.detach()) <= 1e-5
    ref_grads = dict(ref.prompt_learner.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert rel_diff(p.grad, ref_grads[name].grad) <= 1e-5, name


def test_chunked_checkpointed_pass_is_the_same(pair):
    """Several class chunks (activation checkpointing with gradients) give the one-pass answers."""
    bb, official_clip = pair
    _, one = _official_and_ours(bb, official_clip, 4, "a photo of a")
    _, chunked = _official_and_ours(bb, official_clip, 4, "a photo of a", chunk=2)
    feats = F.normalize(torch.randn(2, bb.model.text_projection.shape[1]), dim=-1)
    a, b = one.conditioned_features(feats), chunked.conditioned_features(feats)
    assert rel_diff(b, a) <= 1e-5
    (ga,) = torch.autograd.grad(a.sum(), one.meta_net.linear1.weight)
    (gb,) = torch.autograd.grad(b.sum(), chunked.meta_net.linear1.weight)
    assert rel_diff(gb, ga) <= 1e-5


def test_state_holds_the_official_names_only(tiny_backbone):
    learner = CoCoOpPromptLearner(tiny_backbone, NAMES)
    assert sorted(learner.state_dict()) == ["ctx", "meta_net.linear1.bias", "meta_net.linear1.weight",
                                            "meta_net.linear2.bias", "meta_net.linear2.weight"]
    assert learner.meta_net.linear1.weight.shape == (64 // 16, 64)
    assert learner.meta_net.linear2.weight.shape == (64, 64 // 16)
    model = import_official(learner.state_dict(), NAMES, tiny_backbone, CoCoOpConfig())
    assert model.class_weights() is None
    for k, v in model.state().items():
        assert torch.equal(v, learner.state_dict()[k])


def test_saved_tensors_that_do_not_fit_are_refused(tiny_backbone):
    state = CoCoOpPromptLearner(tiny_backbone, NAMES).state_dict()
    run = RunConfig(method="cocoop", classnames=NAMES, method_config=CoCoOpConfig(), **tiny_backbone.run_fields())
    with pytest.raises(ValueError, match="missing \\['ctx'\\]"):
        build(tiny_backbone, run, {k: v for k, v in state.items() if k != "ctx"})
    with pytest.raises(ValueError, match="ctx \\(8, 64\\) \\(expects \\(4, 64\\)\\)"):
        build(tiny_backbone, run, {**state, "ctx": torch.zeros(8, 64)})
    with pytest.raises(ValueError, match="NaN or infinite"):
        build(tiny_backbone, run, {**state, "ctx": torch.full((4, 64), float("nan"))})


@pytest.mark.parametrize("kwargs,match", [
    ({"n_ctx": 0, "ctx_init": None}, "n_ctx must be an integer >= 1"),
    ({"epochs": 0}, "epochs must be an integer >= 1"),
    ({"batch_size": 1.5}, "batch_size must be an integer >= 1"),
    ({"ctx_init": 4}, "ctx_init must be a string of words or None"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CoCoOpConfig(**kwargs)


def test_config_reads_the_official_empty_ctx_init_as_random():
    assert CoCoOpConfig(ctx_init="").ctx_init is None and CoCoOpConfig(ctx_init=" None ").ctx_init is None
    assert CoCoOpConfig(ctx_init="a_photo  of a").ctx_init == "a photo of a"
    assert CoCoOpConfig(epochs=None).epochs == 10  # coopkit bench's "the method's own epochs"


def test_fit_command(tiny_config, image_folder, tmp_path):
    from click.testing import CliRunner

    from coopkit.cli import main

    args = ["fit", str(image_folder / "train"), "--method", "cocoop", "--model", str(tiny_config), "--pretrained",
            "none", "--device", "cpu", "--shots", "2", "--n-views", "1", "--cocoop-epochs", "1",
            "--cocoop-n-ctx", "3", "--cocoop-ctx-init", "", "-q", "--json", "--out", str(tmp_path / "run")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    run = coopkit.load(tmp_path / "run")
    assert run.method == "cocoop" and run.model.learner.ctx.shape == (3, 64)
    assert run.config.method_config == {"n_ctx": 3, "ctx_init": None, "epochs": 1, "batch_size": 1}


#: Families beyond the official code's reach (its clip.build_model knows OpenAI's two architectures only):
#: plain-GELU ViT (packed path), MetaCLIP 2 (eos pooling by id), SigLIP 2 (bidirectional, logit bias),
#: a Hugging Face text tower, CoCa (appended CLS).
OTHER_FAMILIES = ["ViT-B-32", "ViT-H-14-worldwide", "ViT-B-16-SigLIP2", "roberta-ViT-B-32", "coca_ViT-B-32"]


@pytest.mark.parametrize("name", OTHER_FAMILIES)
def test_other_families_equal_the_per_image_full_length_pass(name, tmp_path):
    """The official algorithm (each image's shifted context, every class's full-length prompt through the
    tower's own pass, one image at a time) against the batched pass, on the families the official code
    cannot build: features and gradients."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    from coopkit.prompts import PromptLearner, reference_text_features
    from coopkit.research.families import CHECK_NAMES, build_family

    config, tok = build_family(name, tmp_path)
    bb = coopkit.load_backbone(str(config), pretrained=None, device="cpu", tokenizer=str(tok) if tok else None)
    torch.manual_seed(0)
    learner = CoCoOpPromptLearner(bb, CHECK_NAMES, CoCoOpConfig(n_ctx=4, ctx_init=None), text_chunk_size=2)
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        learner.meta_net.linear1.bias.add_(1.0)
    dim = learner.meta_net.linear1.in_features
    feats = F.normalize(torch.randn(3, dim, generator=torch.Generator().manual_seed(1)), dim=-1)
    fast = learner.conditioned_features(feats)  # (3, K, D)
    shift = learner.meta_net(feats)  # (3, width)
    refs = []
    for i in range(len(feats)):
        coop = PromptLearner(bb, CHECK_NAMES, learner.config)
        del coop.ctx
        coop.ctx = learner.ctx + shift[i]  # (n_ctx, width): the official ctx_shifted of image i
        refs.append(reference_text_features(coop))  # (K, D), full length, the tower's own pass
    ref = torch.stack(refs)
    assert rel_diff(fast, ref) <= 1e-5
    w = torch.randn_like(ref)
    params = [learner.ctx, learner.meta_net.linear1.weight, learner.meta_net.linear2.weight]
    g_fast = torch.autograd.grad((fast * w).sum(), params, retain_graph=True)
    g_ref = torch.autograd.grad((ref * w).sum(), params)
    for a, b in zip(g_fast, g_ref):
        assert b.abs().sum() > 0 and rel_diff(a, b) <= 1e-5


def _dassl_scheduler(optimizer, epochs):
    """The official configs' scheduler: constant warm-up for one epoch, then cosine."""
    ns = cocoop_official.types.SimpleNamespace
    return dassl_lr_scheduler.build_lr_scheduler(optimizer, ns(
        LR_SCHEDULER="cosine", STEPSIZE=(-1,), GAMMA=0.1, MAX_EPOCH=epochs, WARMUP_EPOCH=1, WARMUP_RECOUNT=True,
        WARMUP_TYPE="constant", WARMUP_CONS_LR=1e-5))


@pytest.mark.parametrize("prec", ["fp32", "fp16"])
def test_official_checkpoint_imports_with_the_official_logits(pair, tmp_path, prec):
    """A checkpoint as the official trainer writes it (Dassl's save_model: state dict with the token buffers,
    SGD state, the warm-up scheduler holding its cosine successor), read through coopkit's safe unpickler,
    gives the logits the official module gives after its own load_model."""
    from coopkit.research.compat import load_checkpoint

    bb, official_clip = pair
    trained, _ = _official_and_ours(bb, official_clip, 4, "a photo of a")
    size = official_clip.visual.input_resolution
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(4))
    learner = trained.prompt_learner
    opt = torch.optim.SGD(learner.parameters(), lr=0.002, momentum=0.9, weight_decay=5e-4)
    sched = _dassl_scheduler(opt, 10)
    trained(images, torch.tensor([1, 2])).backward()  # an optimiser step, so the file holds momentum buffers
    opt.step()
    sched.step()
    if prec == "fp16":  # PREC fp16: the official learner (context, meta-net, token buffers) is half precision
        learner.half()
    dassl_checkpoint.Trainer({"prompt_learner": learner}, {"prompt_learner": opt}, {"prompt_learner": sched}
                             ).save_model(9, str(tmp_path), val_result=None)
    path = tmp_path / "prompt_learner" / "model.pth.tar-10"
    raw = load_checkpoint(path)
    assert raw["epoch"] == 10 and raw["state_dict"]["ctx"].dtype == (torch.float16 if prec == "fp16" else torch.float32)
    model = import_official(raw["state_dict"], NAMES, bb)

    official = cocoop_official.CustomCLIP(cocoop_official.cfg(4, "", "fp32", size), NAMES, official_clip)
    state = cocoop_official.load_model_state_dict(torch.load(path, weights_only=False))
    official.prompt_learner.load_state_dict(state, strict=False)  # the official load_model
    official.eval()
    with torch.no_grad():
        ref_logits = official(images)
        logits = model.head()(F.normalize(bb.model.encode_image(images), dim=-1))
    assert rel_diff(logits, ref_logits) <= 1e-5


def test_checkpoints_that_are_not_cocoop_are_refused(tiny_backbone):
    good = CoCoOpPromptLearner(tiny_backbone, NAMES).state_dict()
    with pytest.raises(ValueError, match="ctx is \\(5, 4, 64\\), expected \\(n_ctx, width\\)"):
        import_official({**good, "ctx": torch.zeros(5, 4, 64)}, NAMES, tiny_backbone)
    with pytest.raises(ValueError, match="unexpected \\['bias_vectors'\\]"):
        import_official({**good, "bias_vectors": torch.zeros(1, 64)}, NAMES, tiny_backbone)
    with pytest.raises(ValueError, match="ctx \\(4, 32\\) \\(expects \\(4, 64\\)\\)"):
        import_official({**good, "ctx": torch.zeros(4, 32)}, NAMES, tiny_backbone)


def test_training_equals_the_official_trainer_steps(pair):
    """Three epochs (warm-up, then cosine) of one batch: the official module stepped by the official
    optimiser and schedule (torch SGD as Dassl builds it, the vendored scheduler) against train_loop on
    cached features: the parameter updates agree."""
    bb, official_clip = pair
    ref, ours = _official_and_ours(bb, official_clip, 4, "a photo of a")
    before = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    size = official_clip.visual.input_resolution
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([2, 0])
    epochs, train = 3, TrainConfig(lr=0.5, seed=1)
    opt = torch.optim.SGD(ref.prompt_learner.parameters(), lr=train.lr, momentum=0.9, weight_decay=5e-4,
                          dampening=0, nesterov=False)
    sched = _dassl_scheduler(opt, epochs)
    ref.prompt_learner.train()
    for _ in range(epochs):  # CoCoOp.forward_backward, then update_lr at the epoch's last batch
        loss = ref(images, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        feats = F.normalize(bb.model.encode_image(images), dim=-1)[None]  # (1 view, 2, D)
    history = train_loop(ours, bb, feats, labels, CoCoOpConfig(epochs=epochs, batch_size=2), train)
    assert history["lr"] == pytest.approx([1e-5, 0.5, 0.375])  # 0.5 (1 + cos(pi / 3)) / 2
    official = dict(ref.prompt_learner.named_parameters())
    for name, p in ours.named_parameters():
        delta, ref_delta = p.detach() - before[name], official[name].detach() - before[name]
        assert ref_delta.abs().max() > 1e-3, name
        assert rel_diff(delta, ref_delta) <= 1e-4, name


# --- the registered method: fit, save, load, evaluate, new classes, export --------------------------------


@pytest.fixture(scope="module")
def cocoop_run(tiny_backbone, image_folder):
    return coopkit.fit(image_folder / "train", method="cocoop", backbone=tiny_backbone, shots=4, epochs=2, n_views=2,
                       n_ctx=2, ctx_init=None, progress=False)


def test_fit_records_the_method_and_its_recipe(cocoop_run):
    assert cocoop_run.method == "cocoop"
    assert cocoop_run.config.method_config == {"n_ctx": 2, "ctx_init": None, "epochs": 2, "batch_size": 1}
    history = cocoop_run.config.metrics["history"]
    assert history["lr"] == [1e-5, 0.002] and len(history["loss"]) == 2
    assert cocoop_run.config.metrics["train_images"] == 16  # 4 shots x 4 classes, batch 1: 16 steps per epoch
    assert cocoop_run.class_weights() is None
    with pytest.raises(ValueError, match="no text features of its own"):
        cocoop_run.text_features()


def test_save_load_round_trip(cocoop_run, tiny_backbone, image_folder, tmp_path):
    run = cocoop_run.save(tmp_path / "run")
    assert sorted(p.name for p in run.iterdir()) == ["cocoop.safetensors", "config.json"]
    loaded = coopkit.load(run, backbone=tiny_backbone)
    images = sorted((image_folder / "test").rglob("*.png"))
    np.testing.assert_array_equal(loaded.logits(images), cocoop_run.logits(images))
    assert loaded.evaluate(image_folder / "test") == cocoop_run.evaluate(image_folder / "test")
    (run / "cocoop.safetensors").write_bytes((run / "cocoop.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="cocoop.safetensors does not match config.json"):
        coopkit.load(run, backbone=tiny_backbone)


def test_logits_are_the_learners_per_image_logits(cocoop_run, image_folder):
    """The classifier's head (what predict, evaluate and the exporter use) on batches larger than one pass."""
    images = sorted((image_folder / "test").rglob("*.png"))
    feats = cocoop_run.image_features(images)
    learner = cocoop_run.model.learner
    with torch.no_grad():
        one_by_one = torch.cat([learner.logits(f[None], cocoop_run.backbone.model.logit_scale.exp()) for f in feats])
        head = cocoop_run.head()
        head.images_per_pass = 5  # several slices
        np.testing.assert_allclose(head(feats).numpy(), one_by_one.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(cocoop_run.logits(images), one_by_one.numpy(), atol=1e-5, rtol=0)


def test_new_classes_keep_the_context_and_the_meta_net(cocoop_run, image_folder):
    """CoCoOp's base-to-new setting: the learned context and meta-net over unseen class names."""
    new = cocoop_run.with_classes(["purple", "red", "orange"])
    assert new.classnames == ["purple", "red", "orange"]
    for k, v in new.model.state().items():
        assert torch.equal(v, cocoop_run.model.state()[k])
    images = sorted((image_folder / "test").rglob("*.png"))[:3]
    both = cocoop_run.with_classes(cocoop_run.classnames)
    np.testing.assert_allclose(both.logits(images), cocoop_run.logits(images), atol=1e-6, rtol=0)
    assert new.logits(images).shape == (3, 3)


def test_a_backbone_too_narrow_for_the_meta_net_is_refused(tmp_path, image_folder):
    narrow = json.loads(json.dumps(FAMILIES["vit-quickgelu"]))
    narrow["embed_dim"] = 8
    path = tmp_path / "coopkit-test-narrow.json"
    path.write_text(json.dumps(narrow))
    bb = coopkit.load_backbone(str(path), pretrained=None, device="cpu")
    with pytest.raises(ValueError, match="width 8 leave the meta-net no hidden unit .* width >= 16"):
        coopkit.fit(image_folder / "train", method="cocoop", backbone=bb, progress=False)


def test_export_runs_in_the_unchanged_runtime(cocoop_run, image_folder, tmp_path):
    from coopkit.exporters import export_onnx
    from coopkit.runtime import Classifier as RuntimeClassifier

    result = export_onnx(cocoop_run, tmp_path / "cocoop.onnx")
    assert result.metadata.method == "cocoop" and result.metadata.weights_sha256 == ""
    runtime = RuntimeClassifier(result.path)
    images = sorted((image_folder / "test").rglob("*.png"))
    np.testing.assert_allclose(runtime.logits(images), cocoop_run.logits(images), atol=1e-4, rtol=0)


def test_import_official_cli(cocoop_run, tiny_config, image_folder, tmp_path):
    """coopkit import-official on a CoCoOp checkpoint as the official trainer saves it."""
    from click.testing import CliRunner

    from coopkit.cli import main

    learner = cocoop_run.model.learner
    dassl_checkpoint.Trainer({"prompt_learner": learner}, {"prompt_learner": None}, {"prompt_learner": None}
                             ).save_model(9, str(tmp_path / "official"))
    ckpt = tmp_path / "official" / "prompt_learner" / "model.pth.tar-10"
    res = CliRunner().invoke(main, ["import-official", str(ckpt), "--classes-from", str(image_folder / "train"),
                                    "--model", str(tiny_config), "--pretrained", "none", "--device", "cpu",
                                    "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "imported CoCoOp context (2, 64) for 4 classes" in res.output
    run = coopkit.load(tmp_path / "run", backbone=cocoop_run.backbone)
    assert run.method == "cocoop" and run.config.metrics["official_epoch"] == 10
    images = sorted((image_folder / "test").rglob("*.png"))
    np.testing.assert_array_equal(run.logits(images), cocoop_run.logits(images))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")  # class indices: constants
def test_head_traces_to_onnx_with_a_dynamic_batch(cocoop_run, tmp_path):
    """The head (meta-net + image-conditioned prompts + text tower) as the exporter traces it: one ONNX graph
    whose batch size is free, equal to PyTorch at other batch sizes than the traced one."""
    ort = pytest.importorskip("onnxruntime")
    head = cocoop_run.head()
    dim = cocoop_run.backbone.model.text_projection.shape[1]
    example = F.normalize(torch.randn(2, dim, generator=torch.Generator().manual_seed(5)), dim=-1)
    path = tmp_path / "head.onnx"
    with torch.no_grad():
        torch.onnx.export(head, (example,), str(path), dynamo=False, input_names=["features"],
                          output_names=["logits"], dynamic_axes={"features": {0: "b"}, "logits": {0: "b"}},
                          opset_version=17)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        x = F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(n)), dim=-1)
        with torch.no_grad():
            expected = head(x).numpy()
        got = session.run(["logits"], {"features": x.numpy()})[0]
        assert got.shape == (n, len(cocoop_run.classnames))
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
