"""CLIP-LoRA against the official code (MaxZanella/CLIP-LoRA, vendored in tests/reference): the same
weights and adapters give the same features, logits and gradients, in every official configuration."""

from __future__ import annotations

import copy
import contextlib
import io
import itertools
import json
import os
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import coopkit
from coopkit.methods.clip_lora import (
    OFFICIAL_LINEARS,
    ENCODERS,
    POSITIONS,
    PROJECTIONS,
    CLIPLoRA,
    LoRAConfig,
    check_backbone,
    layer_indices,
    official_state,
    train_step,
)
from reference import clip_lora_official as official

NAMES = ["red apple", "green_leaf", "blue sky over the sea", "yellow"]
#: OpenAI CLIP's architecture (QuickGELU, 64-wide heads, 12 blocks per tower), tiny widths.
OPENAI_TINY = {
    "embed_dim": 64, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 12, "width": 128, "patch_size": 8, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 12},
}
#: OpenAI's ResNet image tower (RN50's family), tiny: text adapters only.
RESNET_TINY = {
    "embed_dim": 64, "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 64, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 12},
}
#: Another family: plain GELU, LayerScale, a SigLIP-style text tower (no causal mask, last-token
#: pooling, projection bias) held as ``model.text`` (open_clip's CustomTextCLIP).
SIGLIP_STYLE_TINY = {
    "embed_dim": 64, "custom_text": True,
    "vision_cfg": {"image_size": 32, "layers": 12, "width": 64, "patch_size": 8, "head_width": 32,
                   "ls_init_value": 0.5},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 12,
                 "no_causal_mask": True, "pool_type": "last", "proj_bias": True, "ls_init_value": 0.5},
}


def _backbone(tmp_path_factory, name, cfg):
    path = tmp_path_factory.mktemp("cfg") / f"{name}.json"
    path.write_text(json.dumps(cfg))
    torch.set_num_threads(1)
    return coopkit.load_backbone(str(path), pretrained=None, device="cpu")


@pytest.fixture(scope="module")
def openai_bb(tmp_path_factory):
    return _backbone(tmp_path_factory, "coopkit-test-lora-openai", OPENAI_TINY)


@pytest.fixture(scope="module")
def resnet_bb(tmp_path_factory):
    return _backbone(tmp_path_factory, "coopkit-test-lora-rn", RESNET_TINY)


@pytest.fixture(scope="module")
def siglip_bb(tmp_path_factory):
    return _backbone(tmp_path_factory, "coopkit-test-lora-noncausal", SIGLIP_STYLE_TINY)


def _args(cfg: LoRAConfig, backbone="ViT-B/16", dropout_rate=None):
    return types.SimpleNamespace(encoder=cfg.encoder, position=cfg.position, params=list(cfg.projections), r=cfg.r,
                                 alpha=cfg.alpha, dropout_rate=cfg.dropout_rate if dropout_rate is None else dropout_rate,
                                 backbone=backbone, n_iters=cfg.iters_per_shot, shots=1, lr=cfg.lr)


def _official_clip(bb):
    """The official CLIP (clip/model.py build_model) on the backbone's exact fp32 weights."""
    sd = {k: v.clone() for k, v in bb.model.state_dict().items()}
    model = official.build_model(dict(sd)).to(sd["text_projection"].dtype)
    model.load_state_dict(sd)
    return model


