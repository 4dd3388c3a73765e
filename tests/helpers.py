"""Helpers shared by the test modules (plain functions and constants; the fixtures are in conftest.py).

Test modules import what they need from here (``from helpers import photo``); no test module imports
another. Sections: tiny open_clip models and image folders; the official dataset layouts; hand-built
ONNX graphs that follow the runtime's contract, with numpy references; fitting and CLI checks.
onnx is imported inside the graph builders, so that this module imports without it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
from PIL import Image

# --- tiny models and image folders ---------------------------------------------------------------

TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def write_colour_folder(root: Path, per_class: int, seed: int, classes=tuple(COLOURS)) -> Path:
    """ImageFolder of noisy flat-colour images of odd sizes, one folder per colour name."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = int(rng.integers(28, 60)), int(rng.integers(28, 60))
            img = np.array(COLOURS[name])[None, None] + rng.normal(0, 25, (h, w, 3))
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / name / f"{name}_{i:03d}.png")
    return root


# --- tiny copies of the official dataset layouts (CoOp's DATASETS.md), real file and folder names ---

IMAGENET_CLASSES = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark",
                    "n01491361": "tiger shark"}
#: One split-file dataset per line: folder | split file | image folder | image path pattern | class folder=class
#: name in the split file, ... (pattern: {c} the class folder, {c_} without "_", {n} a running number, {k} the
#: image's index within its class and split, {split_dir} StanfordCars' cars_train or cars_test)
SPLIT_LAYOUTS = [line.split(" | ") for line in """\
caltech-101 | split_zhou_Caltech101.json | 101_ObjectCategories | {c}/image_{k:04d}.jpg | accordion=accordion,\
airplanes=airplane,Faces=face,yin_yang=yin_yang
oxford_pets | split_zhou_OxfordPets.json | images | {c}_{k}.jpg | Abyssinian=abyssinian,american_bulldog=american_bulldog,\
Bengal=bengal,yorkshire_terrier=yorkshire_terrier
stanford_cars | split_zhou_StanfordCars.json |  | {split_dir}/{n:05d}.jpg | a=2012 AM General Hummer SUV,\
b=2012 Acura RL Sedan,c=2007 BMW X5 SUV,d=2012 smart fortwo Convertible
oxford_flowers | split_zhou_OxfordFlowers.json | jpg | image_{n:05d}.jpg | 1=pink primrose,2=hard-leaved pocket orchid,\
3=canterbury bells,4=sweet pea
food-101 | split_zhou_Food101.json | images | {c}/10056{k:02d}.jpg | apple_pie=apple_pie,baby_back_ribs=baby_back_ribs,\
baklava=baklava,beef_carpaccio=beef_carpaccio
sun397 | split_zhou_SUN397.json | SUN397 | {c}/sun_aaa{k}zqrimafwbiv.jpg | a/abbey=abbey,\
a/apartment_building/outdoor=outdoor apartment_building,b/bakery/shop=shop bakery,y/youth_hostel=youth_hostel
dtd | split_zhou_DescribableTextures.json | images | {c}/{c}_{k:04d}.jpg | banded=banded,blotchy=blotchy,\
braided=braided,zigzagged=zigzagged
eurosat | split_zhou_EuroSAT.json | 2750 | {c}/{c}_{k}.jpg | AnnualCrop=Annual Crop Land,Forest=Forest,\
HerbaceousVegetation=Herbaceous Vegetation Land,SeaLake=Sea or Lake
ucf101 | split_zhou_UCF101.json | UCF-101-midframes | {c}/v_{c_}_g{k:02d}_c01.jpg | Apply_Eye_Makeup=Apply_Eye_Makeup,\
Archery=Archery,Baby_Crawling=Baby_Crawling,YoYo=YoYo""".splitlines()]
FGVC_VARIANTS = ["707-320", "A300B4", "Cessna 172", "F/A-18"]
PER_SPLIT = {"train": 5, "val": 2, "test": 2}


def _tiny_image(path: Path, label: int, k: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = list(COLOURS.values())[label % len(COLOURS)]
    rng = np.random.default_rng(1000 * label + k)
    img = np.array(colour)[None, None] + rng.normal(0, 20, (20 + k, 24, 3))
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, format="JPEG")


