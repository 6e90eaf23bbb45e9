"""Build, serialize and search ONE FAISS index (a shard). numpy in, numpy out; no Ray here.

Any ``faiss.index_factory`` string works ("Flat", "HNSW32", "IVF1024,PQ64", "OPQ64,IVF1024,PQ64",
...). Passages are added with int64 ids (the ``row_id`` column of the shard's parquet): IVF
indexes take ids natively (with a hash-table direct map so ``reconstruct`` still works); every
other type is wrapped in ``IndexIDMap2``. GPU: when ``faiss.get_num_gpus() > 0`` training/adding
and searching run on GPU 0 through ``StandardGpuResources`` for the types faiss can clone to the GPU
(Flat, IVF*), CPU otherwise; the serialized index is always the CPU form.
"""

from __future__ import annotations

import logging
from typing import Literal

import faiss
import numpy as np

from raggen.errors import ConfigError

logger = logging.getLogger(__name__)

Metric = Literal["ip", "l2"]
_METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
_METRIC_ALIASES = {"ip": "ip", "inner_product": "ip", "dot": "ip", "l2": "l2", "euclidean": "l2"}


def normalize_metric(metric: str) -> Metric:
    """'ip' | 'l2' (also accepts 'inner_product', 'dot', 'euclidean', any case)."""
    key = str(metric).lower()
    if key not in _METRIC_ALIASES:
        raise ConfigError(f"metric: must be 'ip' or 'l2', got {metric!r}")
    return _METRIC_ALIASES[key]  # type: ignore[return-value]


def faiss_metric(metric: str) -> int:
    return _METRICS[normalize_metric(metric)]


