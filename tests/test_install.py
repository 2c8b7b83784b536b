"""A regular (non-editable) install runs the paper's settings from any directory.

The package is built into a wheel from a copy of the sources (pip's own build, as `pip install .`
does), the wheel's contents are inspected, and it is installed with pip into a fresh directory
that is put first on the path of a child process started outside the checkout. That process
imports the installed copy (asserted), not this checkout, and runs the commands a user would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What `pip install .` builds from (pyproject.toml names the rest).
SOURCES = ("pyproject.toml", "README.md", "adashift_pl", "tasks", "configs")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """site directory holding a pip install of a wheel built from this checkout's sources."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(tmp / "dist"), str(src)], check=True, timeout=600)
    wheel = next((tmp / "dist").glob("adashift_pl-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for cfg in (ROOT / "configs").rglob("*.yaml"):
        assert f"adashift_pl/configs/{cfg.relative_to(ROOT / 'configs').as_posix()}" in names, cfg
    site = tmp / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                   check=True, timeout=600)
    return site


# Run in the child, from a directory outside the checkout: prints one JSON line of results.
CHILD = r"""
import contextlib, io, json, sys
from pathlib import Path

import yaml

import adashift_pl
from adashift_pl import compare, train

out = {"package": adashift_pl.__file__}
short = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--test", "false",
         "--correlation", "false", "--num-threads", "1", "--log-dir", "logs"]
for task, opt in (("mnist_mlp", "adashift"), ("mnist_mlp", "adam"), ("counterexample", "adam")):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = train.main(["--task", task, "--optimizer", opt, *short])
    run_dir = Path(buf.getvalue().strip().splitlines()[-1])
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    out[f"{task}/{opt}"] = {"code": code, "optimizer": resolved["optimizer"]}
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    out["fig1a"] = compare.main(["--recipe", "fig1a", "--dry-run", "--out", "sweep"])
out["fig1a_plan"] = buf.getvalue()
err = io.StringIO()
with contextlib.redirect_stderr(err):
    out["missing"] = train.main(["--task", "quadratic", "--optimizer", "adam", *short])
out["missing_err"] = err.getvalue()
print(json.dumps(out))
"""


def test_installed_package_runs_the_papers_settings_from_any_directory(installed, tmp_path):
    (installed / "adashift_pl" / "configs" / "quadratic.yaml").unlink()  # for the loud-missing check
    env = {**os.environ, "PYTHONPATH": str(installed)}
    p = subprocess.run([sys.executable, "-c", CHILD], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert Path(out["package"]).is_relative_to(installed)  # the installed copy, not this checkout
    # Table 6 (Figure 3): beta1 = 0 and n = 1, not the factory's (0.9, 0.999) and 10
    assert out["mnist_mlp/adashift"]["code"] == 0
    assert out["mnist_mlp/adashift"]["optimizer"] == {"name": "adashift", "lr": 1e-2, "betas": [0.0, 0.999],
                                                      "keep_num": 1, "window": None, "eps": 1e-10}
    assert out["mnist_mlp/adam"]["optimizer"]["betas"] == [0.0, 0.999]
    # Section 5.1: the counterexample's Adam has beta1 = 0
    assert out["counterexample/adam"]["code"] == 0
    assert out["counterexample/adam"]["optimizer"]["betas"] == [0.0, 0.999]
    # compare finds the paper's recipes in the installed package
    assert out["fig1a"] == 0 and "counterexample" in out["fig1a_plan"]
    # a config missing from the install is said, not replaced by code defaults
    assert out["missing"] == 2
    assert "config for task quadratic is missing" in out["missing_err"]
    assert len(out["missing_err"].strip().splitlines()) == 1
