"""The index a training run searches: the configured one, or the refreshed version a checkpoint
recorded, opened in the worker or through the shard-actor group that every worker shares."""

from __future__ import annotations

import logging

from raggen.train.checkpointing import TrainingState
from raggen.train.distributed import from_rank_zero
from raggen.train.job import IndexTarget, TrainJob

logger = logging.getLogger(__name__)


def load_index(target: IndexTarget, rank: int = 0, world_size: int = 1):
    """The published index the loop searches (every checksum verified on load), opened with the
    ``index.search`` settings (a collective: every rank calls this at the same point):

    * through the shard-actor group the driver started for this index (``target.group``, shared by
      every worker: one group, not one copy per worker), while it answers;
    * else, when the settings ask for actors (a refreshed version, a resumed run, or the driver's
      group lost for good: its actors past their restarts, their node gone, so that a Ray Train
      restart of the workers does not fail on the same dead group again), rank 0 starts a group
      and hands it to the other ranks;
    * else in this process (small indexes).
    Stored vectors for the hits come back from wherever the shards live."""
    from raggen.index import ShardActorGroup, open_index
    from raggen.index.open_search import search_plan

    settings, s3, given = target.search, target.s3, target.group
    driver_group = given if given is not None and given.source_uri == target.uri and target.version in (
        None, given.version) else None  # fmt: skip

    def plan():
        if driver_group is not None:
            if driver_group.alive():
                return driver_group
            logger.warning("shard actors %s (the driver's) do not answer; rank 0 starts a new group", driver_group.name)
        version = target.version or (driver_group.version if driver_group is not None else None)  # not a newer LATEST
        vuri, manifest, actors = search_plan(target.uri, version, settings, s3)
        return ShardActorGroup.start(vuri, settings=settings, s3_options=s3, manifest=manifest) if actors else vuri

    where = from_rank_zero(plan, rank, world_size)
    if isinstance(where, ShardActorGroup):
        if driver_group is not None and where.name == driver_group.name:
            return open_index(target.uri, group=where)  # borrowed: closing it leaves the driver's group up
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
