"""What a non-editable install gets: the wheel built from this checkout, installed into a directory of its own and
imported from outside the repository (an editable install and pytest's own sys.path both find every subpackage
whether or not it is declared: attnstore_hf.pipeline was left out of the wheel and nothing here noticed)."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _declared() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return {p.strip() for p in cfg["options"]["packages"].split() if p.strip()}


def _on_disk() -> set[str]:
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "attnstore_hf").rglob("__init__.py")}
    found |= {"attnstore_hf.patches"} if (ROOT / "patches" / "__init__.py").exists() else set()
    return found


def test_every_subpackage_is_declared():
    assert _declared() == _on_disk()


def test_the_built_wheel_imports_from_outside_the_repository(tmp_path):
    dist, site, src = tmp_path / "dist", tmp_path / "site", tmp_path / "src"
    # built from a copy: setuptools builds in the source tree, and a build/ left there by an earlier build would
    # hand the wheel modules the configuration no longer declares
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", ".hypothesis"))
    run = dict(capture_output=True, text=True, timeout=600)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(src)], **run)
    assert out.returncode == 0, out.stderr[-3000:]
    wheel = next(dist.glob("attnstore_hf-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = [p for p in (ROOT / "attnstore_hf").rglob("*.py") if "__pycache__" not in p.parts]
    want = {"/".join(p.relative_to(ROOT).parts) for p in sources}
    want |= {"attnstore_hf/patches/" + p.name for p in (ROOT / "patches").glob("*.py")}
    assert want <= names, sorted(want - names)
    assert not any(n.startswith(("tests/", "patches/", "scripts/")) for n in names)
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                          str(wheel)], **run)
    assert out.returncode == 0, out.stderr[-3000:]
    probe = (  # (an editable install of this checkout in the environment would serve what the wheel lacks)
        "import importlib, pkgutil, sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in str(getattr(f, '__module__', f))]\n"
        "import attnstore_hf, attnstore_hf.patches\n"
        "mods = [m.name for m in pkgutil.walk_packages(attnstore_hf.__path__, 'attnstore_hf.')]\n"
        "for m in mods: importlib.import_module(m)\n"
        "files = {m.__file__ for n, m in sys.modules.items() if n.split('.')[0] == 'attnstore_hf'}\n"
        "print(len(mods)); print('\\n'.join(sorted(files)))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, **run)
    assert out.returncode == 0, out.stderr[-3000:]
    count, *files = out.stdout.split("\n")
    assert int(count) >= 20
    assert all(Path(f).is_relative_to(site) for f in files if f), files
