"""What ``import polystore`` adds to ``import numpy`` in a fresh interpreter.

Every worker of a process pool imports polystore, so its import must stay
cheap (target: <= 15 ms over numpy). Runs each variant in fresh interpreters,
alternating, and prints medians and the difference.

Run: ``python benchmarks/import_cost.py [--runs N]``. It measures the
polystore that this interpreter has installed, wherever it is run from: the
fresh interpreters start in an empty directory, so a checkout in the current
directory (uncompiled, perhaps without its C extension) cannot stand in for
the installed package. The first line of the output names what was measured.
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = {
    "python -c pass": "pass",
    "import numpy": "import numpy",
    "import numpy, polystore": "import numpy, polystore",
    "polystore + FileManager(BackendRegistry())": (
        "import polystore; polystore.FileManager(polystore.BackendRegistry())"
    ),
}

TIMER = """
import time
_t = time.perf_counter()
{code}
print(time.perf_counter() - _t)
"""


def run_fresh(code: str) -> str:
    """The output of ``code`` in a fresh interpreter started in an empty directory.

    ``python -c`` puts its working directory first on ``sys.path``: started
    in a checkout, it would import the checkout instead of the installed package.
    """
    with tempfile.TemporaryDirectory() as empty:
        return subprocess.run(
            [sys.executable, "-c", code],
            check=True,
            capture_output=True,
            text=True,
            cwd=empty,
        ).stdout


def measured_package() -> str:
    """Where the fresh interpreters import polystore from."""
    return run_fresh("import polystore; print(polystore.__file__)").strip()


def measure(code: str) -> float:
    return float(run_fresh(TIMER.format(code=code)).strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    # An installed package has its bytecode compiled; an editable checkout run
    # with PYTHONDONTWRITEBYTECODE=1 recompiles every module at each import.
    package = measured_package()
    print(f"measuring {Path(package).parent}")
    compileall.compile_dir(str(Path(package).parent), quiet=1)
    samples: dict[str, list[float]] = {label: [] for label in CASES}
    for _ in range(args.runs):
        for label, code in CASES.items():
            samples[label].append(measure(code))
    medians = {label: statistics.median(values) for label, values in samples.items()}
    print(f"{'in a fresh interpreter':45}{'median ms':>10}")
    for label, value in medians.items():
        print(f"{label:45}{value * 1e3:10.1f}")
    extra = medians["import numpy, polystore"] - medians["import numpy"]
    print(f"import polystore costs {extra * 1e3:.1f} ms over numpy (target <= 15 ms)")
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        print("note: PYTHONDONTWRITEBYTECODE is set here; bytecode was compiled once above")


if __name__ == "__main__":
    main()
