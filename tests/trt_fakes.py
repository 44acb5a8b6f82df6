"""CPU stand-ins for ``tensorrt`` and cuda-python's ``cuda.bindings.runtime`` that can fail.

They model only the calls splitbits makes, but they follow the rules of the real libraries that
splitbits' glue can get wrong, so a test fails where the device would. The "engine" is the parsed
ONNX run by ONNX Runtime, "device memory" is host memory addressed by pointer. Rules (sources in
brackets: the CUDA runtime API reference as shipped in cuda-python 12.6's ``runtime.pyx``, the
TensorRT headers/Python bindings at tags 8.6, 10.3, 10.12 and 11.1 of github.com/NVIDIA/TensorRT,
trtexec's ``samples/common/sampleInference.cpp`` / ``sampleDevice.h``):

CUDA (:class:`FakeCudart`)
* A context belongs to a thread: a runtime call from a thread with no current context binds the
  device's primary context ("implicit initialisation"; ``cudaSetDevice`` binds it explicitly);
  streams belong to the context that made them, so using one while another context is current
  (``push_foreign_context``: e.g. a context a library made with the driver API) fails with
  ``cudaErrorInvalidResourceHandle``, and TensorRT refuses to run an engine outside its context.
* Copies from page-locked memory and kernels are asynchronous: they run when the stream is
  synchronised, so a missing sync reads stale data. Copies from pageable memory are synchronous.
* Stream capture: work is recorded, not run; a potentially unsafe call (``cudaMalloc`` …) made by
  the capturing thread (thread-local or global capture) or by any thread while a *global* capture
  is active fails with ``cudaErrorStreamCaptureUnsupported`` and invalidates that capture;
  ``cudaStreamEndCapture`` of an invalidated capture returns ``cudaErrorStreamCaptureInvalidated``
  and no graph, and must come from the capturing thread.
* A driver older than the runtime cuda-python implements fails every call with
  ``cudaErrorInsufficientDriver`` (no minor-version compatibility unless asked: JetPack's driver).

TensorRT (:class:`FakeTrt`, version selectable: ``"8.6.2"``, ``"10.3.0.30"``, ``"10.12.0"``, ``"11.1.0"``)
* 8.6: ``create_network(0)`` is implicit batch and the ONNX parser rejects it; no STRONGLY_TYPED.
* 10.x: networks are explicit batch; ``STRONGLY_TYPED`` (= 1) makes a network strongly typed, which
  rejects ``layer.precision``/``set_output_type`` and the precision builder flags.
* 10.12+: the weak-typing APIs are deprecated (each use is recorded in ``FakeTrt.deprecated``).
* 11: no FP16/INT8/OBEY builder flags, no ``layer.precision``; every network is strongly typed
  (``STRONGLY_TYPED`` = 0, ignored).
* A weakly typed FP16 build computes in FP16: every float layer not pinned to FP32 (pins hold only
  with OBEY/PREFER_PRECISION_CONSTRAINTS) stores its outputs in FP16 and uses FP16-rounded
  weights (an FP16 round trip after it), so results differ from FP32 and GDN can overflow.
  Strongly typed engines compute in the ONNX's own types.
* ``set_tensor_address`` returns False for an unknown name or a pointer not 256-byte aligned;
  ``set_timing_cache`` returns False for a cache made on another device; ``set_input_shape``
  returns False outside the profile; a ``USER_MANAGED`` context needs ``set_device_memory``.
* ``execute_async_v3`` stages the context's shape-dependent state on the host at enqueue and the
  enqueued work reads it when it runs: a CUDA graph replays the kernels (shapes, addresses) it
  captured plus those copies, so replaying it after the same context was enqueued with other
  shapes computes garbage. The first enqueue of a shape sets up memory (an unsafe call), so it
  cannot be captured (warm up first, as trtexec does). ``FakeCudart(capture_fails=True)`` is an
  engine with work that is not allowed under capture: enqueue returns False and the capture is
  invalidated.
"""

from __future__ import annotations