def as_float32_matrix(x: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    """Shape/dtype check first (faiss/contrib style): a C-contiguous (n, d) float32 array."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (n, d), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name}: expected dimension {dim}, got {x.shape[1]}")
    return np.ascontiguousarray(x, dtype=np.float32)


# ------------------------------------------------------------------------------------------ create


def new_index(dim: int, factory: str, metric: str = "ip") -> faiss.Index:
    """An empty index from a factory string; a bad string raises ConfigError naming it."""
    if dim <= 0:
        raise ConfigError(f"dim: must be positive, got {dim}")
    try:
        return faiss.index_factory(int(dim), str(factory), faiss_metric(metric))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"faiss_factory: cannot build {factory!r} for dim {dim}: {reason}") from None


def ivf_of(index: faiss.Index):
    """The IndexIVF inside ``index`` (through IndexPreTransform / IDMap), or None."""
    return faiss.try_extract_index_ivf(index)


def min_training_vectors(index: faiss.Index) -> int:
    """The fewest training vectors the index's k-means steps accept (0 if it needs no training).

    IVF{n} clusters into n lists; PQ/OPQ quantizers learn 2**nbits centroids per sub-space.
    """
    if index.is_trained:
        return 0
    need = 1
    ivf = ivf_of(index)
    if ivf is not None:
        need = max(need, int(ivf.nlist))
    for obj in _walk(index):
        pq = getattr(obj, "pq", None)
        if pq is not None and hasattr(pq, "ksub"):
            need = max(need, int(pq.ksub))
        if isinstance(obj, faiss.OPQMatrix):
            need = max(need, 256)
    return need


def _walk(index: faiss.Index):
    """The index and the indexes/transforms it wraps (PreTransform chain, IVF, IDMap)."""
    index = faiss.downcast_index(index)
    yield index
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            yield faiss.downcast_VectorTransform(index.chain.at(i))
        yield from _walk(index.index)
    elif isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        yield from _walk(index.index)
    elif isinstance(index, faiss.IndexRefine):  # "...,RFlat" / "...,Refine(SQ8)": search runs in the base
        yield from _walk(index.base_index)
    ivf = ivf_of(index)
    if ivf is not None and ivf is not index:
        yield faiss.downcast_index(ivf)


def _supports_ids(index: faiss.Index) -> bool:
    """IVF indexes (also behind OPQ/PCA transforms) store ids themselves; others need IDMap2 (also an
    IVF inside a refine wrapper: ``IndexRefine`` has no ``add_with_ids``)."""
    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return isinstance(index, faiss.IndexIVF)


def refine_of(index: faiss.Index):
    """The ``IndexRefine`` inside ``index`` (an IVF-PQ re-ranked with exact or SQ8 codes), or None."""
    return next((obj for obj in _walk(index) if isinstance(obj, faiss.IndexRefine)), None)


# ------------------------------------------------------------------------------------------ GPU


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_GPU_RESOURCES = None


def to_gpu(index: faiss.Index) -> faiss.Index:
    """Clone to GPU 0 when a GPU exists and faiss can clone this type; the CPU index otherwise."""
    global _GPU_RESOURCES
    if not gpu_available():
        return index
    try:
        if _GPU_RESOURCES is None:
            _GPU_RESOURCES = faiss.StandardGpuResources()
        options = faiss.GpuClonerOptions()
        options.useFloat16 = True  # PQ tables / flat storage in fp16: 2x memory, same recall in practice
        return faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index, options)
    except RuntimeError as exc:  # e.g. HNSW has no GPU implementation
        logger.info("faiss GPU clone not possible for %s (%s); using CPU", type(index).__name__, exc)
        return index


def to_cpu(index: faiss.Index) -> faiss.Index:
    if gpu_available() and hasattr(faiss, "index_gpu_to_cpu"):
        try:
            return faiss.index_gpu_to_cpu(index)
        except RuntimeError:
            return index
    return index


# ------------------------------------------------------------------------------------------ build


def build_shard_index(
    xb: np.ndarray,
    ids: np.ndarray,
    *,
    factory: str = "Flat",
    metric: str = "ip",
    train_sample: int = 100_000,
    seed: int = 0,
    use_gpu: bool | None = None,
    add_batch_size: int = 65_536,
    trained_index: faiss.Index | None = None,
) -> faiss.Index:
    """A trained, filled CPU index over ``xb`` (n, d) with int64 ``ids`` (n,).

    Training uses a seeded random sample of ``min(train_sample, n)`` rows; fewer rows than the
    factory's k-means steps need raises ConfigError naming ``train_sample`` and the factory.
    ``trained_index`` (an empty, trained index, e.g. from ``train_index``) skips training, so all
    shards can share one coarse quantizer / codebook.
    """
    xb = as_float32_matrix(xb, "xb")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    n, d = xb.shape
    assert ids.shape == (n,), f"ids: expected shape ({n},), got {ids.shape}"
    if len(np.unique(ids)) != n:
        raise ValueError("ids: must be unique within a shard")
    use_gpu = gpu_available() if use_gpu is None else use_gpu
    if trained_index is not None:
        assert trained_index.is_trained and trained_index.ntotal == 0 and trained_index.d == d, (
            "trained_index: empty, trained, dim d"
        )
        index = faiss.clone_index(trained_index)
    else:
        index = train_index(xb, factory=factory, metric=metric, train_sample=train_sample, seed=seed, use_gpu=use_gpu)
    if not _supports_ids(index):
        index = faiss.IndexIDMap2(index)
    target = to_gpu(index) if use_gpu and _supports_ids(index) else index
    for start in range(0, n, add_batch_size):
        target.add_with_ids(xb[start : start + add_batch_size], ids[start : start + add_batch_size])
    index = to_cpu(target) if target is not index else index
    ivf = ivf_of(index)
    if ivf is not None:  # reconstruct(id) on IVF needs a direct map; ids are arbitrary -> hashtable
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    return index


def train_index(
    xb: np.ndarray,
    *,
    factory: str,
    metric: str = "ip",
    train_sample: int = 100_000,
    seed: int = 0,
    use_gpu: bool | None = None,
) -> faiss.Index:
    """An empty index of ``factory``, trained on a sample of ``xb`` (n, d)."""
    xb = as_float32_matrix(xb, "xb")
    index = new_index(xb.shape[1], factory, metric)
    use_gpu = gpu_available() if use_gpu is None else use_gpu
    _train(index, xb, factory=factory, train_sample=train_sample, seed=seed, use_gpu=use_gpu)
    return index


def _train(index: faiss.Index, xb: np.ndarray, *, factory: str, train_sample: int, seed: int, use_gpu: bool) -> None:
    need = min_training_vectors(index)
    if need == 0:
        return
    n = xb.shape[0]
    m = min(int(train_sample), n)
    if m < need:
        raise ConfigError(
            f"faiss_factory: {factory!r} needs at least {need} training vectors, got {m} "
            f"(shard has {n} vectors, train_sample={train_sample}); use fewer IVF lists / PQ bits, "
            "fewer shards, or 'Flat'"
        )
    if m < 39 * need:
        logger.warning("training %r on %d vectors (< 39 x %d centroids): clustering may be poor", factory, m, need)
    for obj in _walk(index):
        if getattr(obj, "do_polysemous_training", False):
            # the factory turns on polysemous training for PQ: minutes of permutation search that
            # only Hamming-filtered search ("PQ8np" off) uses; plain PQ search does not
            obj.do_polysemous_training = False
    rows = np.random.default_rng(seed).choice(n, size=m, replace=False) if m < n else np.arange(n)
    sample = xb[np.sort(rows)]
    ivf = ivf_of(index)
    if use_gpu and ivf is not None and gpu_available():
        # k-means assignment is the costly part of IVF training: run it on the GPU
        ivf.clustering_index = to_gpu(faiss.IndexFlatL2(ivf.d))
    index.train(sample)


# ------------------------------------------------------------------------------------------ serialize


def serialize_index(index: faiss.Index) -> np.ndarray:
    """The index as a uint8 numpy array (CPU form), ready to write to a file or ``ray.put``."""
    return faiss.serialize_index(to_cpu(index))


def deserialize_index(data: bytes | bytearray | memoryview | np.ndarray) -> faiss.Index:
    """Inverse of serialize_index; accepts bytes or a (read-only) uint8 array."""
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    if buf.dtype != np.uint8 or buf.ndim != 1:
        raise ValueError(f"serialized index: expected a 1-D uint8 buffer, got {buf.dtype} {buf.shape}")
    return faiss.deserialize_index(np.ascontiguousarray(buf))


def write_index_file(index: faiss.Index, path) -> None:
    """Serialize atomically to ``path`` (temporary name + os.replace)."""
    from raggen.storage import atomic_write_bytes

    atomic_write_bytes(path, serialize_index(index).tobytes())


def read_index_file(path) -> faiss.Index:
    return deserialize_index(np.fromfile(path, dtype=np.uint8))


# below this size a file is read into memory: nothing to gain from a mapping, and faiss's
# mapped reader does not bounds-check a file cut inside its header
MMAP_MIN_BYTES = 4096


def open_index_file(path, *, mmap: bool = True) -> faiss.Index:
    """Open a serialized index file ONCE, memory-mapped where the type allows it.

    ``IO_FLAG_MMAP_IFC`` maps every code array FAISS keeps in flat storage: an IVF index's inverted
    lists, Flat / HNSW codes (HNSW's graph is read into memory) and a re-ranked index's refine codes
    (``...,RFlat``, ``...,Refine(SQfp16)``). ``IO_FLAG_MMAP``, FAISS's older flag, maps only the IVF
    lists and reads a refine stage's codes into memory: 935 MB of anonymous memory per shard actor for
    1 GB of ``IVF1024,PQ64,Refine(SQfp16)`` shards in the 2M rehearsal (and it searched plain IVF-PQ
    slower, 1.7-2.3 vs 1.0-1.3 ms a query on one thread). A file under ``MMAP_MIN_BYTES``, a type
    the mapped reader does not know, or ``mmap=False`` is read into memory. The mapped file must not
    be truncated in place while the index is used (raggen never does: files are replaced by rename,
    and an unlinked file stays mapped). Errors are RuntimeError."""
    import os

    path = str(path)
    if not mmap or os.path.getsize(path) < MMAP_MIN_BYTES:
        return faiss.read_index(path)
    try:
        return faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC)
    except RuntimeError:
        return faiss.read_index(path)  # a type the mapped reader does not know: read it whole (or raise)


# ------------------------------------------------------------------------------------------ search


def set_search_params(
    index: faiss.Index,
    *,
    nprobe: int | None = None,
    ef_search: int | None = None,
    refine_k_factor: float | None = None,
) -> None:
    """IVF ``nprobe``, HNSW ``efSearch`` and a refine index's ``k_factor`` (candidates re-scored
    per hit); settings that do not apply to the type are ignored."""
    space = faiss.ParameterSpace()
    if nprobe is not None and ivf_of(index) is not None:
        space.set_index_parameter(index, "nprobe", int(nprobe))
    if ef_search is not None:
        for obj in _walk(index):
            hnsw = getattr(obj, "hnsw", None)
            if hnsw is not None:
                hnsw.efSearch = int(ef_search)
    if refine_k_factor is not None and (refine := refine_of(index)) is not None:
        refine.k_factor = float(refine_k_factor)


def search_parameters(
    index: faiss.Index,
    *,
    nprobe: int | None = None,
    ef_search: int | None = None,
    refine_k_factor: float | None = None,
):
    """Per-call ``faiss.SearchParameters`` (None when nothing applies): IVF ``nprobe`` (clamped to
    nlist), HNSW ``efSearch``, a refine index's ``k_factor`` (None: the index's own, which the
    wrapper's parameters must then carry). Unlike ``set_search_params`` nothing in the index
    changes, so concurrent searches with different settings are safe."""
    ivf = ivf_of(index)
    params = None
    if nprobe is not None and ivf is not None:
        params = faiss.SearchParametersIVF(nprobe=max(1, min(int(nprobe), int(ivf.nlist))))
    elif ef_search is not None and hnsw_of(index) is not None:
        params = faiss.SearchParametersHNSW(efSearch=max(1, int(ef_search)))
    refine = refine_of(index) if params is not None or refine_k_factor is not None else None
    if refine is not None:  # a refine index wraps its base's settings
        k_factor = float(refine.k_factor if refine_k_factor is None else refine_k_factor)
        params = faiss.IndexRefineSearchParameters(k_factor=k_factor, base_index_params=params)
    return params


def hnsw_of(index: faiss.Index):
    """The HNSW structure inside ``index`` (through IDMap / PreTransform), or None."""
    for obj in _walk(index):
        hnsw = getattr(obj, "hnsw", None)
        if hnsw is not None:
            return hnsw
    return None


def current_search_params(index: faiss.Index) -> dict[str, float]:
    """The index's own defaults: {"nprobe": ...} for IVF, {"ef_search": ...} for HNSW, and
    {"refine_k_factor": ...} for a refine index."""
    out: dict[str, float] = {}
    ivf = ivf_of(index)
    if ivf is not None:
        out["nprobe"] = int(ivf.nprobe)
    hnsw = hnsw_of(index)
    if hnsw is not None:
        out["ef_search"] = int(hnsw.efSearch)
    refine = refine_of(index)
    if refine is not None:
        out["refine_k_factor"] = float(refine.k_factor)
    return out


def search(
    index: faiss.Index,
    xq: np.ndarray,
    k: int,
    *,
    nprobe: int | None = None,
    ef_search: int | None = None,
    refine_k_factor: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(xq[nq, d], k) -> D[nq, k] float32 scores/distances, I[nq, k] int64 ids (-1 = no hit).
    ``nprobe`` / ``ef_search`` / ``refine_k_factor`` override the index's settings for this call only."""
    xq = as_float32_matrix(xq, "xq", index.d)
    if k <= 0:
        raise ValueError(f"k: must be positive, got {k}")
    params = search_parameters(index, nprobe=nprobe, ef_search=ef_search, refine_k_factor=refine_k_factor)
    if params is None:
        return index.search(xq, int(k))
    return index.search(xq, int(k), params=params)


def exact_reconstruct(index: faiss.Index) -> bool:
    """True when ``reconstruct`` returns the added float32 vectors bit for bit (Flat codes: IndexFlat,
    IVF-Flat, HNSW-Flat, no transform in front), so stored embeddings are redundant."""
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return exact_reconstruct(index.index)
    if isinstance(index, faiss.IndexRefine):  # reconstructs from the refine codes (RFlat: exact)
        return exact_reconstruct(index.refine_index)
    if isinstance(index, faiss.IndexFlat):
        return True
    if isinstance(index, faiss.IndexIVFFlat):
        return True
    if isinstance(index, faiss.IndexHNSW):
        return isinstance(faiss.downcast_index(index.storage), faiss.IndexFlat)
    return False


def reconstruct(index: faiss.Index, ids: np.ndarray) -> np.ndarray:
    """Stored vectors for ``ids`` (n,) -> (n, d) float32. Exact for Flat/HNSW-Flat, lossy for PQ/SQ."""
    ids = np.ascontiguousarray(ids, dtype=np.int64).ravel()
    try:
        return index.reconstruct_batch(ids)
    except RuntimeError as exc:
        raise ConfigError(
            f"faiss_factory: index type {type(faiss.downcast_index(index)).__name__} cannot reconstruct "
            f"vectors ({str(exc).strip().splitlines()[-1]}); publish with store_embeddings=True"
        ) from None


def index_ids(index: faiss.Index) -> np.ndarray | None:
    """The ids stored in an IDMap/IDMap2 index (None for IVF, whose ids live in the lists)."""
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    return None
