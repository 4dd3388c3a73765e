"""Official checkpoints written exactly as Dassl's trainer writes them, read without running their code."""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import coopkit
from coopkit.cli import main
from coopkit.research.compat import import_official, load_checkpoint, read_official_checkpoint

NAMES = ["blue", "green", "red", "yellow"]


class _PromptLearner(nn.Module):
    """The parameters and buffers of the official CoOp PromptLearner (what its state_dict holds)."""

    def __init__(self, ctx: torch.Tensor, extra: dict[str, torch.Tensor] = {}) -> None:  # noqa: B006
        super().__init__()
        self.ctx = nn.Parameter(ctx.clone())
        for name, value in extra.items():
            module, _, leaf = name.rpartition(".")
            owner = self
            for part in filter(None, module.split(".")):
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            owner.register_parameter(leaf, nn.Parameter(value))
        width = ctx.shape[-1]
        self.register_buffer("token_prefix", torch.zeros(len(NAMES), 1, width, dtype=ctx.dtype))
        self.register_buffer("token_suffix", torch.zeros(len(NAMES), 72, width, dtype=ctx.dtype))


def _dassl_warmup_scheduler():
    """A stand-in for ``dassl.optim.lr_scheduler.ConstantWarmupScheduler`` under its real module name:
    an LRScheduler that keeps its successor (the CosineAnnealingLR) as an attribute, as Dassl's does."""
    name = "dassl.optim.lr_scheduler"
    if name not in sys.modules:
        for m in ("dassl", "dassl.optim", name):
            sys.modules.setdefault(m, types.ModuleType(m))

        class ConstantWarmupScheduler(torch.optim.lr_scheduler.LRScheduler):
            def __init__(self, optimizer, successor, warmup_epoch, cons_lr):
                self.successor, self.warmup_epoch, self.cons_lr = successor, warmup_epoch, cons_lr
                super().__init__(optimizer)

            def get_lr(self):
                return [self.cons_lr for _ in self.base_lrs]

        ConstantWarmupScheduler.__module__ = name
        sys.modules[name].ConstantWarmupScheduler = ConstantWarmupScheduler
    return sys.modules[name].ConstantWarmupScheduler


def write_official(path, ctx, extra=None, epoch=50, val_result=None, keep_vars=False):
    """``Dassl SimpleTrainer.save_model`` + ``save_checkpoint``: state_dict, epoch, optimizer and scheduler
    state dicts (the warm-up scheduler's holds the pickled CosineAnnealingLR and, through it, SGD with its
    defaultdict state), val_result; built from a real SGD step and scheduler steps."""
    model = _PromptLearner(ctx, extra or {})
    optim = torch.optim.SGD([model.ctx], lr=0.002, momentum=0.9, weight_decay=5e-4)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optim, 50.0)
    sched = _dassl_warmup_scheduler()(optim, cosine, 1, 1e-5)
    model.ctx.grad = torch.ones_like(model.ctx)
    optim.step()
    sched.step()
    state = model.state_dict(keep_vars=keep_vars)
    torch.save({"state_dict": state, "epoch": epoch, "optimizer": optim.state_dict(),
                "scheduler": sched.state_dict(), "val_result": val_result}, path)
    return model.ctx.detach().float().clone()


def test_the_official_format_defeats_weights_only_loading(tmp_path):
    path = tmp_path / "model.pth.tar-50"
    write_official(path, torch.randn(4, 64))
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)  # why coopkit needs its own reader
    raw = load_checkpoint(path)
    assert raw["epoch"] == 50 and raw["val_result"] is None
    succ = raw["scheduler"]["successor"]
    assert type(succ).__name__ == "CosineAnnealingLR" and succ.global_name == "torch.optim.lr_scheduler.CosineAnnealingLR"
    assert type(succ.state["optimizer"]).__name__ == "SGD"  # inert placeholders, their state kept as data
    assert isinstance(raw["state_dict"]["ctx"], torch.Tensor)


@pytest.mark.parametrize("shape,dtype", [((4, 64), torch.float32), ((4, 4, 64), torch.float32), ((16, 64), torch.float16)])
def test_import_official_checkpoint(tiny_backbone, tmp_path, shape, dtype):
    ckpt = tmp_path / "model.pth.tar-50"
    ctx = write_official(ckpt, torch.randn(*shape).to(dtype), val_result=71.5)
    clf = import_official(ckpt, NAMES, backbone=tiny_backbone)
    assert torch.equal(clf.learner.ctx.detach(), ctx)
    assert clf.config.prompt.csc == (len(shape) == 3)  # a 2-D context is unified (also CSC + CTX_INIT runs)
    assert clf.config.metrics["official_epoch"] == 50 and clf.config.metrics["official_val_result"] == 71.5
    run = clf.save(tmp_path / "run")
    assert torch.equal(coopkit.load(run, backbone=tiny_backbone).learner.ctx, ctx)


