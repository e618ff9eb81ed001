"""Lane passive health (pure unit tier, a clock moved by hand): nginx's max_fails/fail_timeout."""

from __future__ import annotations

from laneproxy.lane import Lane
from tests.helpers import FakeLoop, lane_config

A = {"address": "127.0.0.1:9001", "max_fails": 2, "fail_timeout": "5s"}
B = "127.0.0.1:9002"


def make() -> tuple[Lane, FakeLoop]:
    loop = FakeLoop(start=100.0)
    lane = Lane("app", lane_config(servers=(A, B)), loop)  # type: ignore[arg-type]
    return lane, loop


def test_failures_within_the_window_add_up_across_successes() -> None:
    lane, loop = make()
    a = lane.servers[0]
    lane.record_failure(a)
    loop.now += 1
    lane.record_success(a)  # inside the window: a flapping server is not forgiven
    loop.now += 1
    lane.record_failure(a)
    assert not a.available(loop.now) and a.marked_down == 1


def test_a_success_after_the_window_clears_the_count() -> None:
    lane, loop = make()
    a = lane.servers[0]
    lane.record_failure(a)
    loop.now += 6
    lane.record_success(a)
    lane.record_failure(a)
    assert a.available(loop.now) and a.marked_down == 0


def test_one_failure_after_the_time_out_takes_it_out_again() -> None:
    lane, loop = make()
    a = lane.servers[0]
    lane.record_failure(a)
    lane.record_failure(a)
    assert not a.available(loop.now)
    loop.now += 5.1
    assert a.available(loop.now)  # tried again after fail_timeout
    lane.record_failure(a)  # one more failure: out again at once (nginx)
    assert not a.available(loop.now) and a.marked_down == 2
    loop.now += 5.1
    lane.record_success(a)  # back after its time out: live, the count cleared
    lane.record_failure(a)
    assert a.available(loop.now)
