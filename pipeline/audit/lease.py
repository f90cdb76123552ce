"""Job leases: at most one run of a job at a time, and a lease that expires when its holder dies.

``JobLease`` is taken before a run plans anything and renewed by a heartbeat thread; a second run of the same
job finds a live lease and stops with "already running". A holder that dies stops renewing, so its lease
expires after ``ttl_s``; on the holder's own host a dead pid frees it at once (a rerun right after a crash).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid

from sqlalchemy import delete, select, update

from pipeline.audit.schema import LeaseRow
from pipeline.errors import GenpipeError

DEFAULT_TTL_S = float(os.environ.get("GENPIPE_LEASE_TTL_S", "60"))


class JobAlreadyRunning(GenpipeError):
    """Another live run holds the job's lease."""


class LeaseLost(GenpipeError):
    """This run's lease expired and another run of the job took it over: this run stops."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobLease:
    def __init__(self, store, job: str, ttl_s: float | None = None) -> None:
        self.store, self.job, self.ttl_s = store, job, ttl_s or DEFAULT_TTL_S
        self.holder = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def acquire(self) -> JobLease:
        def tx(conn) -> None:
            row = conn.execute(select(LeaseRow).where(LeaseRow.job == self.job)).first()
            now = time.time()
            if row is not None and row.holder != self.holder:
                dead_here = row.host == self.host and not _pid_alive(row.pid)
                if row.expires_at > now and not dead_here:
                    raise JobAlreadyRunning(
                        f"job {self.job} is already running (host {row.host}, pid {row.pid}); wait for it to "
                        f"finish or stop it, then rerun to resume — a dead run's lease expires within "
                        f"{max(0, int(row.expires_at - now))} s"
                    )
                conn.execute(delete(LeaseRow).where(LeaseRow.job == self.job))
            elif row is not None:
                conn.execute(delete(LeaseRow).where(LeaseRow.job == self.job))
            conn.execute(
                LeaseRow.__table__.insert().values(
                    job=self.job, holder=self.holder, host=self.host, pid=self.pid, expires_at=now + self.ttl_s
                )
            )

        self.store._write(f"lease for job {self.job}", tx)
        self._thread = threading.Thread(target=self._heartbeat, name=f"genpipe-lease-{self.job}", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> bool:
        def tx(conn) -> int:
            stmt = (
                update(LeaseRow)
                .where(LeaseRow.job == self.job, LeaseRow.holder == self.holder)
                .values(expires_at=time.time() + self.ttl_s)
            )
            return conn.execute(stmt).rowcount

        return self.store._write(f"renew lease of {self.job}", tx) == 1

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self._renew():
                    self.lost = True  # taken over after it expired: check() stops the run at its next step
                    return
            except Exception:  # a DB hiccup: try again next beat; the TTL leaves room for two misses
                continue

    def check(self) -> None:
        """Raise ``LeaseLost`` once another run has taken the job over: its first step deletes this run's plan
        and quarantines images without records, so this one must not go on writing."""
        if self.lost:
            raise LeaseLost(
                f"job {self.job}: this run's lease expired (no renewal for {self.ttl_s:g} s) and another run took "
                "the job over; this run stops here. What it recorded stays; the other run resumes the rest."
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

        def tx(conn) -> None:
            conn.execute(delete(LeaseRow).where(LeaseRow.job == self.job, LeaseRow.holder == self.holder))

        self.store._write(f"release lease of {self.job}", tx)

    def __enter__(self) -> JobLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
