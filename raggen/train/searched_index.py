"""The index a training run searches: the configured one, or the refreshed version a checkpoint
recorded, opened in the worker or through the shard-actor group that every worker shares."""

from __future__ import annotations

from raggen.train.checkpointing import TrainingState
from raggen.train.distributed import from_rank_zero
from raggen.train.job import IndexTarget, TrainJob


def load_index(target: IndexTarget, rank: int = 0, world_size: int = 1):
    """The published index the loop searches (every checksum verified on load), opened with the
    ``index.search`` settings:

    * through the shard-actor group the driver started for this index (``target.group``, shared by
      every worker: one group, not one copy per worker);
    * else, when the settings ask for actors (a refreshed version, a resumed run), rank 0 starts a
      group and hands it to the other ranks (a collective: every rank calls this at the same point);
    * else in this process (small indexes).
    Stored vectors for the hits come back from wherever the shards live."""
    from raggen.index import ShardActorGroup, open_index
    from raggen.index.open_search import search_plan

    settings, s3, group = target.search, target.s3, target.group
    if group is not None and group.source_uri == target.uri and target.version in (None, group.version):
        return open_index(target.uri, group=group)

    def plan():
        vuri, manifest, actors = search_plan(target.uri, target.version, settings, s3)
        return ShardActorGroup.start(vuri, settings=settings, s3_options=s3, manifest=manifest) if actors else vuri

    where = from_rank_zero(plan, rank, world_size)
    if isinstance(where, ShardActorGroup):
        return where.sharded_index(owned=rank == 0)
    return open_index(where, settings=settings.model_copy(update={"mode": "local"}), s3_options=s3)


def searched_index(job: TrainJob, state: TrainingState | None) -> IndexTarget:
    """The index to open: the refreshed version a checkpoint recorded, else the configured one."""
    recorded = (state.extra.get("index") if state is not None else None) or {}
    if not recorded:
        return job.index
    return job.index.replace(
        uri=recorded["uri"], version=recorded.get("version"), refreshed=bool(recorded.get("refreshed"))
    )