import copy
import ctypes
import enum
import json
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MAGIC = b"FAKETRT2"
ALIGN = 256  # cudaMalloc's alignment, and what setTensorAddress requires (NvInferRuntime.h)


def version_tuple(version: str) -> tuple[int, int]:
    parts = [int(p) for p in version.split(".")[:2]]
    return parts[0], (parts[1] if len(parts) > 1 else 0)


# ---------------------------------------------------------------------------------------------
# CUDA runtime
# ---------------------------------------------------------------------------------------------


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorInsufficientDriver = 35
    cudaErrorInvalidResourceHandle = 400
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901
    cudaErrorStreamCaptureWrongThread = 908


class cudaStreamCaptureMode(enum.IntEnum):
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


SUCCESS = cudaError_t.cudaSuccess
GLOBAL, THREAD_LOCAL, RELAXED = cudaStreamCaptureMode


@dataclass(eq=False)
class CudaContext:
    name: str
    primary: bool = False


@dataclass(eq=False)
class _Handle:
    """A stream, graph or graph exec: ``int()`` gives its handle, like cuda-python's wrappers."""

    handle: int
    ctx: CudaContext | None = None
    ops: list = field(default_factory=list)

    def __int__(self) -> int:
        return self.handle


@dataclass(eq=False)
class _Capture:
    mode: cudaStreamCaptureMode
    thread: int
    ops: list = field(default_factory=list)
    invalid: str | None = None


