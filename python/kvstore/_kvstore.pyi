"""Type stubs of the C core (python/src/_kvstore.c)."""
from types import TracebackType
from typing import (Any, Dict, List, Literal, NamedTuple, Optional, Sequence,
                    Tuple, Type, TypeVar, Union)

import numpy as np
import numpy.typing as npt

__version__: str
HAVE_CUDA: int

# Anything exposing the buffer protocol, __dlpack__ or __array__.
ArrayLike = Any
DType = Union[Literal["f32", "f16", "bf16", "float32", "float16",
                      "bfloat16"], Any]
Mode = Optional[Literal["wave", "exact", "full", "default"]]
Budget = Optional[Literal["fixed", "bounded", "default"]]

_H = TypeVar("_H", bound="_Handle")


class AttendStats(NamedTuple):
    keys_total: int
    keys_exact: int
    keys_steady: int
    clusters_total: int
    clusters_retrieved: int
    clusters_estimated: int
    clusters_skipped: int
    seconds: float


class SeqInfo(NamedTuple):
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    tokens_min: int
    tokens_max: int
    indexed_tokens: int
    segments: int
    builds_pending: int
    bytes: int
    index_bytes: int
    resident: bool


class _Handle:
    @property
    def closed(self) -> bool: ...
    def create(self, seq: int, *, layers: int, q_heads: int, kv_heads: int,
               head_dim: int, dtype: DType = "f32", ttl: int = 0) -> None: ...
    def append(self, seq: int, layer: int, keys: ArrayLike,
               values: ArrayLike) -> None: ...
    def attend(self, seq: int, layer: int, queries: ArrayLike, *,
               mode: Mode = None, budget: Budget = None,
               retrieval_fraction: float = 0.0,
               estimation_fraction: float = 0.0, epsilon: float = 0.0,
               scale: float = 0.0, out: Optional[ArrayLike] = None
               ) -> Tuple[Any, AttendStats]:
        """numpy out for host queries; for CUDA queries (a Store with
        cuda_device) a CUDA tensor like them."""
    def observe_queries(self, seq: int, layer: int,
                        queries: ArrayLike) -> None: ...
    def search(self, seq: int, layer: int, queries: ArrayLike, k: int, *,
               mode: Mode = None, budget: Budget = None,
               retrieval_fraction: float = 0.0,
               estimation_fraction: float = 0.0, epsilon: float = 0.0
               ) -> Tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]: ...
    def fork(self, parent: int, child: int,
             at_token: Optional[int] = None) -> None: ...
    def drop(self, seq: int) -> None: ...
    def set_ttl(self, seq: int, seconds: int) -> None: ...
    def info(self, seq: int) -> SeqInfo: ...
    def list(self, node: int = 0) -> List[int]: ...
    def stats(self, node: int = 0) -> Dict[str, Union[int, float, str]]: ...
    def close(self) -> None: ...
    def __enter__(self: _H) -> _H: ...
    def __exit__(self, t: Optional[Type[BaseException]],
                 v: Optional[BaseException],
                 tb: Optional[TracebackType]) -> bool: ...


class Store(_Handle):
    def __init__(self, data_dir: Optional[str] = None, memory_bytes: int = 0,
                 sync: Literal["batch", "always", "none"] = "batch",
                 cuda_device: Optional[int] = None, n_threads: int = 0,
                 deterministic: bool = False, segment_tokens: int = 0,
                 cluster_tokens: int = 0, max_sequences: int = 0,
                 sink_tokens: int = 0, window_tokens: int = 0,
                 n_build_threads: int = 0) -> None: ...
    def attend_batch(self, seqs: Sequence[int], layer: int,
                     queries: ArrayLike, *, mode: Mode = None,
                     budget: Budget = None, retrieval_fraction: float = 0.0,
                     estimation_fraction: float = 0.0, epsilon: float = 0.0,
                     scale: float = 0.0, out: Optional[ArrayLike] = None
                     ) -> Tuple[npt.NDArray[np.float32], List[AttendStats]]:
        ...
    def wait_indexed(self, seq: int) -> None: ...
    def expire(self) -> int: ...
    def compact(self) -> None: ...


class Client(_Handle):
    def __init__(self, addrs: Union[str, Sequence[str]],
                 token: Optional[str] = None, name: Optional[str] = None,
                 connect_timeout_ms: int = 0,
                 request_timeout_ms: int = 0) -> None: ...
    def ping(self, node: int = 0) -> None: ...


def strerror(code: int) -> str: ...


class Error(Exception):
    code: int
    name: str
    strerror: str
    detail: str


class InvalidArgumentError(Error): ...
class NoSequenceError(Error): ...
class SequenceExistsError(Error): ...
class GeometryError(Error): ...
class RangeError(Error): ...
class NotFiniteError(Error): ...
class OutOfMemoryError(Error): ...
class StorageIOError(Error): ...
class CorruptError(Error): ...
class LockedError(Error): ...
class ClosedError(Error): ...
class FaissError(Error): ...
class TooBigError(Error): ...
class ProtocolError(Error): ...
class AuthError(Error): ...
class BusyError(Error): ...
class TimedOutError(Error): ...
class ConnectionLostError(Error): ...
class NoSpaceError(Error): ...
class QuarantinedError(Error): ...
class NotSupportedError(Error): ...
class ConflictError(Error): ...

KVS_EINVAL: int
KVS_ENOSEQ: int
KVS_EEXIST: int
KVS_EGEOMETRY: int
KVS_ERANGE: int
KVS_ENOTFINITE: int
KVS_ENOMEM: int
KVS_EIO: int
KVS_ECORRUPT: int
KVS_ELOCKED: int
KVS_ECLOSED: int
KVS_EFAISS: int
KVS_ETOOBIG: int
KVS_EPROTO: int
KVS_EAUTH: int
KVS_EBUSY: int
KVS_ETIMEDOUT: int
KVS_ECONN: int
KVS_ENOSPC: int
KVS_EQUARANTINED: int
KVS_ENOTSUP: int
