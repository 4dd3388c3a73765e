"""coopkit.runtime against open_clip itself: preprocessing, tokenisation and exported models; the
runtime and the PyTorch classifier refuse the same bad class names and bad images, item by item.

Skipped where torch / open_clip are not installed (the torch-free CI environment).
"""

from __future__ import annotations

import random
import sys
import time
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageOps

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

import coopkit  # noqa: E402
from coopkit.runtime import Classifier as RuntimeClassifier  # noqa: E402
from coopkit.runtime import ImageDecodeError  # noqa: E402
from coopkit.runtime.preprocess import load_image, preprocess  # noqa: E402
from coopkit.runtime.tokenizers import clip_bpe  # noqa: E402
from coopkit.runtime.tokenizers.cleaning import clean_text, ftfy_module  # noqa: E402
from coopkit.runtime.tokenizers.clip_bpe import ClipTokenizer, split_words  # noqa: E402


def _photo(width: int, height: int, seed: int) -> np.ndarray:
    """A photo-like image: smooth colour fields, a hard-edged disc, texture and sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            128 + 100 * np.sin(xx / width * (2 + seed % 3) + 0.5 * yy / height),
            128 + 90 * np.cos(yy / height * 3.0 + seed),
            100 + 80 * np.sin((xx + yy) / (width + height) * 5.0),
        ],
        axis=-1,
    )
    disc = (xx - width * 0.55) ** 2 + (yy - height * 0.45) ** 2 < (0.25 * min(width, height)) ** 2
    base[disc] = (240, 200, 40)
    base += 20 * np.sin(xx * 0.9)[..., None] * np.cos(yy * 0.7)[..., None]  # fine texture
    base += rng.normal(0, 5, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, Any]]:
    """Real files: JPEG/PNG, odd sizes, portrait and landscape, grey, RGBA, palette, EXIF-rotated.

    Each comes with the PIL image open_clip should be given (EXIF applied, as coopkit's loader
    does; open_clip itself ignores EXIF) or ``None`` to feed open_clip ``load_image``'s output."""
    root = tmp_path_factory.mktemp("runtime_images")
    files: list[tuple[Path, Any]] = []
    for i, (w, h) in enumerate([(640, 480), (480, 640), (333, 517), (517, 333), (224, 224), (225, 223), (1001, 97), (17, 29), (3, 2)]):
        path = root / f"photo_{w}x{h}.jpg"
        Image.fromarray(_photo(w, h, i)).save(path, quality=90)
        files.append((path, Image.open(path)))
    grey = root / "grey_301x199.png"
    Image.fromarray(_photo(301, 199, 20)[..., 1], mode="L").save(grey)
    files.append((grey, Image.open(grey)))  # open_clip on the L image directly (converts after resizing)
    rgba = root / "rgba_250x400.png"
    alpha = np.full((400, 250, 1), 255, np.uint8)  # opaque: open_clip's own RGBA handling agrees
    Image.fromarray(np.concatenate([_photo(250, 400, 21), alpha], axis=2), mode="RGBA").save(rgba)
    files.append((rgba, Image.open(rgba)))
    translucent = root / "translucent_199x301.png"
    alpha = (np.arange(301)[:, None, None] * np.ones((1, 199, 1)) * 255 / 300).astype(np.uint8)
    Image.fromarray(np.concatenate([_photo(199, 301, 22), alpha], axis=2), mode="RGBA").save(translucent)
    files.append((translucent, None))  # alpha dropped before resizing, as for training
    palette = root / "palette_320x200.png"
    Image.fromarray(_photo(320, 200, 23)).convert("P", palette=Image.Palette.ADAPTIVE).save(palette)
    files.append((palette, None))  # Pillow resizes "P" images nearest-neighbour; coopkit decodes to RGB first
    for orientation in (3, 6, 8):
        path = root / f"exif{orientation}_400x300.jpg"
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(_photo(400, 300, 30 + orientation)).save(path, exif=exif, quality=92)
        files.append((path, ImageOps.exif_transpose(Image.open(path))))
    return files