def _randomise(ours: CLIPLoRA, seed: int = 0) -> None:
    """Non-zero adapters (B starts at zero, which would hide most of the computation)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ours.lora_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _copy_into_official(ours: CLIPLoRA, layers) -> None:
    """Our adapters into the official modules, by the official code: our official_state() file read by its
    load_lora (which checks r, alpha, encoder, params and position against its args)."""
    cfg = ours.config
    with tempfile.TemporaryDirectory() as tmp:
        args = _args(cfg, backbone="ViT-B/16")
        args.save_path, args.dataset, args.shots, args.seed, args.filename = tmp, "test", 1, 1, "lora"
        path = Path(tmp) / "vitb16" / "test" / "1shots" / "seed1" / "lora.pt"
        path.parent.mkdir(parents=True)
        torch.save(official_state(ours), path)
        with contextlib.redirect_stdout(io.StringIO()):
            official.load_lora(args, layers)


def _official_grads(ours: CLIPLoRA, layers) -> list[torch.Tensor]:
    out = []
    for layer, name in zip(layers, ours.adapter_names):
        for p in ours.adapters[name.replace(".", "_")].projections:
            lin = getattr(layer, OFFICIAL_LINEARS[p])
            out += [lin.w_lora_A.grad, lin.w_lora_B.grad]
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative difference ``|a - b| / |b|`` (Frobenius norms)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _official_logits(model, bb, images, names=NAMES, template="a photo of a {}."):
    texts = [template.format(c.replace("_", " ")) for c in names]
    text = model.encode_text(torch.as_tensor(bb.tokenizer(texts)))
    text = text / text.norm(dim=-1, keepdim=True)
    image = model.encode_image(images)
    image = image / image.norm(dim=-1, keepdim=True)
    return bb.model.logit_scale.exp() * image @ text.t()


def _compare(bb, cfg, official_model, layers, images, labels, *, cut=True, seed=None, tol=1e-5, grad_tol=5e-5):
    """Logits (<= 1e-5) and every adapter gradient, ours against the official modules.

    Gradients get 5e-5: through 24 random-init float32 blocks, rounding alone puts the official gradients
    up to ~1.6e-5 (and ours ~1.7e-5) away from the same computation in float64; the largest difference
    between the two codes measured here is 2.3e-5 (docs/methods/clip_lora.md)."""
    ours = CLIPLoRA(bb, NAMES, cfg)
    _randomise(ours)
    _copy_into_official(ours, layers)
    ours.train()
    official_model.train()
    if isinstance(official_model.visual, official.ModifiedResNet):
        official_model.visual.eval()  # run_lora's clip_model.train() would put its BatchNorms on batch statistics
    if seed is not None:
        torch.manual_seed(seed)
    mine = ours.logits(images, cut=cut)
    if seed is not None:
        torch.manual_seed(seed)
    ref = _official_logits(official_model, bb, images)
    _record("logits", cfg, _rel(mine, ref))
    assert _rel(mine, ref) <= tol, _rel(mine, ref)
    F.cross_entropy(mine, labels).backward()
    F.cross_entropy(ref, labels).backward()
    grads = [p.grad for p in ours.lora_parameters()]
    for g, r in zip(grads, _official_grads(ours, layers)):
        assert r is not None and g is not None
        _record("gradients", cfg, _rel(g, r))
        assert _rel(g, r) <= grad_tol, _rel(g, r)
    return ours


def _record(what: str, cfg: LoRAConfig, value: float) -> None:
    """With COOPKIT_REPORT_DIFFS set, log the largest difference per configuration (for the docs)."""
    if os.environ.get("COOPKIT_REPORT_DIFFS"):
        with open(os.environ["COOPKIT_REPORT_DIFFS"], "a") as f:
            f.write(f"{cfg.encoder} {cfg.position} {cfg.params} r={cfg.r} {what} {value:.3g}\n")


def _no_dropout(model) -> None:
    """The official LinearLoRA's dropout branch with p = 0: x W^T + s x (B A)^T, with autograd's gradient."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


# --- positions ---------------------------------------------------------------------------------


def test_positions_are_the_official_index_lists():
    for position in POSITIONS:
        assert layer_indices(position, 12) == official.INDEX_POSITIONS_TEXT[position]
        assert layer_indices(position, 12) == official.INDEX_POSITIONS_VISION["ViT-B/16"][position]
    for backbone, depth in (("ViT-B/32", 12), ("ViT-L/14", 24)):
        for position, indices in official.INDEX_POSITIONS_VISION[backbone].items():
            assert layer_indices(position, depth) == indices, (backbone, position)


def test_positions_that_select_nothing_are_refused():
    with pytest.raises(ValueError, match="position 'mid' selects no block of a 2-block tower"):
        layer_indices("mid", 2)
    with pytest.raises(ValueError, match="'top3' selects no block"):
        layer_indices("top3", 2)
    assert layer_indices("top3", 3) == [0, 1, 2]


def test_config_checks():
    with pytest.raises(ValueError, match="r .* must be an integer >= 1, got 0; rank 0 adapts nothing"):
        LoRAConfig(r=0)
    with pytest.raises(ValueError, match="unknown params"):
        LoRAConfig(params="q,x")
    with pytest.raises(ValueError, match="unknown encoder 'image'; valid"):
        LoRAConfig(encoder="image")
    with pytest.raises(ValueError, match="dropout_rate"):
        LoRAConfig(dropout_rate=1.0)
    assert LoRAConfig(params="vq").params == "q,v"
    assert LoRAConfig(params=["o", "k"]).params == "k,o"
    cfg = LoRAConfig(encoder="text", params="q,o", r=4)
    assert LoRAConfig.from_json(cfg.to_json()) == cfg


# --- exactness against the official modules ----------------------------------------------------

SUBSETS = [",".join(s) for n in range(1, 5) for s in itertools.combinations(PROJECTIONS, n)]
RANKS = (1, 2, 4, 8, 16)
GRID = [(enc, pos, SUBSETS[i % len(SUBSETS)], RANKS[i % len(RANKS)])
        for i, (enc, pos) in enumerate(itertools.product(ENCODERS, POSITIONS))]