class FakeCudart:
    """The subset of ``cuda.bindings.runtime`` splitbits uses, with the rules of the module docstring."""

    cudaError_t = cudaError_t
    cudaStreamCaptureMode = cudaStreamCaptureMode
    cudaMemcpyKind = cudaMemcpyKind
    cudaStreamNonBlocking = 1

    def __init__(self, name: bytes = b"Fake GPU", *, driver_version: int = 12060, runtime_version: int = 12060,
                 minor_version_compat: bool = False, capture_fails: bool = False) -> None:
        self.name = name
        self.driver_version, self.runtime_version = driver_version, runtime_version
        self.minor_version_compat = minor_version_compat
        self.capture_fails = capture_fails
        self.primary = CudaContext("primary", primary=True)
        self.memory: dict[int, tuple[np.ndarray, int, bool]] = {}  # ptr -> (backing, size, page-locked)
        self.streams: dict[int, _Handle] = {}
        self.queues: dict[int, list[Callable[[], None]]] = {}
        self.captures: dict[int, _Capture] = {}
        self.capture_modes: list[cudaStreamCaptureMode] = []
        self.during_capture: Callable[[], None] | None = None  # a test's hook, run inside a captured enqueue
        self.launches = self.copies = 0
        self._tls = threading.local()
        self._lock = threading.RLock()
        self._next = 1000

    # -- contexts and the checks every call makes -------------------------------------------

    def insufficient_driver(self) -> bool:
        if self.runtime_version // 1000 > self.driver_version // 1000:
            return True
        return self.runtime_version > self.driver_version and not self.minor_version_compat

    def current_context(self) -> CudaContext | None:
        return getattr(self._tls, "ctx", None)

    def push_foreign_context(self, name: str = "foreign") -> CudaContext:
        """Make a non-primary context current on this thread (what a driver-API library leaves)."""
        self._tls.ctx = CudaContext(name)
        return self._tls.ctx

    def _fail(self, err: cudaError_t) -> cudaError_t:
        self._tls.last = err
        return err

    def enter(self, unsafe: bool = False) -> cudaError_t:
        """Driver check, implicit primary-context binding, capture prohibitions (every call)."""
        if self.insufficient_driver():
            return self._fail(cudaError_t.cudaErrorInsufficientDriver)
        if self.current_context() is None:
            self._tls.ctx = self.primary
        if unsafe:
            me = threading.get_ident()
            for cap in self.captures.values():
                if cap.mode != RELAXED and (cap.thread == me or cap.mode == GLOBAL):
                    cap.invalid = "a potentially unsafe API call during stream capture"
                    return self._fail(cudaError_t.cudaErrorStreamCaptureUnsupported)
        return SUCCESS

    def check_stream(self, stream: Any) -> cudaError_t:
        s = self.streams.get(int(stream))
        if s is None or s.ctx is not self.current_context():
            return self._fail(cudaError_t.cudaErrorInvalidResourceHandle)
        return SUCCESS

    def _new_handle(self, **kw: Any) -> _Handle:
        with self._lock:
            self._next += 1
            return _Handle(self._next, **kw)

    # -- versions, devices, errors -----------------------------------------------------------

    def cudaDriverGetVersion(self):
        return SUCCESS, self.driver_version

    def cudaRuntimeGetVersion(self):
        return SUCCESS, self.runtime_version

    def cudaSetDevice(self, device: int):
        if self.insufficient_driver():
            return (self._fail(cudaError_t.cudaErrorInsufficientDriver),)
        if device != 0:
            return (self._fail(cudaError_t.cudaErrorInvalidValue),)
        self._tls.ctx = self.primary
        return (SUCCESS,)

    def cudaGetDeviceProperties(self, device: int):
        err = self.enter()
        return (err, None) if err else (SUCCESS, types.SimpleNamespace(name=self.name))

    def cudaGetLastError(self):
        err = getattr(self._tls, "last", SUCCESS)
        self._tls.last = SUCCESS
        return (err,)

    def cudaGetErrorName(self, err):
        return SUCCESS, cudaError_t(err).name.encode()

    # -- memory ------------------------------------------------------------------------------

    def _alloc(self, nbytes: int, pinned: bool):
        err = self.enter(unsafe=True)
        if err:
            return err, 0
        backing = np.zeros(int(nbytes) + ALIGN, np.uint8)
        ptr = -(-backing.ctypes.data // ALIGN) * ALIGN
        with self._lock:
            self.memory[ptr] = (backing, int(nbytes), pinned)
        return SUCCESS, ptr

    def cudaMalloc(self, nbytes: int):
        return self._alloc(nbytes, pinned=False)

    def cudaMallocHost(self, nbytes: int):
        return self._alloc(nbytes, pinned=True)

    def cudaFree(self, ptr: int):
        err = self.enter(unsafe=True)
        if not err:
            with self._lock:
                self.memory.pop(int(ptr))
        return (err,)

    cudaFreeHost = cudaFree

    def is_page_locked(self, ptr: int) -> bool:
        return any(pinned and base <= ptr < base + size for base, (_, size, pinned) in self.memory.items())

    def read(self, ptr: int, nbytes: int) -> np.ndarray:
        return np.frombuffer((ctypes.c_uint8 * nbytes).from_address(ptr), np.uint8).copy()

    def write(self, ptr: int, data: np.ndarray) -> None:
        data = np.ascontiguousarray(data)
        ctypes.memmove(ptr, data.ctypes.data, data.nbytes)

    # -- streams, copies, synchronisation ----------------------------------------------------

    def cudaStreamCreateWithFlags(self, flags: int):
        err = self.enter()
        if err:
            return err, None
        s = self._new_handle(ctx=self.current_context())
        with self._lock:
            self.streams[s.handle], self.queues[s.handle] = s, []
        return SUCCESS, s

    def cudaStreamCreate(self):
        return self.cudaStreamCreateWithFlags(0)

    def cudaStreamDestroy(self, stream):
        err = self.enter() or self.check_stream(stream)
        if not err:
            self.flush(int(stream))
            with self._lock:
                del self.streams[int(stream)], self.queues[int(stream)]
        return (err,)

    def enqueue(self, stream: Any, op: Callable[[], None]) -> None:
        """Record ``op`` into the stream's capture, or queue it until the stream is synchronised."""
        with self._lock:
            cap = self.captures.get(int(stream))
            (cap.ops if cap is not None else self.queues[int(stream)]).append(op)

    def flush(self, handle: int) -> None:
        while True:
            with self._lock:
                queue = self.queues.get(handle)
                if not queue:
                    return
                op = queue.pop(0)
            op()

    def cudaStreamSynchronize(self, stream):
        err = self.enter() or self.check_stream(stream)
        if err:
            return (err,)
        if int(stream) in self.captures:  # not allowed on a capturing stream
            self.invalidate(stream, "cudaStreamSynchronize during capture")
            return (self._fail(cudaError_t.cudaErrorStreamCaptureUnsupported),)
        self.flush(int(stream))
        return (SUCCESS,)

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind, stream):
        err = self.enter() or self.check_stream(stream)
        if err:
            return (err,)

        def copy_now() -> None:
            ctypes.memmove(int(dst), int(src), int(nbytes))
            self.copies += 1

        host = int(src) if kind == cudaMemcpyKind.cudaMemcpyHostToDevice else int(dst)
        if self.is_page_locked(host):
            self.enqueue(stream, copy_now)
        elif int(stream) in self.captures:
            self.invalidate(stream, "a copy from pageable memory during capture")
            return (self._fail(cudaError_t.cudaErrorStreamCaptureUnsupported),)
        else:  # pageable: synchronous with the host (CUDA runtime API, "API synchronization behavior")
            self.flush(int(stream))
            copy_now()
        return (SUCCESS,)

    # -- capture and graphs --------------------------------------------------------------------

    def capturing(self, stream: Any) -> bool:
        return int(stream) in self.captures

    def invalidate(self, stream: Any, why: str) -> None:
        cap = self.captures.get(int(stream))
        if cap is not None:
            cap.invalid = why

    def cudaStreamBeginCapture(self, stream, mode):
        err = self.enter() or self.check_stream(stream)
        if err:
            return (err,)
        if int(stream) in self.captures:
            return (self._fail(cudaError_t.cudaErrorInvalidValue),)
        self.capture_modes.append(cudaStreamCaptureMode(mode))
        with self._lock:
            self.captures[int(stream)] = _Capture(cudaStreamCaptureMode(mode), threading.get_ident())
        return (SUCCESS,)

    def cudaStreamEndCapture(self, stream):
        cap = self.captures.get(int(stream))
        if cap is None:
            return self._fail(cudaError_t.cudaErrorInvalidValue), None
        if cap.mode != RELAXED and cap.thread != threading.get_ident():
            return self._fail(cudaError_t.cudaErrorStreamCaptureWrongThread), None
        with self._lock:
            del self.captures[int(stream)]
        if cap.invalid:
            return self._fail(cudaError_t.cudaErrorStreamCaptureInvalidated), None
        return SUCCESS, self._new_handle(ops=cap.ops)

    def cudaGraphInstantiate(self, graph, flags: int):
        err = self.enter()
        return (err, None) if err else (SUCCESS, self._new_handle(ctx=self.current_context(), ops=list(graph.ops)))

    def cudaGraphLaunch(self, graph_exec, stream):
        err = self.enter() or self.check_stream(stream)
        if err:
            return (err,)
        self.launches += 1
        for op in graph_exec.ops:
            self.enqueue(stream, op)
        return (SUCCESS,)

    def cudaGraphDestroy(self, graph):
        return (SUCCESS,)

    cudaGraphExecDestroy = cudaGraphDestroy