PREPROCESS_CASES = [
    dict(image_size=(224, 224), resize_mode="shortest", interpolation="bicubic"),
    dict(image_size=(224, 224), resize_mode="shortest", interpolation="bilinear"),
    dict(image_size=(64, 64), resize_mode="longest", interpolation="bicubic", fill_color=0),
    dict(image_size=(96, 96), resize_mode="longest", interpolation="bilinear", fill_color=128),
    dict(image_size=(64, 64), resize_mode="squash", interpolation="bicubic"),
    dict(image_size=(240, 160), resize_mode="shortest", interpolation="bilinear"),
    dict(image_size=(96, 128), resize_mode="longest", interpolation="bicubic", fill_color=255),
    dict(image_size=(80, 120), resize_mode="squash", interpolation="bilinear"),
]


@pytest.mark.parametrize("case", PREPROCESS_CASES, ids=lambda c: f"{c['resize_mode']}-{c['interpolation']}-{c['image_size']}")
def test_preprocess_matches_open_clip(case: dict[str, Any], image_files: list[tuple[Path, Any]]) -> None:
    size = case["image_size"]
    transform = open_clip.image_transform(
        size,
        is_train=False,
        resize_mode=case["resize_mode"],
        interpolation=case["interpolation"],
        fill_color=case.get("fill_color", 0),
    )
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
    for path, reference_input in image_files:
        ref = transform(reference_input if reference_input is not None else load_image(path))  # (3, H, W)
        ref_uint8 = ((ref * std + mean) * 255).permute(1, 2, 0).numpy()  # back to grey levels
        ours = preprocess(path, size, case["resize_mode"], case["interpolation"], case.get("fill_color", 0))
        assert ours.shape == (*size, 3) and ours.dtype == np.uint8
        diff = np.abs(ours.astype(np.float64) - ref_uint8).max()
        assert diff <= 1.0, f"{path.name}: {diff} grey levels off"


def test_preprocess_matches_the_training_side(tiny_backbone: Any, image_files: list[tuple[Path, Any]]) -> None:
    # coopkit's training/evaluation path: load_image, then the backbone's open_clip transform
    cfg = tiny_backbone.preprocess_cfg
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    for path, _ in image_files:
        ref = ((tiny_backbone.preprocess(load_image(path)) * std + mean) * 255).permute(1, 2, 0).numpy()
        ours = preprocess(path, tiny_backbone.image_size, cfg["resize_mode"], cfg["interpolation"], cfg["fill_color"])
        assert np.abs(ours - ref).max() <= 1.0, path.name


# --- tokenizer ---------------------------------------------------------------------------------

_PIECES = [
    "dog", "Golden Retriever", "a photo of a", "café", "naïve", "Ångström", "straße", "İstanbul",
    "it's", "DON'T", "we'RE", "they'll", "I'd", "you've", "I'M", "'ſ", "x''s", "ﬁsh", "ﬂower",
    "ＦＵＬＬ", "“quoted”", "‘single’", "&amp;", "&lt;b&gt;", "&quot;hi&quot;", "<start_of_text>",
    "<END_OF_TEXT>", "日本語", "東京タワー", "한국어", "Ελληνικά", "русский", "عربى", "हिन्दी",
    "१२३", "½", "Ⅻ", "2024", "3.14", "1,000,000", "e-mail", "C++", "#tag", "@user", "😀🐶",
    "👍🏽", "\t tab", "\n", "  ", "e\u0301", "ǅ", "\u2028", "\x00", "\x1c", "co-op", "model_v2",
    "(x)", "...", "—", "–", "ﬆ", "ŉ", "\u3000", "ﾀｰﾝ", "\ufeff", "\u200b", "𝒥", "ℋ", "K",
    "µ", "ß", "ĳ", "ⅸ", "¹²³", "٣", "X X X X", "sea turtle.", "n/a", "100%", "$5", "U.S.A.",
    "mother-in-law", "rock'n'roll", "o'clock", "\x85", "\x9c", "Ǆungla", "ＡＢＣ１２３",
]  # fmt: skip


def _varied_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = list(_PIECES)
    while len(out) < n:
        k = rng.randint(1, 6)
        parts = [rng.choice(_PIECES) for _ in range(k)]
        out.append((" " if rng.random() < 0.75 else "").join(parts))
    out.append("word " * 120)  # longer than the context: truncated, ends with the end token
    out.append("")
    return out


def test_tokenizer_matches_open_clip() -> None:
    texts = _varied_strings(400)
    ours = ClipTokenizer()(texts)
    ref = open_clip.tokenize(texts).numpy()
    mismatched = [t for t, a, b in zip(texts, ours, ref) if not np.array_equal(a, b)]
    assert not mismatched, mismatched[:5]
    assert ClipTokenizer()(texts[:3], context_length=16).tolist() == open_clip.tokenize(texts[:3], context_length=16).tolist()