GRID += [("both", "all", s, 2) for s in SUBSETS if s != "q,k,v"]


@pytest.mark.parametrize("encoder,position,params,r", GRID)
def test_logits_and_gradients_equal_the_official(openai_bb, encoder, position, params, r):
    cfg = LoRAConfig(encoder=encoder, position=position, params=params, r=r, alpha=2, dropout_rate=0.0)
    model = _official_clip(openai_bb)
    layers = official.apply_lora(_args(cfg, dropout_rate=0.5), model)
    _no_dropout(model)
    torch.manual_seed(1)
    images = torch.randn(3, 3, 32, 32)
    _compare(openai_bb, cfg, model, layers, images, torch.tensor([0, 2, 3]))


def test_gradients_in_float64_are_within_1e_5(tmp_path_factory, monkeypatch):
    """The worst float32 configuration (2.8e-5, both encoders, all layers, k,v,o, r=2) run in float64:
    the official model and its adapters in float64 (its LayerNorm's cast to float32, there for fp16,
    taken out), ours on a float64 backbone with float64 adapters. Our towers still hand float32 features
    to the logits, so this is not float64 end to end; the gradients agree within 1e-5 (3.8e-6 measured)."""
    bb = _backbone(tmp_path_factory, "coopkit-test-lora-openai64", OPENAI_TINY)
    bb.model.double()
    monkeypatch.setattr(official.LayerNorm, "forward", nn.LayerNorm.forward)

    class Float64Adapters(CLIPLoRA):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for p in self.lora_parameters():
                p.data = p.data.double()

    monkeypatch.setitem(globals(), "CLIPLoRA", Float64Adapters)
    cfg = LoRAConfig(encoder="both", position="all", params="k,v,o", r=2, alpha=2, dropout_rate=0.0)
    model = _official_clip(bb)
    layers = official.apply_lora(_args(cfg, dropout_rate=0.5), model)
    model.double()
    _no_dropout(model)
    torch.manual_seed(1)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    ours = _compare(bb, cfg, model, layers, images, torch.tensor([0, 2, 3]), tol=1e-6, grad_tol=1e-5)
    assert {p.dtype for p in ours.lora_parameters()} == {torch.float64}
    assert {p.dtype for p in model.parameters()} == {torch.float64}


def test_dropout_draws_the_official_masks(openai_bb):
    """Training mode with the default dropout (0.25): same seed, same masks, same logits and gradients
    (the full-length text pass, as the official code runs it)."""
    cfg = LoRAConfig(params="q,k,v,o")
    model = _official_clip(openai_bb)
    layers = official.apply_lora(_args(cfg), model)
    torch.manual_seed(2)
    images = torch.randn(2, 3, 32, 32)
    ours = _compare(openai_bb, cfg, model, layers, images, torch.tensor([1, 3]), cut=False, seed=123)
    torch.manual_seed(123)
    other = ours.logits(images, cut=False)
    torch.manual_seed(124)
    assert _rel(ours.logits(images, cut=False), other) > 1e-3  # the masks do change the result


def test_official_dropout_zero_backward_uses_the_unadapted_weight(openai_bb):
    """A documented difference: with dropout_rate 0 the official LinearLoRA merges B A into its weight,
    runs, then subtracts it in place (``.data``), so autograd sends gradients to earlier layers through W
    alone; its forward equals ours, its gradients of the earlier adapters do not."""
    cfg = LoRAConfig(encoder="vision", dropout_rate=0.0)
    model = _official_clip(openai_bb)
    layers = official.apply_lora(_args(cfg), model)
    ours = CLIPLoRA(openai_bb, NAMES, cfg)
    _randomise(ours)
    _copy_into_official(ours, layers)
    ours.train()
    model.train()
    images = torch.randn(2, 3, 32, 32)
    labels = torch.tensor([0, 1])
    mine, ref = ours.logits(images), _official_logits(model, openai_bb, images)
    assert _rel(mine, ref) <= 1e-5
    F.cross_entropy(mine, labels).backward()
    F.cross_entropy(ref, labels).backward()
    last = len(layers) - 1
    first_a = ours.adapter("vision", 0).q_A.grad
    assert _rel(first_a, layers[0].q_proj.w_lora_A.grad) > 1e-3  # earlier layer: gradient through W only
    assert _rel(ours.adapter("vision", last).q_A.grad, layers[last].q_proj.w_lora_A.grad) <= 1e-5


