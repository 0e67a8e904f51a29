"""kvstore: the KV-cache vector store for long-context LLM inference.

Two handles with one surface (see docs/python.md):

- ``Store(...)``: the in-process engine (libkvstore). Thread-safe.
- ``Client("tcp://host:port" | "unix:/path", token=...)``: a kvstored daemon
  (libkvsclient). Calls are serialised per Client.

Both have create/append/attend/search/fork/drop/set_ttl/info/list/stats,
close() and the context-manager protocol; every engine or client call
releases the GIL. Arrays go in without copies through the buffer protocol
(numpy) or ``__array__`` (torch CPU tensors); outputs are numpy arrays.
Errors are ``kvstore.Error`` subclasses with ``.code``, ``.name``,
``.strerror`` and ``.detail``.
"""
from ._kvstore import *  # noqa: F401,F403  (the C core: types, errors, codes)
from ._kvstore import (AttendStats, Client, Error, SeqInfo, Store,  # noqa: F401
                       HAVE_CUDA, __version__, strerror)


def features():
    """What this build has: {'version', 'cuda', 'store', 'client'}."""
    return {"version": __version__, "cuda": bool(HAVE_CUDA), "store": True,
            "client": True}
