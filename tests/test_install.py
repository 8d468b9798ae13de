"""``pip install .`` ships everything a checkout has: the built-in configs, the GPU catalogue, the
bundled example image, and the ``engine`` command.

The wheel is built from a copy of this checkout and installed into a fresh virtualenv that borrows
the system's site-packages (torch and the rest come from there; nothing is downloaded). The CLI then
runs from an unrelated directory with ``PYTHONPATH`` unset, and the test first proves that
``import engine`` finds the venv's copy rather than this checkout (an editable install of the
checkout in the system site-packages would otherwise hide a wheel that lacks its data files).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from engine.config import BUILTIN_CONFIGS
from engine.estimate.laws.cache import default_cache_dir

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DATA = [f"engine/configs/{name}" for name in (*BUILTIN_CONFIGS.values(), "gpus.yaml")] + [
    "engine/assets/example.png"]


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, (f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                                  f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the venv's bin folder, an environment that uses it, a directory outside the checkout)."""
    root = tmp_path_factory.mktemp("install")
    # Build from a copy holding only what the build reads, so no build/ or *.egg-info lands in the
    # checkout and a half-edited file elsewhere in it cannot matter.
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "engine", src / "engine", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = root / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "--no-index", "-w", str(wheels), str(src)])
    (wheel,) = wheels.glob("engine-*.whl")
    missing = sorted(set(PACKAGE_DATA) - set(zipfile.ZipFile(wheel).namelist()))
    assert not missing, f"the wheel lacks package data {missing}; see [tool.setuptools.package-data]"

    # --without-pip: the system's pip, visible through --system-site-packages, installs into the
    # venv's prefix. --ignore-installed: the checkout's own (editable) install must not count.
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / ("python.exe" if os.name == "nt" else "python")
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
          str(wheel)])

    # The fit cache is this user's: its entries are keyed by the digests of the code that made them,
    # so the installed copy (the same files) reads what the checkout fitted and what it fits serves
    # the checkout too; nothing else is written there.
    cache = default_cache_dir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv),
               ENGINE_CACHE_DIR=str(cache))
    work = root / "elsewhere"
    work.mkdir()
    found = _run([str(python), "-c", "import engine; print(engine.__file__)"], cwd=work, env=env)
    where = Path(found.stdout.strip()).resolve()
    if not where.is_relative_to(venv.resolve()) or where.is_relative_to(REPO):
        pytest.fail(f"`import engine` in the venv found {where}, not the installed wheel under {venv}; "
                    "the checkout (an editable install's finder or a path entry) shadows it")
    return bindir, env, work


def test_installed_plan_reads_packaged_config_and_catalogue(installed):
    bindir, env, work = installed
    proc = _run([str(bindir / "engine"), "plan", "--config", "512", "--gpu", "rtx-4090-laptop"],
                cwd=work, env=env)
    assert "RTX 4090 Laptop" in proc.stdout, proc.stdout


def test_installed_generate_writes_video(installed):
    bindir, env, work = installed
    out = work / "out" / "x.mp4"
    _run([str(bindir / "engine"), "generate", "--steps", "2", "--quiet", "--out", str(out)],
         cwd=work, env=env)
    assert out.is_file() and out.stat().st_size > 0, f"no video at {out}"
