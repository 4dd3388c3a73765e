"""``engine="auto"``: the fastest engine and device whose answers equal the reference engine's, by measurement.

The first time a file is opened on a machine, every installed engine on every device it can use
(:func:`~coopkit.runtime.engines.installed_engines`: onnxruntime on the CPU, CUDA and TensorRT,
OpenVINO on the CPU and its GPUs) opens the file and runs a short probe at batch 1 and at the
serving batch, on the same generated images as the reference engine, onnxruntime on the CPU:

* **eligible** only when its probabilities equal the reference's: the same top-1 on every probe
  image (except where the reference's top two are closer than twice the tolerance) and every
  probability within :data:`PROB_TOLERANCE` of the file's precision (:data:`BF16_PROB_TOLERANCE`
  where the engine computes in bf16, which only ``compute="bf16"`` allows);
* **chosen**: the eligible one with the most images per second (geometric mean of batch 1 and
  the serving batch); an engine that fails to load, crashes or disagrees is skipped, with its
  reason logged and kept.

The choice and every figure are kept in a small JSON file in the user cache
(:func:`cache_root`, ``$COOPKIT_CACHE_DIR`` overrides it), named by a key over the file's sha256
(external data included), the machine (CPU model, instruction sets, GPUs), the engines' versions,
the compute precision, the device request, the serving batch and the thread count, so the next
open costs one checksum. Written atomically; a damaged cache file is measured again.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from .atomic import atomic_write, file_sha256
from .contract import INPUT_NAME, INPUT_RAW, MetadataError, ModelMetadata
from .engines import (
    ONNXRUNTIME,
    OPENVINO,
    EngineInfo,
    OnnxruntimeEngine,
    OpenVINOSession,
    Target,
    check_engine,
    installed_engines,
    onnxruntime_device,
    openvino_device,
    ort_providers,
    resizes_in_graph,
    split_device,
)
from .integrity import FileFormatError, OnnxFile
from .session import ProviderSpec, open_session, usable_cpus

logger = logging.getLogger(__name__)

#: Environment variable naming coopkit's cache folder (the engine choices live in ``engines/`` in it).
CACHE_ENV = "COOPKIT_CACHE_DIR"
#: Bumped when the probe changes what it measures: older cache files are measured again.
PROBE_VERSION = 2  # 2: OpenVINO measured with its static-shape models for batch 1 and the serving batch
#: The reference engine: every other engine's answers are compared with its answers.
REFERENCE = Target(ONNXRUNTIME, "cpu")
#: Largest probability difference against the reference, per file precision: fp32 files must be
#: equal to within float32 rounding; fp16 files run their fp16 ops in fp16 on onnxruntime's CPU
#: and in fp32 on OpenVINO (7e-5 apart on the tiny test model); int8 files as the int8 rule allows.
PROB_TOLERANCE = {"fp32": 1e-5, "fp16": 1e-3, "int8": 1e-2}
#: Largest probability difference of an engine computing in bf16 (``compute="bf16"`` only).
BF16_PROB_TOLERANCE = 1e-2
#: Seconds each target spends timing each batch size (after one untimed run) ...
PROBE_SECONDS = 0.5
#: ... in at least this many runs and at most ...
MIN_RUNS = 2
#: ... this many.
MAX_RUNS = 50
#: The instruction sets recorded in the cache key (the ones engines pick kernels by).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
             "asimd", "asimddp", "asimdhp", "sve", "sve2", "bf16", "i8mm")


def cache_root() -> Path:
    """coopkit's cache folder: ``$COOPKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/coopkit``
    (``~/.cache/coopkit``; ``%LOCALAPPDATA%\\coopkit`` on Windows)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "coopkit"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "coopkit"


def model_sha256(path: Union[str, os.PathLike]) -> str:
    """sha256 over the ``.onnx`` file's bytes and those of every external data file it names."""
    digest = hashlib.sha256(file_sha256(path).encode())
    try:
        with OnnxFile(path) as f:
            locations = sorted({t.external.get("location", "") for t in f.initializers() if t.external})
    except (OSError, FileFormatError, IndexError):
        locations = []
    for location in locations:
        data = Path(path).parent / location
        digest.update(f"{location}:{file_sha256(data) if data.is_file() else 'missing'}".encode())
    return digest.hexdigest()