#: What ftfy repairs as mojibake (the issue's examples among them), mixed into the fuzz below.
_MOJIBAKE = ["Æ½", "é½'", "cafÃ©", "sÃ³", "Ã¼ber", "â€œquotedâ€\x9d", "&Atilde;&copy;", "naÃ¯ve", "Ã", "Â½"]


def _fuzzed_strings(n: int, seed: int) -> list[str]:
    """The varied strings, plus pieces of mojibake-prone characters (Latin-1 and cp1252) in random mixes."""
    rng = random.Random(seed)
    alphabet = [chr(c) for c in range(0xA0, 0x100)] + list("€‚ƒ„…†‡ˆ‰Š‹ŒŽ‘’“”•–—˜™š›œžŸ") + list("ab '&;.")
    out = _varied_strings(n // 2, seed) + _MOJIBAKE
    while len(out) < n:
        out.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))))
    return out


@pytest.fixture()
def without_ftfy(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A runtime install without ftfy: ``import ftfy`` fails while the test runs."""
    monkeypatch.setitem(sys.modules, "ftfy", None)
    ftfy_module.cache_clear()
    yield
    monkeypatch.undo()
    ftfy_module.cache_clear()


def test_tokenizer_equals_open_clip_on_every_string_with_ftfy() -> None:
    texts = _fuzzed_strings(3000, seed=3)
    ours, ref = ClipTokenizer()(texts), open_clip.tokenize(texts).numpy()
    assert [t for t, a, b in zip(texts, ours, ref) if not np.array_equal(a, b)] == []


def test_tokenizer_without_ftfy_equals_open_clip_or_refuses_in_one_line(without_ftfy: Any) -> None:
    """Without ftfy, no string is tokenised differently from training (open_clip with ftfy):
    each one gives open_clip's ids or a one-line error naming ftfy; plain ASCII names still work."""
    from coopkit.runtime.extras import MissingExtraError

    tok = ClipTokenizer()
    texts = _fuzzed_strings(3000, seed=4)
    ref = open_clip.tokenize(texts).numpy()  # open_clip imported ftfy before the test hid it
    differ, refused = [], []
    for text, want in zip(texts, ref):
        try:
            got = tok([text])[0]
        except MissingExtraError as e:
            assert "needs ftfy" in str(e) and "\n" not in str(e), str(e)
            refused.append(text)
            continue
        if not np.array_equal(got, want):
            differ.append(text)
    assert differ == [], differ[:10]
    assert set(_MOJIBAKE) <= set(refused)
    assert len(refused) < len(texts)  # plain ASCII names are tokenised
    assert tok(["Golden Retriever", "a photo of a dog."]).tolist() == open_clip.tokenize(
        ["Golden Retriever", "a photo of a dog."]).tolist()


def test_ftfy_leaves_the_text_the_runtime_tokenises_without_it_unchanged() -> None:
    """The rule the fallback rests on: ftfy.fix_text returns printable ASCII, tabs and newlines
    without ``&`` unchanged, in any combination (fuzzed)."""
    ftfy = pytest.importorskip("ftfy")
    rng = random.Random(5)
    alphabet = [chr(c) for c in range(0x20, 0x7F) if chr(c) != "&"] + ["\t", "\n", "<", "'", '"', "`", "amp;", "  "]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(3000)]
    assert [t for t in texts if ftfy.fix_text(t) != t] == []


def test_pre_tokenizer_agrees_with_regex_everywhere() -> None:
    regex = pytest.importorskip("regex")
    from open_clip.tokenizer import _tokenizer

    for text in _varied_strings(300, seed=2):
        cleaned = clean_text(text)
        assert split_words(cleaned) == regex.findall(_tokenizer.pat, cleaned), text
    # every assigned code point falls in the same class (\p{L}, \p{N}, \s or other) as in regex
    letter, number, space = regex.compile(r"\p{L}"), regex.compile(r"\p{N}"), regex.compile(r"\s")
    bad = []
    for cp in range(0x110000):
        ch = chr(cp)
        if unicodedata.category(ch) in ("Cn", "Cs"):
            continue  # unassigned in this Python's Unicode tables (regex may know newer ones)
        want = "L" if letter.match(ch) else "N" if number.match(ch) else "S" if space.match(ch) else "O"
        if clip_bpe.char_class(ch) != want:
            bad.append(hex(cp))
    assert not bad, bad[:20]


