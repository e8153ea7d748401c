"""Fixtures and checks shared by the whole test suite.

Leak checks
-----------
Every test runs under the autouse fixture :func:`no_leaks`. When the test ends
it waits a few seconds for the processes the test started to exit, then fails
the test (as an error in teardown) if

* ``multiprocessing.active_children()`` holds a process that was not there
  before the test (leftovers are then terminated, so later tests start clean);
* ``/dev/shm`` holds a new polystore segment that this test left behind.

Naming contract: polystore names every shared-memory entry it creates
``polystore-<ownerpid>-<anything>``, where ``<ownerpid>`` is the process that
owns the entry and will unlink it. The contract is what lets the check run
under pytest-xdist, where other workers create and remove their own segments
in the same ``/dev/shm`` at the same time. A new entry is blamed on the current
test when its owner is this process or a live descendant of it; an entry whose
owner is dead is blamed on the test only when no other worker runs beside it.
Under xdist, dead-owner leftovers are reported once at the end of the session
instead, by the controlling process.

Mark a test ``@pytest.mark.allow_leaks("why")`` to skip the per-test check; the
session-wide check still sees what it leaves.

Fresh interpreters
------------------
The :func:`run_python` fixture runs code in a new ``python -c`` process whose
imports resolve to this checkout, and by default fails the test when that
process exits non-zero or prints a resource-tracker or "leaked" warning.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from polystore.locks import pid_alive

REPO_ROOT = Path(__file__).resolve().parent.parent
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "polystore-"
CHILD_EXIT_GRACE = 5.0
LEAK_WARNING_WORDS = ("resource_tracker", "leaked")

# Hypothesis' deadline is a wall-clock assertion, and this suite asserts on no
# wall clock: a loaded 2-core CI machine must not turn slowness into failures.
settings.register_profile(
    "polystore",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# On CI: reproducible examples, no example database left in the clone.
settings.register_profile(
    "polystore-ci",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
    database=None,
    print_blob=True,
)
_default_profile = "polystore-ci" if os.environ.get("CI") else "polystore"
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or _default_profile)


# --- /dev/shm and process helpers -------------------------------------------------


def shm_entries() -> set[str]:
    """Names in ``/dev/shm`` owned by the current user (empty where there is none)."""
    uid = os.getuid()
    names = set()
    try:
        entries = list(os.scandir(SHM_DIR))
    except FileNotFoundError:
        return set()
    for entry in entries:
        try:
            if entry.stat(follow_symlinks=False).st_uid == uid:
                names.add(entry.name)
        except FileNotFoundError:
            continue  # removed by its owner between listing and stat
    return names


def owner_pid(name: str) -> int | None:
    """The owner pid encoded in a polystore shared-memory name, if it is one."""
    if not name.startswith(SHM_PREFIX):
        return None
    head = name[len(SHM_PREFIX) :].split("-", 1)[0]
    return int(head) if head.isdigit() else None


def descendants(pid: int) -> set[int]:
    """Pids of the live descendants of ``pid``, read from ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # the process exited while we looked
        # The command name is in parentheses and may contain spaces: the
        # parent pid is the second field after the last ')'.
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _parallel_workers() -> int:
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def _blamed_segments(new: set[str]) -> list[str]:
    me = os.getpid()
    family: set[int] | None = None
    alone = _parallel_workers() <= 1
    blamed = []
    for name in sorted(new):
        pid = owner_pid(name)
        if pid is None:
            continue
        if pid == me:
            blamed.append(name)
        elif pid_alive(pid):
            if family is None:
                family = descendants(me)
            if pid in family:
                blamed.append(name)
        elif alone:
            blamed.append(name)
    return blamed


def _surviving_children(
    before: set[int | None], grace: float
) -> list[multiprocessing.process.BaseProcess]:
    deadline = time.monotonic() + grace
    while True:
        # active_children() also joins the children that have exited.
        extra = [p for p in multiprocessing.active_children() if p.pid not in before]
        if not extra or time.monotonic() >= deadline:
            return extra
        time.sleep(0.05)


