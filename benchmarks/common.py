"""What every benchmark shares: machine facts (load average first), peak-memory windows, timing hooks put on
genpipe's functions from outside, markdown tables and the results JSON.

Hooks wrap functions and methods in place (and put them back afterwards) so per-stage time is measured
without changing ``pipeline/``; each records inclusive time and *exclusive* time (minus nested hooks in the same
thread), per thread: the exclusive times of one thread add up to that thread's wall time less what no hook covers,
while different threads (genpipe's stage threads) overlap in time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import importlib
import inspect
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quiet_env() -> None:
    """The environment the tests use: no hub, no tokenizer thread pools, no uv runtime env in Ray workers."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


# --- machine facts --------------------------------------------------------------------------------------------
def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def uptime_line() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:
        return f"load average: {', '.join(map(str, loadavg()))}"


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def git_revision() -> str:
    """``abc1234``, ``abc1234 (working tree modified)``, or where the tree travelled without ``.git`` (a lent GPU
    machine) what ``$GENPIPE_GIT_REVISION`` says (benchmarks/device_run.sh sets it from the kit)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()  # fmt: skip
        if not rev:
            return os.environ.get("GENPIPE_GIT_REVISION") or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True,
                               timeout=10).stdout.strip()  # fmt: skip
        return f"{rev}{' (working tree modified)' if dirty else ''}"
    except Exception:
        return os.environ.get("GENPIPE_GIT_REVISION") or "unknown"


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": now_iso(),
        "host": platform.node(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_1_5_15": loadavg(),
        "uptime": uptime_line(),
        "git": git_revision(),
        "command": " ".join(
            [
                os.path.relpath(sys.executable, REPO) if sys.executable.startswith(REPO) else sys.executable,
                "-m",
                _module_name(),
                *sys.argv[1:],
            ]
        ),  # fmt: skip
    }
    with contextlib.suppress(Exception), open("/proc/meminfo") as f:
        info["mem_total_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    info["cpu_model"] = cpu_model()
    return info


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else os.path.basename(sys.argv[0])


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "diffusers", "transformers", "open_clip_torch", "onnxruntime", "ray", "SQLAlchemy",
                 "psycopg", "pyarrow"):  # fmt: skip
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


# --- memory ---------------------------------------------------------------------------------------------------
def _status_kb(field_name: str, pid: str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return round(kb / 1024, 1) if kb is not None else float("nan")


def peak_rss_mb() -> float:
    """Peak RSS of this process since the last ``reset_peak_rss`` (VmHWM; ru_maxrss where /proc is missing)."""
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / 1024, 1)


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_seconds() -> float:
    """CPU time of this process, every thread, user + system."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass
class _Proc:
    title: str
    first_title: str = ""  # what the process was when the window opened (a pre-started worker is ray::IDLE)
    peak_mb: float = 0.0
    cpu_start: float = 0.0
    cpu_last: float = 0.0