# --- exported by coopkit, served by the runtime ------------------------------------------------


def _export_onnx() -> Any:
    exporters = pytest.importorskip("coopkit.exporters")
    fn = getattr(exporters, "export_onnx", None)
    if fn is None:
        pytest.skip("coopkit.exporters.export_onnx is not available")
    return fn


COLOURS = ["red", "green", "blue", "yellow"]


def test_exported_zero_shot_model_matches_pytorch(tiny_backbone: Any, image_files: list[tuple[Path, Any]], tmp_path: Path) -> None:
    import coopkit
    from coopkit.runtime import Classifier

    export_onnx = _export_onnx()
    torch_clf = coopkit.zero_shot(tiny_backbone, COLOURS)
    path = tmp_path / "tiny.onnx"
    export_onnx(torch_clf, path, precision="fp32")
    rt = Classifier(path, device="cpu")
    assert rt.classnames == COLOURS and rt.image_size == tiny_backbone.image_size
    paths = [p for p, _ in image_files]
    # end to end: coopkit's decode + open_clip transform + PyTorch vs the runtime's own path
    np.testing.assert_allclose(rt.logits(paths), torch_clf.logits(paths), rtol=1e-3, atol=1e-3)
    want = torch_clf.image_features(paths).numpy()
    np.testing.assert_allclose(rt.embed(paths), want, rtol=1e-3, atol=1e-4)
    assert [r.label for r in rt.predict(paths)] == [r.label for r in torch_clf.predict(paths)]


def test_exported_text_encoder_set_classes_matches_pytorch(tiny_backbone: Any, image_files: list[tuple[Path, Any]], tmp_path: Path) -> None:
    import coopkit
    from coopkit.runtime import Classifier

    export_onnx = _export_onnx()
    path = tmp_path / "tiny_text.onnx"
    export_onnx(coopkit.zero_shot(tiny_backbone, COLOURS, templates=["a photo of a {}.", "a {} thing."]), path, with_text_encoder=True)
    rt = Classifier(path, device="cpu")
    names = ["sky_blue", "grass", "Ångström"]
    rt.set_classes(names)
    torch_clf = coopkit.zero_shot(tiny_backbone, names, templates=["a photo of a {}.", "a {} thing."])
    paths = [p for p, _ in image_files]
    np.testing.assert_allclose(rt.logits(paths), torch_clf.logits(paths), rtol=1e-3, atol=1e-3)
    assert rt.classnames == names


def test_exported_coop_text_encoder_set_classes_matches_pytorch(
    tiny_backbone: Any, image_folder: Path, image_files: list[tuple[Path, Any]], tmp_path: Path
) -> None:
    import coopkit
    from coopkit.prompts import PromptLearner
    from coopkit.runtime import Classifier

    export_onnx = _export_onnx()
    fitted = coopkit.fit(
        image_folder / "train", backbone=tiny_backbone, shots=4, epochs=2, n_views=1, n_ctx=4,
        batch_size=8, class_token_position="middle", progress=False,
    )  # fmt: skip
    path = tmp_path / "coop.onnx"
    export_onnx(fitted, path, with_text_encoder=True)
    rt = Classifier(path, device="cpu")
    paths = [p for p, _ in image_files]
    np.testing.assert_allclose(rt.logits(paths), fitted.logits(paths), rtol=1e-3, atol=1e-3)

    names = ["sky_blue", "grass green", "Ångström", "a much longer class name with many words"]
    rt.set_classes(names)
    # PyTorch: the learned context over the new names
    learner = PromptLearner(tiny_backbone, names, n_ctx=fitted.learner.n_ctx, class_token_position="middle")
    with torch.no_grad():
        learner.ctx.copy_(fitted.learner.ctx)
        weights = tiny_backbone.model.logit_scale.exp() * learner.text_features().float()
    want = (fitted.image_features(paths) @ weights.T).numpy()
    np.testing.assert_allclose(rt.logits(paths), want, rtol=1e-3, atol=1e-3)


