"""Check that a Ray cluster runs raggen code end to end (a ``ray job submit`` entry point).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/smoke.py --out /tmp/raggen-smoke.json --num-entities 50

Builds the embedded world on the driver, counts the words of every passage with a Ray Data map
spread over the cluster's nodes, and writes a JSON summary to ``--out`` (atomically). Cheap
enough for CI: 50 entities give about a hundred passages and run in seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger("jobs.smoke")


def count_words(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data map: one row per passage with its word count and the node that counted it."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    words = np.array([len(str(t).split()) for t in batch["text"]], dtype=np.int64)
    return {"id": batch["id"], "words": words, "node": np.array([node] * len(words))}


def run(out: Path, world_dir: Path, num_entities: int, seed: int, num_blocks: int) -> dict:
    import ray

    from raggen.corpus import WorldConfig, atomic_writer, read_passages, write_world

    files = write_world(world_dir, WorldConfig(num_entities=num_entities, seed=seed))
    passages = read_passages(files.passages_v1)
    log.info("world: %d passages in %s", len(passages), files.passages_v1)

    ray.init()  # inside `ray job submit` RAY_ADDRESS points at the cluster: connect, never start one
    ray.data.DataContext.get_current().enable_progress_bars = False
    records = passages[["id", "text"]].to_dict("records")
    counted = (
        ray.data.from_items(records, override_num_blocks=min(num_blocks, max(1, len(records))))
        .map_batches(count_words, batch_format="numpy", batch_size=16, num_cpus=0.25)
        .take_all()
    )
    result = {
        "num_passages": len(counted),
        "num_words": int(sum(r["words"] for r in counted)),
        "max_words": int(max((r["words"] for r in counted), default=0)),
        "ids_unique": len({r["id"] for r in counted}) == len(counted),
        "map_nodes": sorted({r["node"] for r in counted}),
        "cluster_nodes": sum(1 for n in ray.nodes() if n["Alive"]),
        "cluster_resources": ray.cluster_resources(),
        "ray_version": ray.__version__,
        "python": sys.executable,
        "world_dir": str(files.out_dir),
        "passages_file": str(files.passages_v1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(out) as f:
        f.write(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="where to write the result JSON")
    parser.add_argument(
        "--world-dir",
        type=Path,
        default=None,
        help="where to build the world (default: a temporary folder, removed after)",
    )
    parser.add_argument("--num-entities", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-blocks", type=int, default=4, help="Ray Data blocks: how far the map spreads")
    args = parser.parse_args(argv)
    if args.num_entities < 10:
        parser.error(f"--num-entities must be >= 10, got {args.num_entities}")
    if args.num_blocks < 1:
        parser.error(f"--num-blocks must be >= 1, got {args.num_blocks}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="raggen-smoke-") as tmp:
        result = run(args.out, args.world_dir or Path(tmp), args.num_entities, args.seed, args.num_blocks)
    print(json.dumps({k: result[k] for k in ("num_passages", "num_words", "map_nodes")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