class ChildSampler:
    """Samples every descendant process (Ray's raylet, GCS and workers) in a thread: peak RSS per process and
    CPU time spent inside the window. Worker titles (``ray::...``) say which process is an actor."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.procs: dict[int, _Proc] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ChildSampler:
        import psutil

        self._psutil = psutil
        self._started = time.time()
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-child-sampler")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        psutil = self._psutil
        try:
            children = psutil.Process().children(recursive=True)
        except psutil.Error:
            return
        for p in children:
            try:
                with p.oneshot():
                    rss = p.memory_info().rss / 2**20
                    times = p.cpu_times()
                    cpu = times.user + times.system
                    title = " ".join(p.cmdline())[:100] or p.name()
                    created = p.create_time()
            except psutil.Error:
                continue
            rec = self.procs.get(p.pid)
            if rec is None:
                # A process born inside the window spent all its CPU inside it.
                born = created >= self._started
                rec = self.procs[p.pid] = _Proc(title, first_title=title, cpu_start=0.0 if born else cpu)
            if not title.startswith("ray::IDLE"):
                rec.title = title
            rec.peak_mb = max(rec.peak_mb, round(rss, 1))
            rec.cpu_last = cpu

    def actors(self) -> list[dict[str, Any]]:
        """Ray worker processes that ran genpipe stages, with their peak RSS and CPU seconds in the window."""
        out = []
        for pid, rec in sorted(self.procs.items()):
            if rec.title.startswith("ray::") and "IDLE" not in rec.title:
                cpu = round(rec.cpu_last - rec.cpu_start, 2)
                out.append({"pid": pid, "title": rec.title, "peak_rss_mb": rec.peak_mb, "cpu_s": cpu,
                            "title_at_start": rec.first_title})  # fmt: skip
        return out

    def cpu_seconds(self) -> float:
        return round(sum(r.cpu_last - r.cpu_start for r in self.procs.values()), 2)


# --- timing hooks ---------------------------------------------------------------------------------------------
#: Helper threads whose work their starter waits for at once (``thread.start(); thread.join()``): their root hook
#: calls count as nested calls of the hook that was running in the starting thread when it started them.
JOINED_THREADS = frozenset({"genpipe-scorer-call"})
#: The lane of the thread that installed the hooks (the one that calls ``run_job``).
DRIVER = "driver"


@dataclass
class HookStats:
    calls: int = 0
    inclusive_s: float = 0.0
    exclusive_s: float = 0.0  # wall time minus nested hooks of the same thread (and of its joined helpers)
    exclusive_cpu_s: float = 0.0  # CPU time of the calling thread, minus nested hooks in the same thread
    first_end: float | None = None  # monotonic time the first call returned


class HookEvent(NamedTuple):
    key: str
    start: float  # monotonic
    end: float  # monotonic
    summary: Any  # what _summarise kept of the call (db_write: generated items written)
    parent: str | None  # key of the hook this call was nested in (same thread or the joined helper's starter)
    lane: str  # DRIVER, a thread name, or a joined helper's starter's lane


class _Frame:
    __slots__ = ("key", "start", "start_m", "nested_s", "cpu0", "nested_cpu_s", "tid", "lane", "parent")

    def __init__(self, key: str, tid: int, lane: str, parent: _Frame | None) -> None:
        self.key, self.tid, self.lane, self.parent = key, tid, lane, parent
        self.nested_s = self.nested_cpu_s = 0.0
        self.start_m = time.monotonic()
        self.cpu0 = time.thread_time()
        self.start = time.perf_counter()


@dataclass
class Hooks:
    """Timing wrappers around ``module[.Class].attr`` targets; ``with hooks.installed(): ...`` applies them.

    A stack per thread: a hook's exclusive time is its wall time minus the hooks nested in it *in the same
    thread*, so it is the time that thread spent in it, whatever other threads did meanwhile. genpipe's local
    executor runs each stage (and the planner, and the shard reader) in its own thread, so the exclusive times
    of different threads overlap in time and add up to more than the wall time; only one thread's add up to at
    most the wall time. One exception: a thread named in ``joined`` (the scorer's ``genpipe-scorer-call``, which
    its caller starts and joins at once) has its root calls counted as nested in the hook that was on top of
    the starting thread's stack when it was started (``threading.Thread.start`` is patched while installed), and
    belongs to that thread's lane. (A helper that outlives the join — a scorer timeout — is then counted twice.)

    Each call is also counted by *lane*: ``DRIVER`` for the thread that installed the hooks, else the thread's
    name. The driver lane's exclusive times add up to its wall time less what no hook covers.
    Targets that do not exist (code under change) are listed in ``missing`` rather than failing the benchmark."""

    targets: list[tuple[str, str, str]]
    joined: frozenset[str] = JOINED_THREADS
    stats: dict[str, HookStats] = field(default_factory=dict)
    lanes: dict[str, dict[str, HookStats]] = field(default_factory=dict)  # lane → key → stats
    missing: list[str] = field(default_factory=list)
    events: list[HookEvent] = field(default_factory=list)
    _stacks: dict[int, list[_Frame]] = field(default_factory=dict)
    _driver: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        self.stats.clear()
        self.lanes.clear()
        self.events.clear()

    @contextlib.contextmanager
    def installed(self) -> Iterator[Hooks]:
        saved: list[tuple[Any, str, Any, bool]] = []
        self.missing = []
        self._driver = threading.get_ident()
        original_start = threading.Thread.start
        hooks = self

        def start(thread: threading.Thread, *args: Any, **kwargs: Any) -> Any:
            # Remember who started the thread and what it was doing; a joined helper's calls nest under that.
            tid = threading.get_ident()
            with hooks._lock:
                stack = hooks._stacks.get(tid)
                top = stack[-1] if stack else None
            thread._bench_starter = (top, top.lane if top is not None else hooks._lane_name(tid))  # type: ignore[attr-defined]
            return original_start(thread, *args, **kwargs)

        try:
            threading.Thread.start = start  # type: ignore[method-assign]
            for target, attr, key in self.targets:
                owner = _resolve(target)
                if owner is None or attr not in vars(owner):
                    self.missing.append(f"{target}.{attr}")
                    continue
                original = vars(owner)[attr]
                is_static = isinstance(original, staticmethod)
                fn = original.__func__ if is_static else original
                wrapped = self._wrap(fn, key)
                setattr(owner, attr, staticmethod(wrapped) if is_static else wrapped)
                saved.append((owner, attr, original, is_static))
            yield self
        finally:
            threading.Thread.start = original_start  # type: ignore[method-assign]
            for owner, attr, original, _ in reversed(saved):
                setattr(owner, attr, original)

    def _wrap(self, fn: Any, key: str) -> Any:
        hooks = self
        if inspect.isgeneratorfunction(fn):
            # Time each step of a generator (a page of a streamed read), not the creation of the generator; a
            # step is timed in the thread that takes it.
            @functools.wraps(fn)
            def gen_wrapper(*args: Any, **kwargs: Any) -> Any:
                gen = fn(*args, **kwargs)
                try:
                    while True:
                        frame = hooks._enter(key)
                        try:
                            value = next(gen)
                        except StopIteration:
                            hooks._exit(frame, ())
                            return
                        except BaseException:
                            hooks._exit(frame, ())
                            raise
                        hooks._exit(frame, ())
                        yield value
                finally:
                    gen.close()  # closing the wrapper closes the wrapped generator at once (its finally runs)

            return gen_wrapper

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            frame = hooks._enter(key)
            try:
                return fn(*args, **kwargs)
            finally:
                hooks._exit(frame, args)

        return wrapper

    def _lane_name(self, tid: int) -> str:
        return DRIVER if tid == self._driver else threading.current_thread().name

    def _enter(self, key: str) -> _Frame:
        tid = threading.get_ident()
        with self._lock:
            stack = self._stacks.setdefault(tid, [])
            if stack:
                parent: _Frame | None = stack[-1]
                lane = parent.lane  # type: ignore[union-attr]
            else:
                parent, lane = None, self._lane_name(tid)
                thread = threading.current_thread()
                starter = getattr(thread, "_bench_starter", None)
                if starter is not None and thread.name in self.joined:
                    parent, lane = starter
            frame = _Frame(key, tid, lane, parent)
            stack.append(frame)
        return frame

    def _exit(self, frame: _Frame, args: tuple) -> None:
        elapsed = time.perf_counter() - frame.start
        cpu = time.thread_time() - frame.cpu0
        end = time.monotonic()
        summary = _summarise(frame.key, args)
        with self._lock:
            stack = self._stacks.get(frame.tid, [])
            if stack and stack[-1] is frame:
                stack.pop()
            else:  # one thread's calls always nest; this is only a safety net
                with contextlib.suppress(ValueError):
                    stack.remove(frame)
            parent = frame.parent
            if parent is not None:
                parent.nested_s += elapsed  # the parent waited for this call (same thread, or a joined helper)
                if parent.tid == frame.tid:
                    parent.nested_cpu_s += cpu  # CPU is per thread: only a same-thread child's CPU was the parent's
            for s in (self.stats.setdefault(frame.key, HookStats()),
                      self.lanes.setdefault(frame.lane, {}).setdefault(frame.key, HookStats())):  # fmt: skip
                s.calls += 1
                s.inclusive_s += elapsed
                s.exclusive_s += elapsed - frame.nested_s
                s.exclusive_cpu_s += cpu - frame.nested_cpu_s
                if s.first_end is None:
                    s.first_end = end
            self.events.append(HookEvent(frame.key, frame.start_m, end, summary,
                                         parent.key if parent is not None else None, frame.lane))  # fmt: skip

    def table(self) -> dict[str, dict[str, float]]:
        """Every hook, all threads together: calls, inclusive, exclusive and exclusive CPU seconds."""
        return _stats_table(self.stats)

    def lane_table(self) -> dict[str, dict[str, dict[str, float]]]:
        """The same per lane (``DRIVER`` or a thread name)."""
        return {lane: _stats_table(stats) for lane, stats in sorted(self.lanes.items())}

    def covered_s(self, lane: str = DRIVER) -> float:
        """Wall seconds of ``lane`` that some hook covers (the sum of its exclusive times)."""
        return sum(v.exclusive_s for v in self.lanes.get(lane, {}).values())

    def union_s(self, prefix: str) -> float:
        """Wall seconds during which at least one call of a hook whose key starts with ``prefix`` was running, in
        any thread (overlapping calls counted once)."""
        spans = sorted((e.start, e.end) for e in self.events if e.key.startswith(prefix))
        total, cur_start, cur_end = 0.0, None, None
        for s, e in spans:
            if cur_end is None or s > cur_end:
                if cur_end is not None:
                    total += cur_end - cur_start
                cur_start, cur_end = s, e
            else:
                cur_end = max(cur_end, e)
        if cur_end is not None:
            total += cur_end - cur_start
        return total


def _stats_table(stats: dict[str, HookStats]) -> dict[str, dict[str, float]]:
    return {k: {"calls": v.calls, "inclusive_s": round(v.inclusive_s, 4), "exclusive_s": round(v.exclusive_s, 4),
                "exclusive_cpu_s": round(v.exclusive_cpu_s, 4)} for k, v in sorted(stats.items())}  # fmt: skip


def _summarise(key: str, args: tuple) -> Any:
    """What a hook event remembers about its call: for the DB writes, how many items were generated."""
    if key == "db_write" and len(args) >= 2 and isinstance(args[1], list):
        return sum(1 for it in args[1] if getattr(it, "status", None) == "generated")
    return None


def _resolve(target: str) -> Any:
    """``pkg.module`` or ``pkg.module.Class`` → the object, or None."""
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name, None)
            if obj is None:
                return None
        return obj
    return None


# --- output ---------------------------------------------------------------------------------------------------
def md_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            if v != v:  # NaN
                return "–"
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def update_json(path: str, data: dict[str, Any]) -> None:
    """Merge ``data`` into the JSON object at ``path`` (created if missing), so several benchmarks share a file."""
    existing: dict[str, Any] = {}
    if os.path.exists(path):
        with contextlib.suppress(ValueError, OSError), open(path) as f:
            existing = json.load(f)
    existing.update(data)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(existing, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


def write_text(path: str | None, text: str) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return round(a / b, 4)