def test_fp16_export_serves_on_cpu_without_crashing(tiny_backbone, tmp_path):
    """onnxruntime 1.31's NchwcTransformer segfaults on fp16 graphs; the runtime switches it off.

    Run in a child process so that a regression fails this test instead of killing pytest.
    """
    import subprocess
    import sys

    import coopkit
    from coopkit.exporters import export_onnx

    clf = coopkit.zero_shot(tiny_backbone, ["red", "green", "blue"])
    path = tmp_path / "fp16.onnx"
    export_onnx(clf, path, precision="fp16", n_verify=4)
    images = np.random.default_rng(0).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    code = (
        "import sys, json, numpy as np; from coopkit.runtime import Classifier; "
        "c = Classifier(sys.argv[1], device='cpu'); "
        "print(json.dumps(c.logits(list(np.load(sys.argv[2]))).tolist()))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "images.npy")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"runtime died on an fp16 file (code {out.returncode}): {out.stderr[-2000:]}"
    import json

    got = np.array(json.loads(out.stdout.strip().splitlines()[-1]))
    want = clf.logits(list(images))
    np.testing.assert_allclose(got, want, atol=5e-2)
    assert (got.argmax(1) == want.argmax(1)).all()


# --- the runtime and the PyTorch classifier refuse the same inputs ----------------------------


def test_class_names_that_cannot_be_used_are_refused(exported, tiny_backbone):
    clf = RuntimeClassifier(exported.path, device="cpu")
    for names, match in [("cat", "must be a list of strings"), (["cat", " "], "blank names"),
                         (["cat", "cat"], "duplicate class names"),
                         (["cat", "very " * 80 + "long name"], "need more than the 75 tokens")]:
        with pytest.raises(ValueError, match=match):
            clf.set_classes(names)
    assert clf.classnames == ["blue", "green", "red", "yellow"]
    long_a, long_b = "a " * 80 + "cat", "a " * 80 + "dog"  # identical once cut to the context
    with pytest.raises(ValueError, match="need more than the 75 tokens"):
        coopkit.zero_shot(tiny_backbone, [long_a, long_b])
    with pytest.raises(ValueError, match="need more than"):
        coopkit.PromptLearner(tiny_backbone, [long_a, long_b])


def _bad_items(tmp_path: Path) -> dict[str, Any]:
    closed = Image.new("RGB", (40, 40), (200, 30, 30))
    closed.close()
    truncated = tmp_path / "truncated.png"
    buf = tmp_path / "full.png"
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(buf)
    truncated.write_bytes(buf.read_bytes()[:60])
    return {
        "zero-size array": np.zeros((0, 32, 3), np.uint8),
        "zero-size PIL image": Image.new("RGB", (0, 0)),
        "closed PIL image": closed,
        "unreadable bytes": b"\x89PNG\r\n\x1a\n not really",
        "truncated file": str(truncated),
        "float array": np.zeros((32, 32, 3), np.float32),
        "None": None,
        "extreme aspect ratio": np.zeros((2, 40000, 3), np.uint8),
        "missing file": str(tmp_path / "nope.png"),
    }


@pytest.mark.parametrize("side", ["runtime", "pytorch"])
def test_bad_items_get_their_own_error_and_the_rest_is_answered(coop, exported, image_folder, tmp_path, side):
    clf = RuntimeClassifier(exported.path, device="cpu") if side == "runtime" else coop
    good = [str(p) for p in sorted((image_folder / "test").rglob("*.png"))[:2]]
    bad = _bad_items(tmp_path)
    batch = [good[0], *bad.values(), good[1]]
    t = time.perf_counter()
    out = clf.predict(batch, errors="skip", top_k=2)
    assert time.perf_counter() - t < 20  # the 2x40000 strip is refused, not resized to 4480000x224
    assert [p.index for p in out] == list(range(len(batch)))
    assert [p.ok for p in out] == [True] + [False] * len(bad) + [True]
    alone = clf.predict(good, top_k=2)
    assert (out[0].labels, out[-1].labels) == (alone[0].labels, alone[1].labels)
    np.testing.assert_allclose([out[0].probs, out[-1].probs], [alone[0].probs, alone[1].probs], atol=1e-6)
    for pred, what in zip(out[1:-1], bad):
        assert pred.error and "\n" not in pred.error, (what, pred)
    with pytest.raises((ImageDecodeError, FileNotFoundError)):
        clf.predict(batch, errors="raise")