def write_official_layouts(root: Path) -> Path:
    """All 15 datasets under ``root`` as CoOp's DATASETS.md lays them out (4 classes each; 5 train,
    2 val and 2 test images per class; ImageNet-A/-R hold 2 of ImageNet's classes)."""
    n = 0
    for folder, split_file, images, pattern, classes in SPLIT_LAYOUTS:
        split: dict[str, list] = {s: [] for s in PER_SPLIT}
        for y, pair in enumerate(classes.split(",")):
            sub, cname = pair.split("=")
            for part, count in PER_SPLIT.items():
                for j in range(count):
                    n += 1
                    k = {"train": 1, "val": 11, "test": 21}[part] + j
                    rel = pattern.format(c=sub, c_=sub.replace("_", ""), n=n, k=k,
                                         split_dir="cars_test" if part == "test" else "cars_train")
                    _tiny_image(root / folder / images / rel, y, j)
                    split[part].append([rel, y, cname])
        (root / folder / split_file).write_text(json.dumps(split))
    (root / "oxford_pets" / "annotations").mkdir()
    fgvc = root / "fgvc_aircraft"
    (fgvc / "images").mkdir(parents=True)
    (fgvc / "variants.txt").write_text("\n".join(FGVC_VARIANTS) + "\n")
    for part, count in PER_SPLIT.items():
        lines = []
        for y, variant in enumerate(FGVC_VARIANTS):
            for j in range(count):
                n += 1
                _tiny_image(fgvc / "images" / f"{1025794 + n}.jpg", y, j)
                lines.append(f"{1025794 + n} {variant}")
        (fgvc / f"images_variant_{part}.txt").write_text("\n".join(lines) + "\n")
    names = "".join(f"{w} {c}\n" for w, c in IMAGENET_CLASSES.items())
    wnids = list(IMAGENET_CLASSES)
    for y, w in enumerate(wnids):
        for j in range(PER_SPLIT["train"]):
            _tiny_image(root / "imagenet/images/train" / w / f"{w}_{10026 + j}.JPEG", y, j)
        for j in range(PER_SPLIT["test"]):
            _tiny_image(root / "imagenet/images/val" / w / f"ILSVRC2012_val_{8 * y + j + 1:08d}.JPEG", y, j)
        _tiny_image(root / "imagenetv2/imagenetv2-matched-frequency-format-val" / str(y) / f"{y}a7b3c.jpeg", y, 0)
        _tiny_image(root / "imagenet-sketch/images" / w / f"sketch_{y}.JPEG", y, 0)
    for folder, sub, chosen in (("imagenet-adversarial", "imagenet-a", wnids[1:3]),
                                ("imagenet-rendition", "imagenet-r", wnids[::3])):
        for w in chosen:
            y = wnids.index(w)
            _tiny_image(root / folder / sub / w / f"art_{y}.jpg", y, 1)
        (root / folder / sub / "README.txt").write_text("readme\n")
    for folder in ("imagenet", "imagenetv2", "imagenet-sketch", "imagenet-adversarial", "imagenet-rendition"):
        (root / folder / "classnames.txt").write_text(names)
    return root



# --- hand-built ONNX graphs: the exporter's contract, with numpy references ---------------------

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
CLASSES = ["cat", "dog", "sea turtle", "golden retriever", "red fox"]
TEXT_VOCAB_ROWS = 1000  # the text fixture maps token ids into a small table (id % 1000)
LOGIT_SCALE = 20.0


class GraphModel(NamedTuple):
    """A graph written by :func:`image_graph` and the weights it holds (for :func:`reference`)."""

    path: Path
    params: dict[str, np.ndarray]


def onnx_model(graph: Any, meta: Optional[Any]) -> Any:
    """An opset-17 model of ``graph`` that onnxruntime reads, with ``meta`` (a ``ModelMetadata``) as its
    coopkit metadata unless None; checked by the onnx checker."""
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="coopkit-tests")
    model.ir_version = 9  # onnxruntime reads up to its own IR version; onnx writes its newest
    if meta is not None:
        helper.set_model_props(model, {"coopkit": meta.to_json()})
    onnx.checker.check_model(model)
    return model