# ---------------------------------------------------------------------------------------------
# what a weakly typed FP16 build computes
# ---------------------------------------------------------------------------------------------

_NOT_COMPUTE = {"Constant", "Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Reshape", "Identity", "Cast"}


def fp16_compute_model(model: onnx.ModelProto, fp32_nodes: set[str]) -> onnx.ModelProto:
    """``model`` with every float layer outside ``fp32_nodes`` computed "in FP16": its float outputs
    go through FP16 and back (FP16 storage: rounding, ±inf above 65504) and the weights only it
    reads are rounded to FP16."""
    m = onnx.shape_inference.infer_shapes(copy.deepcopy(model))
    kinds = {v.name: v.type.tensor_type.elem_type for v in [*m.graph.value_info, *m.graph.output, *m.graph.input]}
    readers: dict[str, set[str]] = {}
    nodes = []
    for node in m.graph.node:
        for i in node.input:
            readers.setdefault(i, set()).add(node.name)
        nodes.append(node)
        if node.name in fp32_nodes or node.op_type in _NOT_COMPUTE:
            continue
        for k, out in enumerate(node.output):
            if kinds.get(out) != TensorProto.FLOAT:
                continue
            node.output[k] = f"{out}__fp32"
            nodes.append(helper.make_node("Cast", [f"{out}__fp32"], [f"{out}__fp16"], to=TensorProto.FLOAT16,
                                          name=f"{node.name}__to_fp16_{k}"))
            nodes.append(helper.make_node("Cast", [f"{out}__fp16"], [out], to=TensorProto.FLOAT,
                                          name=f"{node.name}__from_fp16_{k}"))
    for init in m.graph.initializer:
        users = readers.get(init.name, set())
        if init.data_type == TensorProto.FLOAT and users and not users & fp32_nodes:
            arr = numpy_helper.to_array(init).astype(np.float16).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


