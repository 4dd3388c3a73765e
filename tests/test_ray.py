"""``coopkit predict ... --engine ray`` on a local Ray instance (the machine's CPUs, no dashboard).

The local engine (tests/test_batch.py) is the reference: the same inputs must give the same
rows. Actor deaths are real ones (``os._exit`` inside the actor process).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytest.importorskip("pyarrow")

from helpers import image_graph, photo  # noqa: E402

from coopkit.runtime.batch import BatchConfig, predict_collection  # noqa: E402
from coopkit.runtime.engine_choice import CACHE_ENV  # noqa: E402
from coopkit.runtime.inputs import iter_inputs  # noqa: E402
from coopkit.runtime.ray_engine import FAILED_BATCH, ClassifierActor, RayConfig, predict_ray  # noqa: E402


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A local Ray instance; its workers keep engine choices in the folder it yields."""
    cache = tmp_path_factory.mktemp("ray_engine_cache")
    ray.init(num_cpus=min(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             configure_logging=False, runtime_env={"env_vars": {CACHE_ENV: str(cache)}})
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    yield cache
    ray.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ray_job")
    image_graph(root / "model.onnx")
    images = root / "images"
    for i in range(240):
        sub = images / f"part{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(34 + i % 13, 30 + i % 7, seed=i)).save(sub / f"img{i:03d}.png")
    (images / "part0" / "broken.png").write_bytes(b"not a png")
    return {"model": root / "model.onnx", "images": images, "root": root}


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ray_rows_equal_the_local_engine(local_ray: Path, job: dict[str, Path], tmp_path: Path) -> None:
    local, remote = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    predict_collection(job["model"], job["images"], local, progress=False, logits=True, device="cpu")
    summary = predict_ray(job["model"], job["images"], remote, ray_config=RayConfig(actors=2, cpus_per_actor=0.5),
                          progress=False,
                          logits=True, batch_size=16)
    assert (summary.rows, summary.errors) == (241, 1)
    want, got = _rows(local), _rows(remote)
    assert [r["path"] for r in got] == [r["path"] for r in want]
    assert [r["labels"] for r in got] == [r["labels"] for r in want]
    assert [r["error"] for r in got] == [r["error"] for r in want]
    diff = max(np.abs(np.subtract(a["logits"], b["logits"])).max() for a, b in zip(got, want) if a["logits"])
    assert diff <= 1e-5
    # a URI input (file:// through pyarrow's filesystems, as s3:// or gs:// would be) lists the same images
    uri = tmp_path / "uri.parquet"
    predict_ray(job["model"], f"file://{job['images']}", uri, progress=False, batch_size=64)
    import pyarrow.parquet as pq

    rows = pq.read_table(uri).to_pylist()
    assert [r["path"].removeprefix("file://") for r in rows] == [r["path"] for r in want]
    assert [r["labels"] for r in rows] == [r["labels"][:5] for r in want]
    # resume: the same output file again writes nothing new
    assert predict_ray(job["model"], job["images"], remote, progress=False, logits=True).skipped == 241


def test_a_multilabel_file_writes_the_labels_that_apply(local_ray: Path, multilabel_export: Any, dualcoop_clf: Any,
                                                        multilabel_sets: Any, tmp_path: Path) -> None:
    """Every label at or above its threshold, as the PyTorch classifier's own sigmoids and thresholds give them."""
    _, val = multilabel_sets
    listing = tmp_path / "inputs.txt"
    listing.write_text("".join(f"{p}\n" for p in val.paths))
    predict_ray(multilabel_export.path, listing, tmp_path / "ray.jsonl", progress=False, batch_size=4, top_k=1)
    probs, names, thresholds = dualcoop_clf.probs(val.paths), dualcoop_clf.classnames, dualcoop_clf.thresholds
    rows = _rows(tmp_path / "ray.jsonl")
    assert [r["path"] for r in rows] == list(val.paths)
    for row, p in zip(rows, probs):
        assert row["labels"] == [names[i] for i in np.argsort(-p, kind="stable") if p[i] >= thresholds[i]]


class DiesOnce(ClassifierActor):
    """Dies (the whole actor process) on the first batch holding img007, once per marker file."""

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        marker = Path(os.environ["COOPKIT_TEST_MARKER"])
        if any("img007" in str(p) for p in batch["path"]) and (self.always or not marker.exists()):
            marker.touch()
            os._exit(1)
        return super().__call__(batch)

    always = False


class AlwaysDies(DiesOnce):
    always = True


def test_a_dying_actor_is_replaced_and_its_batch_retried_once(local_ray: Path, job: dict[str, Path],
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = tmp_path / "list.txt"
    paths = [p for p in iter_inputs(job["images"]) if "part3" in p or "img007" in p]
    inputs.write_text("\n".join(paths))
    want = _rows(_local(job, inputs, tmp_path / "want.jsonl"))
    marker = tmp_path / "died"
    monkeypatch.setenv("COOPKIT_TEST_MARKER", str(marker))
    # ray workers inherit the driver's environment at ray.init; pass the marker path explicitly
    out = tmp_path / "once.jsonl"
    summary = predict_ray(job["model"], inputs, out, progress=False, batch_size=8,
                          actor=_with_marker(DiesOnce, marker))
    assert marker.exists() and summary.errors == 0  # it died, was replaced, and the retry succeeded
    assert [r["labels"] for r in _rows(out)] == [r["labels"] for r in want]
    out = tmp_path / "always.jsonl"
    summary = predict_ray(job["model"], inputs, out, progress=False, batch_size=8,
                          actor=_with_marker(AlwaysDies, marker))
    rows = _rows(out)
    failed = [i for i, r in enumerate(rows) if r["error"] == FAILED_BATCH]
    doomed = paths.index(next(p for p in paths if "img007" in p)) // 8
    assert failed == list(range(doomed * 8, min(len(paths), doomed * 8 + 8)))  # exactly that batch
    assert [r["path"] for r in rows] == paths
    assert all(r["labels"] == w["labels"] for i, (r, w) in enumerate(zip(rows, want)) if i not in failed)


class RecordsItsEngine(ClassifierActor):
    """Writes the engine its classifier opened (and whether it measured) into the marker folder."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        info = self.clf.engine
        record = {"label": info.label, "compute": info.compute, "measured": info.choice is not None}
        (Path(os.environ["COOPKIT_TEST_MARKER"]) / f"actor-{os.getpid()}.json").write_text(json.dumps(record))


def test_auto_is_chosen_once_and_every_actor_runs_the_choice(local_ray: Path, job: dict[str, Path],
                                                             tmp_path: Path) -> None:
    local, remote = tmp_path / "local.jsonl", tmp_path / "auto.jsonl"
    predict_collection(job["model"], job["images"], local, progress=False, logits=True, device="cpu")
    records = tmp_path / "actors"
    records.mkdir()
    summary = predict_ray(job["model"], job["images"], remote, ray_config=RayConfig(actors=2, cpus_per_actor=0.5),
                          progress=False, logits=True, batch_size=16, engine="auto",
                          actor=_with_marker(RecordsItsEngine, records))
    info = summary.engine
    assert info is not None and info.choice is not None and info.label == info.choice.chosen
    assert info.choice.batch_sizes == [1, 16] and info.choice.measurement(info.label).eligible
    assert info.choice.key_fields["threads"] == 1  # measured with an actor's threads (round(0.5) -> 1)
    assert len(list(local_ray.glob("engines/*.json"))) == 1  # measured once, in the task before the pool
    actors = [json.loads(p.read_text()) for p in records.glob("actor-*.json")]
    assert actors and all(a == {"label": info.label, "compute": "fp32", "measured": False} for a in actors)
    want, got = _rows(local), _rows(remote)
    assert [r["labels"] for r in got] == [r["labels"] for r in want]
    # the chosen engine may be OpenVINO: answers within auto's own rule for fp32 files (probabilities 1e-5)
    def probs(logits: list[float]) -> np.ndarray:
        z = np.exp(np.subtract(logits, max(logits)))
        return z / z.sum()

    diff = max(np.abs(probs(a["logits"]) - probs(b["logits"])).max() for a, b in zip(got, want) if a["logits"])
    assert diff <= 1e-5
    with pytest.raises(ValueError, match="engine 'tensorflow' is not one of"):  # refused before Ray runs anything
        predict_ray(job["model"], job["images"], tmp_path / "x.jsonl", progress=False, engine="tensorflow")
    with pytest.raises(ValueError, match="resolves engine='auto' once"):
        ClassifierActor(str(job["model"]), BatchConfig(), engine="auto")


def _local(job: dict[str, Path], inputs: Path, out: Path) -> Path:
    predict_collection(job["model"], inputs, out, progress=False, device="cpu", batch_size=8)
    return out


def _with_marker(cls: type, marker: Path) -> type:
    class Marked(cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            os.environ["COOPKIT_TEST_MARKER"] = str(marker)
            super().__init__(*args, **kwargs)

    return Marked