def test_eval_mode_equals_the_official_merged_eval(openai_bb):
    cfg = LoRAConfig(params="q,v,o", r=4, alpha=3)
    model = _official_clip(openai_bb)
    layers = official.apply_lora(_args(cfg), model)
    ours = CLIPLoRA(openai_bb, NAMES, cfg)
    _randomise(ours, seed=5)
    _copy_into_official(ours, layers)
    ours.eval()
    model.eval()  # the official merges B A into the weights here
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        mine, ref = ours.logits(images), _official_logits(model, openai_bb, images)
    assert _rel(mine, ref) <= 1e-5


def test_resnet_family_text_adapters_equal_the_official(resnet_bb):
    cfg = LoRAConfig(encoder="text", position="half-up", params="k,v,o", r=3, dropout_rate=0.0)
    bb = resnet_bb
    model = _official_clip(bb)
    layers = official.apply_lora(_args(cfg, backbone="RN50", dropout_rate=0.5), model)
    _no_dropout(model)
    images = torch.randn(2, 3, 64, 64)
    _compare(bb, cfg, model, layers, images, torch.tensor([3, 0]))


def test_resnet_image_tower_is_refused(resnet_bb):
    with pytest.raises(ValueError, match="adapts open_clip's ViT image towers; .* ModifiedResNet .* encoder='text'"):
        check_backbone(resnet_bb, LoRAConfig(encoder="both"))


def test_another_family_equals_the_official_modules(siglip_bb):
    """GELU, LayerScale, a non-causal last-token text tower in ``model.text`` (nothing is cut): the official
    PlainMultiheadAttentionLoRA put into open_clip's own blocks, as its apply_lora does."""
    bb = siglip_bb
    for encoder, position, params in (("both", "all", "q,k,v"), ("text", "top3", "o"), ("vision", "mid", "q,k,v,o")):
        cfg = LoRAConfig(encoder=encoder, position=position, params=params, r=2, dropout_rate=0.0)
        ours = CLIPLoRA(bb, NAMES, cfg)
        assert ours.cut == 16
        ref = copy.deepcopy(bb.model)
        layers = []
        for tower, blocks in (("text", ref.text.transformer.resblocks), ("vision", ref.visual.transformer.resblocks)):
            if tower not in cfg.towers:
                continue
            indices = official.INDEX_POSITIONS_TEXT[position]
            for i, block in enumerate(blocks):
                if i in indices:
                    lora = official.PlainMultiheadAttentionLoRA(block.attn, enable_lora=list(cfg.projections),
                                                                r=cfg.r, lora_alpha=cfg.alpha, dropout_rate=0.5)
                    block.attn = lora
                    layers.append(lora)
        _no_dropout(ref)
        _randomise(ours, seed=7)
        _copy_into_official(ours, layers)
        ours.train()
        images = torch.randn(2, 3, 32, 32)
        mine = ours.logits(images)
        text = F.normalize(ref.encode_text(ours.tokens), dim=-1)
        want = ref.logit_scale.exp() * F.normalize(ref.encode_image(images), dim=-1) @ text.T + ref.logit_bias \
            if ref.logit_bias is not None else ref.logit_scale.exp() * F.normalize(ref.encode_image(images), dim=-1) @ text.T
        assert _rel(mine, want) <= 1e-5
        F.cross_entropy(mine, torch.tensor([0, 1])).backward()
        F.cross_entropy(want, torch.tensor([0, 1])).backward()
        for g, r in zip([p.grad for p in ours.lora_parameters()], _official_grads(ours, layers)):
            assert _rel(g, r) <= 5e-5


# --- our own paths: cutting, merging, state ------------------------------------------------------


def test_cut_text_pass_equals_the_full_one(openai_bb):
    ours = CLIPLoRA(openai_bb, NAMES, LoRAConfig(encoder="text", params="q,k,v,o"))
    _randomise(ours, seed=3)
    assert ours.cut < 77
    ours.train()  # dropout on: the masks differ between the two passes, so compare with dropout off
    for m in ours.adapters.values():
        m.dropout_rate = 0.0
    a, b = ours.text_features(cut=True), ours.text_features(cut=False)
    assert _rel(a, b) <= 1e-5