def _cpu_description() -> tuple[str, list[str]]:
    """The CPU's model name and the :data:`ISA_FLAGS` it has (from /proc/cpuinfo on Linux)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name in ("model name", "hardware", "cpu model") and value.strip():
                    model = value.strip()
                elif name in ("flags", "features"):
                    flags |= set(value.split())
    except OSError:
        pass
    return model, [f for f in ISA_FLAGS if f in flags]


def _nvidia_gpus() -> list[str]:
    """Names of the GPUs the NVIDIA driver reports (none without a driver)."""
    from .session import cuda_device_count

    count, _ = cuda_device_count()
    if not count:
        return []
    lib = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    names = []
    for i in range(count):
        device, buffer = ctypes.c_int(0), ctypes.create_string_buffer(256)
        if lib.cuDeviceGet(ctypes.byref(device), i) == 0 and lib.cuDeviceGetName(buffer, 256, device) == 0:
            names.append(buffer.value.decode(errors="replace"))
    return names


def machine_info() -> dict[str, Any]:
    """What the choice depends on besides the file: CPU model, instruction sets, usable CPUs, GPUs."""
    model, flags = _cpu_description()
    try:
        gpus = _nvidia_gpus()
    except (OSError, AttributeError):
        gpus = []
    return {"cpu": model, "isa": flags, "machine": platform.machine(), "usable_cpus": len(usable_cpus()),
            "gpus": gpus}


@dataclass
class Measurement:
    """One engine on one device, measured on the file.

    Attributes:
        target: ``engine:device``.
        version: The engine's version.
        compute: The precision it computed in (``fp32``, or ``bf16`` read back from the engine).
        load_seconds: Opening the file.
        images_per_s: Images per second per batch size (``{"1": ..., "32": ...}``).
        max_prob_diff: Largest probability difference against the reference.
        top1_agreement: Share of probe images with the reference's top-1.
        tolerance: The probability tolerance it was held to.
        eligible: Its answers equal the reference's (and it loaded and ran).
        reason: Why it is not eligible (``""`` when it is).
    """

    target: str
    version: str = ""
    compute: str = "fp32"
    load_seconds: float = 0.0
    images_per_s: dict[str, float] = field(default_factory=dict)
    max_prob_diff: Optional[float] = None
    top1_agreement: Optional[float] = None
    tolerance: float = 0.0
    eligible: bool = False
    reason: str = ""

    @property
    def score(self) -> float:
        """Geometric mean of the images per second over the measured batch sizes."""
        speeds = [v for v in self.images_per_s.values() if v > 0]
        return math.exp(sum(math.log(v) for v in speeds) / len(speeds)) if speeds else 0.0

    def describe(self) -> str:
        """``target speeds images/s (prob diff d)``, and why it was skipped."""
        speeds = "/".join(f"{v:.4g}" for v in self.images_per_s.values())
        figures = f"{speeds} images/s (prob diff {self.max_prob_diff:.2g})" if speeds else ""
        return f"{self.target} {figures}" if self.eligible else f"{self.target} skipped: {self.reason} {figures}".rstrip()


@dataclass
class EngineChoice:
    """What ``auto`` chose for a file on this machine, and every engine's figures.

    Attributes:
        chosen: ``engine:device`` of the chosen target.
        measurements: Every target tried, the chosen one included.
        batch_sizes: The batch sizes measured (1 and the serving batch).
        compute: The compute precision asked for.
        key: The cache key (sha256 of ``key_fields``).
        key_fields: What the key covers: file checksum, machine, engine versions, settings.
        from_cache: True when read from the cache (nothing was measured this time).
        cache_file: Where it is kept (``None`` when it could not be written).
        probe_seconds: How long measuring took (when it was measured).
    """

    chosen: str
    measurements: list[Measurement]
    batch_sizes: list[int]
    compute: str
    key: str
    key_fields: dict[str, Any]
    from_cache: bool = False
    cache_file: Optional[str] = None
    probe_seconds: float = 0.0

    @property
    def target(self) -> Target:
        """The chosen :class:`~coopkit.runtime.engines.Target`."""
        engine, _, device = self.chosen.partition(":")
        return Target(engine, device)

    def measurement(self, label: str) -> Measurement:
        """The figures of the target named ``label``."""
        return next(m for m in self.measurements if m.target == label)

    def compute_of(self, target: Target) -> str:
        """The compute precision ``target`` was measured in (``fp32`` for engines without bf16)."""
        return self.measurement(target.label).compute

    def summary(self) -> str:
        """One line: the choice, then every target's figures (images/s at each batch size)."""
        sizes = "/".join(str(b) for b in self.batch_sizes)
        where = "cache" if self.from_cache else f"measured in {self.probe_seconds:.1f} s"
        others = "; ".join(m.describe() for m in self.measurements)
        return f"{self.chosen} chosen ({where}; images/s at batch {sizes}): {others}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "EngineChoice":
        fields = dict(raw)
        fields["measurements"] = [Measurement(**m) for m in raw["measurements"]]
        return cls(**fields)


