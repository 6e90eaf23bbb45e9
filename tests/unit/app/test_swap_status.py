"""``raggen serve swap`` waits for a rollout in progress (an app DEPLOYING after the previous swap)
instead of refusing; it refuses an absent or failed app at once."""

from __future__ import annotations

from raggen.app.serving import settled_status


def _sequence(*statuses):
    seen = list(statuses)

    def read():
        return seen.pop(0) if len(seen) > 1 else seen[0]

    return read


def test_a_deploying_app_is_waited_for_until_it_runs():
    assert settled_status(_sequence("DEPLOYING", "DEPLOYING", "RUNNING"), timeout_s=5, poll_s=0.001) == "RUNNING"


def test_absent_or_failed_apps_are_reported_without_waiting():
    assert settled_status(_sequence("absent", "RUNNING"), timeout_s=5, poll_s=0.001) == "absent"
    assert settled_status(_sequence("DEPLOY_FAILED", "RUNNING"), timeout_s=5, poll_s=0.001) == "DEPLOY_FAILED"


def test_an_app_that_never_settles_is_reported_as_it_is_at_the_timeout():
    assert settled_status(_sequence("DEPLOYING"), timeout_s=0.05, poll_s=0.01) == "DEPLOYING"
