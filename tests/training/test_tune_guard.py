"""What keeps a search from hanging: a stopped trial's placement group is released, concurrency fits."""

import time

import ray


@ray.remote(num_cpus=0)
class _Creator:
    """Stands for a Ray Train controller: it reserves a worker group's resources, then dies abruptly."""

    def reserve(self, cpus: float) -> str:
        from ray.util.placement_group import placement_group

        pg = placement_group([{"CPU": cpus}])
        ray.get(pg.ready(), timeout=60)
        return pg.id.hex()


def _live(pg_hex: str) -> bool:
    from ray.util.placement_group import placement_group_table

    table = placement_group_table()
    return pg_hex in table and table[pg_hex]["state"] != "REMOVED"


def test_a_dead_creators_reservation_is_released(ray_local):
    """The hang's cause: GCS keeps a placement group until creator actor *and* job are dead, so a
    stopped trial's reservation outlived it; the driver releases it without the State API."""
    from ray.util.placement_group import placement_group, remove_placement_group

    from liverseg.training.tune_guard import (
        orphaned_placement_groups,
        placeable_trials,
        release_orphaned_placement_groups,
    )

    own = placement_group([{"CPU": 0.5}])  # the driver's (as Tune's trial reservations are): never touched
    ray.get(own.ready(), timeout=60)
    creator = _Creator.remote()
    pg_hex = ray.get(creator.reserve.remote(1.0))
    assert pg_hex not in orphaned_placement_groups()  # its creator lives
    ray.kill(creator)
    deadline = time.time() + 30
    while pg_hex not in orphaned_placement_groups() and time.time() < deadline:
        time.sleep(0.2)
    assert _live(pg_hex) and pg_hex in orphaned_placement_groups()  # left behind, as the trials' were
    assert release_orphaned_placement_groups() >= 1
    assert not _live(pg_hex) and _live(own.id.hex())
    remove_placement_group(own)
    assert placeable_trials({"CPU": 1.01}) == 1 and placeable_trials({"CPU": 0.5}) == 4  # ray_local: 2 CPUs
    assert placeable_trials({"CPU": 1.0, "GPU": 1.0}) == 0
