"""DualCoOp against the official modules (sunxm2357/DualCoOp, vendored in tests/reference), on random-init
open_clip ResNets whose weights the official ``build_model_conv_proj`` loads: region features, text features,
logits, ASL loss and gradients in every configuration the official README and configs use, the training
loop against the official ``train_coop`` steps with Dassl's scheduler, and the official checkpoint import."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from coopkit.methods.dualcoop import DualCoOp, DualCoOpConfig, check_backbone, importer, make, predict_scores, train
from coopkit.methods.multilabel import asymmetric_loss, asymmetric_loss_sigmoid, squash_transform
from coopkit.multilabel_data import MultiLabelDataset

from helpers import write_multilabel_set
from reference import dassl_lr_scheduler, dualcoop_clip_model, dualcoop_official

NAMES = ["person", "dining_table", "tv", "potted plant", "cat"]

#: OpenAI-architecture ResNet CLIPs (one text head per 64 channels, as the official build assumes); image 224
#: so that the official build's hard-coded 7 x 7 attention-pool grid holds.
FAMILIES = {
    "RN-quickgelu": {"embed_dim": 64, "quick_gelu": True,
                     "vision_cfg": {"image_size": 224, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
                     "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}},
    "RN-gelu-deeper": {"embed_dim": 64,
                       "vision_cfg": {"image_size": 224, "layers": [1, 2, 1, 1], "width": 8, "patch_size": None},
                       "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 1}},
}

#: (DualCoOpConfig fields, official cfg arguments): the official defaults, README's partial-label run
#: (class-specific, 448 pixels), README's zero-shot run (64 + 64 context), word initialisation.
CONFIGS = [
    ({}, {}),
    ({"csc": True, "input_size": 448}, {"csc": True, "input_size": 448}),
    ({"n_ctx_pos": 64, "n_ctx_neg": 64}, {"n_ctx_pos": 64, "n_ctx_neg": 64}),
    ({"pos_init": "a photo of a", "neg_init": "not a photo of"}, {"pos_init": "a photo of a", "neg_init": "not a photo of"}),
]


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights on fp16 values (the official build stores its CLIP in fp16 before loading); batch-norm scales
    away from their identity init (bn3 starts at zero in both) and statistics measured on random images, so
    that region features depend on the image."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".bn" in name or "downsample.1" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5 if name.endswith("weight") else
                        0.1 * torch.randn(p.shape, generator=g))
            p.copy_(p.half().float())
        norms = [m for m in model.visual.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # running statistics = the average over the batch below
        model.visual.train()
        model.visual(torch.randn(4, 3, 224, 224, generator=g))
        model.visual.eval()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def resnet_family(request, tmp_path_factory):
    import coopkit

    path = tmp_path_factory.mktemp("cfg") / f"coopkit-dualcoop-{request.param}.json"
    path.write_text(json.dumps(FAMILIES[request.param]))
    torch.set_num_threads(1)
    bb = coopkit.load_backbone(str(path), pretrained=None, device="cpu")
    _randomise(bb.model, 0)
    if not FAMILIES[request.param].get("quick_gelu"):  # the official CLIP hard-codes QuickGELU: give it the model's
        dualcoop_clip_model.QuickGELU = torch.nn.GELU
    yield request.param, bb
    dualcoop_clip_model.QuickGELU = _QUICK_GELU


_QUICK_GELU = dualcoop_clip_model.QuickGELU


def _pair(bb, ours_cfg: dict, off_cfg: dict, names=NAMES):
    cfg = dualcoop_official.cfg(**off_cfg)
    official = dualcoop_official.build(cfg, names, bb.model.state_dict())
    ours = DualCoOp(bb, names, DualCoOpConfig(**ours_cfg))
    pl_off, pl_ours = official.prompt_learner, ours.prompt_learner
    assert pl_off.ctx_pos.shape == pl_ours.ctx_pos.shape and pl_off.ctx_neg.shape == pl_ours.ctx_neg.shape
    if off_cfg.get("pos_init"):  # initialised from the same words' embeddings
        assert torch.equal(pl_ours.ctx_pos, pl_off.ctx_pos) and torch.equal(pl_ours.ctx_neg, pl_off.ctx_neg)
    with torch.no_grad():  # the same learned contexts in both; negative close to positive, so that the
        g = torch.Generator().manual_seed(3)  # random models' pair probabilities are not saturated
        pl_off.ctx_pos.add_(0.05 * torch.randn(pl_off.ctx_pos.shape, generator=g))
        if pl_off.ctx_neg.shape == pl_off.ctx_pos.shape:
            pl_off.ctx_neg.copy_(pl_off.ctx_pos + 0.03 * torch.randn(pl_off.ctx_pos.shape, generator=g))
        pl_ours.ctx_pos.copy_(pl_off.ctx_pos)
        pl_ours.ctx_neg.copy_(pl_off.ctx_neg)
    official.eval()
    return official, ours, cfg


@pytest.mark.parametrize("ours_cfg,off_cfg", CONFIGS, ids=["default", "csc-448", "ctx64", "init"])
def test_equal_to_the_official_modules(resnet_family, ours_cfg, off_cfg):
    _, bb = resnet_family
    official, ours, cfg = _pair(bb, ours_cfg, off_cfg)
    size = cfg.INPUT.SIZE[0]
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([[1, 0, -1, 1, 0], [0, 0, 1, -1, 1], [1, 1, 0, 0, -1]])

    # region features: the official AttentionConv's value path
    ref_regions, _ = official.image_encoder(images)
    assert rel_diff(ours.image_regions(images), ref_regions) <= 1e-5
    # text features: the official TextEncoder over MLCPromptLearner's prompts (negatives, then positives)
    prompts, tokens = official.prompt_learner()
    ref_text = official.text_encoder(prompts, tokens)
    ref_text = ref_text / ref_text.norm(dim=-1, keepdim=True)
    assert rel_diff(ours.prompt_learner.text_features(), ref_text) <= 1e-5

    # logits, ASL loss, gradients of both contexts
    ref_logits = official(images)
    logits = ours(images)
    assert logits.shape == (3, 2, len(NAMES)) and rel_diff(logits, ref_logits) <= 1e-5
    crit = dualcoop_official.AsymmetricLoss(cfg.TRAINER.COOP_MLC.ASL_GAMMA_NEG, cfg.TRAINER.COOP_MLC.ASL_GAMMA_POS)
    ref_loss = crit(ref_logits, targets)
    loss = asymmetric_loss(logits, targets)
    assert rel_diff(loss, ref_loss) <= 1e-5
    ref_loss.backward()
    loss.backward()
    for ref_p, p in ((official.prompt_learner.ctx_pos, ours.prompt_learner.ctx_pos),
                     (official.prompt_learner.ctx_neg, ours.prompt_learner.ctx_neg)):
        assert ref_p.grad.abs().sum() > 0 and rel_diff(p.grad, ref_p.grad) <= 1e-5

    # the exported pieces: head(normalised regions) is logit_pos - logit_neg, sigmoid = the official probability
    with torch.no_grad():
        head_logits = ours.head()(torch.nn.functional.normalize(ours.image_encoder()(images), dim=-1))
    ref_prob = torch.softmax(ref_logits.detach(), dim=1)[:, 1]
    assert rel_diff(torch.sigmoid(head_logits), ref_prob) <= 1e-5


def test_other_input_sizes_resize_the_grid_as_the_official_code(resnet_family):
    _, bb = resnet_family
    official, ours, _ = _pair(bb, {"input_size": 448}, {"input_size": 448})
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))  # built for 448, run at 224
    with torch.no_grad():
        assert rel_diff(ours(images), official(images)) <= 1e-5


def test_sigmoid_asl_equals_the_official_asymmetric_loss2():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, generator=g, requires_grad=True)
    targets = (torch.rand(4, 6, generator=g) < 0.4).long()
    ref = dualcoop_official.AsymmetricLoss2(2, 1)(logits, targets)
    ours = asymmetric_loss_sigmoid(logits, targets)
    assert rel_diff(ours, ref) <= 1e-6
    (g_ref,) = torch.autograd.grad(ref, logits)
    (g_ours,) = torch.autograd.grad(asymmetric_loss_sigmoid(logits, targets), logits)
    assert rel_diff(g_ours, g_ref) <= 1e-6
    # unknown labels drop out: the same as leaving those entries out of the official sum
    masked = targets.clone()
    masked[0, :3] = -1
    keep = masked != -1
    ref_masked = dualcoop_official.AsymmetricLoss2(2, 1)(logits[keep], targets[keep])
    assert rel_diff(asymmetric_loss_sigmoid(logits, masked), ref_masked) <= 1e-6


def _images(root, n: int, seed: int) -> MultiLabelDataset:
    return write_multilabel_set(root, n, seed, NAMES)


def test_training_equals_the_official_train_coop_steps(resnet_family, tmp_path):
    """Three epochs of one batch each: our loop on cached region features against the official model stepped by
    ``train_coop``'s loss and SGD, with Dassl's scheduler stepped per epoch."""
    _, bb = resnet_family
    data = _images(tmp_path, 6, seed=0)
    # contexts from nearly the same words: a random model's pair probabilities start far from saturation
    cfg_kw = {"epochs": 3, "batch_size": 6, "lr": 0.05, "loss_weight": 0.5, "pos_init": "a photo of a",
              "neg_init": "a photo of no"}
    ours, metrics = train(bb, data, DualCoOpConfig(**cfg_kw), seed=5)

    torch.manual_seed(5)  # our fit draws the random initial contexts first: the same draw for the official model
    start = DualCoOp(bb, NAMES, DualCoOpConfig(**cfg_kw)).state()
    official = dualcoop_official.build(dualcoop_official.cfg(pos_init="a photo of a", neg_init="a photo of no"), NAMES,
                                       bb.model.state_dict())
    with torch.no_grad():
        official.prompt_learner.ctx_pos.copy_(start["ctx_pos"])
        official.prompt_learner.ctx_neg.copy_(start["ctx_neg"])
    opt = dualcoop_official.optimizer(official, lr=0.05)
    ns = dualcoop_official.types.SimpleNamespace
    sched = dassl_lr_scheduler.build_lr_scheduler(opt, ns(
        LR_SCHEDULER="cosine", STEPSIZE=(-1,), GAMMA=0.1, MAX_EPOCH=3, WARMUP_EPOCH=1, WARMUP_RECOUNT=True,
        WARMUP_TYPE="constant", WARMUP_CONS_LR=1e-5))
    transform = squash_transform(bb, 224)
    images = torch.stack([transform(Image.open(p).convert("RGB")) for p in data.paths])
    target = torch.as_tensor(data.targets.astype(np.int64))[:, None]  # (n, 1, C): the official loader's rows
    losses = []
    for _ in range(3):
        loss, _ = dualcoop_official.train_step(official, opt, images, target, official.cfg, loss_w=0.5)
        losses.append(float(loss) / 6)
        sched.step()
    assert rel_diff(ours.prompt_learner.ctx_pos, official.prompt_learner.ctx_pos) <= 1e-5
    assert rel_diff(ours.prompt_learner.ctx_neg, official.prompt_learner.ctx_neg) <= 1e-5
    assert rel_diff(ours.prompt_learner.ctx_pos, start["ctx_pos"]) > 1e-3  # it did learn
    np.testing.assert_allclose(metrics["history"]["loss"], losses, rtol=1e-5)


def test_fit_with_validation_chooses_thresholds_and_reports_map(tmp_path, resnet_family):
    _, bb = resnet_family
    train_set, val = _images(tmp_path, 8, seed=1), _images(tmp_path, 6, seed=2)
    model, metrics = train(bb, train_set, DualCoOpConfig(epochs=2, n_views=2), val_set=val)
    assert 0 <= metrics["val_mAP"] <= 1 and model.thresholds.shape == (len(NAMES),)
    scores, targets = predict_scores(model, val)
    assert scores.shape == (6, len(NAMES)) and ((scores >= 0) & (scores <= 1)).all()
    assert (targets == val.targets).all()


def test_saved_tensors_rebuild_the_model_and_the_official_checkpoint_imports(resnet_family):
    _, bb = resnet_family
    official, ours, _ = _pair(bb, {"csc": True}, {"csc": True})
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    ours.thresholds.fill_(0.3)
    again = make(bb, NAMES, DualCoOpConfig(csc=True), ours.state())
    with torch.no_grad():
        assert torch.equal(again(images), ours(images))
        # the official train.py checkpoint: {"state_dict": model.state_dict(), ...} (DataParallel adds "module.")
        for prefix in ("", "module."):
            sd = {prefix + k: v for k, v in official.state_dict().items()}
            assert rel_diff(importer(sd, NAMES, bb, DualCoOpConfig(csc=True))(images), official(images)) <= 1e-5
    assert sorted(ours.state()) == ["ctx_neg", "ctx_pos", "thresholds"] and again.thresholds.tolist() == [pytest.approx(0.3)] * 5
    width = ours.prompt_learner.ctx_pos.shape[-1]
    with pytest.raises(ValueError, match=rf"ctx_pos has shape \(16, {width}\); this model and config need \(5, 16, {width}\)"):
        make(bb, NAMES, DualCoOpConfig(csc=True), {"ctx_pos": torch.zeros(16, width), "ctx_neg": torch.zeros(16, width)})
    with pytest.raises(ValueError, match="not a DualCoOp checkpoint"):
        importer({"prompt_learner.ctx": torch.zeros(4, 64)}, NAMES, bb, DualCoOpConfig())


def test_vit_is_refused_in_one_line(tiny_backbone):
    with pytest.raises(ValueError, match="DualCoOp needs a CLIP ModifiedResNet image tower .* has VisionTransformer"):
        check_backbone(tiny_backbone)


@pytest.mark.parametrize("kwargs,match", [
    ({"pos_init": "a photo of"}, "pos_init and neg_init go together"),
    ({"input_size": 300}, "input_size must be a multiple of 32"),
    ({"epochs": 0}, "epochs must be an integer >= 1"),
    ({"lr": -1.0}, "lr must be a finite number > 0"),
    ({"asl_clip": 1.0}, "asl_clip must be < 1"),
    ({"n_ctx_pos": 0}, "n_ctx"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DualCoOpConfig(**kwargs)


def test_fit_save_load_evaluate_through_the_registry(resnet_family, tmp_path, check_tensors_file_guarded):
    """``coopkit.fit(csv, method="dualcoop")``: a multi-label CSV read as such, a run recording its task, config
    and thresholds, loaded back with the same answers, evaluated with mAP and F1."""
    import coopkit

    _, bb = resnet_family
    train_set, val = _images(tmp_path, 8, seed=3), _images(tmp_path, 6, seed=4)
    csv = tmp_path / "train.csv"
    csv.write_text("path,labels,unknown\n" + "".join(
        f"{p},{'|'.join(train_set.labels_of(i))},{'|'.join(n for n, t in zip(NAMES, train_set.targets[i]) if t == -1)}\n"
        for i, p in enumerate(train_set.paths)))
    clf = coopkit.fit(csv, method="dualcoop", backbone=bb, val=val, epochs=2, n_ctx_pos=4, n_ctx_neg=4, progress=False)
    assert clf.config.task == "multilabel" and clf.config.method == "dualcoop" and clf.multilabel
    assert clf.config.method_config["n_ctx_pos"] == 4 and clf.config.metrics["epochs"] == 2
    assert sorted(clf.classnames) == sorted(NAMES) and "val_mAP" in clf.config.metrics
    run = clf.save(tmp_path / "run")
    assert (run / "dualcoop.safetensors").is_file()
    again = coopkit.load(run, backbone=bb)
    assert again.config.task == "multilabel"
    assert torch.equal(again.model.thresholds, clf.model.thresholds)
    probs = clf.probs(val.paths)
    np.testing.assert_allclose(again.probs(val.paths), probs, rtol=1e-6)
    thresholds = clf.thresholds
    top = clf.predict(val.paths[:2], top_k=2)  # every label at or above its threshold, best first (not top_k)
    for p, row in zip(top, probs[:2]):
        best = [i for i in np.argsort(-row, kind="stable") if row[i] >= thresholds[i]]
        assert list(p.labels) == [clf.classnames[i] for i in best]
        np.testing.assert_allclose(p.probs, row[best], rtol=1e-5)
        np.testing.assert_allclose(list(p.label_probs.values()), row, rtol=1e-5)  # every label's probability
    assert probs.shape == (6, len(NAMES)) and ((probs >= 0) & (probs <= 1)).all()
    # the same probabilities as the official forward on the same stretched pixels
    official = dualcoop_official.build(dualcoop_official.cfg(n_ctx_pos=4, n_ctx_neg=4), clf.classnames,
                                       bb.model.state_dict())
    with torch.no_grad():
        official.prompt_learner.ctx_pos.copy_(clf.model.prompt_learner.ctx_pos)
        official.prompt_learner.ctx_neg.copy_(clf.model.prompt_learner.ctx_neg)
        transform = squash_transform(bb, 224)
        ref = torch.softmax(official(torch.stack([transform(Image.open(p).convert("RGB")) for p in val.paths])), 1)[:, 1]
    assert rel_diff(torch.from_numpy(probs), ref) <= 1e-5
    report = again.evaluate(val.relabel(clf.classnames))
    assert report["n"] == 6 and 0 <= report["mAP"] <= 1 and len(report["AP"]) == len(NAMES)
    assert report["mAP"] == pytest.approx(clf.config.metrics["val_mAP"])
    check_tensors_file_guarded(run, "dualcoop.safetensors", "dualcoop", bb)


def test_an_official_train_py_checkpoint_file_imports_through_the_safe_unpickler(resnet_family, tmp_path):
    """The file the official ``train.py`` writes (``save_checkpoint``: epoch, arch, the whole model's state dict,
    best_mAP, SGD state, Dassl's warm-up scheduler holding its cosine successor), read by coopkit's safe
    unpickler, gives the official module's logits."""
    from coopkit.research.compat import import_official_dualcoop, load_checkpoint, read_official_checkpoint

    _, bb = resnet_family
    official, _, _ = _pair(bb, {"csc": True}, {"csc": True})
    opt = dualcoop_official.optimizer(official)
    ns = dualcoop_official.types.SimpleNamespace
    sched = dassl_lr_scheduler.build_lr_scheduler(opt, ns(
        LR_SCHEDULER="cosine", STEPSIZE=(-1,), GAMMA=0.1, MAX_EPOCH=50, WARMUP_EPOCH=1, WARMUP_RECOUNT=True,
        WARMUP_TYPE="constant", WARMUP_CONS_LR=1e-5))
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(8))
    target = torch.tensor([[[1, 0, -1, 1, 0]], [[0, 1, 1, 0, 0]]])
    dualcoop_official.train_step(official, opt, images, target, official.cfg)  # so the file holds momentum buffers
    sched.step()
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 1, "arch": "coco-DualCoop-RN50", "state_dict": official.state_dict(), "best_mAP": 12.5,
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, path)
    raw = load_checkpoint(path)
    assert raw["epoch"] == 1 and "prompt_learner.ctx_pos" in raw["state_dict"]
    model = importer(raw["state_dict"], NAMES, bb)
    assert model.config.csc and model.config.n_ctx_pos == 16
    clf = import_official_dualcoop(path, NAMES, backbone=bb)
    assert clf.config.task == "multilabel" and clf.config.metrics["official_best_mAP"] == 12.5
    with torch.no_grad():
        ref = official(images)
        assert rel_diff(model(images), ref) <= 1e-5
        probs = torch.sigmoid(clf.head()(clf.model.encode_image(images)))
    assert rel_diff(probs, torch.softmax(ref, 1)[:, 1]) <= 1e-5
    with pytest.raises(ValueError, match="is a DualCoOp checkpoint .*import_official_dualcoop"):
        read_official_checkpoint(path)
    torch.save({"state_dict": {"prompt_learner.ctx": torch.zeros(4, 64)}}, tmp_path / "other.pth.tar")
    with pytest.raises(ValueError, match="other.pth.tar: not a DualCoOp checkpoint"):
        import_official_dualcoop(tmp_path / "other.pth.tar", NAMES, backbone=bb)