def _end(processes: list[multiprocessing.process.BaseProcess]) -> None:
    for p in processes:
        p.terminate()
    for p in processes:
        p.join(2)
        if p.is_alive():
            p.kill()
            p.join(2)


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if it leaves child processes or polystore shared memory behind."""
    if request.node.get_closest_marker("allow_leaks") is not None:
        yield
        return
    shm_before = shm_entries()
    children_before = {p.pid for p in multiprocessing.active_children()}
    yield
    problems = []
    survivors = _surviving_children(children_before, CHILD_EXIT_GRACE)
    if survivors:
        listing = ", ".join(f"{p.name} (pid {p.pid})" for p in survivors)
        problems.append(
            f"child processes still running {CHILD_EXIT_GRACE:g}s after the test "
            f"(now terminated): {listing}"
        )
        _end(survivors)
    leaked = _blamed_segments(shm_entries() - shm_before)
    if leaked:
        problems.append(f"shared memory left in {SHM_DIR}: {', '.join(leaked)}")
    if problems:
        pytest.fail("resource leak: " + "; ".join(problems), pytrace=False)


# --- session-wide check under xdist -------------------------------------------------

_session_shm_before: set[str] = set()
_session_leaks: list[str] = []


def _is_xdist_controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput") and bool(getattr(config.option, "numprocesses", None))


def pytest_sessionstart(session: pytest.Session) -> None:
    """Remember ``/dev/shm`` before the workers start."""
    if _is_xdist_controller(session.config):
        _session_shm_before.update(shm_entries())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any worker left segments behind whose owner is gone."""
    if not _is_xdist_controller(session.config):
        return
    me = os.getpid()
    family = descendants(me)
    for name in sorted(shm_entries() - _session_shm_before):
        pid = owner_pid(name)
        if pid is not None and (pid == me or pid in family or not pid_alive(pid)):
            _session_leaks.append(name)
    if _session_leaks and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Name the segments :func:`pytest_sessionfinish` found."""
    if _session_leaks:
        terminalreporter.section("resource leaks", sep="=", red=True, bold=True)
        terminalreporter.write_line(
            f"this run left {len(_session_leaks)} polystore entries in {SHM_DIR} "
            "(reclaim them with `python -m polystore gc`):"
        )
        for name in _session_leaks:
            terminalreporter.write_line(f"  {name}")


# --- fresh interpreters ---------------------------------------------------------------

RunPython = Callable[..., "subprocess.CompletedProcess[str]"]


def leak_warnings(text: str) -> list[str]:
    """Lines of ``text`` that look like resource-tracker or leak warnings."""
    return [line for line in text.splitlines() if any(w in line for w in LEAK_WARNING_WORDS)]


def _run_python(
    code: str,
    timeout: float = 60,
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str | None] | None = None,
    check: bool = True,
    check_leaks: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter and return its completed process.

    Args:
        code: Python source; common indentation is removed first.
        timeout: seconds before the child is killed and the test fails.
        cwd: working directory, the repository root by default.
        env: variables to set on top of this process's environment; a value
            of ``None`` removes the variable.
        check: fail the test when the child exits with a non-zero status.
        check_leaks: fail the test when the child's stderr mentions the
            resource tracker or a leak.
    """
    child_env = dict(os.environ)
    # The checkout comes first, so the code under test is this one even when
    # another polystore is installed or cwd is elsewhere.
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p
    )
    for key, value in (env or {}).items():
        if value is None:
            child_env.pop(key, None)
        else:
            child_env[key] = value
    command = [sys.executable, "-c", textwrap.dedent(code)]
    try:
        proc = subprocess.run(
            command,
            cwd=REPO_ROOT if cwd is None else cwd,
            env=child_env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"fresh interpreter did not finish within {timeout}s\n"
            f"--- stdout ---\n{exc.stdout!r}\n--- stderr ---\n{exc.stderr!r}",
            pytrace=False,
        )
    if check and proc.returncode != 0:
        pytest.fail(
            f"fresh interpreter exited with status {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}",
            pytrace=False,
        )
    if check_leaks and leak_warnings(proc.stderr):
        pytest.fail(
            "fresh interpreter printed leak warnings:\n" + "\n".join(leak_warnings(proc.stderr)),
            pytrace=False,
        )
    return proc


@pytest.fixture(scope="session")
def run_python() -> RunPython:
    """Run code in a fresh interpreter: ``run_python(code, timeout=60, ...)``.

    See :func:`_run_python` for the arguments. Returns the
    :class:`subprocess.CompletedProcess` with text ``stdout`` and ``stderr``.
    """
    return _run_python


# --- start methods --------------------------------------------------------------------


@pytest.fixture(params=["fork", "spawn", "forkserver"])
def mp_context(request: pytest.FixtureRequest) -> multiprocessing.context.BaseContext:
    """A multiprocessing context, once per start method."""
    method = request.param
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"start method {method!r} is not available here")
    return multiprocessing.get_context(method)


# --- the store's C fast path --------------------------------------------------------


@pytest.fixture(params=["c", "python"])
def store_paths(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once with the C fast path of the shared-memory store, once without.

    Stores made after this fixture ran use the chosen paths, and so do the
    processes the test spawns (through the environment). Forked children keep
    their parent's choice; a forkserver started earlier keeps its own, which
    is a mix the store must handle anyway: all paths speak one protocol.
    """
    from polystore._shm import fast as _shm_fast

    if request.param == "c":
        if not _shm_fast.AVAILABLE:
            pytest.skip("polystore._shm._fastpath is not built")
        monkeypatch.setattr(_shm_fast, "ENABLED", True)
        monkeypatch.delenv("POLYSTORE_NO_FASTPATH", raising=False)
    else:
        monkeypatch.setattr(_shm_fast, "ENABLED", False)
        monkeypatch.setenv("POLYSTORE_NO_FASTPATH", "1")
    return str(request.param)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak-seconds",
        type=float,
        default=6.0,
        help="how long the shared-memory kill soak runs (tests/test_shm_soak.py); "
        "the default keeps CI short, run 300 or more before a release",
    )
    parser.addoption(
        "--storm-seconds",
        type=float,
        default=1.0,
        help="how long each storm of exceptions from a signal handler runs "
        "(tests/test_shm_interrupts.py and the disk's and the Manager dict's); "
        "the default keeps CI short, run 10 or more before a release",
    )


@pytest.fixture
def storm_seconds(request: pytest.FixtureRequest) -> str:
    """The length of an interrupt storm, as the storm scripts take it (``--storm-seconds``)."""
    return str(request.config.getoption("--storm-seconds"))