def probe_images(n: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """``n`` uint8 images ``(n, H, W, 3)``: coarse random blocks blurred into smooth shapes, plus noise."""
    rng = np.random.default_rng(seed)
    h, w = size
    cells = rng.uniform(0, 255, (n, 6, 6, 3))
    ys = np.linspace(0, 5, h)
    xs = np.linspace(0, 5, w)
    y0, x0 = np.floor(ys).astype(int).clip(0, 4), np.floor(xs).astype(int).clip(0, 4)
    fy, fx = (ys - y0)[None, :, None, None], (xs - x0)[None, None, :, None]
    top = cells[:, y0][:, :, x0] * (1 - fx) + cells[:, y0][:, :, x0 + 1] * fx  # (n, H, W, 3)
    bottom = cells[:, y0 + 1][:, :, x0] * (1 - fx) + cells[:, y0 + 1][:, :, x0 + 1] * fx
    smooth = top * (1 - fy) + bottom * fy
    return np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)


def agreement(reference: np.ndarray, got: np.ndarray, tolerance: float) -> tuple[float, float, str]:
    """``(max probability difference, top-1 agreement, reason)`` of ``got`` against
    ``reference`` (both ``(n, n_classes)``); ``reason`` is ``""`` when they agree: the same top-1
    wherever the reference's top two are more than ``2 * tolerance`` apart, every probability
    within ``tolerance``, all finite."""
    if got.shape != reference.shape:
        return math.inf, 0.0, f"outputs of shape {got.shape}, the reference gives {reference.shape}"
    if not np.isfinite(got).all():
        return math.inf, 0.0, "non-finite outputs"
    diff = float(np.abs(got - reference).max()) if got.size else 0.0
    top_ref, top_got = reference.argmax(1), got.argmax(1)
    ordered = np.sort(reference, axis=1)
    gap = ordered[:, -1] - ordered[:, -2] if reference.shape[1] > 1 else np.full(len(reference), np.inf)
    flips = int(((top_ref != top_got) & (gap > 2 * tolerance)).sum())
    agree = float((top_ref == top_got).mean()) if len(reference) else 1.0
    if flips:
        return diff, agree, f"disagrees: top-1 differs on {flips} of {len(reference)} probe images"
    if diff > tolerance:
        return diff, agree, f"disagrees: probabilities differ by up to {diff:.3g} (tolerance {tolerance:g})"
    return diff, agree, ""


def _images_per_second(session: Any, batch: np.ndarray, seconds: float) -> float:
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < MIN_RUNS or (len(times) < MAX_RUNS and time.perf_counter() < deadline):
        start = time.perf_counter()
        session.run(["probs"], {INPUT_NAME: batch})
        times.append(time.perf_counter() - start)
    return len(batch) / float(np.median(times))