def test_kgcoop_and_cocoop_import(tiny_backbone, tmp_path):
    kg = tmp_path / "kg.pth.tar-100"
    ctx = write_official(kg, torch.randn(4, 64), extra={"bias_vectors": torch.randn(1, 512),
                                                         "meta_net.linear1.weight": torch.randn(512, 512),
                                                         "meta_net.linear1.bias": torch.randn(512)})
    ck = read_official_checkpoint(kg)
    assert ck.trainer == "KgCoOp" and "bias_vectors" in ck.ignored
    assert torch.equal(import_official(kg, NAMES, backbone=tiny_backbone).learner.ctx.detach(), ctx)
    cocoop = tmp_path / "cocoop.pth.tar-10"  # CoCoOp imports (tests/test_cocoop.py: logits equal the official module's)
    meta = {"meta_net.linear1.weight": torch.randn(4, 64), "meta_net.linear1.bias": torch.randn(4),
            "meta_net.linear2.weight": torch.randn(64, 4), "meta_net.linear2.bias": torch.randn(64)}
    ctx = write_official(cocoop, torch.randn(4, 64), extra=meta)
    assert read_official_checkpoint(cocoop).trainer == "CoCoOp"
    clf = import_official(cocoop, NAMES, backbone=tiny_backbone)
    assert clf.method == "cocoop" and torch.equal(clf.model.state()["ctx"], ctx)
    assert all(torch.equal(clf.model.state()[k], v) for k, v in meta.items())
    wrong = tmp_path / "cocoop-wrong.pth.tar-10"  # a meta-net for 512-wide image features, on a 64-wide model
    write_official(wrong, torch.randn(4, 64), extra={**meta, "meta_net.linear1.weight": torch.randn(32, 512)})
    with pytest.raises(ValueError, match="meta_net.linear1.weight \\(32, 512\\) \\(expects \\(4, 64\\)\\)"):
        import_official(wrong, NAMES, backbone=tiny_backbone)
    # IVLP, MaPLe and PromptSRC checkpoints import (tests/test_deep_prompts.py, against the official modules)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_payload_never_runs_and_is_refused_by_name(tiny_backbone, tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pth.tar-50"
    torch.save({"state_dict": {"ctx": torch.randn(4, 64)}, "epoch": 50, "val_result": _Evil(marker)}, bad)
    with pytest.raises(ValueError, match=r"refusing .*evil.pth.tar-50: it names the global posix.system, .* "
                                         r"nothing from the file was run"):
        import_official(bad, NAMES, backbone=tiny_backbone)
    assert not marker.exists()
    res = CliRunner().invoke(main, ["import-official", str(bad), "--classes-from", str(tmp_path), "--out",
                                    str(tmp_path / "run")])
    assert not marker.exists()
    assert res.exit_code == 2


def test_non_checkpoints_say_so_in_one_line(tiny_backbone, tmp_path):
    with pytest.raises(FileNotFoundError):
        import_official(tmp_path / "nope", NAMES, backbone=tiny_backbone)
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match=r"junk is not a torch checkpoint \(") as e:
        import_official(junk, NAMES, backbone=tiny_backbone)
    assert "\n" not in str(e.value)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, other)
    with pytest.raises(ValueError, match="no 'ctx' tensor"):
        import_official(other, NAMES, backbone=tiny_backbone)
    wrong = tmp_path / "wrong.pt"
    write_official(wrong, torch.randn(4, 32))
    with pytest.raises(ValueError, match="does not fit"):
        import_official(wrong, NAMES, backbone=tiny_backbone)


def test_import_official_cli_with_an_official_dataset(official_root, tiny_config, tmp_path):
    ckpt = tmp_path / "prompt_learner" / "model.pth.tar-50"
    ckpt.parent.mkdir()
    write_official(ckpt, torch.randn(2, 2, 64))  # class-specific, trained on dtd's 2 base classes
    common = ["--model", str(tiny_config), "--pretrained", "none", "--device", "cpu"]
    args = ["import-official", str(ckpt), "--dataset", "dtd", "--root", str(official_root), *common]
    res = CliRunner().invoke(main, [*args, "--subsample", "base", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "imported CoOp context (2, 2, 64) for 2 classes" in res.output
    assert coopkit.load(tmp_path / "run").classnames == ["banded", "blotchy"]  # dtd's base half, in label order
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "run2")])
    assert res.exit_code == 2 and "class-specific context for 2 classes, but 4 class names given" in res.output
    res = CliRunner().invoke(main, ["import-official", str(ckpt), *common, "--out", str(tmp_path / "run3")])
    assert res.exit_code == 2 and "give either --classes-from PATH or --dataset NAME --root DATA" in res.output
