"""TensorRT backend: runs a bundle's prebuilt engines (``splitbits export BUNDLE --trt``).

Written against the TensorRT 10 Python API (JetPack 6 ships 10.3), which TensorRT 11 keeps for
inference: ``Runtime.deserialize_cuda_engine``, the name-based tensor API (``num_io_tensors``,
``get_tensor_name/mode/dtype/shape``, ``get_tensor_profile_shape``), ``set_input_shape``,
``set_tensor_address`` and ``execute_async_v3`` on a CUDA stream. Device memory comes from
cuda-python (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6) with pycuda as a
fallback; host staging buffers are page-locked. ``cuda_graph=True`` captures one CUDA graph per
input shape after a first normal run and replays it (cuda-python only).

Engines are device artefacts: the manifest lists them under ``"engines"`` (outside the model
fingerprint) keyed ``{graph}.{device}.trt{version}.{precision}``; this backend loads only engines
built for this device and this TensorRT version, and checks their sha256 before deserialising.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from splitbits.runtime.backends.base import Backend, Session
from splitbits.runtime.errors import BackendError

if TYPE_CHECKING:
    from splitbits.runtime.bundle import Bundle

PRECISIONS = ("fp32", "fp16", "int8")
#: engine choice when no precision is asked for (per graph; ``hyper`` is always built in FP32)
DEFAULT_PREFERENCE = ("fp16", "fp32", "int8")
ENGINE_DIR = "engines"
#: golden tolerances (atol, rtol) of engines per precision; symbols are exact except for INT8,
#: whose end-to-end top-1 must still agree on at least ``INT8_MIN_TOP1`` of the golden images
TOLERANCES = {"fp32": (1e-3, 1e-3), "fp16": (5e-2, 5e-2), "int8": (0.25, 0.1)}
INT8_MIN_TOP1 = 0.5


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
    """``import tensorrt`` or a :class:`BackendError` that says where TensorRT comes from."""
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendError(
            f"TensorRT is not installed here ({exc}). On a Jetson it comes with JetPack "
            "(apt: python3-libnvinfer; use a venv made with --system-site-packages); on an x86 "
            "server: pip install 'splitbits[trt]'"
        ) from exc
    return tensorrt


class CudaPython:
    """Device memory, streams and graphs through cuda-python's runtime bindings."""

    name = "cuda-python"

    def __init__(self, cudart: Any = None) -> None:
        if cudart is None:
            try:
                from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
            except ImportError:
                try:
                    from cuda import cudart  # older cuda-python
                except ImportError as exc:
                    raise BackendError("cuda-python is not installed: pip install 'cuda-python>=12,<13'") from exc
        self.rt = cudart

    def _ok(self, res: Any) -> Any:
        err, rest = (res[0], res[1:]) if isinstance(res, tuple) else (res, ())
        if err != self.rt.cudaError_t.cudaSuccess:
            try:
                name = self.rt.cudaGetErrorName(err)[1]
                name = name.decode() if isinstance(name, bytes) else str(name)
            except Exception:  # the error name is a courtesy
                name = str(err)
            raise BackendError(f"CUDA error: {name}")
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
        return self._ok(self.rt.cudaStreamCreate())

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

    def capture(self, stream: Any, fn) -> Any:
        """Capture what ``fn`` enqueues on ``stream`` into an instantiated CUDA graph."""
        self._ok(self.rt.cudaStreamBeginCapture(stream, self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
        try:
            fn()
        finally:
            graph = self._ok(self.rt.cudaStreamEndCapture(stream))
        try:
            return self._ok(self.rt.cudaGraphInstantiate(graph, 0))
        finally:
            self._ok(self.rt.cudaGraphDestroy(graph))

    def launch(self, graph_exec: Any, stream: Any) -> None:
        self._ok(self.rt.cudaGraphLaunch(graph_exec, stream))

    def graph_free(self, graph_exec: Any) -> None:
        self._ok(self.rt.cudaGraphExecDestroy(graph_exec))

    def device_name(self) -> str:
        props = self._ok(self.rt.cudaGetDeviceProperties(0))
        name = props.name
        return (name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)).strip("\x00 ")


class PyCuda:
    """The pycuda fallback (no CUDA graphs)."""

    name = "pycuda"

    def __init__(self) -> None:
        try:
            import pycuda.autoinit  # noqa: F401 - creates the context
            import pycuda.driver as cuda
        except ImportError as exc:
            raise BackendError(
                "neither cuda-python nor pycuda is installed: pip install 'cuda-python>=12,<13'") from exc
        self.cuda = cuda
        self._allocs: dict[int, Any] = {}

    def malloc(self, nbytes: int) -> int:
        a = self.cuda.mem_alloc(max(nbytes, 1))
        self._allocs[int(a)] = a
        return int(a)

    def free(self, ptr: int) -> None:
        self._allocs.pop(ptr).free()

    def host_alloc(self, nbytes: int) -> np.ndarray:
        return self.cuda.pagelocked_empty(max(nbytes, 1), np.uint8)

    def host_free(self, arr: np.ndarray) -> None:
        return None  # freed with the array

    def stream(self) -> Any:
        return self.cuda.Stream()

    def stream_free(self, stream: Any) -> None:
        return None

    @staticmethod
    def stream_handle(stream: Any) -> int:
        return int(stream.handle)

    def htod(self, dst: int, src: np.ndarray, stream: Any) -> None:
        self.cuda.memcpy_htod_async(dst, src, stream)

    def dtoh(self, dst: np.ndarray, src: int, stream: Any) -> None:
        self.cuda.memcpy_dtoh_async(dst, src, stream)

    def sync(self, stream: Any) -> None:
        stream.synchronize()

    def capture(self, stream: Any, fn) -> Any:
        raise BackendError("CUDA graphs need cuda-python (pycuda fallback in use)")

    def launch(self, graph_exec: Any, stream: Any) -> None:  # pragma: no cover - never captured
        raise BackendError("CUDA graphs need cuda-python")

    def graph_free(self, graph_exec: Any) -> None:  # pragma: no cover
        return None

    def device_name(self) -> str:
        return str(self.cuda.Device(0).name())


def load_cuda() -> CudaPython | PyCuda:
    """cuda-python if importable, else pycuda, else a :class:`BackendError`."""
    try:
        return CudaPython()
    except BackendError as first:
        try:
            return PyCuda()
        except BackendError:
            raise first from None


# --------------------------------------------------------------------------------------------
# session and backend
# --------------------------------------------------------------------------------------------


class TrtSession(Session):
    """One deserialised engine with its execution context, stream and fixed I/O buffers."""

    def __init__(self, backend: TrtBackend, engine_bytes: bytes, label: str) -> None:
        trt, cuda = backend.trt, backend.cuda
        self.trt, self.cuda, self.label = trt, cuda, label
        self.cuda_graph = backend.cuda_graph
        self._dev: dict[str, int] = {}
        self._host: dict[str, np.ndarray] = {}
        self._graphs: dict[tuple, Any] = {}
        self.stream = None
        self.engine = backend.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise BackendError(f"{label}: TensorRT could not deserialise the engine (built by another "
                               "TensorRT version or for another GPU?)")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"{label}: could not create an execution context")
        e = self.engine
        names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        self.input_names = [n for n in names if e.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.dtypes = {n: np.dtype(trt.nptype(e.get_tensor_dtype(n))) for n in names}
        self.dims = {n: tuple(int(d) for d in e.get_tensor_shape(n)) for n in names}
        max_shapes = {}
        for n in self.input_names:
            shape = self.dims[n]
            if any(d < 0 for d in shape):
                _, _, mx = e.get_tensor_profile_shape(n, 0)
                shape = tuple(int(d) for d in mx)
            max_shapes[n] = shape
            if not self.context.set_input_shape(n, shape):
                raise BackendError(f"{label}: TensorRT rejected input shape {shape} for {n}")
        self.max_batch = min(s[0] for s in max_shapes.values()) if max_shapes else 1
        for n in self.output_names:
            max_shapes[n] = tuple(int(d) for d in self.context.get_tensor_shape(n))
        self.stream = cuda.stream()
        for n in names:
            nbytes = int(np.prod(max_shapes[n])) * self.dtypes[n].itemsize
            self._dev[n] = cuda.malloc(nbytes)
            self._host[n] = cuda.host_alloc(nbytes)
            self.context.set_tensor_address(n, self._dev[n])
        self._shapes: dict[str, tuple] = dict(max_shapes)

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.cuda.stream_handle(self.stream)):
            raise BackendError(f"{self.label}: execute_async_v3 failed")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise BackendError(f"{self.label}: missing inputs {missing}")
        n = int(feeds[self.input_names[0]].shape[0])
        if n <= self.max_batch:
            return self._run(feeds)
        parts = [self._run({k: v[i:i + self.max_batch] for k, v in feeds.items()})
                 for i in range(0, n, self.max_batch)]
        return {k: np.concatenate([p[k] for p in parts]) for k in self.output_names}

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda = self.cuda
        for name in self.input_names:
            a = np.ascontiguousarray(feeds[name], dtype=self.dtypes[name])
            want = self.dims[name]
            if a.ndim != len(want) or any(w >= 0 and w != d for w, d in zip(want[1:], a.shape[1:])):
                raise BackendError(f"{self.label}: input {name} has shape {a.shape}, engine expects {want}")
            if self._shapes.get(name) != a.shape:
                if not self.context.set_input_shape(name, a.shape):
                    raise BackendError(f"{self.label}: shape {a.shape} of {name} is outside the engine's profile")
                self._shapes[name] = a.shape
            staged = self._host[name][: a.nbytes]
            staged[:] = a.reshape(-1).view(np.uint8)
            cuda.htod(self._dev[name], staged, self.stream)
        if self.cuda_graph:
            key = tuple(self._shapes[n] for n in self.input_names)
            if key not in self._graphs:
                self._execute()  # a normal run first: settles shape-dependent state before capture
                self._graphs[key] = cuda.capture(self.stream, self._execute)
            else:
                cuda.launch(self._graphs[key], self.stream)
        else:
            self._execute()
        outs = {}
        for name in self.output_names:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            nbytes = int(np.prod(shape)) * self.dtypes[name].itemsize
            cuda.dtoh(self._host[name][:nbytes], self._dev[name], self.stream)
            outs[name] = (shape, nbytes)
        cuda.sync(self.stream)
        return {name: self._host[name][:nb].view(self.dtypes[name]).reshape(shape).astype(np.float32, copy=True)
                for name, (shape, nb) in outs.items()}

    def close(self) -> None:
        """Free the graphs, buffers and stream (also on garbage collection)."""
        cuda = self.cuda
        for g in self._graphs.values():
            cuda.graph_free(g)
        self._graphs.clear()
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
        self.cuda = cuda if cuda is not None else load_cuda()
        self.version = str(self.trt.__version__)
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)
        self.device = device or jetson_model() or self.cuda.device_name()
        self.device_slug = slugify(self.device)
        self.precision = precision
        self.cuda_graph = cuda_graph
        self.chosen: dict[str, str] = {}

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
        return {"backend": self.name, "tensorrt": self.version, "device": self.device, "cuda": self.cuda.name,
                "precision": ",".join(f"{g}={p}" for g, p in sorted(self.chosen.items())) or (self.precision or "auto"),
                "cuda_graph": str(self.cuda_graph).lower()}