class _Probe:
    """The reference's answers on the probe images, and the measurement of one target after another."""

    def __init__(self, path: Path, batch_size: int, threads: Optional[int], spinning: bool, seconds: float) -> None:
        self.path, self.threads, self.spinning, self.seconds = path, threads, spinning, seconds
        reference = OnnxruntimeEngine().open(path, REFERENCE, "fp32", threads, spinning)
        try:
            self.metadata = ModelMetadata.from_props(reference.get_modelmeta().custom_metadata_map)
        except MetadataError as e:
            raise MetadataError(f"{path}: {e}") from None
        fixed = reference.get_inputs()[0].shape[0]
        n = fixed if isinstance(fixed, int) and fixed > 0 else batch_size
        self.batch_sizes = [n] if isinstance(fixed, int) and fixed > 0 else sorted({1, n})
        h, w = self.metadata.image_size
        self.inputs = {"crops": probe_images(n, (h, w))}
        if self.metadata.input_kind == INPUT_RAW:  # decoded images larger than the crop: the graph resizes
            self.inputs["decoded"] = probe_images(n, (int(h * 1.5) + 1, int(w * 1.25) + 3), seed=1)
        self.reference = {
            kind: {b: reference.run(["probs"], {INPUT_NAME: x[:b]})[0] for b in self.batch_sizes}
            for kind, x in self.inputs.items()
        }
        self.tolerance = PROB_TOLERANCE.get(self.metadata.precision, PROB_TOLERANCE["int8"])

    def measure(self, engine: Any, target: Target, compute: str) -> Measurement:
        result = Measurement(target.label, version=_version(engine), compute=compute)
        start = time.perf_counter()
        try:
            session = engine.open(self.path, target, compute, self.threads, self.spinning, self.batch_sizes)
        except Exception as e:  # noqa: BLE001 - any failure to load skips this target, with its reason
            result.reason = f"failed to load: {_one_line(e)}"
            return result
        result.load_seconds = time.perf_counter() - start
        result.compute = getattr(session, "compute", "fp32")
        result.tolerance = max(self.tolerance, BF16_PROB_TOLERANCE if result.compute == "bf16" else 0.0)
        try:
            provider = session.get_providers()[0]
            kind = "decoded" if "decoded" in self.inputs and resizes_in_graph(self.metadata, provider) else "crops"
            worst, agree = 0.0, 1.0
            for b in self.batch_sizes:
                got = session.run(["probs"], {INPUT_NAME: self.inputs[kind][:b]})[0]
                diff, share, reason = agreement(self.reference[kind][b], np.asarray(got, np.float32), result.tolerance)
                worst, agree = max(worst, diff), min(agree, share)
                result.reason = result.reason or (f"{reason} at batch {b}" if reason else "")
            result.max_prob_diff, result.top1_agreement = worst, agree
            for b in self.batch_sizes:  # timed even when it disagrees: its figures are reported
                result.images_per_s[str(b)] = _images_per_second(session, self.inputs[kind][:b], self.seconds)
        except Exception as e:  # noqa: BLE001 - a target that crashes is skipped, with its reason
            result.reason = f"failed to run: {_one_line(e)}"
            return result
        finally:
            close = getattr(session, "close", None)
            if close is not None:
                close()
        result.eligible = not result.reason
        return result


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


def _version(engine: Any) -> str:
    try:
        return str(engine.version)
    except Exception as e:  # noqa: BLE001 - an engine whose version cannot be read is still tried
        return f"unknown ({_one_line(e)})"


def _targets(engine: Any, device: str) -> tuple[list[Target], str]:
    try:
        return list(engine.targets(device)), ""
    except Exception as e:  # noqa: BLE001 - an engine that cannot list its devices is skipped
        return [], _one_line(e)


