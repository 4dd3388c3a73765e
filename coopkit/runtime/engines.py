"""Engines: what runs an exported graph. onnxruntime (the reference) or OpenVINO, one session surface.

Every engine opens the same ``.onnx`` file (fp32, fp16, int8, raw-input, external data, the text
graph) and hands back a session with the small surface the runtime uses, onnxruntime's own:
``get_inputs()`` / ``get_outputs()`` (``name``, ``shape``, ``type``), ``get_modelmeta()``
(``custom_metadata_map``), ``get_providers()`` and ``run(output_names, feeds)``. Preprocessing,
checks, metadata and answers stay the runtime's, whatever the engine.

* **onnxruntime** (:class:`OnnxruntimeEngine`): the session is onnxruntime's own, made by
  :mod:`coopkit.runtime.session` (CPU, CUDA, TensorRT), exactly as before engines existed.
* **OpenVINO** (:class:`OpenVINOEngine`, the ``openvino`` extra): :class:`OpenVINOSession`.
  Its CPU plugin computes in bf16 by default on CPUs with AVX-512 BF16 or AMX (and its GPU
  plugin in fp16), which changes answers; coopkit pins ``INFERENCE_PRECISION_HINT=f32`` unless
  ``compute="bf16"`` is asked, and reads back what the compiled model really uses.

``engine="auto"`` measures every installed engine and device on the file and keeps the fastest
one whose answers equal the reference engine's (:mod:`coopkit.runtime.engine_choice`).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np

from .configbase import ConfigMixin
from .contract import INPUT_NAME, INPUT_RAW, MetadataError, ModelMetadata
from .extras import require
from .preprocess import resize_plan
from .session import CPU, CUDA, TENSORRT, ProviderSpec, cuda_device_count, default_threads, open_session

if TYPE_CHECKING:
    from .engine_choice import EngineChoice

logger = logging.getLogger(__name__)

ONNXRUNTIME = "onnxruntime"
OPENVINO = "openvino"
#: What ``engine=`` accepts: ``auto`` measures the installed engines (see :mod:`~coopkit.runtime.engine_choice`).
ENGINES = ("auto", ONNXRUNTIME, OPENVINO)
#: What ``compute=`` accepts: ``fp32`` runs the file as stored with fp32 arithmetic for its float
#: ops (an fp16 file's weights as stored, an int8 file's int8 ops as quantised); ``bf16`` lets an
#: engine that can (OpenVINO on a CPU with AVX-512 BF16 or AMX) compute float ops in bfloat16.
COMPUTES = ("fp32", "bf16")
#: The provider name an OpenVINO session reports, ``OpenVINO:<device>`` (``OpenVINO:CPU``).
OPENVINO_PROVIDER = "OpenVINO:"
#: Filters whose antialiased ``Resize`` onnxruntime's CUDA kernel gets wrong (onnxruntime issue
#: 25264: cubic with antialias, a wrong launch grid and a hardcoded cubic coefficient). A raw-input
#: file resizing with one of them is fed Pillow crops on CUDA (``benchmarks/gpu_check_rawgraph.py``
#: compares CUDA with the CPU for every filter).
CUDA_WRONG_RESIZE = ("bicubic",)
#: OpenVINO's ``INFERENCE_PRECISION_HINT`` per ``compute``.
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}
_OV_TYPES = {"u8": "tensor(uint8)", "i8": "tensor(int8)", "f32": "tensor(float)", "f16": "tensor(float16)",
             "i64": "tensor(int64)", "i32": "tensor(int32)", "boolean": "tensor(bool)"}

PathLike = Union[str, "os.PathLike[str]"]


def check_engine(engine: str, compute: str) -> tuple[str, str]:
    """``(engine, compute)`` if both are known; else a ValueError naming the bad one and the choices."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not one of {ENGINES}")
    if compute not in COMPUTES:
        raise ValueError(f"compute {compute!r} is not one of {COMPUTES}")
    if engine == ONNXRUNTIME and compute != "fp32":
        raise ValueError(f"compute={compute!r} needs engine='openvino' or 'auto': onnxruntime computes a file's "
                         "float ops in fp32 (or as the file stores them)")
    return engine, compute