def image_graph(
    path: Path,
    classnames: list[str] = CLASSES,
    image_size: tuple[int, int] = (32, 32),
    embed_dim: int = 16,
    seed: int = 0,
    weights: Optional[np.ndarray] = None,
    batch: Any = "batch",
    meta: Optional[Any] = None,
    **meta_kwargs: Any,
) -> dict[str, np.ndarray]:
    """Write a runtime-contract image graph to ``path`` (built by hand with onnx.helper): uint8 (n,H,W,3)
    -> /255 -> (x-mean)/std -> NCHW -> flatten @ P -> L2 -> @ W^T -> softmax, with coopkit metadata
    (``meta``, or one made from the arguments and ``meta_kwargs``).

    Returns the weights, for :func:`reference`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from coopkit.runtime import ModelMetadata

    rng = np.random.default_rng(seed)
    h, w = image_size
    proj = (rng.normal(size=(3 * h * w, embed_dim)) / np.sqrt(3 * h * w)).astype(np.float32)
    if weights is None:
        weights = rng.normal(size=(len(classnames), embed_dim)).astype(np.float32)
        weights = (LOGIT_SCALE * weights / np.linalg.norm(weights, axis=1, keepdims=True)).astype(np.float32)
    inits = [
        numpy_helper.from_array(np.array(255.0, np.float32), "k255"),
        numpy_helper.from_array(MEAN.reshape(1, 1, 1, 3), "mean"),
        numpy_helper.from_array(STD.reshape(1, 1, 1, 3), "std"),
        numpy_helper.from_array(proj, "proj"),
        numpy_helper.from_array(np.ascontiguousarray(weights.T), "w_t"),
    ]
    nodes = [
        helper.make_node("Cast", ["images"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["xf", "k255"], ["x01"]),
        helper.make_node("Sub", ["x01", "mean"], ["xc"]),
        helper.make_node("Div", ["xc", "std"], ["xn"]),
        helper.make_node("Transpose", ["xn"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Flatten", ["nchw"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "proj"], ["feat"]),
        helper.make_node("ReduceL2", ["feat"], ["norm"], axes=[1], keepdims=1),
        helper.make_node("Div", ["feat", "norm"], ["image_embeds"]),
        helper.make_node("MatMul", ["image_embeds", "w_t"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "coopkit-test-image",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, [batch, h, w, 3])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, len(classnames)]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, [batch, len(classnames)]),
            helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, [batch, embed_dim]),
        ],
        inits,
    )
    if meta is None:
        meta = ModelMetadata(classnames=classnames, image_size=image_size, embed_dim=embed_dim, model="test", **meta_kwargs)
    onnx.save(onnx_model(graph, meta), str(path))
    return {"proj": proj, "weights": weights}


def text_graph(path: Path, embed_dim: int = 16, seed: int = 1) -> np.ndarray:
    """Write a text graph to ``path``: token_ids int64 (n, L) -> table[ids % 1000] -> mean over L -> L2
    -> x LOGIT_SCALE. Returns the table, for :func:`text_reference`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = np.random.default_rng(seed).normal(size=(TEXT_VOCAB_ROWS, embed_dim)).astype(np.float32)
    nodes = [
        helper.make_node("Mod", ["token_ids", "rows"], ["ids"]),
        helper.make_node("Gather", ["table", "ids"], ["emb"], axis=0),
        helper.make_node("ReduceMean", ["emb"], ["pooled"], axes=[1], keepdims=0),
        helper.make_node("ReduceL2", ["pooled"], ["norm"], axes=[1], keepdims=1),
        helper.make_node("Div", ["pooled", "norm"], ["unit"]),
        helper.make_node("Mul", ["unit", "scale"], ["class_weights"]),
    ]
    graph = helper.make_graph(
        nodes,
        "coopkit-test-text",
        [helper.make_tensor_value_info("token_ids", TensorProto.INT64, ["n", 77])],
        [helper.make_tensor_value_info("class_weights", TensorProto.FLOAT, ["n", embed_dim])],
        [
            numpy_helper.from_array(np.array(TEXT_VOCAB_ROWS, np.int64), "rows"),
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(np.array(LOGIT_SCALE, np.float32), "scale"),
        ],
    )
    onnx.save(onnx_model(graph, None), str(path))
    return table


