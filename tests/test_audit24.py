"""Audit 24: a hypothesis stateful test of LaneQueue against a small reference model.

Pure unit tier: a fake clock moved by hand, no sockets, no sleeps.  The model is written from
the lane's admission rules in /work/shared/docs/lanes.md and README.md ("Lanes", "Sizing the
queue"); where those are silent (priority classes, aging, the CoDel interval bookkeeping) it
checks the looser property they imply, or the unit's own documented rule (queue.py's module
docstring), and says which in a comment.

The model does not re-implement CoDel's interval arithmetic.  It reads `overloaded` from the
queue and checks what the docs say about it instead: it is off while nothing waits, it can only
turn on after the queue has stood for a whole interval with its oldest waiter older than the
target, and while it is on the order is newest-first and waiters older than twice the target are
shed ('codel').  Everything else (slots, GO/QUEUED/FULL, deadlines, who leaves how, counters) is
decided by the model alone.

Float care: the fake clock moves by dyadic steps or jumps exactly onto next_deadline(); age
comparisons use a tolerance EPS where the rule is a threshold ("must be shed" only when
clearly past it, "may be shed" from just below it).
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from laneproxy.queue import FULL, GO, QUEUED, SHED_REASONS, LaneQueue

pytestmark = pytest.mark.timeout(60)

EPS = 1e-9


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class W:
    """A waiter: hashable by identity, carries what the model knows about it."""

    __slots__ = ("seq", "cls", "t")

    def __init__(self, seq: int, cls: int, t: float) -> None:
        self.seq, self.cls, self.t = seq, cls, t

    def __repr__(self) -> str:
        return f"W{self.seq}(c{self.cls}@{self.t})"


class LaneQueueMachine(RuleBasedStateMachine):
    # -- setup ---------------------------------------------------------------------------------

    @initialize(
        limit=st.sampled_from([0, 1, 1, 1, 2, 2, 3]),
        size=st.sampled_from([0, 1, 2, 3, 4, 5, 6, 6]),
        timeout=st.sampled_from([0.0, 0.25, 1.0, 2.0, 3.0, 10.0, 10.0, math.inf]),
        codel=st.sampled_from(["default", "tight", "standing", "standing", "loose"]),
        aging=st.sampled_from([None, 0.125, 1.0, math.inf]),
    )
    def setup(self, limit: int, size: int, timeout: float, codel: str, aging: float | None) -> None:
        self.clock = Clock()
        kw: dict[str, float] = {}
        if codel == "tight":
            kw = {"target": 0.125, "interval": 0.5}
        elif codel == "standing":  # short interval: overload comes and goes within a run
            kw = {"target": 0.0625, "interval": 0.25}
        elif codel == "loose":
            kw = {"target": 1000.0, "interval": 1000.0}
        if aging is not None:
            kw["aging"] = aging
        self.q = LaneQueue(limit, size, timeout, clock=self.clock, **kw)
        self.limit, self.size, self.timeout = limit, size, timeout
        self.target, self.interval, self.aging = self.q.target, self.q.interval, self.q.aging
        # Model state.
        self.seq = 0
        self.all: list[W] = []  # every waiter ever offered (for remove() of stale ones)
        self.live: dict[W, None] = {}  # queued, insertion ordered
        self.pending: dict[W, set[str]] = {}  # shed by admit/release, not yet returned by expire()
        self.gone: set[W] = set()  # left without a slot (any reason), or handed a slot
        self.handed: set[W] = set()
        self.in_flight = 0
        self.served = 0
        self.shed = dict.fromkeys(SHED_REASONS, 0)
        self.nonempty_since: float | None = None  # when the queue last went from 0 to >= 1 waiter
        self.ready = True

    # -- helpers -------------------------------------------------------------------------------

    def age(self, w: W) -> float:
        return self.clock.now - w.t

    def must_timeout(self, w: W) -> bool:
        return self.age(w) >= self.timeout + EPS

    def may_timeout(self, w: W) -> bool:
        return self.age(w) >= self.timeout - EPS

    def may_codel(self, w: W) -> bool:
        return self.age(w) >= 2 * self.target - EPS

    def note_shed(self, op: str, dropped: list[W], over_during: bool | None) -> None:
        """`dropped` left the queue during a sweep: legit only when due; they become pending."""
        for w in dropped:
            ok_timeout = self.may_timeout(w)
            ok_codel = self.may_codel(w) and over_during is not False
            reasons = {r for r, ok in (("timeout", ok_timeout), ("codel", ok_codel)) if ok}
            assert reasons, (
                f"{op}: {w!r} shed at age {self.age(w)} (timeout {self.timeout}, "
                f"2*target {2 * self.target}, overloaded {over_during})")
            del self.live[w]
            self.pending[w] = reasons  # the reason is checked when expire() returns it
            self.gone.add(w)

    def check_swept(self, op: str, over_after: bool) -> None:
        """After a sweeping call no queued waiter is past queue_timeout (or 2*target in overload)."""
        for w in self.live:
            if w.t == self.clock.now and self.timeout == 0:
                continue  # just queued with timeout 0: due at once, shed at the next call
            assert not self.must_timeout(w), f"{op}: {w!r} still queued at age {self.age(w)}"
            if over_after:
                assert self.age(w) < 2 * self.target + EPS, f"{op}: {w!r} kept in overload"

    def check_overload_flip(self, op: str, pre_over: bool, pre_live: list[W]) -> None:
        post = self.q.overloaded
        if post and not pre_over:
            # lanes.md: overloaded when "the minimum wait over an interval exceeds a target":
            # the queue stood for a whole interval and its oldest waiter is past the target.
            assert pre_live, f"{op}: overload turned on with an empty queue"
            assert self.nonempty_since is not None
            assert self.clock.now - self.nonempty_since >= self.interval - EPS, (
                f"{op}: overload after {self.clock.now - self.nonempty_since} < interval {self.interval}")
            oldest = min(w.t for w in pre_live)
            assert self.clock.now - oldest > self.target - EPS, f"{op}: overload with a young queue"
            # Not modelled: which interval closed and its minimum sample (queue.py Rule 3's
            # bookkeeping; lanes.md only says "the minimum wait over an interval"): the looser
            # property above (stood >= interval, oldest past target) is what is checked.
    def after_change(self) -> None:
        if self.live and self.nonempty_since is None:
            self.nonempty_since = self.clock.now
        if not self.live:
            self.nonempty_since = None

    def new_waiter(self, cls: int) -> W:
        w = W(self.seq, cls, self.clock.now)
        self.seq += 1
        self.all.append(w)
        return w

    # -- rules ---------------------------------------------------------------------------------

    @rule(classes=st.lists(st.integers(0, 2), min_size=1, max_size=4))
    def admit_some(self, classes: list[int]) -> None:
        for cls in classes:
            self.admit(cls)
            self.step_invariants()

    def admit(self, cls: int) -> None:
        w = self.new_waiter(cls)
        pre_live = list(self.live)
        pre_over = self.q.overloaded
        go_able = self.limit == 0 or (self.in_flight < self.limit and not self.live)
        res = self.q.admit(w, cls)
        if go_able:
            assert res == GO, f"admit: a free slot and nobody queued, got {res}"
            assert set(self.q.waiters()) == set(self.live)
            self.in_flight += 1
            self.served += 1
            self.handed.add(w)
            return
        assert res in (QUEUED, FULL), "admit: no free slot (or somebody queued), got GO"
        now_live = set(self.q.waiters())
        dropped = [x for x in pre_live if x not in now_live]
        self.check_overload_flip("admit", pre_over, pre_live)
        over_during = self.q.overloaded if (len(pre_live) - len(dropped)) else None
        self.note_shed("admit", dropped, over_during)
        # Everybody clearly due was dropped before deciding FULL (README: full = at `size`).
        self.check_swept("admit", self.q.overloaded)
        if not self.live:  # the sweep emptied the queue: a new one (and interval) starts here
            self.nonempty_since = None
        if res == FULL:
            assert len(self.live) >= self.size, (
                f"admit: FULL with {len(self.live)} live waiters < size {self.size} after dropping due ones")
            self.shed["full"] += 1
            self.gone.add(w)
        else:
            assert len(self.live) < self.size, f"admit: QUEUED beyond size {self.size}"
            self.live[w] = None
        self.after_change()

    @precondition(lambda self: self.in_flight > 0)
    @rule(n=st.integers(1, 3))
    def release_some(self, n: int) -> None:
        for _ in range(n):
            if self.in_flight:
                self.release()
                self.step_invariants()

    def release(self) -> None:
        pre_live = list(self.live)
        pre_over = self.q.overloaded
        got = self.q.release()
        now_live = set(self.q.waiters())
        dropped = [w for w in pre_live if w not in now_live and w is not got]
        self.check_overload_flip("release", pre_over, pre_live)
        remaining = [w for w in pre_live if w not in dropped]  # candidates after the sweep
        # The mode the selection used: the flag now, unless the queue emptied (which resets it;
        # then there was at most one candidate and the mode does not matter).
        over_during = self.q.overloaded if now_live else None
        self.note_shed("release", dropped, over_during)
        if got is None:
            # "a slot never sits idle while somebody waits": None only when nobody is left.
            assert not remaining, f"release: None while {remaining} wait"
            assert self.in_flight > 0
            self.in_flight -= 1
        else:
            assert isinstance(got, W)
            assert got in self.live, f"release: handed {got!r}, which is not queued (left or served)"
            assert got not in self.handed and got not in self.gone, f"release: {got!r} handed twice"
            # lanes.md: "A request never starts upstream when its deadline has already passed."
            assert not self.must_timeout(got), f"release: {got!r} handed a slot at age {self.age(got)}"
            self.check_order(got, remaining, over_during)
            del self.live[got]
            self.handed.add(got)
            self.gone.add(got)
            self.served += 1
        self.check_swept("release", self.q.overloaded)
        self.after_change()

    def check_order(self, got: W, cand: list[W], over: bool | None) -> None:
        if len(cand) == 1:
            assert got is cand[0]
            return
        same = [w for w in cand if w.cls == got.cls]
        if over:
            # lanes.md: "serve newest first" in overload.  Within a class that is exact; across
            # classes lanes.md is silent; queue.py's docstring (Rule 4) says strict priority:
            # the newest of the highest non-empty class.  Both are checked.
            assert got.seq == max(w.seq for w in same), f"overload: {got!r} is not the newest of its class in {cand}"
            assert got.cls == min(w.cls for w in cand), f"overload: {got!r} served over a higher class in {cand}"
            return
        # Not overloaded: lanes.md "FIFO while the lane keeps up": exact within a class.
        assert got.seq == min(w.seq for w in same), f"fifo: {got!r} is not the oldest of its class in {cand}"
        heads = {}
        for w in cand:
            if w.cls not in heads or w.seq < heads[w.cls].seq:
                heads[w.cls] = w
        # Across classes README only says "per route priority class, with aging so none
        # starves".  Looser property (always): a lower class overtakes a higher one only if its
        # waiter arrived no later.  Precise (queue.py docstring Rule 2): smallest
        # enqueued + class * aging among the class heads; near-ties accepted either way.
        for h in heads.values():
            if h.cls < got.cls:
                assert got.t <= h.t + EPS, f"aging: {got!r} (newer, lower class) overtook {h!r}"
        if math.isinf(self.aging):
            assert got.cls == min(heads), f"strict priority: {got!r} over {heads}"
        else:
            key = {c: h.t + c * self.aging for c, h in heads.items()}
            assert key[got.cls] <= min(key.values()) + 1e-7, f"aging order: {got!r} keys {key}"

    @rule(i=st.integers(0, 10_000))
    def remove(self, i: int) -> None:
        if not self.all:
            return
        w = self.all[-1 - i % len(self.all)] if i % 3 else self.all[i % len(self.all)]
        pre_live = list(self.live)
        pre_over = self.q.overloaded
        ok = self.q.remove(w)
        assert ok == (w in self.live), f"remove({w!r}) said {ok}; queued: {w in self.live}"
        self.check_overload_flip("remove", pre_over, pre_live)
        if ok:
            del self.live[w]
            self.gone.add(w)
            self.shed["client_gone"] += 1
        assert set(self.q.waiters()) == set(self.live)
        self.after_change()

    @rule(step=st.sampled_from([0.0, 0.001953125, 0.0625, 0.0625, 0.125, 0.125, 0.25, 0.5, 1.0, 2.5, 7.0]))
    def advance(self, step: float) -> None:
        self.clock.now += step

    @rule()
    def advance_to_deadline(self) -> None:
        nd = self.q.next_deadline()
        if nd is not None and nd > self.clock.now and not math.isinf(nd):
            self.clock.now = nd

    @rule()
    def expire(self) -> None:
        pre_live = list(self.live)
        pre_over = self.q.overloaded
        out = self.q.expire()
        self.check_overload_flip("expire", pre_over, pre_live)
        now_live = set(self.q.waiters())
        dropped = [w for w in pre_live if w not in now_live]
        over_during = self.q.overloaded if now_live else None
        self.note_shed("expire", dropped, over_during)
        got = [w for w, _ in out]
        assert len(got) == len(set(got)), f"expire: a waiter returned twice {out}"
        assert set(got) == set(self.pending), f"expire returned {got}, expected {list(self.pending)}"
        for w, reason in out:
            assert reason in self.pending[w], f"expire: {w!r} shed as {reason!r}, allowed {self.pending[w]}"
            self.shed[reason] += 1
        self.pending.clear()
        self.check_swept("expire", self.q.overloaded)
        self.after_change()

    @rule(step=st.sampled_from([0.0, 0.03125, 0.0625, 0.125]),
          classes=st.lists(st.integers(0, 2), max_size=3), releases=st.integers(0, 2))
    def traffic(self, step: float, classes: list[int], releases: int) -> None:
        """A little time passes, a few requests arrive, a few exchanges finish: a standing queue."""
        self.advance(step)
        for cls in classes:
            self.admit(cls)
            self.step_invariants()
        for _ in range(releases):
            if self.in_flight:
                self.release()
                self.step_invariants()
        self.expire()

    @rule(rounds=st.integers(4, 16), classes=st.lists(st.integers(0, 2), min_size=2, max_size=3),
          every=st.integers(1, 3))
    def flood(self, rounds: int, classes: list[int], every: int) -> None:
        """Arrivals outpace completions for a while: the queue stands and CoDel engages."""
        for r in range(rounds):
            self.traffic(0.03125, classes, int(r % every == 0))
            self.step_invariants()

    @rule(k=st.integers(0, 7))
    def drain(self, k: int) -> None:
        if k:  # rare: a drain empties the queue, which ends the interesting states
            return
        out = self.q.drain()
        assert len(out) == len(set(out))
        assert set(out) == set(self.live), f"drain returned {out}, queued {list(self.live)}"
        self.shed["stopping"] += len(out)
        self.gone.update(out)
        self.live.clear()
        self.after_change()

    # -- invariants ----------------------------------------------------------------------------

    def step_invariants(self) -> None:
        """The invariants, also between the calls of a multi-call rule."""
        self.slots()
        self.queue_contents()
        self.deadlines()
        self.counters()

    @invariant()
    def slots(self) -> None:
        if not getattr(self, "ready", False):
            return
        q = self.q
        assert q.in_flight == self.in_flight >= 0
        if self.limit:
            assert q.in_flight <= self.limit
            if self.live:  # "a slot never sits idle while somebody waits"
                assert q.in_flight == self.limit, (q.in_flight, self.limit, list(self.live))
        else:
            assert not self.live

    @invariant()
    def queue_contents(self) -> None:
        if not getattr(self, "ready", False):
            return
        assert len(self.q) == len(self.live)
        assert set(self.q.waiters()) == set(self.live)
        assert len(self.live) <= self.size
        if not self.live:
            assert not self.q.overloaded, "overloaded with an empty queue"

    @invariant()
    def deadlines(self) -> None:
        if not getattr(self, "ready", False):
            return
        nd = self.q.next_deadline()
        if self.pending:
            assert nd is not None and nd <= self.clock.now + EPS, f"next_deadline {nd} with shed waiters pending"
        elif self.live:
            assert nd is not None
            due = min(w.t for w in self.live) + self.timeout
            assert nd <= due + EPS, f"next_deadline {nd} later than a timeout due at {due}"
            if self.q.overloaded:
                codel = min(w.t for w in self.live) + 2 * self.target
                assert nd <= codel + EPS, f"next_deadline {nd} later than a codel shed due at {codel}"
        else:
            assert nd is None, f"next_deadline {nd} with nothing queued"

    @invariant()
    def counters(self) -> None:
        if not getattr(self, "ready", False):
            return
        st_ = self.q.stats()
        # Timeout and codel are counted when shed (pending), so compare their sum with the model's
        # returned + pending; the per-reason split is checked against what expire() returned.
        shed = dict(st_["shed"])
        pend = len(self.pending)
        assert shed["timeout"] + shed["codel"] == self.shed["timeout"] + self.shed["codel"] + pend
        for r in ("full", "client_gone", "stopping"):
            assert shed[r] == self.shed[r], (r, shed, self.shed)
        assert st_["served"] == self.served
        assert st_["in_flight"] == self.in_flight
        assert st_["queued"] == len(self.live)
        assert st_["limit"] == self.limit and st_["size"] == self.size
        assert st_["overloaded"] == self.q.overloaded
        # Conservation: every offered request is served, refused FULL, left without a slot
        # (timeout + codel + client_gone + stopping), or still queued.
        left = shed["timeout"] + shed["codel"] + shed["client_gone"] + shed["stopping"]
        assert self.served + shed["full"] + left + len(self.live) == len(self.all)

    @invariant()
    def retry_after_bounds(self) -> None:
        if not getattr(self, "ready", False):
            return
        ra = self.q.retry_after()
        cap = math.ceil(self.timeout) if self.timeout < math.inf else 60
        assert isinstance(ra, int) and 1 <= ra <= max(1, cap)


LaneQueueMachine.TestCase.settings = settings(
    max_examples=120, stateful_step_count=40, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_lane_queue_against_model = LaneQueueMachine.TestCase
