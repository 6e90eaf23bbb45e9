"""The bodies of direct calls to shard actors (``direct_calls`` carries them, ``ActorBackend`` sends
them, ``ShardServer`` answers): top-k and fetch requests and answers, each one pickle in which
numpy arrays travel as (dtype, shape, bytes).

Why not pickle the arrays themselves: numpy's reduce runs Python code at both ends, 10-15 us per
array each way (a 768-d query vector: 14 us to pickle, 10 to unpickle), and a single query's two
round trips to 4 actors carry about 20 arrays. As raw bytes the same vector takes 2 + 3 us.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np

from raggen.index.search_params import SearchParams

Packed = tuple[str, tuple[int, ...], bytes]
PROTOCOL = pickle.HIGHEST_PROTOCOL


def pack(a: np.ndarray) -> Packed:
    a = np.ascontiguousarray(a)
    return a.dtype.str, a.shape, a.tobytes()


def unpack(packed: Packed) -> np.ndarray:
    """A writable array (FAISS and the merges may write into what they are given)."""
    dtype, shape, data = packed
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape).copy()


def topk_request(
    xq: np.ndarray, k: int, params: SearchParams, assignment: tuple[np.ndarray, np.ndarray] | None = None
) -> bytes:
    """``ShardServer.topk``'s arguments; ``assignment`` (Dq, Iq): the IVF lists the caller chose."""
    lists = None if assignment is None else (pack(assignment[0]), pack(assignment[1]))
    return pickle.dumps((pack(xq), int(k), params, lists), PROTOCOL)


def read_topk_request(body: bytes) -> tuple[np.ndarray, int, SearchParams, tuple[np.ndarray, np.ndarray] | None]:
    xq, k, params, lists = pickle.loads(body)
    return unpack(xq), k, params, None if lists is None else (unpack(lists[0]), unpack(lists[1]))


def topk_answer(answer: tuple[np.ndarray, ...]) -> bytes:
    """(scores, row ids, shard numbers), (b, k) each."""
    return pickle.dumps(tuple(pack(a) for a in answer), PROTOCOL)


def read_topk_answer(body: bytes) -> tuple[np.ndarray, ...]:
    return tuple(unpack(a) for a in pickle.loads(body))


def fetch_request(requests: dict[int, np.ndarray], embeddings: bool) -> bytes:
    """{shard number: row ids (n,)} and whether the stored vectors come too."""
    return pickle.dumps(({int(s): pack(r) for s, r in requests.items()}, bool(embeddings)), PROTOCOL)


def read_fetch_request(body: bytes) -> tuple[dict[int, np.ndarray], bool]:
    requests, embeddings = pickle.loads(body)
    return {s: unpack(r) for s, r in requests.items()}, embeddings


def fetch_answer(fetched: dict[int, tuple[Any, ...]]) -> bytes:
    """{shard number: (ids, titles, texts, vectors (n, d) or None)}."""
    return pickle.dumps({s: (*part[:3], None if part[3] is None else pack(part[3])) for s, part in fetched.items()},
                        PROTOCOL)  # fmt: skip


def read_fetch_answer(body: bytes) -> dict[int, tuple[Any, ...]]:
    return {s: (*part[:3], None if part[3] is None else unpack(part[3])) for s, part in pickle.loads(body).items()}
