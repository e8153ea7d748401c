"""``import polystore`` is cheap and has no side effects.

Each check runs in a fresh interpreter, since this test process has long since
imported everything. The child reports what it saw as JSON and the assertions
are made here, so a failure names the offending module, thread or file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

# Runs in the child. It snapshots the process after numpy is imported (numpy's
# BLAS may start native threads of its own), imports what the test asks for,
# and reports the difference.
PROBE = r"""
import json, os, signal, sys, threading

SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD,
           signal.SIGUSR1, signal.SIGUSR2, signal.SIGPIPE, signal.SIGALRM]

def native_threads():
    return len(os.listdir("/proc/self/task"))

def children():
    me = str(os.getpid())
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if stat[stat.rindex(b")") + 2:].split()[1].decode() == me:
                found.append(int(entry))
    return found

def shm_in_use():
    maps = [line.split(None, 5)[-1].strip() for line in open("/proc/self/maps")
            if "/dev/shm/" in line]
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/dev/shm/"):
            fds.append(target)
    return sorted(set(maps + fds))

def shm_named_by_me():
    try:
        names = os.listdir("/dev/shm")
    except FileNotFoundError:
        return []
    return sorted(n for n in names if str(os.getpid()) in n)

import numpy

modules_before = set(sys.modules)
threads_before = native_threads()
handlers_before = [repr(signal.getsignal(s)) for s in SIGNALS]

exec(STATEMENTS)

new_modules = sorted(set(sys.modules) - modules_before)
print(json.dumps({
    "new_modules": new_modules,
    "stdlib": sorted(sys.stdlib_module_names),
    "python_threads": threading.active_count(),
    "native_threads_before": threads_before,
    "native_threads_after": native_threads(),
    "signals_changed": [signal.Signals(s).name for s, h in zip(SIGNALS, handlers_before)
                        if repr(signal.getsignal(s)) != h],
    "children": children(),
    "shm_in_use": shm_in_use(),
    "shm_named_by_me": shm_named_by_me(),
    "version": getattr(sys.modules.get("polystore"), "__version__", None),
}))
"""

# Dependencies that polystore may only import inside the code that needs them.
HEAVY = (
    "zarr",
    "numcodecs",
    "dask",
    "distributed",
    "pandas",
    "tifffile",
    "tqdm",
    "rich",
    "portalocker",
    "matplotlib",
    "fsspec",
    "psutil",
    "filelock",
    "joblib",
    "loky",
    "torch",
)


def probe(run_python: Any, tmp_path: Path, statements: str) -> dict[str, Any]:
    """Run ``statements`` after numpy in a fresh interpreter in an empty sandbox."""
    work, home, tmp = tmp_path / "cwd", tmp_path / "home", tmp_path / "tmp"
    for folder in (work, home, tmp):
        folder.mkdir()
    proc = run_python(
        f"STATEMENTS = {statements!r}\n{PROBE}",
        cwd=work,
        env={
            "HOME": str(home),
            "TMPDIR": str(tmp),
            "XDG_CACHE_HOME": None,
            "XDG_CONFIG_HOME": None,
            "XDG_DATA_HOME": None,
            "PYTHONSTARTUP": None,
        },
    )
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    written = {str(p.relative_to(tmp_path)) for d in (work, home, tmp) for p in d.rglob("*")}
    report["written"] = sorted(written)
    return report


def outside_core(report: dict[str, Any]) -> list[str]:
    """New modules that are neither standard library, numpy nor polystore."""
    allowed = set(report["stdlib"]) | {"numpy", "polystore"}
    return [m for m in report["new_modules"] if m.split(".", 1)[0] not in allowed]


def assert_no_side_effects(report: dict[str, Any]) -> None:
    heavy = [m for m in report["new_modules"] if m.split(".", 1)[0] in HEAVY]
    assert heavy == [], f"imported eagerly: {heavy}"
    assert outside_core(report) == [], "only the standard library and numpy may be imported"
    assert report["python_threads"] == 1, "a thread was started"
    assert report["native_threads_after"] == report["native_threads_before"], (
        "a native thread was started"
    )
    assert report["children"] == [], "a child process was started"
    assert report["shm_in_use"] == [], "shared memory was opened"
    assert report["shm_named_by_me"] == [], "shared memory was created"
    assert report["signals_changed"] == [], "signal handlers were replaced"
    assert report["written"] == [], "files were written"


def test_import_has_no_side_effects(run_python: Any, tmp_path: Path) -> None:
    report = probe(run_python, tmp_path, "import polystore")
    assert_no_side_effects(report)


def test_public_names_stay_light(run_python: Any, tmp_path: Path) -> None:
    # Naming a backend class, or listing the registry, must not import the
    # library behind it: zarr loads when a ZarrBackend is first built.
    statements = (
        "from polystore import (FileManager, BackendRegistry, StorageBackend, DiskBackend,\n"
        "    MemoryBackend, ZarrBackend, StorageError, BackendNotFoundError,\n"
        "    UnsupportedFormatError)\n"
        "registry = BackendRegistry()\n"
        "names = sorted(registry)\n"
        "assert {'disk', 'memory', 'zarr'} <= set(names), names\n"
        "MemoryBackend().save([{'a': 1}], 'a.csv')  # formats load lazily, torch never\n"
    )
    report = probe(run_python, tmp_path, statements)
    assert_no_side_effects(report)


def test_version(run_python: Any, tmp_path: Path) -> None:
    import polystore
    from polystore._version import __version__

    assert isinstance(polystore.__version__, str)
    assert polystore.__version__ == __version__
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?(a|b|rc|dev|post)\d*)*", __version__)
    assert probe(run_python, tmp_path, "import polystore")["version"] == __version__


def test_probe_sees_side_effects(run_python: Any, tmp_path: Path) -> None:
    # The checks above are only worth something if the probe can fail.
    statements = (
        "import threading, pytest\n"
        "threading.Thread(target=threading.Event().wait, args=(5,), daemon=True).start()\n"
        "open('stray.txt', 'w').close()\n"
    )
    report = probe(run_python, tmp_path, statements)
    assert report["python_threads"] == 2
    assert report["native_threads_after"] == report["native_threads_before"] + 1
    assert report["written"] == ["cwd/stray.txt"]
    assert "pytest" in outside_core(report)
