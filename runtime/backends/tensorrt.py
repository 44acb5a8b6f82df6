"""TensorRT backend: runs a bundle's prebuilt engines (``splitbits export BUNDLE --trt``).

Written against the TensorRT 10 Python API (JetPack 6.1/6.2 ship 10.3), which TensorRT 11 keeps
for inference: ``Runtime.deserialize_cuda_engine``, the name-based tensor API (``num_io_tensors``,
``get_tensor_name/mode/dtype/shape``, ``get_tensor_profile_shape``), ``set_input_shape``,
``set_tensor_address`` (its bool result checked) and ``execute_async_v3`` on a non-blocking CUDA
stream. TensorRT < 10 (JetPack 6.0 ships 8.6) is refused with a message that names the JetPacks
that work: its builder needs the explicit-batch flag and has no strong typing, a second build path
nothing here could test.

CUDA comes from cuda-python's runtime bindings (``cuda.bindings.runtime``, or ``cuda.cudart`` in
cuda-python 12.6.0). The runtime API uses the context current on the calling thread; every session
call first binds the device's primary context to its thread (``cudaSetDevice``), so a session may
run on any thread (``send`` encodes on a worker thread, ``serve`` decodes on a pool), and a lock
serialises calls into one session. pycuda is not supported: ``pycuda.autoinit``'s context is
current on the importing thread only. A driver older than the runtime cuda-python implements (pip's
cuda-python 12.9 on JetPack 6.1/6.2's CUDA 12.6 driver) is a clear error at start-up, not a
``cudaErrorInsufficientDriver`` later; the ``jetson`` extra pins cuda-python 12.6.

``cuda_graph=True``: one execution context per input shape (sharing the session's device memory and
I/O buffers): its first run is a plain enqueue + sync (settles what a new shape sets up), then it is
captured in thread-local mode and replayed. A graph replays the shapes, addresses and context state
it captured, so a context is never re-run with another shape after its capture. If capture fails,
the capture is ended and discarded, the error is logged and reported (``describe()``'s
``cuda_graph_fallback``), and the session runs without graphs, as trtexec does.

Engines are device artefacts: the manifest lists them under ``"engines"`` (outside the model
fingerprint) keyed ``{graph}.{device}.trt{version}.{precision}``; this backend loads only engines
built for this device and this TensorRT version, and checks their sha256 before deserialising.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from splitbits.runtime.backends.base import Backend, Session
from splitbits.runtime.errors import BackendError

if TYPE_CHECKING:
    from splitbits.runtime.bundle import Bundle

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
#: engine choice when no precision is asked for (per graph; ``hyper`` is always built in FP32)
DEFAULT_PREFERENCE = ("fp16", "fp32", "int8")
ENGINE_DIR = "engines"
#: golden tolerances (atol, rtol) of engines per precision; symbols are exact except for INT8,
#: whose end-to-end top-1 must still agree on at least ``INT8_MIN_TOP1`` of the golden images
TOLERANCES = {"fp32": (1e-3, 1e-3), "fp16": (5e-2, 5e-2), "int8": (0.25, 0.1)}
INT8_MIN_TOP1 = 0.5
#: the oldest TensorRT this backend and the builder accept (JetPack 6.1/6.2 ship 10.3)
MIN_TENSORRT = (10, 0)
#: cuda-python whose CUDA runtime JetPack 6.1/6.2's driver (CUDA 12.6) supports
JETSON_CUDA_PYTHON = "cuda-python>=12.6,<12.7"


# --------------------------------------------------------------------------------------------
# names (pure logic, tested without TensorRT)
# --------------------------------------------------------------------------------------------


def slugify(name: str) -> str:
    """``"NVIDIA Jetson AGX Orin Developer Kit"`` → ``"nvidia-jetson-agx-orin-developer-kit"``."""
    s = re.sub(r"[^a-z0-9]+", "-", name.strip().lower()).strip("-")
    return s or "unknown-device"


def version_tag(version: str) -> str:
    """TensorRT ``"10.3.0.30"`` → ``"10.3.0"`` (engines are tied to major.minor.patch)."""
    parts = re.findall(r"\d+", version)
    if not parts:
        raise ValueError(f"not a TensorRT version: {version!r}")
    return ".".join([*parts, "0", "0"][:3])


def version_tuple(version: str) -> tuple[int, int, int]:
    """``"10.12.0.36"`` → ``(10, 12, 0)``."""
    major, minor, patch = (int(p) for p in version_tag(version).split("."))
    return major, minor, patch


def check_tensorrt_version(version: str) -> None:
    """Refuse TensorRT older than :data:`MIN_TENSORRT` with a line that says which JetPacks work."""
    if version_tuple(version)[:2] < MIN_TENSORRT:
        raise BackendError(
            f"TensorRT {version} is not supported: splitbits needs TensorRT 10 or newer, i.e. on a Jetson "
            "JetPack 6.1 or 6.2 (TensorRT 10.3, CUDA 12.6); JetPack 6.0 ships TensorRT 8.6: upgrade it to "
            "L4T r36.4 (jetson/README.md)")


def engine_key(graph: str, device_slug: str, trt_version: str, precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return f"{graph}.{device_slug}.trt{version_tag(trt_version)}.{precision}"


def engine_filename(graph: str, device_slug: str, trt_version: str, precision: str) -> str:
    """Bundle-relative path of an engine: ``engines/{graph}.{device}.trt{X.Y.Z}.{precision}.engine``."""
    return f"{ENGINE_DIR}/{engine_key(graph, device_slug, trt_version, precision)}.engine"


def timing_cache_filename(device_slug: str, trt_version: str) -> str:
    """The timing cache shared by every engine built on one device with one TensorRT version."""
    return f"{ENGINE_DIR}/{device_slug}.trt{version_tag(trt_version)}.timing.cache"


def select_engine(engines: dict[str, dict[str, Any]], graph: str, device_slug: str, trt_version: str,
                  precision: str | None = None) -> tuple[str, dict[str, Any]] | None:
    """The manifest entry to run ``graph`` here: this device, this TensorRT version, and the asked
    precision (falling back to FP32, which is how ``hyper`` is always built), else the first of
    ``DEFAULT_PREFERENCE`` present. ``None`` when nothing fits."""
    order = [precision, "fp32"] if precision else list(DEFAULT_PREFERENCE)
    for p in order:
        key = engine_key(graph, device_slug, trt_version, p)
        if key in engines:
            return key, engines[key]
    return None


def jetson_model(path: str = "/proc/device-tree/model") -> str | None:
    """The board name on a Jetson (``NVIDIA Jetson AGX Orin Developer Kit``), else ``None``."""
    try:
        text = Path(path).read_bytes().decode("utf-8", "replace").strip("\x00 \n")
    except OSError:
        return None
    return text if "jetson" in text.lower() else None


# --------------------------------------------------------------------------------------------
# imports
# --------------------------------------------------------------------------------------------



def import_tensorrt():
    """``import tensorrt`` (10 or newer) or a :class:`BackendError` that says where TensorRT comes from."""
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendError(
            f"TensorRT is not installed here ({exc}). On a Jetson it comes with JetPack "
            "(apt: python3-libnvinfer; use a venv made with --system-site-packages); on an x86 "
            "server: pip install 'splitbits[trt]'"
        ) from exc
    check_tensorrt_version(str(tensorrt.__version__))
    return tensorrt


def _import_cudart() -> Any:
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6.1 (cuda-bindings)
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python 12.6.0 and older
        except ImportError as exc:
            raise BackendError(
                f"cuda-python is not installed: pip install '{JETSON_CUDA_PYTHON}' on JetPack 6.1/6.2 "
                "(jetson/setup.sh does), 'cuda-python>=12,<13' elsewhere (pycuda is not supported)") from exc
    return runtime


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


class CaptureError(BackendError):
    """A CUDA graph capture that failed (the session then runs without graphs)."""


class CudaPython:
    """Device memory, streams and graphs through cuda-python's runtime bindings, on one device
    whose primary context :meth:`bind` makes current on the calling thread."""

    name = "cuda-python"

    def __init__(self, cudart: Any = None, device: int = 0) -> None:
        self.rt = cudart if cudart is not None else _import_cudart()
        self.device = device
        self.driver_version, self.runtime_version = self._versions()
        self.bind()

    def _versions(self) -> tuple[int, int]:
        err, driver = self.rt.cudaDriverGetVersion()
        if err != self.rt.cudaError_t.cudaSuccess or not driver:
            raise BackendError(f"no usable CUDA driver here (cudaDriverGetVersion: {self._name(err)})")
        runtime = int(self._ok(self.rt.cudaRuntimeGetVersion()))
        if runtime // 1000 > driver // 1000:  # no minor-version compatibility across a major version
            raise BackendError(self._driver_message(driver, runtime))
        return int(driver), runtime

    @staticmethod
    def _driver_message(driver: int, runtime: int) -> str:
        return (f"this CUDA driver supports CUDA {_cuda_version(driver)} but cuda-python implements the "
                f"CUDA runtime {_cuda_version(runtime)} (cudaErrorInsufficientDriver): on JetPack 6.1/6.2 "
                f"pip install '{JETSON_CUDA_PYTHON}' (jetson/setup.sh pins it); elsewhere install the "
                "cuda-python of your driver's CUDA version or update the driver")

    def bind(self) -> None:
        """Make the device's primary context current on the calling thread (``cudaSetDevice``)."""
        (err,) = self.rt.cudaSetDevice(self.device)
        if err == self.rt.cudaError_t.cudaErrorInsufficientDriver:
            raise BackendError(self._driver_message(self.driver_version, self.runtime_version))
        self._ok((err,))

    def _name(self, err: Any) -> str:
        try:
            name = self.rt.cudaGetErrorName(err)[1]
            return name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # the error name is a courtesy
            return str(err)

    def _ok(self, res: Any) -> Any:
        err, rest = (res[0], res[1:]) if isinstance(res, tuple) else (res, ())
        if err != self.rt.cudaError_t.cudaSuccess:
            raise BackendError(f"CUDA error: {self._name(err)}")
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else rest

    def malloc(self, nbytes: int) -> int:
        return int(self._ok(self.rt.cudaMalloc(max(nbytes, 1))))

    def free(self, ptr: int) -> None:
        self._ok(self.rt.cudaFree(ptr))

    def host_alloc(self, nbytes: int) -> np.ndarray:
        """Page-locked host memory as a uint8 numpy array."""
        ptr = int(self._ok(self.rt.cudaMallocHost(max(nbytes, 1))))
        return np.ctypeslib.as_array((ctypes.c_uint8 * max(nbytes, 1)).from_address(ptr))

    def host_free(self, arr: np.ndarray) -> None:
        self._ok(self.rt.cudaFreeHost(arr.ctypes.data))

    def stream(self) -> Any:
        """A non-blocking stream (no implicit sync with the legacy default stream, which would
        break graph capture; TensorRT advises against the default stream)."""
        return self._ok(self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking))

    def stream_free(self, stream: Any) -> None:
        self._ok(self.rt.cudaStreamDestroy(stream))

    @staticmethod
    def stream_handle(stream: Any) -> int:
        return int(stream)

    def htod(self, dst: int, src: np.ndarray, stream: Any) -> None:
        self._ok(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes,
                                         self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def dtoh(self, dst: np.ndarray, src: int, stream: Any) -> None:
        self._ok(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes,
                                         self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))

    def sync(self, stream: Any) -> None:
        self._ok(self.rt.cudaStreamSynchronize(stream))

    def capture(self, stream: Any, enqueue: Callable[[], None]) -> Any:
        """Capture what ``enqueue`` puts on ``stream`` into an instantiated graph, in thread-local mode
        (other threads' CUDA calls do not break it). On failure the capture is ended and discarded
        and :class:`CaptureError` carries ``enqueue``'s own error, not the end-capture one
        (trtexec: ``TrtCudaGraph::endCaptureOnError``)."""
        rt = self.rt
        self._ok(rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        try:
            enqueue()
        except BaseException as exc:
            self._discard_capture(stream)
            if isinstance(exc, BackendError):
                raise CaptureError(str(exc)) from exc
            raise
        err, graph = rt.cudaStreamEndCapture(stream)
        if err != rt.cudaError_t.cudaSuccess:
            rt.cudaGetLastError()
            raise CaptureError(f"stream capture failed ({self._name(err)})")
        try:
            return self._ok(rt.cudaGraphInstantiate(graph, 0))
        finally:
            self._ok(rt.cudaGraphDestroy(graph))

    def _discard_capture(self, stream: Any) -> None:
        err, graph = self.rt.cudaStreamEndCapture(stream)  # an invalidated capture returns no graph
        if err == self.rt.cudaError_t.cudaSuccess and graph is not None:
            self.rt.cudaGraphDestroy(graph)
        self.rt.cudaGetLastError()  # clear the error the failed capture left on this thread

    def launch(self, graph_exec: Any, stream: Any) -> None:
        self._ok(self.rt.cudaGraphLaunch(graph_exec, stream))

    def graph_free(self, graph_exec: Any) -> None:
        self._ok(self.rt.cudaGraphExecDestroy(graph_exec))

    def device_name(self) -> str:
        props = self._ok(self.rt.cudaGetDeviceProperties(self.device))
        name = props.name
        return (name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)).strip("\x00 ")


