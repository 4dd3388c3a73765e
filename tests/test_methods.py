"""The method registry: lookups, one-line errors, fit() and the CLI for any registered method, and a
new method (its own config and tensors file) registered, fitted, saved and loaded through it alone."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

import coopkit
from coopkit import methods
from coopkit.cli import main
from coopkit.config import ConfigMixin, RunConfig
from coopkit.methods.base import MethodModel, Shots, logit_scale
from coopkit.research import baselines
from coopkit.research.protocols import DEFAULT_METHODS, METHODS


def test_the_registry_lists_every_method_once_in_order():
    assert methods.names()[:5] == ("zeroshot", "linear-probe", "clap", "tip-adapter", "tip-adapter-f")
    assert "coop" in methods.names() and len(set(methods.names())) == len(methods.names())
    # the bench rows of 0.2.0, in its order (methods registered later come after them)
    assert METHODS[:8] == ("zeroshot", "zeroshot-ensemble", "linear-probe", "clap", "tip-adapter", "tip-adapter-f",
                           "coop", "coop-csc")
    assert set(DEFAULT_METHODS) <= set(METHODS) and "zeroshot-ensemble" not in DEFAULT_METHODS
    coop = methods.get("coop")
    assert coop.tensors_file == "ctx.safetensors" and coop.text_graph and coop.config is coopkit.PromptConfig
    assert methods.get("tip-adapter").tensors_file == methods.get("clap").tensors_file == "head.safetensors"
    assert methods.get("zeroshot").fit is None and methods.get("zeroshot").tensors_file is None
    with pytest.raises(ValueError, match=r"unknown method 'magic'; valid: zeroshot, linear-probe, .*coop"):
        methods.get("magic")
    with pytest.raises(ValueError, match=r"already registered"):
        methods.register(dataclasses.replace(methods.get("clap"), name="clap2", variants={"coop-csc": {}},
                                             bench_default=()))
    with pytest.raises(ValueError, match="unknown protocols"):
        methods.Method(name="x", summary="x", build=lambda *a: None, protocols=("zeroshot",))


def test_fit_reads_the_registry_for_a_baseline(tiny_backbone, image_folder, tmp_path):
    """fit(method="linear-probe") gives the probe the research helper fits on the same drawn shots."""
    clf = coopkit.fit(image_folder / "train", method="linear-probe", backbone=tiny_backbone, shots=4, seed=2,
                      progress=False)
    sample = coopkit.few_shot(coopkit.load_dataset(image_folder / "train"), 4, 2)
    ref = baselines.linear_probe(tiny_backbone, baselines.encode_fewshot(tiny_backbone, sample, augment=False), seed=2)
    torch.testing.assert_close(clf.class_weights(), ref.class_weights(), atol=0, rtol=0)
    assert clf.method == "linear-probe" and clf.config.train.shots == 4 and clf.config.data is not None
    back = coopkit.load(clf.save(tmp_path / "run"), backbone=tiny_backbone)
    test = sorted(str(p) for p in (image_folder / "test").rglob("*.png"))[:6]
    np.testing.assert_array_equal(back.logits(test), clf.logits(test))
    with pytest.raises(ValueError, match="trains nothing; use coopkit.zero_shot"):
        coopkit.fit(image_folder / "train", method="zeroshot", backbone=tiny_backbone)
    with pytest.raises(ValueError, match="method_config must be a ClapConfig, got PromptConfig"):
        coopkit.fit(image_folder / "train", method="clap", method_config=coopkit.PromptConfig(), backbone=tiny_backbone)
    with pytest.raises(ValueError, match="unknown settings \\['n_ctx'\\]"):
        coopkit.fit(image_folder / "train", method="clap", n_ctx=4, backbone=tiny_backbone)


def test_cli_fit_takes_any_method_and_its_own_options(tiny_config, image_folder, tmp_path):
    common = ["--model", str(tiny_config), "--pretrained", "none", "--device", "cpu", "-q", "--json"]
    res = CliRunner().invoke(main, ["fit", str(image_folder / "train"), "--out", str(tmp_path / "clap"), *common,
                                    "--method", "clap", "--clap-epochs", "2", "--no-constraint", "--shots", "2",
                                    "--n-views", "1"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["method"] == "clap"
    saved = json.loads((tmp_path / "clap" / "config.json").read_text())
    assert saved["method"] == "clap" and saved["method_config"] == {"epochs": 2, "lr": 0.1, "batch_size": 256,
                                                                     "constraint": False}
    res = CliRunner().invoke(main, ["fit", str(image_folder / "train"), "--out", str(tmp_path / "x"), *common,
                                    "--clap-epochs", "2"])
    assert res.exit_code == 2 and "'epochs' is a setting of clap, not of coop" in res.output
    res = CliRunner().invoke(main, ["fit", str(image_folder / "train"), "--out", str(tmp_path / "x"), *common,
                                    "--method", "tip-adapter", "--n-ctx", "4"])
    assert res.exit_code == 2 and "'n_ctx' is a setting of coop, not of tip-adapter" in res.output


# --- a new method, registered from outside the package: one module's worth of code -------------------


@dataclasses.dataclass
class CentroidConfig(ConfigMixin):
    """Nearest class centroid, scaled."""

    scale: float = dataclasses.field(default=1.0, metadata={"help": "multiplies exp(logit_scale)"})

    def __post_init__(self) -> None:
        if not isinstance(self.scale, (int, float)) or not self.scale > 0:
            raise ValueError(f"scale must be a number > 0, got {self.scale!r}")


class CentroidModel(MethodModel):
    def __init__(self, backbone, classnames, centroids: torch.Tensor, config: CentroidConfig) -> None:
        super().__init__(backbone, classnames)
        self.centroids, self.config = centroids, config

    def compute_class_weights(self) -> torch.Tensor:
        return self.config.scale * logit_scale(self.backbone) * F.normalize(self.centroids, dim=-1)

    def state(self) -> dict[str, torch.Tensor]:
        return {"centroids": self.centroids.contiguous()}


def _fit_centroids(backbone, shots: Shots, config, train, *, progress=False, callback=None):
    feats = shots.features(backbone, augment=False)
    centroids = torch.stack([feats.feats[0][feats.labels == c].mean(0) for c in range(len(shots.classnames))])
    return CentroidModel(backbone, shots.classnames, centroids, config), {"train_images": len(feats.labels)}


def _build_centroids(backbone, run: RunConfig, tensors):
    spec = methods.get(run.method)
    if set(tensors or {}) != {"centroids"}:
        raise ValueError(f"must hold one tensor 'centroids', holds {sorted(tensors or {})}")
    return CentroidModel(backbone, run.classnames, tensors["centroids"], spec.run_config(run))


@pytest.fixture
def centroid_method():
    spec = methods.register(methods.Method(
        name="test-centroid", summary="nearest class centroid", build=_build_centroids, config=CentroidConfig,
        tensors_file="centroids.safetensors", fit=_fit_centroids, protocols=("fewshot",)))
    yield spec
    methods.unregister(spec.name)


def test_a_new_method_fits_saves_and_loads_through_the_registry(centroid_method, tiny_backbone, image_folder,
                                                                tmp_path, check_tensors_file_guarded):
    clf = coopkit.fit(image_folder / "train", method="test-centroid", scale=2.0, shots=3, backbone=tiny_backbone,
                      progress=False)
    sample = coopkit.few_shot(coopkit.load_dataset(image_folder / "train"), 3, 1)
    feats = baselines.encode_fewshot(tiny_backbone, sample, augment=False)
    by_hand = torch.stack([F.normalize(feats.feats[0][feats.labels == c].mean(0), dim=-1) for c in range(4)])
    torch.testing.assert_close(clf.class_weights(), 2.0 * logit_scale(tiny_backbone) * by_hand)
    run = clf.save(tmp_path / "run")
    assert sorted(p.name for p in run.iterdir()) == ["centroids.safetensors", "config.json"]
    saved = json.loads((run / "config.json").read_text())
    assert saved["method_config"] == {"scale": 2.0} and len(saved["tensors_sha256"]) == 64
    back = coopkit.load(run, backbone=tiny_backbone)
    assert back.model.config == CentroidConfig(2.0) and not back.text_graph
    test = sorted(str(p) for p in (image_folder / "test").rglob("*.png"))[:5]
    np.testing.assert_array_equal(back.logits(test), clf.logits(test))
    check_tensors_file_guarded(run, "centroids.safetensors", "test-centroid", tiny_backbone)


def test_the_runtime_takes_any_method_name_from_a_file():
    """A file's method is informational for the torch-free runtime: any non-empty name, even one this
    coopkit does not register, is read; an empty one is refused."""
    from coopkit.runtime.contract import MetadataError, ModelMetadata

    meta = ModelMetadata.from_json(ModelMetadata(["a", "b"], (32, 32), method="a-method-from-the-future").to_json())
    assert meta.method == "a-method-from-the-future"
    with pytest.raises(MetadataError, match="method must be a non-empty string"):
        ModelMetadata(["a", "b"], (32, 32), method=" ")


class _Shifted(torch.nn.Module):
    """An image encoder that moves every feature towards one direction (a method that changes the encoder)."""

    def __init__(self, model, shift: torch.Tensor) -> None:
        super().__init__()
        self.model, self.shift = model, shift

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels) + self.shift  # (b, D)


class ShiftedCentroidModel(CentroidModel):
    def image_encoder(self) -> torch.nn.Module:
        norm = self.backbone.model.encode_image(torch.zeros(1, 3, 32, 32)).norm()
        return _Shifted(self.backbone.model, 20 * norm * F.normalize(self.centroids[0], dim=-1))


def _fit_shifted(backbone, shots, config, train, *, progress=False, callback=None):
    model, metrics = _fit_centroids(backbone, shots, config, train)
    return ShiftedCentroidModel(backbone, model.classnames, model.centroids, config), metrics


@pytest.fixture
def shifted_method():
    spec = methods.register(methods.Method(
        name="test-shifted", summary="centroids, scored on shifted features", build=_build_centroids,
        config=CentroidConfig, tensors_file="centroids.safetensors", fit=_fit_shifted, protocols=("fewshot",)))
    yield spec
    methods.unregister(spec.name)


def test_a_method_with_its_own_image_encoder_is_scored_through_it(shifted_method, tiny_backbone, image_folder):
    """The classifier and the bench encode images through the method's encoder, not the frozen one."""
    from coopkit.research.experiments import fewshot_curves

    clf = coopkit.fit(image_folder / "train", method="test-shifted", shots=3, backbone=tiny_backbone, progress=False)
    assert not clf.model.frozen_encoder and coopkit.zero_shot(tiny_backbone, clf.classnames).model.frozen_encoder
    path = sorted(str(p) for p in (image_folder / "test").rglob("*.png"))[0]
    pixels = tiny_backbone.preprocess(Image.open(path).convert("RGB"))[None]  # (1, 3, H, W)
    with torch.no_grad():
        by_hand = clf.head()(F.normalize(clf.image_encoder()(pixels), dim=-1))
    np.testing.assert_allclose(clf.logits([path]), by_hand.numpy(), atol=1e-5, rtol=0)
    shifted = clf.evaluate(image_folder / "test")["accuracy"]
    rows = fewshot_curves(image_folder / "train", image_folder / "test", backbone=tiny_backbone, shots=(3,), seeds=(1,),
                          methods=["test-shifted"], progress=False)
    assert [r["accuracy"] for r in rows] == [pytest.approx(shifted, abs=1e-6)]