def test_merged_encoders_equal_the_adapted_ones(openai_bb):
    cfg = LoRAConfig(params="q,k,v,o", r=4, alpha=2)
    ours = CLIPLoRA(openai_bb, NAMES, cfg).eval()
    _randomise(ours, seed=11)
    images = torch.randn(4, 3, 32, 32)
    with torch.enable_grad():  # the factored path, B (A x), as in training
        adapted = ours.view.encode_image(images).detach()
        text = ours.text_features().detach()
    encoder = ours.image_encoder()
    assert all(type(b.attn) is nn.MultiheadAttention for b in encoder.model.visual.transformer.resblocks)
    with torch.no_grad():
        merged = encoder(images)
    assert _rel(merged, adapted) <= 1e-5
    assert _rel(ours.class_weights(), ours.logit_scale * text) <= 1e-5
    # the merged text tower, as --with-text-encoder serves it: the template over any class name
    tmodel = ours.text_encoder()
    tokens = torch.as_tensor(openai_bb.tokenizer([cfg.template.format(n.replace("_", " ")) for n in NAMES]))
    with torch.no_grad():
        assert _rel(F.normalize(tmodel.encode_text(tokens), dim=-1), text) <= 1e-5
    # the merged state dict is the backbone's layout; the backbone itself is untouched
    sd = ours.merged_state_dict()
    base = openai_bb.model.state_dict()
    assert sd.keys() == base.keys()
    changed = sorted(k for k in sd if not torch.equal(sd[k], base[k]))
    assert changed and all(k.endswith(("attn.in_proj_weight", "attn.out_proj.weight")) for k in changed)
    assert type(openai_bb.model.visual.transformer.resblocks[0].attn) is nn.MultiheadAttention


def test_state_round_trip_and_refusals(openai_bb):
    cfg = LoRAConfig(encoder="vision", position="up", params="v,o", r=2)
    ours = CLIPLoRA(openai_bb, NAMES, cfg)
    _randomise(ours, seed=4)
    state = ours.state()
    assert sorted(state)[0] == "vision.10.o.lora_A" and state["vision.8.v.lora_B"].shape == (128, 2)
    other = CLIPLoRA(openai_bb, NAMES, cfg)
    other.load_state(state)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(other.eval().logits(images), ours.eval().logits(images))
    with pytest.raises(ValueError, match="missing .*vision.8.v.lora_A"):
        other.load_state({k: v for k, v in state.items() if k != "vision.8.v.lora_A"})
    bad = dict(state, **{"vision.8.v.lora_A": torch.full((2, 128), float("nan"))})
    with pytest.raises(ValueError, match="NaN"):
        other.load_state(bad)
    bad = dict(state, **{"vision.8.v.lora_A": torch.zeros(3, 128)})
    with pytest.raises(ValueError, match=r"shape \(3, 128\), expected \(2, 128\)"):
        other.load_state(bad)


# --- the recipe, runs, the command line ----------------------------------------------------------


def test_recipe_equals_the_official_steps(openai_bb):
    """Three steps of our train_step (fit's step: AdamW, cosine over iters x shots, CE on the scaled cosine)
    against the official run_lora iteration on the same images and adapters: the same adapters after."""
    cfg = LoRAConfig(encoder="both", dropout_rate=0.0, iters_per_shot=3)
    model = _official_clip(openai_bb)
    layers = official.apply_lora(_args(cfg, dropout_rate=0.5), model)
    _no_dropout(model)
    ours = CLIPLoRA(openai_bb, NAMES, cfg)
    _randomise(ours, seed=9)
    _copy_into_official(ours, layers)
    args = _args(cfg)
    opt_ref, sched_ref, scaler_ref = official.official_optimizer(args, model)
    dataset = types.SimpleNamespace(template=[cfg.template], classnames=NAMES)
    params = ours.lora_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.iters_per_shot * 1, eta_min=cfg.eta_min)
    ours.train()
    model.train()
    for step in range(3):
        images, target = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, step])
        loss_ref, _ = official.official_train_step(args, model, openai_bb.model.logit_scale.exp().item(), dataset,
                                                   images, target, None, opt_ref, sched_ref, scaler_ref,
                                                   lambda t: torch.as_tensor(openai_bb.tokenizer(t)))
        loss, _ = train_step(ours, images, target, opt, sched, torch.amp.GradScaler("cuda", enabled=False))
        assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    mine = ours.state()
    for i, name in enumerate(ours.adapter_names):
        ref = layers[i].q_proj.w_lora_B
        assert _rel(mine[f"{name}.q.lora_B"], ref) <= 1e-4  # Adam divides by sqrt(v): rounding grows, stays small
    assert sched.get_last_lr() == sched_ref.get_last_lr()