def text_reference(table: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """The text graph of :func:`text_graph` in float64 numpy: (n, L) token ids -> (n, dim) class weights."""
    pooled = table[tokens % TEXT_VOCAB_ROWS].astype(np.float64).mean(axis=1)  # (n, dim)
    return LOGIT_SCALE * pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def reference(batch: np.ndarray, params: dict[str, np.ndarray], weights: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """The fixture graph in float64 numpy."""
    x = (batch.astype(np.float64) / 255.0 - MEAN) / STD  # (n, H, W, 3)
    flat = x.transpose(0, 3, 1, 2).reshape(len(batch), -1)  # (n, 3*H*W)
    feat = flat @ params["proj"].astype(np.float64)
    embeds = feat / np.linalg.norm(feat, axis=1, keepdims=True)
    w = params["weights"] if weights is None else weights
    logits = embeds @ w.astype(np.float64).T
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return {"image_embeds": embeds, "logits": logits, "probs": e / e.sum(axis=1, keepdims=True)}


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth, photo-like uint8 RGB image (gradients, a disc, mild noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 127 + 120 * np.sin(xx / max(width, 1) * 3.1 + seed)
    g = 127 + 120 * np.cos(yy / max(height, 1) * 2.3 + seed)
    b = 255 * ((xx - width * 0.6) ** 2 + (yy - height * 0.4) ** 2 < (min(width, height) * 0.3) ** 2)
    img = np.stack([r, g, b], axis=-1) + rng.normal(0, 6, size=(height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)




# --- fitting the tiny model, checking the command line -------------------------------------------


def fit_tiny(backbone: Any, folder: Path, **overrides: Any) -> Any:
    """A quick CoOp fit on ``folder / "train"`` (2 shots, 2 epochs, 1 view, 4 context tokens, batch 8,
    no progress bar); keyword arguments override any of these or add others (``coopkit.fit``'s)."""
    import coopkit

    args: dict[str, Any] = dict(backbone=backbone, shots=2, epochs=2, n_views=1, n_ctx=4, batch_size=8, progress=False)
    args.update(overrides)
    return coopkit.fit(folder / "train", **args)


def error_lines(output: str) -> list[str]:
    """The lines of a command's output that report an error (``Error: ...``)."""
    return [line for line in output.strip().splitlines() if line.startswith("Error")]


def one_line_error(res: Any, code: int, *needles: str) -> None:
    """Assert that a click ``Result`` exited with ``code`` after exactly one error line that holds
    every needle, and no traceback."""
    assert res.exit_code == code, (res.exit_code, res.output)
    lines = error_lines(res.output)
    assert len(lines) == 1 and all(n in lines[0] for n in needles), res.output
    assert "Traceback" not in res.output

#: The labels of the multi-label fixtures (conftest.py).
MULTILABEL_NAMES = ["person", "dog", "beach", "sea_turtle"]


def write_multilabel_set(root: Path, n: int, seed: int, classnames, photos: bool = False):
    """``n`` noise images (``photos``: :func:`photo` images) of odd sizes under ``root`` with random targets
    (1, 0, -1 unknown) over ``classnames``, every label positive on the first image: a
    :class:`coopkit.multilabel_data.MultiLabelDataset`."""
    from coopkit.multilabel_data import MultiLabelDataset

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(40, 80)), int(rng.integers(40, 80))
        img = photo(w, h, seed=1000 * seed + i) if photos else rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        paths.append(str(root / f"{seed}_{i}.png"))
        Image.fromarray(img).save(paths[-1])
    targets = rng.choice([-1, 0, 1], size=(n, len(classnames)), p=[0.2, 0.5, 0.3]).astype(np.int8)
    targets[0] = 1
    return MultiLabelDataset(paths, targets, list(classnames), str(root))


# --- the browser (web/coopkit.js in headless Chromium) ---------------------------------------------

REPO = Path(__file__).resolve().parents[1]
ORT_WEB = REPO / "web" / "node_modules" / "onnxruntime-web"
#: Software WebGPU (SwiftShader), so the WebGPU path runs on a machine without a GPU.
CHROMIUM_ARGS = ["--no-sandbox", "--enable-unsafe-webgpu", "--enable-features=Vulkan", "--use-vulkan=swiftshader",
                 "--use-webgpu-adapter=swiftshader", "--disable-vulkan-surface"]
BROWSER_TIMEOUT_MS = 120_000


def chromium_path() -> Optional[str]:
    """Debian's ``chromium`` (or ``$COOPKIT_CHROMIUM``), if installed."""
    import os
    import shutil

    for candidate in (os.environ.get("COOPKIT_CHROMIUM"), "/usr/lib/chromium/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def browser_missing() -> Optional[str]:
    """Why the browser tests cannot run here (``None``: they can)."""
    import importlib.util

    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (pip install -e '.[test]')"
    if chromium_path() is None:
        return "chromium is not installed (apt-get install chromium)"
    if not ORT_WEB.is_dir():
        return "onnxruntime-web is not installed (cd web && npm ci)"
    return None


def require_browser() -> None:
    """Skip the calling test or fixture when the browser is missing; fail instead under
    ``COOPKIT_REQUIRE_BROWSER=1`` (``.ci/run`` sets it)."""
    import os

    import pytest

    reason = browser_missing()
    if reason:
        if os.environ.get("COOPKIT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"COOPKIT_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)


def load_web_server_module() -> Any:
    """``examples/web/serve.py`` as a module (``make_server(root, port, quiet)``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("coopkit_web_serve", REPO / "examples" / "web" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class web_site:
    """``examples/web/serve.py`` serving ``root`` on 127.0.0.1 in a thread (a context manager; ``url``)."""

    def __init__(self, root: Path) -> None:
        self.server = load_web_server_module().make_server(root, 0, quiet=True)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "web_site":
        import threading

        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
