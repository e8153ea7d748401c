"""What ``import polystore`` adds to ``import numpy`` in a fresh interpreter.

Every worker of a process pool imports polystore, so its import must stay
cheap (target: <= 15 ms over numpy). Runs each variant in fresh interpreters,
alternating, and prints medians and the difference.

Run: ``python benchmarks/import_cost.py [--runs N]``.
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import subprocess
import sys
from pathlib import Path

import polystore

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


def measure(code: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", TIMER.format(code=code)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(out.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    # An installed package has its bytecode compiled; an editable checkout run
    # with PYTHONDONTWRITEBYTECODE=1 recompiles every module at each import.
    compileall.compile_dir(str(Path(polystore.__file__).parent), quiet=1)
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