@dataclass(frozen=True)
class EngineConfig(ConfigMixin):
    """Which engine runs the graph, in which compute precision: the ``engine=`` and ``compute=``
    of :class:`~coopkit.runtime.Classifier`, as ``coopkit predict`` and ``coopkit serve`` take them
    (``--runtime-engine``: ``coopkit predict`` has ``--engine local|ray`` for where the job runs)."""

    engine: str = field(default=ONNXRUNTIME, metadata={"flag": "runtime-engine", "choices": ENGINES, "help": (
        "What runs the graph: onnxruntime (the reference), openvino (the openvino extra), or auto (the fastest "
        "installed engine and device whose answers equal onnxruntime's, measured once per file and machine).")})
    compute: str = field(default="fp32", metadata={"choices": COMPUTES, "help": (
        "fp32: the file's own precision; bf16: OpenVINO computes float ops in bfloat16 where the CPU can "
        "(changes answers; openvino or auto only).")})

    def __post_init__(self) -> None:
        check_engine(self.engine, self.compute)


@dataclass(frozen=True)
class Target:
    """One engine on one device: what ``auto`` measures and what a session runs on.

    ``device`` is ``cpu``, ``cuda:N`` or ``tensorrt:N`` for onnxruntime, ``cpu``, ``gpu`` or
    ``gpu:N`` for OpenVINO. ``label`` (``openvino:cpu``) names it in logs, caches and reports.
    """

    engine: str
    device: str

    @property
    def label(self) -> str:
        return f"{self.engine}:{self.device}"


@dataclass(frozen=True)
class EngineInfo:
    """What runs a classifier's graph (``Classifier.engine``).

    Attributes:
        engine: ``onnxruntime`` or ``openvino``.
        device: The device the graph runs on, as a :class:`Target` names it (``cpu``,
            ``cuda:0``, ``tensorrt:0``, ``gpu:1``).
        compute: The precision float ops really run in: ``fp32`` (the file's own precision) or
            ``bf16`` (read back from the engine, not taken from the request).
        provider: The session's first provider (``CPUExecutionProvider``, ``OpenVINO:CPU``...).
        reopen: The :func:`open_engine` arguments that open another file the same way (the
            companion text graph runs where the image graph runs).
        choice: ``auto``'s measurement of every engine (``None`` when the engine was named).
    """

    engine: str
    device: str
    compute: str
    provider: str
    reopen: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    choice: Optional["EngineChoice"] = field(default=None, compare=False, repr=False)

    @property
    def label(self) -> str:
        """``engine:device`` (``openvino:cpu``, ``onnxruntime:cuda:0``)."""
        return f"{self.engine}:{self.device}"

    @property
    def where(self) -> str:
        """``cpu``, ``cuda`` or ``gpu`` (OpenVINO's GPUs): where the graph really runs."""
        if self.provider in (CUDA, TENSORRT):
            return "cuda"
        return "gpu" if self.provider.startswith(OPENVINO_PROVIDER + "GPU") else "cpu"

    def describe(self) -> str:
        """One line: ``openvino:cpu (OpenVINO:CPU, fp32 compute)``, then ``auto``'s choice and figures."""
        text = f"{self.label} ({self.provider}, {self.compute} compute)"
        return text if self.choice is None else f"{text}; auto: {self.choice.summary()}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for ``/health`` and summaries): the choice's figures included."""
        out: dict[str, Any] = {"engine": self.engine, "device": self.device, "compute": self.compute,
                               "provider": self.provider}
        if self.choice is not None:
            c = self.choice
            out["auto"] = {"chosen": c.chosen, "from_cache": c.from_cache, "batch_sizes": c.batch_sizes,
                           "measurements": [vars(m) for m in c.measurements]}
        return out


def onnxruntime_device(session: Any) -> str:
    """The :class:`Target` device of an onnxruntime session: ``cpu``, ``cuda:N`` or ``tensorrt:N``."""
    provider = session.get_providers()[0]
    if provider not in (CUDA, TENSORRT):
        return "cpu"
    index = session.get_provider_options().get(provider, {}).get("device_id", "0")
    return f"{'cuda' if provider == CUDA else 'tensorrt'}:{index}"


def resizes_in_graph(metadata: ModelMetadata, provider: str) -> bool:
    """Whether decoded images go to the graph as they are (a raw-input file on a provider whose
    resize is right), or Pillow crops them first (cropped files, and raw-input files whose filter
    is in :data:`CUDA_WRONG_RESIZE` on CUDA or TensorRT, and every raw-input file on OpenVINO, whose
    antialiased Resize differs from onnxruntime's by up to 0.03 in probabilities)."""
    m = metadata
    if m.input_kind != INPUT_RAW:
        return False
    interpolation = resize_plan(m.image_size, m.resize_mode, m.interpolation, m.fill_color).interpolation
    return not (provider in (CUDA, TENSORRT) and interpolation in CUDA_WRONG_RESIZE or provider.startswith(OPENVINO_PROVIDER))


# --- onnxruntime ------------------------------------------------------------------------------------