def test_fit_save_load_evaluate(tiny_backbone, image_folder, tmp_path):
    clf = coopkit.fit(image_folder / "train", method="clip-lora", backbone=tiny_backbone, shots=2, iters_per_shot=3,
                      r=4, params="q,v,o", progress=False)
    m = clf.config.metrics
    assert m["steps"] == 6 and m["epochs"] == 6 and len(m["history"]["loss"]) == 6
    assert not clf.model.frozen_encoder  # scored through its own encoder (coopkit bench)
    assert clf.config.method_config["r"] == 4 and clf.config.templates == ["a photo of a {}."]
    assert any(float(t.abs().max()) > 0 for k, t in clf.model.state().items() if k.endswith("lora_B"))
    run = clf.save(tmp_path / "run")
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "lora.safetensors"]
    back = coopkit.load(run, backbone=tiny_backbone)
    test = sorted(str(p) for p in (image_folder / "test").rglob("*.png"))[:6]
    np.testing.assert_array_equal(back.logits(test), clf.logits(test))
    # the logits are the merged encoder's, and equal the adapted (unmerged) computation
    pixels = torch.stack([tiny_backbone.preprocess(Image.open(p).convert("RGB")) for p in test])
    with torch.enable_grad():
        unmerged = clf.model.logits(pixels).detach()
    np.testing.assert_allclose(clf.logits(test), unmerged.numpy(), rtol=0, atol=1e-4)
    assert back.evaluate(image_folder / "test")["n"] == 24
    # new class names: the adapted text tower reads them in the template
    other = back.with_classes(["red", "blue"])
    assert other.class_weights().shape == (2, 64)
    np.testing.assert_allclose(other.class_weights().numpy(), back.class_weights()[[2, 0]].numpy(), atol=1e-5)
    # the whole fitted model, merged, for people who want the weights: open_clip loads it as a checkpoint
    import open_clip

    sd = back.model.merged_state_dict()
    assert sd.keys() == tiny_backbone.model.state_dict().keys()
    file = back.model.save_merged_weights(tmp_path / "merged.safetensors")
    plain = open_clip.create_model(tiny_backbone.name, pretrained=str(file)).eval()
    assert type(plain.visual.transformer.resblocks[0].attn) is nn.MultiheadAttention
    with torch.no_grad():
        np.testing.assert_allclose(F.normalize(plain.encode_image(pixels), dim=-1).numpy(),
                                   back.model.encode_image(pixels).numpy(), atol=1e-6)


def test_fit_refusals(tiny_backbone, image_folder):
    with pytest.raises(ValueError, match="position 'mid' selects no block of a 2-block tower"):
        coopkit.fit(image_folder / "train", method="clip-lora", position="mid", backbone=tiny_backbone, progress=False)
    with pytest.raises(ValueError, match="rank 0 adapts nothing"):
        coopkit.fit(image_folder / "train", method="clip-lora", r=0, backbone=tiny_backbone, progress=False)


def test_text_only_fit_uses_cached_image_features(tiny_backbone, image_folder):
    clf = coopkit.fit(image_folder / "train", method="clip-lora", encoder="text", backbone=tiny_backbone, shots=2,
                      iters_per_shot=2, progress=False, n_views=2)
    assert clf.model.adapter_names == ["text.0", "text.1"] and clf.model.frozen_encoder
    enc = clf.image_encoder()
    assert all(type(b.attn) is nn.MultiheadAttention for b in enc.model.visual.transformer.resblocks)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), tiny_backbone.model.encode_image(x))