def test_unified_contexts_serve_unseen_labels_as_the_official_zero_shot_setting(resnet_family):
    import coopkit

    _, bb = resnet_family
    official, ours, _ = _pair(bb, {"n_ctx_pos": 64, "n_ctx_neg": 64}, {"n_ctx_pos": 64, "n_ctx_neg": 64})
    unseen = ["zebra", "hair drier", "toaster"]
    official_unseen = dualcoop_official.build(dualcoop_official.cfg(n_ctx_pos=64, n_ctx_neg=64), unseen,
                                              bb.model.state_dict())
    with torch.no_grad():
        official_unseen.prompt_learner.ctx_pos.copy_(official.prompt_learner.ctx_pos)
        official_unseen.prompt_learner.ctx_neg.copy_(official.prompt_learner.ctx_neg)
        images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(9))
        assert rel_diff(ours.with_classes(unseen)(images), official_unseen(images)) <= 1e-5
    config = coopkit.config.RunConfig(method="dualcoop", classnames=NAMES, model=bb.name, task="multilabel",
                                      method_config=ours.config.to_dict())
    clf = coopkit.Classifier(bb, config, ours)
    assert clf.with_classes(unseen).classnames == unseen
    csc = make(bb, NAMES, DualCoOpConfig(csc=True))
    with pytest.raises(ValueError, match="class-specific contexts"):
        csc.with_classes(unseen)
