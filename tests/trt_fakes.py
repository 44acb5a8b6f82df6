"""Stand-ins for ``tensorrt`` and cuda-python's ``cudart`` that run on a CPU.

They model only the calls splitbits makes (TensorRT 10/11 Python API, cuda-python runtime
bindings) so the engine-build and TensorRT-backend code paths execute in CI: the "engine" is the
parsed ONNX run by ONNX Runtime, "device memory" is host memory addressed by pointer, and CUDA
graph capture records the enqueued work. They test splitbits' glue (shapes, buffers, flags,
pins, manifest, verification), not TensorRT itself.
"""

from __future__ import annotations

import ctypes
import json
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx

MAGIC = b"FAKETRT1"


class FakeCudart:
    """The subset of ``cuda.bindings.runtime`` used by ``CudaPython``."""

    class cudaError_t:
        cudaSuccess = 0

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class cudaStreamCaptureMode:
        cudaStreamCaptureModeGlobal = 0

    def __init__(self, name: bytes = b"Fake GPU") -> None:
        self.name = name
        self.buffers: dict[int, np.ndarray] = {}
        self.capturing: dict[int, list] = {}
        self.launches = 0
        self.copies = 0
        self._streams = 0

    def cudaMalloc(self, n):
        buf = np.zeros(n, np.uint8)
        self.buffers[buf.ctypes.data] = buf
        return 0, buf.ctypes.data

    cudaMallocHost = cudaMalloc

    def cudaFree(self, p):
        self.buffers.pop(int(p))
        return (0,)

    cudaFreeHost = cudaFree

    def cudaStreamCreate(self):
        self._streams += 1
        return 0, 1000 + self._streams

    def cudaStreamDestroy(self, s):
        return (0,)

    def cudaStreamSynchronize(self, s):
        return (0,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        def op():
            ctypes.memmove(int(dst), int(src), int(n))
            self.copies += 1

        self.enqueue(stream, op)
        return (0,)

    def enqueue(self, stream, op) -> None:
        if int(stream) in self.capturing:
            self.capturing[int(stream)].append(op)
        else:
            op()

    def cudaStreamBeginCapture(self, stream, mode):
        self.capturing[int(stream)] = []
        return (0,)

    def cudaStreamEndCapture(self, stream):
        return 0, types.SimpleNamespace(ops=self.capturing.pop(int(stream)))

    def cudaGraphInstantiate(self, graph, flags):
        return 0, types.SimpleNamespace(ops=list(graph.ops))

    def cudaGraphLaunch(self, graph_exec, stream):
        self.launches += 1
        for op in graph_exec.ops:
            op()
        return (0,)

    def cudaGraphDestroy(self, g):
        return (0,)

    cudaGraphExecDestroy = cudaGraphDestroy

    def cudaGetDeviceProperties(self, dev):
        return 0, types.SimpleNamespace(name=self.name)

    def cudaGetErrorName(self, err):
        return 0, b"cudaErrorFake"


# ---------------------------------------------------------------------------------------------


class _Tensor:
    def __init__(self, name: str, dtype: str, shape: tuple = ()) -> None:
        self.name, self.dtype, self.shape = name, dtype, shape


class _Layer:
    def __init__(self, node: onnx.NodeProto, float_out: bool) -> None:
        self.name = node.name
        self.metadata = f"[ONNX Layer: {node.name}]"
        self._outs = [_Tensor(o, "float32" if float_out else "int64") for o in node.output]
        self.num_outputs = len(self._outs)
        self.precision = None
        self.output_types: dict[int, str] = {}

    def get_output(self, k: int) -> _Tensor:
        return self._outs[k]

    def set_output_type(self, k: int, dtype: str) -> None:
        self.output_types[k] = dtype


class _Network:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.layers: list[_Layer] = []
        self.inputs: list[_Tensor] = []
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


_INT_OPS = {"Shape", "Gather", "Unsqueeze", "Concat", "Constant"}


class _Parser:
    def __init__(self, network: _Network, logger: Any) -> None:
        self.network = network
        self.num_errors = 0

    def parse_from_file(self, path: str) -> bool:
        model = onnx.load(path)
        self.network.onnx_path = path
        inits = {i.name for i in model.graph.initializer}
        for i in model.graph.input:
            if i.name in inits:
                continue
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim)
            self.network.inputs.append(_Tensor(i.name, "float32", dims))
        for n in model.graph.node:
            self.network.layers.append(_Layer(n, n.op_type not in _INT_OPS))
        return True

    def get_error(self, i: int) -> str:  # pragma: no cover
        return ""


class _Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name, mn, opt, mx) -> None:
        self.shapes[name] = (tuple(mn), tuple(opt), tuple(mx))


class _Cache:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> bytes:
        return self.data + b"+"