def choose_engine(
    path: Union[str, os.PathLike],
    *,
    device: str = "auto",
    compute: str = "fp32",
    batch_size: int = 32,
    threads: Optional[int] = None,
    spinning: bool = False,
    engines: Optional[Sequence[Any]] = None,
    cache: bool = True,
    refresh: bool = False,
    probe_seconds: float = PROBE_SECONDS,
) -> EngineChoice:
    """The fastest engine and device whose answers equal the reference's on ``path``, measured
    once per file and machine and then read from the cache (see the module's description).

    Args:
        path: The ``.onnx`` file (a coopkit image graph).
        device: Limits the devices tried: ``auto`` (all), ``cpu``, ``cuda``/``cuda:N``
            (onnxruntime's CUDA and TensorRT), ``gpu``/``gpu:N`` (OpenVINO's GPUs).
        compute: ``fp32``, or ``bf16`` to let engines that can compute in bf16 (held to
            :data:`BF16_PROB_TOLERANCE`).
        batch_size: The serving batch, measured beside batch 1.
        threads: CPU threads each engine runs with (``None``: one per idle CPU).
        spinning: onnxruntime's thread spinning.
        engines: The engines to try (default :func:`~coopkit.runtime.engines.installed_engines`);
            each has ``name``, ``version``, ``computes``, ``targets(device)`` and ``open(path,
            target, compute, threads, spinning)``.
        cache: Read and write the cache (``False``: measure, keep nothing).
        refresh: Measure again even when the cache holds a choice (and replace it).
        probe_seconds: Timing per target and batch size.

    Raises:
        MetadataError: not a coopkit image graph (the reference cannot read it).
        RuntimeError: no engine agrees with the reference (its own run failed).
    """
    check_engine("auto", compute)
    path = Path(path)
    engines = list(engines) if engines is not None else installed_engines()
    targets = {e.name: _targets(e, device) for e in engines}  # name -> (targets, why none)
    fields = {
        "probe": PROBE_VERSION,
        "file": model_sha256(path),
        "machine": machine_info(),
        "engines": {e.name: _version(e) for e in engines},
        "targets": {name: [t.label for t in found] for name, (found, _) in targets.items()},
        "compute": compute,
        "device": device,
        "batch_size": int(batch_size),
        "threads": threads,
    }
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    file = cache_root() / "engines" / f"{key[:32]}.json"
    if cache and not refresh:
        cached = _read_cache(file, key)
        if cached is not None:
            return cached
    start = time.perf_counter()
    probe = _Probe(path, int(batch_size), threads, spinning, probe_seconds)
    measurements = []
    for engine in engines:
        found, problem = targets[engine.name]
        if problem:
            measurements.append(Measurement(f"{engine.name}:{device}", _version(engine), reason=f"no devices: {problem}"))
        for target in found:
            m = probe.measure(engine, target, compute if compute in getattr(engine, "computes", ("fp32",)) else "fp32")
            if not m.eligible:
                logger.warning("engine auto: %s skipped for %s: %s", m.target, path.name, m.reason)
            measurements.append(m)
    eligible = [m for m in measurements if m.eligible]
    if not eligible:
        raise RuntimeError(f"{path}: no engine can run this file: " + "; ".join(m.describe() for m in measurements))
    best = max(eligible, key=lambda m: m.score)
    choice = EngineChoice(best.target, measurements, probe.batch_sizes, compute, key, fields,
                          probe_seconds=time.perf_counter() - start)
    if cache:
        choice.cache_file = _write_cache(file, choice)
    return choice


def _read_cache(file: Path, key: str) -> Optional[EngineChoice]:
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
        choice = EngineChoice.from_dict(raw)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as e:
        logger.warning("engine auto: ignoring the damaged cache file %s (%s); measuring again", file, _one_line(e))
        return None
    if choice.key != key:
        return None
    choice.from_cache, choice.cache_file = True, str(file)
    return choice


def _write_cache(file: Path, choice: EngineChoice) -> Optional[str]:
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(file, json.dumps(choice.to_dict(), indent=1, sort_keys=True) + "\n", fsync=False)
    except OSError as e:
        logger.warning("engine auto: cannot keep the choice in %s (%s); it will be measured again", file, _one_line(e))
        return None
    return str(file)