class OnnxruntimeEngine:
    """onnxruntime's sessions, made by :mod:`coopkit.runtime.session` (the reference engine)."""

    name = ONNXRUNTIME
    #: The ``compute`` values it can open a file with.
    computes: tuple[str, ...] = ("fp32",)

    @property
    def version(self) -> str:
        import onnxruntime

        return str(onnxruntime.__version__)

    def targets(self, device: str = "auto") -> list[Target]:
        """The devices ``auto`` may try for a ``device`` request: the CPU, and each usable CUDA
        GPU with CUDA and (where onnxruntime has it) TensorRT."""
        import onnxruntime

        kind, index = split_device(device)
        out = [Target(self.name, "cpu")] if kind in ("auto", "cpu") else []
        if kind not in ("auto", "cuda"):
            return out
        available = onnxruntime.get_available_providers()
        count, _ = cuda_device_count() if CUDA in available else (0, "")
        for i in range(count) if index is None else [index]:
            if i < count:
                out.append(Target(self.name, f"cuda:{i}"))
                if TENSORRT in available:
                    out.append(Target(self.name, f"tensorrt:{i}"))
        return out

    def open(self, path: PathLike, target: Target, compute: str = "fp32", threads: Optional[int] = None,
             spinning: bool = False, batch_sizes: Sequence[int] = ()) -> Any:
        """An onnxruntime session of ``path`` on ``target``; CUDA without TF32 (its default
        changes fp32 answers). Raises RuntimeError when the device's provider does not start.
        ``batch_sizes`` is OpenVINO's (onnxruntime runs every batch size alike; ignored)."""
        if compute != "fp32":
            raise ValueError(f"onnxruntime has no {compute} compute")
        kind, index = split_device(target.device)
        providers = ort_providers(kind, index or 0)
        session = open_session(path, "cpu" if providers is None else "auto", threads, providers, spinning=spinning)
        wanted = CPU if providers is None else providers[0][0]
        if session.get_providers()[0] != wanted:
            raise RuntimeError(f"{wanted} did not start (onnxruntime fell back to {session.get_providers()[0]})")
        return session


def ort_providers(kind: str, index: int) -> Optional[list[ProviderSpec]]:
    if kind == "cpu":
        return None
    cuda = (CUDA, {"device_id": index, "use_tf32": 0})
    if kind == "tensorrt":
        return [(TENSORRT, {"device_id": index}), cuda]
    return [cuda]


def split_device(device: str) -> tuple[str, Optional[int]]:
    kind, _, index = str(device).strip().lower().partition(":")
    return kind, int(index) if index.isdigit() else None


# --- OpenVINO ---------------------------------------------------------------------------------------


def _openvino() -> Any:
    """The ``openvino`` package (the ``openvino`` extra); MissingExtraError (a RuntimeError) without it."""
    return require("openvino", "openvino", "engine='openvino'")


@dataclass(frozen=True)
class _Node:
    """An input or output as onnxruntime describes it: ``name``, ``shape`` (ints; ``None`` for
    a dynamic size), ``type`` (``tensor(uint8)``)."""

    name: str
    shape: list[Optional[int]]
    type: str


@dataclass(frozen=True)
class _ModelMeta:
    custom_metadata_map: dict[str, str]