def test_cli_fit_clip_lora(tiny_config, image_folder, tmp_path):
    from click.testing import CliRunner

    from coopkit.cli import main

    res = CliRunner().invoke(main, ["fit", str(image_folder / "train"), "--out", str(tmp_path / "lora"), "--model",
                                    str(tiny_config), "--pretrained", "none", "--device", "cpu", "--quiet", "--json",
                                    "--method", "clip-lora", "--shots", "2", "--iters-per-shot", "1", "--r", "3",
                                    "--encoder", "vision", "--clip-lora-lr", "1e-3"])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "lora" / "config.json").read_text())
    assert saved["method"] == "clip-lora" and saved["method_config"]["r"] == 3
    assert saved["method_config"]["lr"] == 1e-3 and saved["method_config"]["encoder"] == "vision"

    # coopkit export --merged-weights: the ONNX file and the merged open_clip checkpoint
    from safetensors.torch import load_file

    merged, onnx_file = tmp_path / "out" / "merged.safetensors", tmp_path / "out" / "lora.onnx"
    res = CliRunner().invoke(main, ["export", str(tmp_path / "lora"), "--out", str(onnx_file), "--merged-weights",
                                    str(merged), "--n-verify", "4", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["merged_weights"] == str(merged) and onnx_file.exists()
    back = coopkit.load(tmp_path / "lora", pretrained=None)
    written, expected = load_file(merged), back.model.merged_state_dict()
    assert written.keys() == expected.keys() == back.backbone.model.state_dict().keys()
    assert any(not torch.equal(expected[k], back.backbone.model.state_dict()[k]) for k in expected)  # LoRA merged in
    for k in expected:
        torch.testing.assert_close(written[k], expected[k], rtol=0, atol=0)


def test_export_merged_weights_refuses_a_method_without_them(tiny_backbone, tmp_path):
    """Any other method is refused in one line naming the methods that have merged weights; nothing is written."""
    from click.testing import CliRunner

    from coopkit.cli import main

    run = coopkit.zero_shot(tiny_backbone, ["red", "blue"]).save(tmp_path / "zs")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["export", str(run), "--out", str(out / "zs.onnx"), "--merged-weights",
                                    str(out / "merged.safetensors")])
    assert res.exit_code != 0
    assert "a zeroshot run has no merged weights; methods that have them: clip-lora" in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    assert not any(out.glob("*")) if out.exists() else True
    with pytest.raises(ValueError, match="methods that have them: clip-lora$"):
        coopkit.load(run, backbone=tiny_backbone).save_merged_weights(tmp_path / "m.safetensors")


# --- official files ------------------------------------------------------------------------------


def test_official_save_lora_file_imports_with_equal_logits(openai_bb, tmp_path):
    """save_lora's file, read through coopkit's safe unpickler, gives the logits of the official eval."""
    from coopkit.research.compat import import_official

    cfg = LoRAConfig(encoder="both", position="half-up", params="q,k,v,o", r=4, alpha=2)
    model = _official_clip(openai_bb)
    args = _args(cfg)
    args.save_path, args.dataset, args.shots, args.seed, args.filename = str(tmp_path), "dtd", 16, 1, "lora_weights"
    layers = official.apply_lora(args, model)
    ours = CLIPLoRA(openai_bb, NAMES, cfg)
    _randomise(ours, seed=13)
    _copy_into_official(ours, layers)
    official.save_lora(args, layers)
    path = tmp_path / "vitb16" / "dtd" / "16shots" / "seed1" / "lora_weights.pt"
    clf = import_official(path, NAMES, backbone=openai_bb)
    assert clf.method == "clip-lora" and clf.config.method_config["position"] == "half-up"
    images = torch.randn(3, 3, 32, 32)
    model.eval()  # the official evaluate_lora: merged weights
    with torch.no_grad():
        ref = _official_logits(model, openai_bb, images)
        mine = clf.head()(F.normalize(clf.image_encoder()(images), dim=-1))
    assert _rel(mine, ref) <= 1e-5
    official.load_lora(args, layers)  # the official reader accepts the file it wrote (sanity)
    other = tmp_path / "other.pt"
    torch.save({"weights": {"layer_0": {}}, "metadata": dict(r=2, alpha=1, encoder="text", params=["q"],
                                                             position="all")}, other)
    with pytest.raises(ValueError, match="other.pt: the file holds 1 adapted layers, but text/all .* adapts 12"):
        import_official(other, NAMES, backbone=openai_bb)
    bad = tmp_path / "bad.pt"
    torch.save({"weights": {}, "metadata": dict(r=0, alpha=1, encoder="text", params=["q"], position="all")}, bad)
    with pytest.raises(ValueError, match="rank 0"):
        import_official(bad, NAMES, backbone=openai_bb)


# --- export --------------------------------------------------------------------------------------


def test_export_merges_the_adapters(tiny_backbone, image_folder, tmp_path):
    """One fp32 file (the merged image encoder, constant class weights) read by the unchanged runtime:
    its logits are the classifier's; the text graph serves new class names with the template."""
    graphs = pytest.importorskip("coopkit.exporters.graphs")
    if not hasattr(graphs, "image_encoder"):
        pytest.skip("needs the exporter that traces classifier.image_encoder() (issue 20, branch wip-export)")
    from coopkit.exporters import export_onnx
    from coopkit.runtime import Classifier as RuntimeClassifier

    clf = coopkit.fit(image_folder / "train", method="clip-lora", backbone=tiny_backbone, shots=2, iters_per_shot=1,
                      params="q,k,v,o", progress=False)
    gen = torch.Generator().manual_seed(0)
    clf.model.load_state({k: torch.randn(v.shape, generator=gen) * 0.2 for k, v in clf.model.state().items()})
    res = export_onnx(clf, tmp_path / "lora.onnx", "fp32", with_text_encoder=True)
    paths = sorted(str(p) for p in (image_folder / "test").rglob("*.png"))
    frozen = coopkit.zero_shot(tiny_backbone, clf.classnames, clf.config.templates)
    assert np.abs(clf.logits(paths) - frozen.logits(paths)).max() > 1e-1  # the adapters matter here
    new = ["golden retriever", "fire_truck", "red"]
    with RuntimeClassifier(res.path, device="cpu") as rt:
        np.testing.assert_allclose(rt.logits(paths), clf.logits(paths), atol=2e-3, rtol=0)  # PIL vs torchvision
        np.testing.assert_allclose(rt.text_encoder.class_weights(new), clf.with_classes(new).class_weights().numpy(),
                                   atol=1e-4, rtol=0)


# --- open_clip families (shrunken configs: 1 block per tower) ------------------------------------

FAMILIES = [("coca_ViT-B-32", "both"), ("ViT-B-16-SigLIP2", "text"), ("ViT-H-14-worldwide", "both"),
            ("ViT-bigG-14-CLIPA", "both")]


@pytest.mark.parametrize("name,encoder", FAMILIES)
def test_families_merge_exactly(name, encoder, tmp_path):
    """CoCa (appended CLS, attentional pooling), SigLIP 2 (bidirectional text, last-token pooling; its real
    image tower is timm's: text only), MetaCLIP 2 (pooled at </s> by id), CLIPA: the cut text pass equals the
    full one, and the merged encoders equal the adapted ones."""
    from coopkit.research.families import build_family

    path, tok = build_family(name, tmp_path)
    bb = coopkit.load_backbone(str(path), pretrained=None, device="cpu", tokenizer=str(tok) if tok else None)
    cfg = LoRAConfig(encoder=encoder, params="q,k,v,o", r=2, dropout_rate=0.0)
    ours = CLIPLoRA(bb, ["cat", "golden retriever", "red_panda"], cfg)
    _randomise(ours, seed=1)
    size = bb.image_size
    images = torch.randn(2, 3, *size)
    with torch.enable_grad():
        cut, full = ours.text_features(cut=True).detach(), ours.text_features(cut=False).detach()
        adapted = ours.view.encode_image(images).detach()
    assert _rel(cut, full) <= 1e-5
    with torch.no_grad():
        assert _rel(ours.image_encoder()(images), adapted) <= 1e-5
        merged_text = ours.text_tower
        emb = merged_text.embed(ours.tokens)
        assert _rel(F.normalize(merged_text.encode(emb, ours.tokens).float(), dim=-1), full) <= 1e-5
    if encoder == "both":
        assert _rel(adapted, bb.model.encode_image(images).detach()) > 1e-3


def test_refused_families(tmp_path):
    from coopkit.research.families import build_family

    path, tok = build_family("xlm-roberta-base-ViT-B-32", tmp_path)
    bb = coopkit.load_backbone(str(path), pretrained=None, device="cpu", tokenizer=str(tok), text_model=str(tok))
    with pytest.raises(ValueError, match="adapts open_clip's own text transformer; .* Hugging Face encoder.*"
                                         "encoder='vision'"):
        check_backbone(bb, LoRAConfig(encoder="both"))
    check_backbone(bb, LoRAConfig(encoder="vision"))


def test_fit_with_loader_workers_repeats_for_a_seed(tiny_backbone, image_folder):
    """Images decoded and augmented in two loader processes: a seeded run repeats; unreadable images skipped."""
    runs = [coopkit.fit(image_folder / "train", method="clip-lora", encoder="vision", workers=2, shots=3,
                        iters_per_shot=1, batch_size=4, backbone=tiny_backbone, progress=False) for _ in range(2)]
    a, b = (r.model.state() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs[0].config.metrics["steps"] == 3 and runs[0].config.metrics["epochs"] == 1
    assert runs[0].config.metrics["history"]["lr"] == [2e-4]
    by_epochs = coopkit.fit(image_folder / "train", method="clip-lora", encoder="text", epochs=2, shots=3, batch_size=4,
                            backbone=tiny_backbone, progress=False)  # epochs, when given, replace iters_per_shot
    assert by_epochs.config.metrics["steps"] == 6 and by_epochs.config.metrics["epochs"] == 2


def test_bench_fewshot_scores_through_the_merged_encoder(tiny_backbone, image_folder):
    """coopkit bench's few-shot rows score a CLIP-LoRA run with its own (merged) image encoder (here most
    predictions differ from what the frozen encoder's features would give)."""
    from coopkit.features import encode_images
    from coopkit.research.experiments import fewshot_curves

    cfg = LoRAConfig(encoder="vision", iters_per_shot=5, params="q,k,v,o", lr=0.01)
    rows = fewshot_curves(image_folder / "train", image_folder / "test", backbone=tiny_backbone, shots=[2], seeds=[1],
                          methods=["clip-lora"], configs=[cfg], progress=False)
    clf = coopkit.fit(image_folder / "train", method="clip-lora", method_config=cfg, shots=2, seed=1,
                      backbone=tiny_backbone, progress=False)
    assert [r["method"] for r in rows] == ["clip-lora"]
    assert rows[0]["accuracy"] == pytest.approx(clf.evaluate(image_folder / "test")["accuracy"], abs=1e-6)
    test = sorted(str(p) for p in (image_folder / "test").rglob("*.png"))
    frozen = clf.head()(encode_images(tiny_backbone, test)[0][0]).argmax(1)
    assert int((frozen != torch.as_tensor(clf.logits(test)).argmax(1)).sum()) > len(test) // 4