def load_cuda() -> CudaPython:
    """cuda-python on device 0, or a :class:`BackendError` that says what to install."""
    return CudaPython()


# --------------------------------------------------------------------------------------------
# session and backend
# --------------------------------------------------------------------------------------------


@dataclass
class _Graph:
    """A CUDA graph and the execution context it was captured from, which runs nothing else."""

    context: Any
    graph: Any


class TrtSession(Session):
    """One deserialised engine with its execution context(s), stream and fixed I/O buffers."""

    def __init__(self, backend: TrtBackend, engine_bytes: bytes, label: str) -> None:
        trt, cuda = backend.trt, backend.cuda
        self.trt, self.cuda, self.label = trt, cuda, label
        self.cuda_graph = backend.cuda_graph
        self.graph_error: str | None = None
        self._report_graph_error = backend.graph_fallbacks.__setitem__
        self._lock = threading.Lock()
        self._dev: dict[str, int] = {}
        self._host: dict[str, np.ndarray] = {}
        self._graphs: dict[tuple, _Graph] = {}
        self.stream = None
        self._scratch: int | None = None
        self._scratch_size = 0
        cuda.bind()
        self.engine = backend.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise BackendError(f"{label}: TensorRT could not deserialise the engine (built by another "
                               "TensorRT version or for another GPU?)")
        e = self.engine
        names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        self.input_names = [n for n in names if e.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.dtypes = {n: np.dtype(trt.nptype(e.get_tensor_dtype(n))) for n in names}
        self.dims = {n: tuple(int(d) for d in e.get_tensor_shape(n)) for n in names}
        self._share_device_memory()
        self.context = self._new_context()
        max_shapes = {n: self._max_shape(n) for n in self.input_names}
        self._set_shapes(self.context, max_shapes)
        self.max_batch = min(s[0] for s in max_shapes.values()) if max_shapes else 1
        for n in self.output_names:
            max_shapes[n] = tuple(int(d) for d in self.context.get_tensor_shape(n))
        self.stream = cuda.stream()
        for n in names:
            nbytes = int(np.prod(max_shapes[n])) * self.dtypes[n].itemsize
            self._dev[n] = cuda.malloc(nbytes)
            self._host[n] = cuda.host_alloc(nbytes)
        self._set_addresses(self.context)
        self._shapes: dict[str, tuple] = {n: max_shapes[n] for n in self.input_names}

    def _max_shape(self, name: str) -> tuple[int, ...]:
        shape = self.dims[name]
        if any(d < 0 for d in shape):
            _, _, mx = self.engine.get_tensor_profile_shape(name, 0)
            shape = tuple(int(d) for d in mx)
        return shape

    def _share_device_memory(self) -> None:
        """With CUDA graphs, one block of device memory for all of the session's contexts (they run
        one after another on one stream: ``IExecutionContext::setDeviceMemoryV2``)."""
        strategy = getattr(self.trt, "ExecutionContextAllocationStrategy", None)
        size = getattr(self.engine, "device_memory_size_v2", None)
        if self.cuda_graph and strategy is not None and size is not None:
            self._scratch_size = int(size)
            self._scratch = self.cuda.malloc(self._scratch_size)

    def _new_context(self) -> Any:
        if self._scratch is not None:
            ctx = self.engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if ctx is not None:
                ctx.set_device_memory(self._scratch, self._scratch_size)
        else:
            ctx = self.engine.create_execution_context()
        if ctx is None:
            raise BackendError(f"{self.label}: could not create an execution context")
        return ctx

    def _set_shapes(self, ctx: Any, shapes: dict[str, tuple]) -> None:
        for n, shape in shapes.items():
            if not ctx.set_input_shape(n, shape):
                raise BackendError(f"{self.label}: shape {shape} of {n} is outside the engine's profile")

    def _set_addresses(self, ctx: Any) -> None:
        for n, ptr in self._dev.items():
            if not ctx.set_tensor_address(n, ptr):
                raise BackendError(f"{self.label}: TensorRT refused the device address of {n} "
                                   "(not a tensor of this engine, or not 256-byte aligned)")

    def _enqueue(self, ctx: Any) -> None:
        if not ctx.execute_async_v3(self.cuda.stream_handle(self.stream)):
            raise BackendError(f"{self.label}: execute_async_v3 failed (TensorRT's log says why)")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise BackendError(f"{self.label}: missing inputs {missing}")
        with self._lock:
            self.cuda.bind()
            n = int(feeds[self.input_names[0]].shape[0])
            if n <= self.max_batch:
                return self._run(feeds)
            parts = [self._run({k: v[i:i + self.max_batch] for k, v in feeds.items()})
                     for i in range(0, n, self.max_batch)]
        return {k: np.concatenate([p[k] for p in parts]) for k in self.output_names}

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shapes = self._stage_inputs(feeds)
        ctx = self._execute_graph(shapes) if self.cuda_graph else self._execute(shapes)
        outs = {}
        for name in self.output_names:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
            nbytes = int(np.prod(shape)) * self.dtypes[name].itemsize
            self.cuda.dtoh(self._host[name][:nbytes], self._dev[name], self.stream)
            outs[name] = (shape, nbytes)
        self.cuda.sync(self.stream)
        return {name: self._host[name][:nb].view(self.dtypes[name]).reshape(shape).astype(np.float32, copy=True)
                for name, (shape, nb) in outs.items()}

    def _stage_inputs(self, feeds: dict[str, np.ndarray]) -> dict[str, tuple]:
        """Copy the inputs to the device (through page-locked buffers); their shapes."""
        shapes = {}
        for name in self.input_names:
            a = np.ascontiguousarray(feeds[name], dtype=self.dtypes[name])
            want = self.dims[name]
            if a.ndim != len(want) or any(w >= 0 and w != d for w, d in zip(want[1:], a.shape[1:])):
                raise BackendError(f"{self.label}: input {name} has shape {a.shape}, engine expects {want}")
            if not 1 <= a.shape[0] <= self.max_batch:
                raise BackendError(f"{self.label}: shape {a.shape} of {name} is outside the engine's profile")
            staged = self._host[name][: a.nbytes]
            staged[:] = a.reshape(-1).view(np.uint8)
            self.cuda.htod(self._dev[name], staged, self.stream)
            shapes[name] = a.shape
        return shapes

    def _execute(self, shapes: dict[str, tuple]) -> Any:
        """A plain run on the main context (input shapes set where they changed)."""
        changed = {n: s for n, s in shapes.items() if self._shapes.get(n) != s}
        self._set_shapes(self.context, changed)
        self._shapes.update(changed)
        self._enqueue(self.context)
        return self.context

    def _execute_graph(self, shapes: dict[str, tuple]) -> Any:
        """Replay the graph of these input shapes, or warm up, capture and keep a new one on a
        context of its own. Addresses never change (fixed buffers), so the shapes are the key."""
        key = tuple(shapes[n] for n in self.input_names)
        found = self._graphs.get(key)
        if found is not None:
            self.cuda.launch(found.graph, self.stream)
            return found.context
        ctx = self._new_context()
        self._set_shapes(ctx, shapes)
        self._set_addresses(ctx)
        self._enqueue(ctx)  # the warm-up run computes this call's outputs ...
        self.cuda.sync(self.stream)  # ... and settles what a new shape sets up, before capture (trtexec)
        try:
            graph = self.cuda.capture(self.stream, lambda: self._enqueue(ctx))
        except CaptureError as exc:
            self._graphs_off(str(exc))
            return ctx
        self._graphs[key] = _Graph(ctx, graph)
        return ctx

    def _graphs_off(self, error: str) -> None:
        self.graph_error = error
        self.cuda_graph = False
        self._report_graph_error(self.label, error)
        log.warning("%s: CUDA graph capture failed (%s); running with plain execution", self.label, error)

    def close(self) -> None:
        """Free the graphs, contexts, buffers and stream (also on garbage collection)."""
        cuda = self.cuda
        cuda.bind()
        for g in self._graphs.values():
            cuda.graph_free(g.graph)
        self._graphs.clear()
        self.context = None
        if self._scratch is not None:
            cuda.free(self._scratch)
            self._scratch = None
        for p in self._dev.values():
            cuda.free(p)
        self._dev.clear()
        for h in self._host.values():
            cuda.host_free(h)
        self._host.clear()
        if self.stream is not None:
            cuda.stream_free(self.stream)
            self.stream = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: the CUDA context may be gone
            self.close()


class TrtBackend(Backend):
    """``TrtBackend(precision=None, cuda_graph=False)``; ``trt``/``cuda``/``device`` are for tests."""

    name = "tensorrt"

    def __init__(self, precision: str | None = None, cuda_graph: bool = False, device: str | None = None,
                 *, trt: Any = None, cuda: Any = None) -> None:
        if precision is not None and precision not in PRECISIONS:
            raise BackendError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.trt = trt if trt is not None else import_tensorrt()
        self.version = str(self.trt.__version__)
        check_tensorrt_version(self.version)
        self.cuda = cuda if cuda is not None else load_cuda()
        self.cuda.bind()
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)
        self.device = device or jetson_model() or self.cuda.device_name()
        self.device_slug = slugify(self.device)
        self.precision = precision
        self.cuda_graph = cuda_graph
        self.chosen: dict[str, str] = {}
        self.graph_fallbacks: dict[str, str] = {}  # session label -> why its CUDA graph capture failed

    def engine_for(self, bundle: Bundle, graph: str) -> tuple[str, dict[str, Any]] | None:
        return select_engine(bundle.engines(), graph, self.device_slug, self.version, self.precision)

    def has_engines(self, bundle: Bundle) -> bool:
        """Every graph of ``bundle`` has an engine for this device and TensorRT version."""
        return all(self.engine_for(bundle, g) is not None for g in bundle.manifest.get("graphs", {}))

    def load(self, bundle: Bundle, graph: str) -> Session:
        found = self.engine_for(bundle, graph)
        if found is None:
            want = self.precision or "/".join(DEFAULT_PREFERENCE)
            raise BackendError(
                f"bundle {bundle.path} has no {want} TensorRT engine for {graph!r} on {self.device} "
                f"(TensorRT {version_tag(self.version)}); build one here: splitbits export {bundle.path} --trt"
                + (f" --precision {self.precision}" if self.precision else ""))
        key, entry = found
        path = bundle.path / entry["file"]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BackendError(f"engine {path} unreadable: {exc}") from exc
        if entry.get("sha256") and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise BackendError(f"engine {path} does not match its sha256 in the manifest (rebuild it)")
        self.chosen[graph] = entry.get("precision", key.rsplit(".", 1)[-1])
        return TrtSession(self, data, f"{graph} ({key})")

    def describe(self) -> dict[str, str]:
        d = {"backend": self.name, "tensorrt": self.version, "device": self.device, "cuda": self.cuda.name,
             "precision": ",".join(f"{g}={p}" for g, p in sorted(self.chosen.items())) or (self.precision or "auto"),
             "cuda_graph": str(self.cuda_graph).lower()}
        if self.graph_fallbacks:
            d["cuda_graph_fallback"] = "; ".join(f"{k}: {v}" for k, v in sorted(self.graph_fallbacks.items()))
        return d