class OpenVINOSession:
    """An OpenVINO compiled model behind onnxruntime's session surface.

    Args:
        path: The ``.onnx`` file (OpenVINO reads ONNX directly, external data included).
        device: OpenVINO's device name (``CPU``, ``GPU``, ``GPU.1``).
        compute: ``fp32`` pins ``INFERENCE_PRECISION_HINT=f32``; ``bf16`` asks for bf16.
        threads: CPU threads (``None``: :func:`~coopkit.runtime.session.default_threads`).
        batch_sizes: Batch sizes compiled for a static shape (see below).

    Thread-safe: each call takes an idle infer request from a pool (or makes one).

    OpenVINO's CPU plugin runs a graph compiled for one static shape faster than the same graph
    with a dynamic batch (``benchmarks/bench_engines.py``: 2-9% on ViT-B-32, 15-30% on
    coopkit-tiny), so the image graph is compiled once per size in ``batch_sizes`` (the runtime
    passes 1 and its serving batch), and once more with its dynamic batch, at the first call of
    another size. Each compiled model holds its own copy of the weights (about 0.6-1 GB for
    ViT-B-32): ``batch_sizes=()`` keeps a single dynamic one.

    Attributes:
        compute: The precision the compiled model really computes in (``fp32`` or ``bf16``),
            read back from OpenVINO: ``bf16`` asked on a CPU without it runs in ``fp32``.
        static_batches: The batch sizes with a static-shape compiled model.
    """

    def __init__(self, path: PathLike, device: str = "CPU", compute: str = "fp32",
                 threads: Optional[int] = None, batch_sizes: Sequence[int] = ()) -> None:
        ov = _openvino()
        self._core = core = ov.Core()
        self.path = os.fspath(path)
        self.device = device
        try:
            model = core.read_model(self.path)
        except RuntimeError as e:
            raise MetadataError(f"{self.path}: OpenVINO cannot read this model: {_ov_message(e)}") from None
        self._meta = _ModelMeta(_openvino_metadata(model))
        self._config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": _OV_PRECISION[compute]}
        if device.split(".")[0] == "CPU":
            # one stream with every thread (one request at a time, as onnxruntime's intra-op pool);
            # threads not pinned to cores: on a busy machine a pinned thread waits for its core
            self._config.update(INFERENCE_NUM_THREADS=threads or default_threads(), NUM_STREAMS=1,
                                ENABLE_CPU_PINNING=False)
        self._model = model
        self._lock = threading.Lock()
        #: compiled models by batch size (``None``: the dynamic one), each with its idle infer requests
        self._compiled: dict[Optional[int], tuple[Any, "queue.SimpleQueue[Any]"]] = {}
        self.static_batches = static_batch_sizes(model, batch_sizes)
        for b in self.static_batches:
            self._compile(b)
        first = self._compile(None) if not self.static_batches else self._compiled[self.static_batches[0]][0]
        used = str(first.get_property("INFERENCE_PRECISION_HINT")).lower()
        self.compute = "bf16" if "bf16" in used or "bfloat16" in used else "fp32"
        if "16" in used and self.compute != "bf16":
            raise RuntimeError(f"OpenVINO compiled {self.path} on {device} in {used}, not the {compute} asked for")
        if self.compute != compute:
            logger.warning("OpenVINO on %s cannot compute in %s here; it computes in %s", device, compute, self.compute)
        self._ports = first.inputs, first.outputs
        self._outputs = {name: i for i, port in enumerate(first.outputs) for name in port.get_names()}

    def _compile(self, batch: Optional[int]) -> Any:
        """The model compiled for a static ``batch`` (``None``: the file's own dynamic shapes), made once."""
        with self._lock:
            if batch not in self._compiled:
                model = self._model
                if batch is not None:  # (batch, *static dims) on the image input; the file itself is untouched
                    model = model.clone()
                    port = model.input(0)
                    model.reshape({port: [batch, *[d.get_length() for d in list(port.get_partial_shape())[1:]]]})
                try:
                    compiled = self._core.compile_model(model, self.device, self._config)
                except RuntimeError as e:
                    raise RuntimeError(f"OpenVINO cannot compile {self.path} for {self.device}: {_ov_message(e)}") from None
                self._compiled[batch] = (compiled, queue.SimpleQueue())
            return self._compiled[batch][0]

    def get_inputs(self) -> list[_Node]:
        return [_node(p) for p in self._model.inputs]

    def get_outputs(self) -> list[_Node]:
        return [_node(p) for p in self._model.outputs]

    def get_modelmeta(self) -> _ModelMeta:
        return self._meta

    def get_providers(self) -> list[str]:
        return [OPENVINO_PROVIDER + self.device]

    def run(self, output_names: Optional[Sequence[str]], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The named outputs (all when ``None``) for ``feeds``, as numpy arrays."""
        names = list(output_names) if output_names else [n.name for n in self.get_outputs()]
        unknown = [n for n in names if n not in self._outputs]
        if unknown:
            raise ValueError(f"outputs {unknown} are not in the graph; it has {sorted(self._outputs)}")
        feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        batch = len(next(iter(feeds.values()))) if feeds else None
        compiled, requests = self._compiled.get(batch) or self._compiled.get(None) or (None, None)
        if compiled is None:  # a batch size without its own static model: the dynamic one, compiled once
            self._compile(None)
            compiled, requests = self._compiled[None]
        try:
            request = requests.get_nowait()
        except queue.Empty:
            request = compiled.create_infer_request()
        try:
            # inputs read in place (the call is synchronous); outputs copied out (the request is reused)
            results = request.infer(feeds, share_inputs=True, share_outputs=False)
            return [np.asarray(results[compiled.outputs[self._outputs[n]]]) for n in names]
        finally:
            requests.put(request)

    def close(self) -> None:
        """Drop the compiled model and its requests (the session is unusable afterwards)."""
        self._compiled.clear()


def _ov_message(error: Exception) -> str:
    """OpenVINO's error without its source-location lines, on one line."""
    lines = [x.strip() for x in str(error).splitlines() if x.strip() and not x.startswith("Exception from src")]
    return " ".join(lines)[:300] or type(error).__name__


def static_batch_sizes(model: Any, batch_sizes: Sequence[int]) -> tuple[int, ...]:
    """The ``batch_sizes`` worth a static-shape compiled model of ``model``: all of them when its
    input is the image input with a dynamic batch and static other dimensions (crops of a fixed
    size), none otherwise (a raw-input graph, the text graph, a file exported for one batch)."""
    if len(model.inputs) != 1 or INPUT_NAME not in model.input(0).get_names():
        return ()
    shape = model.input(0).get_partial_shape()
    if shape.rank.is_dynamic or shape[0].is_static or not all(d.is_static for d in list(shape)[1:]):
        return ()
    return tuple(sorted({int(b) for b in batch_sizes if int(b) > 0}))


def _node(port: Any) -> _Node:
    names = port.get_names()
    # an ONNX tensor may carry several names in OpenVINO; the graph's own input/output name is the one
    # the file declares, which is the shortest non-internal one (internal names start with "/")
    name = sorted(names, key=lambda n: (n.startswith("/"), len(n), n))[0]
    shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
    kind = port.get_element_type().get_type_name()
    return _Node(name, shape, _OV_TYPES.get(kind, f"tensor({kind})"))


def _openvino_metadata(model: Any) -> dict[str, str]:
    """The file's ONNX ``metadata_props``, which OpenVINO's ONNX reader keeps under ``framework``."""
    if not model.has_rt_info(["framework"]):
        return {}
    props = model.get_rt_info()["framework"]
    if not isinstance(props, dict):
        return {}
    return {str(k): v.astype(str) if hasattr(v, "astype") else str(v) for k, v in props.items()}


class OpenVINOEngine:
    """OpenVINO (the ``openvino`` extra): its CPU plugin, and its GPU plugin where OpenVINO sees a GPU."""

    name = OPENVINO
    #: The ``compute`` values it can open a file with.
    computes: tuple[str, ...] = COMPUTES

    @property
    def version(self) -> str:
        return str(_openvino().get_version())

    def targets(self, device: str = "auto") -> list[Target]:
        """``cpu`` for ``auto``/``cpu``; each GPU OpenVINO lists for ``auto``/``gpu``/``gpu:N``."""
        kind, index = split_device(device)
        out = [Target(self.name, "cpu")] if kind in ("auto", "cpu") else []
        if kind in ("auto", "gpu"):
            gpus = [d for d in _openvino().Core().available_devices if d.startswith("GPU")]
            for name in gpus:
                number = int(name.partition(".")[2] or 0)
                if index is None or index == number:
                    out.append(Target(self.name, "gpu" if name == "GPU" else f"gpu:{number}"))
        return out

    def open(self, path: PathLike, target: Target, compute: str = "fp32", threads: Optional[int] = None,
             spinning: bool = False, batch_sizes: Sequence[int] = ()) -> OpenVINOSession:
        """An :class:`OpenVINOSession` of ``path`` on ``target``, with static-shape models for
        ``batch_sizes`` (``spinning`` is onnxruntime's; ignored)."""
        return OpenVINOSession(path, openvino_device(target.device), compute, threads, batch_sizes)


def openvino_device(device: str) -> str:
    """OpenVINO's name for a ``device`` argument: ``auto``/``cpu`` -> ``CPU``, ``gpu`` -> ``GPU``,
    ``gpu:N`` -> ``GPU.N``; a ValueError for anything else (CUDA devices are onnxruntime's)."""
    kind, index = split_device(device)
    if kind in ("auto", "cpu") and index is None and ":" not in str(device):
        return "CPU"
    if kind == "gpu" and (index is not None or ":" not in str(device)):
        return "GPU" if index is None else f"GPU.{index}"
    raise ValueError(f"device {device!r} is not one of ('auto', 'cpu', 'gpu', 'gpu:N') for engine='openvino' "
                     "(CUDA devices are onnxruntime's: engine='onnxruntime' or 'auto')")


def installed_engines() -> list[Any]:
    """The engines this environment can run: onnxruntime always, OpenVINO when it imports."""
    engines: list[Any] = [OnnxruntimeEngine()]
    try:
        _openvino()
    except Exception as e:  # noqa: BLE001 - not installed, or an install that fails to load its libraries
        logger.debug("engine auto: OpenVINO cannot be used: %s", e)
    else:
        engines.append(OpenVINOEngine())
    return engines