def open_engine(
    path: Union[str, os.PathLike],
    engine: str = ONNXRUNTIME,
    compute: str = "fp32",
    device: str = "auto",
    threads: Optional[int] = None,
    providers: Optional[Sequence[ProviderSpec]] = None,
    *,
    spinning: bool = False,
    batch_size: int = 32,
) -> tuple[Any, EngineInfo]:
    """Open ``path`` on ``engine``: ``(session, EngineInfo)``.

    Args:
        path: The ``.onnx`` file.
        engine: ``onnxruntime`` (the session of :func:`~coopkit.runtime.session.open_session`,
            as before engines existed), ``openvino``, or ``auto`` (the fastest engine and device
            whose answers equal onnxruntime's on the CPU, measured once per file and machine:
            :func:`~coopkit.runtime.engine_choice.choose_engine`).
        compute: ``fp32`` or ``bf16`` (see :data:`~coopkit.runtime.engines.COMPUTES`).
        device: onnxruntime: ``auto``, ``cpu``, ``cuda``, ``cuda:N``; OpenVINO: ``auto``,
            ``cpu``, ``gpu``, ``gpu:N``; ``auto`` engine: any of these, limiting what it tries.
        threads: CPU threads (``None``: one per idle CPU).
        providers: onnxruntime providers (``engine="onnxruntime"`` only).
        spinning: onnxruntime's thread spinning.
        batch_size: The serving batch ``auto`` measures (beside batch 1), and, with 1, the batch
            sizes OpenVINO compiles for a static shape.

    Raises:
        ValueError: an unknown engine, compute or device, or providers with another engine.
        MetadataError: the engine cannot read the file.
        RuntimeError: the engine is not installed, or the device cannot run.
    """
    check_engine(engine, compute)
    if providers is not None and engine != ONNXRUNTIME:
        raise ValueError(f"providers are onnxruntime's; they need engine='onnxruntime', not {engine!r}")
    if engine == ONNXRUNTIME:
        session = open_session(path, device, threads, providers, spinning=spinning)
        return session, EngineInfo(ONNXRUNTIME, onnxruntime_device(session), "fp32", session.get_providers()[0],
                                   reopen={"engine": ONNXRUNTIME, "device": device, "providers": providers})
    if engine == OPENVINO:
        name = openvino_device(device)  # CPU, GPU, GPU.1
        session = OpenVINOSession(path, name, compute, threads, batch_sizes=(1, batch_size))
        where = name.lower().replace(".", ":")
        return session, EngineInfo(OPENVINO, where, session.compute, session.get_providers()[0],
                                   reopen={"engine": OPENVINO, "device": where, "compute": compute})
    choice = choose_engine(path, device=device, compute=compute, batch_size=batch_size, threads=threads,
                           spinning=spinning)
    target = choice.target
    engines = {e.name: e for e in installed_engines()}
    try:
        session = engines[target.engine].open(path, target, choice.compute_of(target), threads, spinning,
                                             (1, batch_size))
    except Exception as e:  # noqa: BLE001 - the cached choice no longer opens: measure again, once
        if not choice.from_cache:
            raise
        logger.warning("engine auto: the cached choice %s no longer opens %s (%s); measuring again",
                       target.label, Path(path).name, _one_line(e))
        choice = choose_engine(path, device=device, compute=compute, batch_size=batch_size, threads=threads,
                               spinning=spinning, refresh=True)
        target = choice.target
        session = engines[target.engine].open(path, target, choice.compute_of(target), threads, spinning,
                                             (1, batch_size))
    info = EngineInfo(target.engine, target.device, getattr(session, "compute", "fp32"), session.get_providers()[0],
                      reopen=reopen_args(target, choice.compute_of(target)), choice=choice)
    logger.info("engine auto: %s", choice.summary())
    return session, info


def reopen_args(target: Target, compute: str = "fp32") -> dict[str, Any]:
    """The :func:`open_engine` arguments that open another file (the text graph) on ``target``."""
    if target.engine != ONNXRUNTIME:
        return {"engine": target.engine, "device": target.device, "compute": compute}
    kind, index = split_device(target.device)
    providers = ort_providers(kind, index or 0)
    return {"engine": ONNXRUNTIME, "device": "cpu" if providers is None else "auto", "providers": providers}