def test_each_protocol_runs_the_methods_registered_for_it():
    from coopkit.research.experiments import protocol_methods

    assert [m.name for m in protocol_methods("shift")][:2] == ["zeroshot", "coop"]
    assert [m.name for m in protocol_methods("base2new", ["coop"])] == ["coop"]
    with pytest.raises(ValueError, match=r"methods \['linear-probe'\] do not run in the shift protocol; those that "
                                         r"do: zeroshot, coop"):
        protocol_methods("shift", ["coop", "linear-probe"])


def test_base2new_and_shift_default_to_each_methods_bench_default():
    """The default rows of ``bench base2new`` / ``shift`` are the methods whose ``bench_default`` holds
    their name for that protocol (zero-shot, CoOp, CoCoOp), not every method registered for it; the
    expensive ones (deep prompts, CLIP-LoRA) run when named. The few-shot defaults are unchanged."""
    from coopkit.research.experiments import protocol_methods

    for protocol in ("base2new", "shift"):
        assert [m.name for m in protocol_methods(protocol)] == ["zeroshot", "coop", "cocoop"]
        assert methods.method_names(protocol, default=True) == ("zeroshot", "coop", "cocoop")
        everyone = methods.method_names(protocol)
        assert {"ivlp", "maple", "promptsrc", "clip-lora"} <= set(everyone)
        assert [m.name for m in protocol_methods(protocol, ["clip-lora", "zeroshot"])] == ["zeroshot", "clip-lora"]
        help_text = CliRunner().invoke(main, ["bench", protocol, "--help"], terminal_width=400).output
        assert "[default: zeroshot,coop,cocoop]" in " ".join(help_text.split())
    assert "cocoop" in METHODS and "cocoop" not in DEFAULT_METHODS and "clip-lora" not in DEFAULT_METHODS
    toy = methods.Method(name="toy-default", summary="x", build=lambda *a: None, fit=lambda *a, **k: None,
                         protocols=("fewshot", "shift"), bench_default=("toy-default",),
                         bench_default_protocols=("shift",))
    methods.register(toy)
    try:
        assert methods.method_names("shift", default=True)[-1] == "toy-default"
        assert "toy-default" not in methods.for_protocol("fewshot", default=True)
        assert "toy-default" in methods.for_protocol("fewshot")
    finally:
        methods.unregister("toy-default")
    with pytest.raises(ValueError, match="unknown protocols"):
        methods.Method(name="x", summary="x", build=lambda *a: None, bench_default_protocols=("b2n",))


def test_domain_shift_runs_the_chosen_methods_only(tiny_backbone, image_folder):
    from coopkit.research.experiments import domain_shift

    rows = domain_shift(image_folder / "train", {"t": image_folder / "test"}, backbone=tiny_backbone, shots=1,
                        seeds=(1,), epochs=1, n_views=1, progress=False, methods=["zeroshot"])
    assert [(r["method"], r["seed"]) for r in rows] == [("zeroshot", 0)]
