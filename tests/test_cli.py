"""The click CLI through CliRunner: fit, eval, zeroshot, export, help; every failure one line, output
paths checked before any work."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from click.testing import CliRunner
from helpers import image_graph, one_line_error

from coopkit.cli import main
from coopkit.runtime import Classifier as RuntimeClassifier


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


def test_every_command_has_help(runner):
    out = runner.invoke(main, ["--help"])
    assert out.exit_code == 0
    listing = out.output.split("Commands:")[1].strip().split("\n\n")[0]  # the epilog follows a blank line
    commands = [line.split()[0] for line in listing.splitlines()]
    assert {"fit", "eval", "zeroshot"} <= set(commands)
    for cmd in commands:
        res = runner.invoke(main, [cmd, "--help"])
        assert res.exit_code == 0, (cmd, res.output)
        assert "Usage:" in res.output


def test_fit_eval_zeroshot(runner, tiny_config, image_folder, tmp_path):
    run = tmp_path / "run"
    common = ["--model", str(tiny_config), "--pretrained", "none", "--device", "cpu"]
    res = runner.invoke(main, ["fit", str(image_folder / "train"), *common, "--out", str(run), "--shots", "4",
                               "--epochs", "3", "--n-ctx", "4", "--n-views", "1", "--no-augment", "-q", "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.output)
    assert result["classes"] == 4 and result["train_images"] == 16 and result["epochs"] == 3
    assert json.loads((run / "config.json").read_text())["train"]["augment"] is False

    res = runner.invoke(main, ["eval", str(run), str(image_folder / "test"), "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    ev = json.loads(res.output)
    assert ev["method"] == "coop" and ev["n"] == 24 and 0 <= ev["accuracy"] <= 1

    res = runner.invoke(main, ["eval", str(run), str(image_folder / "test"), "--device", "cpu", "--per-class"])
    assert res.exit_code == 0 and "accuracy" in res.output and "yellow" in res.output

    zs = tmp_path / "zs"
    res = runner.invoke(main, ["zeroshot", str(image_folder / "test"), *common, "--template", "a photo of a {}.",
                               "--template", "a {} thing.", "--out", str(zs)])
    assert res.exit_code == 0, res.output
    assert "zeroshot" in res.output and "images" in res.output
    assert json.loads((zs / "config.json").read_text())["templates"] == ["a photo of a {}.", "a {} thing."]


@pytest.mark.parametrize(
    "args,message",
    [
        (["fit", "/no/such/dir", "--out", "x"], "dataset not found: /no/such/dir"),
        (["fit", "{train}", "--out", "x", "--model", "ViT-B-33", "--pretrained", "none"], "unknown model 'ViT-B-33'; did you mean"),
        (["fit", "{train}", "--out", "x", "--shots", "0"], "shots must be an integer >= 1"),
        (["fit", "{train}", "--out", "x", "--n-ctx", "0"], "n_ctx must be an integer >= 1"),
        (["fit", "{train}", "--out", "x", "--ctx-init", " "], "ctx_init has no words"),
        (["eval", "/no/run", "{train}"], "run folder not found"),
        (["eval", "{train}", "{train}"], "is not a coopkit run"),
        (["zeroshot", "{train}", "--model", "{config}", "--pretrained", "none", "--template", "oops"], "exactly once"),
    ],
)
def test_bad_input_is_one_line_exit_2(runner, image_folder, tiny_config, args, message):
    args = [a.format(train=image_folder / "train", config=tiny_config) for a in args]
    one_line_error(runner.invoke(main, args), 2, message)


def test_bad_position_choice(runner, image_folder):
    res = runner.invoke(main, ["fit", str(image_folder / "train"), "--out", "x", "--position", "left"])
    assert res.exit_code == 2 and "'left' is not one of 'end', 'middle', 'front'" in res.output


def test_python_dash_m_runs_the_cli():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "coopkit", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Usage: coopkit" in out.stdout and "fit" in out.stdout


# --- failures: one line, output paths checked before any work ---------------------------------


@pytest.mark.parametrize("lr", ["nan", "inf", "-1"])
def test_cli_fit_refuses_a_non_finite_lr_before_any_work(image_folder, tmp_path, lr):
    res = CliRunner().invoke(main, ["fit", str(image_folder / "train"), "--out", str(tmp_path / "run"),
                                    "--lr", lr, "--model", "no-such-model"])
    one_line_error(res, 2, "lr must be a finite number > 0")
    assert not (tmp_path / "run").exists()


def test_cli_output_paths_are_checked_before_any_work(tmp_path, image_folder):
    runner = CliRunner()
    res = runner.invoke(main, ["demo", "--out", "/proc/x"])
    one_line_error(res, 2, "cannot save a run to /proc/x/run")
    assert "[1/5]" not in res.output
    res = runner.invoke(main, ["demo", "--out", str(tmp_path / "d"), "--device", "gpu"])
    one_line_error(res, 2, "unknown device 'gpu'; valid: auto, cpu, cuda, cuda:N")
    assert not (tmp_path / "d").exists()
    if not torch.cuda.is_available():
        res = runner.invoke(main, ["demo", "--out", str(tmp_path / "d"), "--device", "cuda"])
        one_line_error(res, 1, "no usable CUDA device")
        assert not (tmp_path / "d").exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    res = runner.invoke(main, ["fit", str(image_folder / "train"), "--out", str(a_file), "--model", "no-such-model"])
    one_line_error(res, 2, "it is a file; give a folder")
    res = runner.invoke(main, ["zeroshot", str(image_folder / "test"), "--out", str(a_file), "--model", "no-such-model"])
    one_line_error(res, 2, "it is a file")
    res = runner.invoke(main, ["bench", "fewshot", "--train", str(image_folder / "train"), "--test",
                               str(image_folder / "test"), "--seeds", "", "--out", str(tmp_path / "b"),
                               "--model", "no-such-model"])
    one_line_error(res, 2, "--seeds is empty")
    assert not (tmp_path / "b").exists()


def test_cli_export_out_ending_in_a_slash_is_a_folder(coop, tmp_path):
    run = coop.save(tmp_path / "run")
    runner = CliRunner()
    res = runner.invoke(main, ["export", str(run), "--out", str(tmp_path / "newdir") + "/", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["file"] == str(tmp_path / "newdir" / "model.onnx")
    assert (tmp_path / "newdir").is_dir() and RuntimeClassifier(tmp_path / "newdir" / "model.onnx", device="cpu")
    res = runner.invoke(main, ["export", str(run), "--out", str(tmp_path / "newdir"), "--json"])  # an existing folder
    assert res.exit_code == 0 and json.loads(res.output)["file"] == str(tmp_path / "newdir" / "model.onnx")


def test_cli_zeroshot_template_with_other_braces(tiny_config, image_folder):
    res = CliRunner().invoke(main, ["zeroshot", str(image_folder / "test"), "--model", str(tiny_config),
                                    "--pretrained", "none", "--device", "cpu", "--template", "a {x} photo of {}",
                                    "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["n"] == 24


# --- exit codes: bad input 2, environment 1, with hints true of the run ----------------------------


def test_diverging_training_is_bad_input_and_its_hint_is_true_of_the_run(runner, tiny_config, image_folder, tmp_path):
    """--lr 1e30 on a CPU (fp32) run: exit 2, and the hint does not suggest fp32 to a run already in fp32."""
    res = runner.invoke(main, ["fit", str(image_folder / "train"), "--model", str(tiny_config), "--pretrained", "none",
                               "--device", "cpu", "--out", str(tmp_path / "run"), "--shots", "2", "--epochs", "3",
                               "--warmup-epochs", "0", "--n-views", "1", "--no-augment", "--lr", "1e30", "-q"])
    one_line_error(res, 2, "at epoch", "lower lr (now ", "; this run already trains in fp32)")
    assert "precision='fp32'" not in res.output and not (tmp_path / "run").exists()


def test_divergence_hint_names_the_precision_each_run_trains_in():
    """The general rule: fp32 is suggested only to a run that does not already train in fp32."""
    from coopkit.methods.base import divergence_hint

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for device, precision, used in ((cpu, "auto", None), (cpu, "bf16", None), (cuda, "fp32", None),
                                    (cuda, "fp16", "fp16"), (cuda, "bf16", "bf16")):
        hint = divergence_hint(0.5, precision, device)
        assert hint.startswith("lower lr (now 0.5")
        if used is None:
            assert "precision='fp32'" not in hint and "already trains in fp32" in hint, (device, precision, hint)
        else:
            assert f"use precision='fp32' (this run trains in {used})" in hint, (device, precision, hint)


def test_a_path_too_long_for_the_file_system_is_bad_input(runner, image_folder, tmp_path):
    """--out whose name exceeds NAME_MAX: exit 2 (bad input), one line, not 1 (environment)."""
    model = tmp_path / "model.onnx"
    image_graph(model)
    out = tmp_path / ("x" * 300 + ".jsonl")
    res = runner.invoke(main, ["predict", str(model), str(image_folder / "test"), "--out", str(out), "--device", "cpu",
                               "--no-progress"])
    one_line_error(res, 2, "File name too long")


def test_every_path_error_is_bad_input_and_every_environment_error_is_not():
    """The general rule of classify_error for errors raised by the OS."""
    from coopkit.cli.base import EXIT_BAD_INPUT, EXIT_ENVIRONMENT, classify_error

    def os_error(code: int) -> OSError:
        return OSError(code, os.strerror(code), "/some/path")

    for code in (errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP):
        assert classify_error(os_error(code))[0] == EXIT_BAD_INPUT, errno.errorcode[code]
    for code in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EIO, errno.EMFILE):
        assert classify_error(os_error(code))[0] == EXIT_ENVIRONMENT, errno.errorcode[code]
    code, message = classify_error(os_error(errno.ENAMETOOLONG))
    assert message == "File name too long: /some/path"