# ---------------------------------------------------------------------------------------------
# TensorRT: network, parser, builder
# ---------------------------------------------------------------------------------------------

_WEAK_FLAGS = {"FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"}
_ONNX_DTYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.INT64: "int64",
                TensorProto.INT32: "int32", TensorProto.INT8: "int8"}


class _Tensor:
    def __init__(self, name: str, dtype: str, shape: tuple = ()) -> None:
        self.name, self.dtype, self.shape = name, dtype, shape


class _Layer:
    def __init__(self, fake: FakeTrt, network: _Network, node: onnx.NodeProto, dtypes: dict[str, str]) -> None:
        self._fake, self._network = fake, network
        self.name = node.name
        self.metadata = f"[ONNX Layer: {node.name}]"
        self._outs = [_Tensor(o, dtypes.get(o, "float32")) for o in node.output]
        self.num_outputs = len(self._outs)
        self._precision: str | None = None
        self.output_types: dict[int, str] = {}

    def get_output(self, k: int) -> _Tensor:
        return self._outs[k]

    def _weak_typing_api(self, api: str) -> bool:
        if self._fake.major >= 11:
            raise AttributeError(f"'ILayer' object has no attribute '{api}' (removed in TensorRT 11)")
        if self._network.strongly_typed:
            self._network.errors.append(f"{self.name}: {api} is not allowed on a strongly typed network")
            return False
        self._fake.weak_typing_used(f"ILayer.{api}")
        return True

    @property
    def precision(self) -> str | None:
        if self._fake.major >= 11:
            raise AttributeError("'ILayer' object has no attribute 'precision' (removed in TensorRT 11)")
        return self._precision

    @precision.setter
    def precision(self, dtype: str) -> None:
        if self._weak_typing_api("precision"):
            self._precision = dtype

    def set_output_type(self, k: int, dtype: str) -> None:
        if self._weak_typing_api("set_output_type"):
            self.output_types[k] = dtype


class _Network:
    def __init__(self, fake: FakeTrt, flags: int) -> None:
        ndf = fake.NetworkDefinitionCreationFlag
        self.flags = flags
        self.explicit_batch = fake.major >= 10 or bool(flags & (1 << ndf.EXPLICIT_BATCH))
        strong_bit = getattr(ndf, "STRONGLY_TYPED", None)
        self.strongly_typed = fake.major >= 11 or (strong_bit is not None and bool(flags & (1 << strong_bit)))
        self.layers: list[_Layer] = []
        self.inputs: list[_Tensor] = []
        self.errors: list[str] = []
        self.onnx_path: str | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def get_layer(self, i: int) -> _Layer:
        return self.layers[i]

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> _Tensor:
        return self.inputs[i]


class _Parser:
    def __init__(self, fake: FakeTrt, network: _Network, logger: Any) -> None:
        self.fake, self.network = fake, network
        self.errors: list[str] = []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> str:
        return self.errors[i]

    def parse_from_file(self, path: str) -> bool:
        if not self.network.explicit_batch:
            self.errors.append("the ONNX parser supports only networks created with the EXPLICIT_BATCH flag")
            return False
        model = onnx.shape_inference.infer_shapes(onnx.load(path))
        self.network.onnx_path = path
        dtypes = {v.name: _ONNX_DTYPES.get(v.type.tensor_type.elem_type, "float32")
                  for v in [*model.graph.value_info, *model.graph.output]}
        inits = {i.name for i in model.graph.initializer}
        for i in model.graph.input:
            if i.name not in inits:
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim)
                self.network.inputs.append(_Tensor(i.name, "float32", dims))
        for n in model.graph.node:
            self.network.layers.append(_Layer(self.fake, self.network, n, dtypes))
        return True