class _Config:
    def __init__(self) -> None:
        self.flags: set = set()
        self.cleared: set = set()
        self.pools: dict = {}
        self.profiles: list[_Profile] = []
        self.cache: _Cache | None = None

    def set_memory_pool_limit(self, pool, size) -> None:
        self.pools[pool] = size

    def set_flag(self, f) -> None:
        self.flags.add(f)

    def clear_flag(self, f) -> None:
        self.cleared.add(f)

    def create_timing_cache(self, data: bytes) -> _Cache:
        return _Cache(bytes(data))

    def set_timing_cache(self, cache: _Cache, ignore_mismatch: bool) -> bool:
        self.cache = cache
        return True

    def get_timing_cache(self) -> _Cache:
        assert self.cache is not None
        return self.cache

    def add_optimization_profile(self, p: _Profile) -> int:
        self.profiles.append(p)
        return len(self.profiles) - 1


class _Context:
    def __init__(self, engine: _Engine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.runs = 0

    def set_input_shape(self, name: str, shape) -> bool:
        shape = tuple(int(d) for d in shape)
        if shape[0] > self.engine.max_batch or shape[0] < 1:
            return False
        self.shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> tuple:
        if name in self.engine.input_names:
            return self.shapes[name]
        n = self.shapes[self.engine.input_names[0]][0]
        return (n, *self.engine.out_dims[name])

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = int(ptr)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        self.engine.cudart.enqueue(stream_handle, self._compute)
        return True

    def _compute(self) -> None:
        self.runs += 1
        feeds = {}
        for name in self.engine.input_names:
            shape = self.shapes[name]
            nbytes = int(np.prod(shape)) * 4
            raw = (ctypes.c_uint8 * nbytes).from_address(self.addresses[name])
            feeds[name] = np.frombuffer(raw, np.float32).reshape(shape).copy()
        outs = self.engine.session.run(self.engine.output_names, feeds)
        for name, arr in zip(self.engine.output_names, outs):
            arr = np.ascontiguousarray(arr, np.float32)
            ctypes.memmove(self.addresses[name], arr.ctypes.data, arr.nbytes)


class _Engine:
    def __init__(self, meta: dict, onnx_bytes: bytes, cudart: FakeCudart) -> None:
        import onnxruntime as ort

        self.meta = meta
        self.cudart = cudart
        self.max_batch = meta["max_batch"]
        self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.in_dims = {i.name: tuple(d if isinstance(d, int) else -1 for d in i.shape)
                        for i in self.session.get_inputs()}
        probe = {n: np.zeros((1, *d[1:]), np.float32) for n, d in self.in_dims.items()}
        self.out_dims = {n: a.shape[1:] for n, a in zip(self.output_names, self.session.run(None, probe))}
        self.names = self.input_names + self.output_names

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> str:
        return FakeTrt.TensorIOMode.INPUT if name in self.input_names else FakeTrt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> str:
        return "float32"

    def get_tensor_shape(self, name: str) -> tuple:
        return self.in_dims[name] if name in self.in_dims else (-1, *self.out_dims[name])

    def get_tensor_profile_shape(self, name: str, profile: int) -> tuple:
        d = self.in_dims[name][1:]
        return (1, *d), (self.max_batch, *d), (self.max_batch, *d)

    def create_execution_context(self) -> _Context:
        return _Context(self)


class FakeTrt:
    """``import tensorrt`` as far as splitbits uses it; ``FakeTrt(version="11.0.0")`` drops weak typing."""

    float32, float16, int8, int32, int64 = "float32", "float16", "int8", "int32", "int64"

    class Logger:
        WARNING = 2

        def __init__(self, level: int = 2) -> None:
            self.level = level

    class TensorIOMode:
        INPUT = "INPUT"
        OUTPUT = "OUTPUT"

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 5

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    def __init__(self, cudart: FakeCudart, version: str = "10.3.0.30") -> None:
        self.__version__ = version
        self.cudart = cudart
        weak = int(version.split(".")[0]) < 11
        names = ["TF32"] + (["FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"] if weak else [])
        self.BuilderFlag = types.SimpleNamespace(**{n: n for n in names})
        self.builds: list[dict] = []
        fake = self

        class Builder:
            def __init__(self, logger) -> None:
                self.logger = logger

            def create_network(self, flags: int = 0) -> _Network:
                return _Network(flags)

            def create_builder_config(self) -> _Config:
                return _Config()

            def create_optimization_profile(self) -> _Profile:
                return _Profile()

            def build_serialized_network(self, network: _Network, config: _Config) -> bytes:
                mx = max((p.shapes[n][2][0] for p in config.profiles for n in p.shapes), default=1)
                meta = {"max_batch": mx, "flags": sorted(config.flags), "strong": bool(network.flags),
                        "onnx": network.onnx_path}
                fake.builds.append({"network": network, "config": config, "meta": meta})
                head = json.dumps(meta).encode()
                return MAGIC + len(head).to_bytes(4, "little") + head + Path(network.onnx_path).read_bytes()

        class Runtime:
            def __init__(self, logger) -> None:
                self.logger = logger

            def deserialize_cuda_engine(self, data: bytes):
                if not data.startswith(MAGIC):
                    return None
                n = int.from_bytes(data[8:12], "little")
                return _Engine(json.loads(data[12:12 + n]), data[12 + n:], fake.cudart)

        self.Builder = Builder
        self.Runtime = Runtime
        self.OnnxParser = _Parser

    @staticmethod
    def nptype(dtype: str):
        return {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int8": np.int8}[dtype]
