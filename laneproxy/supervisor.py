"""Supervisor for `workers: N`: N proxy processes sharing each listener with SO_REUSEPORT.

The supervisor forks the workers before any event loop exists, then only waits for signals
and children (sigtimedwait, no loop of its own):
- SIGTERM / SIGINT / SIGQUIT: forwarded; the workers drain and exit; the supervisor exits 0 after
  them (a SIGHUP from then on is ignored).
  A second one is forwarded too (the workers then stop at once).
- SIGHUP: the config file is validated here first (an invalid file is reported and nothing is
  signalled), then each worker reloads it itself.
- SIGUSR1: forwarded (access log reopen).
- A worker that dies is replaced, with a backoff that doubles up to 30 s while deaths come in
  quick succession.

Per-lane `limit` and `queue` are per worker: each worker holds ceil(limit / N) and
ceil(queue / N) (see `share_limits`), so the lane as a whole admits at most about `limit`.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import tempfile
import time

from laneproxy.config import ConfigError, ProxyConfig, load_config

log = logging.getLogger("laneproxy.supervisor")

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1)
MAX_BACKOFF = 30.0
STABLE_AFTER = 10.0  # a worker that lived this long resets the backoff


def share_limits(cfg: ProxyConfig) -> ProxyConfig:
    """Each worker's share of the lanes' limits and queues."""
    n = cfg.workers
    lanes = {
        name: lane.model_copy(update={
            "limit": math.ceil(lane.limit / n) if lane.limit else 0,
            "queue": math.ceil(lane.queue / n) if lane.queue else 0,
        })
        for name, lane in cfg.lanes.items()
    }
    return cfg.model_copy(update={"lanes": lanes})


class Supervisor:
    def __init__(self, cfg: ProxyConfig) -> None:
        self.cfg = cfg
        self.children: dict[int, int] = {}  # pid → worker index
        self.started: dict[int, float] = {}  # worker index → start time
        self.backoff: dict[int, float] = {}
        self.stopping = False

    def _spawn(self, index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, [*FORWARDED, signal.SIGCHLD])
                os.environ["LANEPROXY_WORKER"] = str(index)
                from laneproxy.server import run_worker

                code = run_worker(share_limits(self.cfg), index)
            except BaseException:  # noqa: BLE001 - a worker must never return into the supervisor
                log.exception("worker %d crashed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = index
        self.started[index] = time.monotonic()
        log.info("worker %d started (pid %d)", index, pid)

    def _forward(self, signum: int) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _reap(self) -> list[int]:
        """Indexes of workers that exited."""
        dead = []
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            index = self.children.pop(pid, None)
            if index is None:
                continue
            dead.append(index)
            if not self.stopping:
                code = os.waitstatus_to_exitcode(status)
                log.error("worker %d (pid %d) exited with %d; replacing it", index, pid, code)
        return dead

    def run(self) -> int:
        # Workers publish their counters here; worker 0's admin listener adds them up.
        rundir = tempfile.mkdtemp(prefix="laneproxy-")
        os.environ["LANEPROXY_RUNDIR"] = rundir
        try:
            return self._run()
        finally:
            shutil.rmtree(rundir, ignore_errors=True)

    def _run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, [*FORWARDED, signal.SIGCHLD])
        for index in range(self.cfg.workers):
            self._spawn(index)
        respawn_at: dict[int, float] = {}
        while self.children or (respawn_at and not self.stopping):
            now = time.monotonic()
            for index, when in list(respawn_at.items()):
                if when <= now and not self.stopping:
                    del respawn_at[index]
                    self._spawn(index)
            timeout = min([w - now for w in respawn_at.values()] + [1.0])
            info = signal.sigtimedwait([*FORWARDED, signal.SIGCHLD], max(timeout, 0.01))
            if info is not None:
                signum = info.si_signo
                if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                    if not self.stopping:
                        log.info("%s: stopping %d workers", signal.Signals(signum).name, len(self.children))
                    self.stopping = True
                    respawn_at.clear()
                    self._forward(signum)
                elif signum == signal.SIGHUP:
                    if self.stopping:
                        log.warning("SIGHUP ignored: stopping")
                    else:
                        self._reload()
                elif signum == signal.SIGUSR1:
                    self._forward(signum)
            for index in self._reap():
                if self.stopping:
                    continue
                lived = time.monotonic() - self.started.get(index, 0.0)
                delay = 0.1 if lived > STABLE_AFTER else min(self.backoff.get(index, 0.5) * 2, MAX_BACKOFF)
                self.backoff[index] = delay
                respawn_at[index] = time.monotonic() + delay
        log.info("all workers stopped")
        return 0

    def _reload(self) -> None:
        if self.cfg.path is None:
            log.warning("SIGHUP: running on the built-in default; nothing to re-read")
            return
        try:
            cfg = load_config(self.cfg.path)
        except ConfigError as exc:
            log.error("reload refused, the running config stays:\n%s", "\n".join(exc.problems))
            return
        if cfg.workers != self.cfg.workers:
            log.warning("workers changed from %d to %d: takes effect on restart", self.cfg.workers, cfg.workers)
        self.cfg = cfg.model_copy(update={"workers": self.cfg.workers})
        self._forward(signal.SIGHUP)  # each worker re-reads and applies the file itself