class _Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name, mn, opt, mx) -> None:
        self.shapes[name] = (tuple(mn), tuple(opt), tuple(mx))


class _Cache:
    """A timing cache: the device it was made on, and one ``+`` per build that used it."""

    def __init__(self, device: bytes, entries: int = 0) -> None:
        self.device, self.entries = device, entries

    @classmethod
    def parse(cls, data: bytes, device: bytes) -> _Cache:
        if not data:
            return cls(device)
        _, made_on, plus = bytes(data).split(b"|", 2)
        return cls(made_on, len(plus))

    def serialize(self) -> bytes:
        return b"FAKECACHE|" + self.device + b"|" + b"+" * self.entries


class _Config:
    def __init__(self, fake: FakeTrt) -> None:
        self.fake = fake
        self.flags: set = set()
        self.cleared: set = set()
        self.pools: dict = {}
        self.profiles: list[_Profile] = []
        self.cache: _Cache | None = None

    def set_memory_pool_limit(self, pool, size) -> None:
        self.pools[pool] = size

    def set_flag(self, flag) -> None:
        if flag in _WEAK_FLAGS:
            self.fake.weak_typing_used(f"BuilderFlag.{flag}")
        self.flags.add(flag)

    def clear_flag(self, flag) -> None:
        self.cleared.add(flag)

    def create_timing_cache(self, data: bytes) -> _Cache:
        return _Cache.parse(data, self.fake.cudart.name)

    def set_timing_cache(self, cache: _Cache, ignore_mismatch: bool) -> bool:
        """False for a cache made on another device (NvInfer.h: the cache's verification header)."""
        if cache.device != self.fake.cudart.name and not ignore_mismatch:
            return False
        self.cache = cache
        return True

    def get_timing_cache(self) -> _Cache:
        assert self.cache is not None
        return self.cache

    def add_optimization_profile(self, p: _Profile) -> int:
        self.profiles.append(p)
        return len(self.profiles) - 1


class _Builder:
    def __init__(self, fake: FakeTrt, logger: Any) -> None:
        self.fake, self.logger = fake, logger

    def create_network(self, flags: int = 0) -> _Network:
        return _Network(self.fake, flags)

    def create_builder_config(self) -> _Config:
        return _Config(self.fake)

    def create_optimization_profile(self) -> _Profile:
        return _Profile()

    def build_serialized_network(self, network: _Network, config: _Config) -> bytes | None:
        fake = self.fake
        weak_flags = _WEAK_FLAGS & config.flags
        if network.strongly_typed and weak_flags:
            network.errors.append(f"builder flags {sorted(weak_flags)} are not allowed on a strongly typed network")
        if network.errors or network.onnx_path is None:
            fake.errors += network.errors
            return None
        model = onnx.load(network.onnx_path)
        compute = "onnx types" if network.strongly_typed else "fp32"
        if not network.strongly_typed and "FP16" in config.flags:
            obey = bool({"OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"} & config.flags)
            pinned = {layer.name for layer in network.layers if obey and layer._precision == fake.float32}
            model, compute = fp16_compute_model(model, pinned), "fp16"
        mx = max((p.shapes[n][2][0] for p in config.profiles for n in p.shapes), default=1)
        meta = {"max_batch": mx, "flags": sorted(config.flags), "strong": network.strongly_typed,
                "onnx": network.onnx_path, "tensorrt": fake.__version__, "compute": compute}
        if config.cache is not None:
            config.cache.entries += 1
        fake.builds.append({"network": network, "config": config, "meta": meta})
        head = json.dumps(meta).encode()
        return MAGIC + len(head).to_bytes(4, "little") + head + model.SerializeToString()


