"""What several test modules share and that is not a fixture: paths and small builders."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_random_shards(
    out: Path,
    *,
    n: int,
    dim: int,
    seed: int,
    store_embeddings: bool = False,
    text: str = "text {r}",
    num_shards: int = 2,
) -> list[tuple[Path, Path, int]]:
    """``num_shards`` Flat shards of ``n`` seeded random vectors in ``out`` (contiguous rows per shard,
    passage ids ``"{seed}-{row}"``): the ``shard_files`` of ``make_manifest``."""
    import numpy as np

    xb = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    texts = [text.format(seed=seed, r=r) for r in range(n)]
    return write_shards(
        out,
        xb,
        [f"{seed}-{r}" for r in range(n)],
        [""] * n,
        texts,
        np.array_split(np.arange(n), num_shards),
        store_embeddings=store_embeddings,
    )


def write_shards(
    out: Path,
    xb,
    pids: list[str],
    titles: list[str],
    texts: list[str],
    row_sets,
    *,
    store_embeddings: bool,
    factory: str = "Flat",
) -> list[tuple[Path, Path, int]]:
    """Shard ``s`` = the passages ``row_sets[s]`` (vectors ``xb``), written as a FAISS file of
    ``factory`` and a passage parquet in ``out`` with ids ``s << 40 | position``: the ``shard_files``
    of ``make_manifest``."""
    import numpy as np

    from raggen.index import manifest as M
    from raggen.index import shard as S
    from raggen.index.passage_table import passages_table, write_parquet_atomic

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for s, rows in enumerate(row_sets):
        ids = (np.int64(s) << 40) + np.arange(len(rows), dtype=np.int64)
        index_name, passages_name = M.shard_file_names(s)
        S.write_index_file(S.build_shard_index(xb[rows], ids, factory=factory, metric="ip"), out / index_name)
        table = passages_table(
            ids,
            [pids[r] for r in rows],
            [titles[r] for r in rows],
            [texts[r] for r in rows],
            xb[rows] if store_embeddings else None,
        )
        write_parquet_atomic(table, out / passages_name)
        files.append((out / index_name, out / passages_name, len(rows)))
    return files


def publish_random_version(
    root: str, tmp: Path, version: str, created: str, *, n: int = 30, seed: int = 0, dim: int = 8, s3_options=None
):
    """A two-shard Flat version of random vectors, published to ``root`` (LATEST moves forward)."""
    from raggen.index import manifest as M
    from raggen.index.publish import publish_version

    out = tmp / f"build-{version}"
    files = write_random_shards(out, n=n, dim=dim, seed=seed)
    m = M.make_manifest(
        version,
        encoder_name_or_path="enc-" + version,
        pooling="cls",
        dim=dim,
        metric="ip",
        faiss_factory="Flat",
        shard_files=files,
    ).model_copy(update={"created": created})
    return publish_version(root, m, out, s3_options=s3_options)


def three_versions(root: str, tmp: Path, s3_options=None) -> None:
    """v1 < v2 < v3 by created time; LATEST -> v3."""
    for i in (1, 2, 3):
        publish_random_version(
            root, tmp, f"v{i}", f"2026-01-0{i}T00:00:00.000000Z", n=20 + 10 * i, seed=i, s3_options=s3_options
        )


def publish_encoded_index(
    passages,
    root: str,
    encoder,
    encoder_name_or_path: str,
    work: Path,
    *,
    version: str = "v1",
    num_shards: int = 2,
    s3_options=None,
    factory: str = "Flat",
):
    """``passages`` (a DataFrame with id, title, text) encoded in this process by ``encoder`` (a
    ``TextEncoder``) and published to ``root`` as a version of ``factory`` with stored vectors: the same files
    and manifest as ``build_index`` writes, without Ray Data (that path has its own tests), for tests
    whose subject is what reads an index. Returns the vectors (n, d)."""
    import numpy as np

    from raggen.index import make_manifest, publish_version

    xb = encoder.encode_passages(passages["title"].tolist(), passages["text"].tolist()).numpy()  # (n, d)
    out = work / f"build-{version}"
    n = len(passages)
    rows = [np.arange(shard, n, num_shards) for shard in range(num_shards)]  # round-robin
    files = write_shards(
        out,
        xb,
        passages["id"].tolist(),
        passages["title"].tolist(),
        passages["text"].tolist(),
        rows,
        store_embeddings=True,
        factory=factory,
    )
    manifest = make_manifest(
        version,
        encoder_name_or_path=encoder_name_or_path,
        pooling=encoder.pooling,
        normalize=encoder.normalize,
        passage_format=encoder.passage_format or "joined",
        query_prefix=encoder.query_prefix or "",
        passage_prefix=encoder.passage_prefix,
        dim=xb.shape[1],
        metric="ip",
        faiss_factory=factory,
        shard_files=files,
    )
    publish_version(root, manifest, out, s3_options=s3_options)
    return xb


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a dashboard or HTTP server of a test's own)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
