"""The project around the package: tox, benchmarks and examples say and do what they claim."""

from __future__ import annotations

import configparser
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

import polystore

REPO = Path(__file__).resolve().parent.parent


def load_script(relative: str) -> ModuleType:
    """Import a script of the repository by its path, without running its main()."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem + "_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it runs
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_tox_writes_nothing_into_the_checkout() -> None:
    # Recent tox writes a .venv redirect file into the project unless told not to.
    config = configparser.ConfigParser()
    config.read(REPO / "tox.ini")
    assert config.getboolean("tox", "venv_redirect") is False


def test_import_cost_measures_the_installed_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Run from a directory holding another polystore (a checkout, say), the
    # benchmark must still time the one this interpreter has installed.
    decoy = tmp_path / "polystore"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise ImportError('the decoy was imported')\n")
    monkeypatch.chdir(tmp_path)
    import_cost = load_script("benchmarks/import_cost.py")
    assert import_cost.measured_package() == polystore.__file__


def test_example_docstring_states_the_default_sizes() -> None:
    pipeline = load_script("examples/pipeline.py")
    args = pipeline.build_parser().parse_args([])
    plan = pipeline.Plan(args.images, args.side, args.group)
    doc = pipeline.__doc__
    assert f"{plan.moved_bytes / 2**30:.2f} GiB of arrays" in doc
    assert f"{plan.handoffs} hand-offs of {plan.image_bytes >> 20} MiB images" in doc
    assert f"through {['no', 'one', 'two', 'three', 'four'][args.workers]} workers" in doc


def test_a_failed_c_build_says_so_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import setuptools
    from setuptools.command.build_ext import build_ext

    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)
    spec = importlib.util.spec_from_file_location("polystore_setup", REPO / "setup.py")
    assert spec is not None and spec.loader is not None
    setup_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_module)

    def no_compiler(self: object, ext: object) -> None:
        raise OSError("no C compiler here")

    monkeypatch.setattr(build_ext, "build_extension", no_compiler)
    builder = setup_module.BuildExt.__new__(setup_module.BuildExt)
    with pytest.raises(OSError):  # setuptools then skips the optional extension
        builder.build_extension(object())
    err = capsys.readouterr().err
    assert err.count("the optional C fast path could not be built") == 1
    assert "no C compiler here" in err and "python -m polystore info" in err


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "script", sorted(p.name for p in (REPO / "benchmarks").glob("*.py")), ids=str
)
def test_every_benchmark_imports_and_takes_help(script: str) -> None:
    # Benchmarks are not run by the suite, so a rename in the package could
    # break one unseen (cold_get.py imported a module that had moved).
    import subprocess

    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--help"],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