class _Runtime:
    def __init__(self, fake: FakeTrt, logger: Any) -> None:
        self.fake, self.logger = fake, logger

    def deserialize_cuda_engine(self, data: bytes) -> _Engine | None:
        if bytes(data[:8]) != MAGIC:
            return None
        n = int.from_bytes(data[8:12], "little")
        self.fake.cudart.enter()  # the engine lives in the context current now
        return _Engine(json.loads(data[12:12 + n]), bytes(data[12 + n:]), self.fake,
                       self.fake.cudart.current_context())


# ---------------------------------------------------------------------------------------------
# TensorRT: engine and execution context
# ---------------------------------------------------------------------------------------------


class _Engine:
    def __init__(self, meta: dict, onnx_bytes: bytes, fake: FakeTrt, ctx: CudaContext | None) -> None:
        import onnxruntime as ort

        self.meta, self.fake, self.ctx = meta, fake, ctx
        self.max_batch = meta["max_batch"]
        self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        self.input_names = [i.name for i in ins]
        self.output_names = [o.name for o in outs]
        kinds = {i.name: i.type for i in [*ins, *outs]}
        self.dtypes = {n: "float16" if t == "tensor(float16)" else "float32" for n, t in kinds.items()}
        self.in_dims = {i.name: tuple(d if isinstance(d, int) else -1 for d in i.shape) for i in ins}
        probe = {n: np.zeros((1, *d[1:]), FakeTrt.nptype(self.dtypes[n])) for n, d in self.in_dims.items()}
        self.out_dims = {n: a.shape[1:] for n, a in zip(self.output_names, self.session.run(None, probe))}
        self.names = self.input_names + self.output_names
        if fake.major >= 10:
            self.device_memory_size_v2 = 1 << 16

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> str:
        return FakeTrt.TensorIOMode.INPUT if name in self.input_names else FakeTrt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> str:
        return self.dtypes[name]

    def get_tensor_shape(self, name: str) -> tuple:
        return self.in_dims[name] if name in self.in_dims else (-1, *self.out_dims[name])

    def get_tensor_profile_shape(self, name: str, profile: int) -> tuple:
        d = self.in_dims[name][1:]
        return (1, *d), (self.max_batch, *d), (self.max_batch, *d)

    def create_execution_context(self, strategy: str = "STATIC") -> _Context:
        return _Context(self, strategy)


class _Context:
    def __init__(self, engine: _Engine, strategy: str) -> None:
        self.engine, self.cudart = engine, engine.fake.cudart
        self.device_memory: int | None = None if strategy == "USER_MANAGED" else 0
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.staged: dict[str, tuple] | None = None  # host-side state of the last enqueue
        self.prepared: set[tuple] = set()  # shapes whose first enqueue (set-up) is done
        self.runs = 0

    def set_device_memory(self, ptr: int, size: int) -> None:
        if size < self.engine.device_memory_size_v2 or int(ptr) % ALIGN:
            raise RuntimeError("set_device_memory: too small or unaligned")
        self.device_memory = int(ptr)

    def set_input_shape(self, name: str, shape) -> bool:
        shape = tuple(int(d) for d in shape)
        want = self.engine.in_dims.get(name)
        if want is None or len(shape) != len(want) or not 1 <= shape[0] <= self.engine.max_batch \
                or any(w >= 0 and w != s for w, s in zip(want[1:], shape[1:])):
            return False
        self.shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> tuple:
        if name in self.engine.input_names:
            return self.shapes[name]
        return (self.shapes[self.engine.input_names[0]][0], *self.engine.out_dims[name])

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        if name not in self.engine.names or int(ptr) % ALIGN:
            return False
        self.addresses[name] = int(ptr)
        return True

    def _refuse(self, why: str) -> bool:
        self.engine.fake.errors.append(why)
        return False

    def execute_async_v3(self, stream_handle: int) -> bool:
        cudart, engine = self.cudart, self.engine
        if cudart.enter() or cudart.current_context() is not engine.ctx:
            return self._refuse("enqueueV3: the engine's CUDA context is not current (invalid device context)")
        if cudart.check_stream(stream_handle):
            return self._refuse("enqueueV3: the stream belongs to another CUDA context")
        if set(self.addresses) != set(engine.names) or set(self.shapes) != set(engine.input_names):
            return self._refuse("enqueueV3: tensor addresses or input shapes not set")
        if self.device_memory is None:
            return self._refuse("enqueueV3: USER_MANAGED context without set_device_memory")
        key = tuple(sorted(self.shapes.items()))
        if cudart.capturing(stream_handle):
            if cudart.during_capture is not None:
                cudart.during_capture()
            if cudart.capture_fails:
                cudart.invalidate(stream_handle, "the engine enqueues work that capture does not allow")
                return self._refuse("enqueueV3: operation not permitted when stream is capturing")
            if key not in self.prepared:  # the first run of a shape allocates: an unsafe call
                cudart.invalidate(stream_handle, "first enqueue of a shape during capture")
                return self._refuse("enqueueV3: set-up of a new shape during capture")
        self.prepared.add(key)
        self.staged = dict(self.shapes)
        shapes, addresses = dict(self.shapes), dict(self.addresses)
        cudart.enqueue(stream_handle, lambda: self._compute(shapes, addresses))
        return True

    def _compute(self, shapes: dict[str, tuple], addresses: dict[str, int]) -> None:
        """The enqueued work: kernels bound to ``shapes``/``addresses``, and the copies of the
        context's staged host state, read now (what the last enqueue left there)."""
        engine, cudart = self.engine, self.cudart
        run_shapes = self.staged or shapes
        self.runs += 1
        feeds = {}
        for name in engine.input_names:
            dtype = np.dtype(FakeTrt.nptype(engine.dtypes[name]))
            n = int(np.prod(run_shapes[name])) * dtype.itemsize
            feeds[name] = cudart.read(addresses[name], n).view(dtype).reshape(run_shapes[name])
        for name, arr in zip(engine.output_names, engine.session.run(engine.output_names, feeds)):
            cudart.write(addresses[name], arr.astype(FakeTrt.nptype(engine.dtypes[name])))


class FakeTrt:
    """``import tensorrt`` as far as splitbits uses it, for the TensorRT ``version`` asked."""

    float32, float16, int8, int32, int64 = "float32", "float16", "int8", "int32", "int64"

    class Logger:
        ERROR, WARNING = 1, 2

        def __init__(self, level: int = 2) -> None:
            self.level = level

    class TensorIOMode:
        INPUT = "INPUT"
        OUTPUT = "OUTPUT"

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    def __init__(self, cudart: FakeCudart, version: str = "10.3.0.30") -> None:
        self.__version__ = version
        self.cudart = cudart
        self.major, self.minor = version_tuple(version)
        self.builds: list[dict] = []
        self.errors: list[str] = []  # what TensorRT's logger would print
        self.deprecated: list[str] = []  # weak-typing APIs used on TensorRT >= 10.12
        flags: dict[str, int] = {}
        if self.major < 11:
            flags["EXPLICIT_BATCH"] = 0
        if self.major >= 10:
            flags["STRONGLY_TYPED"] = 1 if self.major < 11 else 0
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(**flags)
        names = ["TF32"] + (sorted(_WEAK_FLAGS) if self.major < 11 else [])
        self.BuilderFlag = types.SimpleNamespace(**{n: n for n in names})
        if self.major >= 10:
            self.ExecutionContextAllocationStrategy = types.SimpleNamespace(
                STATIC="STATIC", ON_PROFILE_CHANGE="ON_PROFILE_CHANGE", USER_MANAGED="USER_MANAGED")

    def weak_typing_used(self, api: str) -> None:
        if (self.major, self.minor) >= (10, 12):
            self.deprecated.append(api)

    def Builder(self, logger: Any) -> _Builder:
        return _Builder(self, logger)

    def Runtime(self, logger: Any) -> _Runtime:
        return _Runtime(self, logger)

    def OnnxParser(self, network: _Network, logger: Any) -> _Parser:
        return _Parser(self, network, logger)

    @staticmethod
    def nptype(dtype: str):
        return {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int8": np.int8}[dtype]
