"""A fresh, non-editable install runs the whole system on its own, from its package data alone.

The project is built into a wheel and installed (``pip install --no-deps --no-build-isolation``)
into a new venv. Its third-party dependencies are the dev venv's, reached through a ``.pth`` line,
so the test needs no network and takes seconds. A ``.pth`` line only adds a directory to
``sys.path``; the ``.pth`` files inside that directory (among them the dev venv's editable finder,
which maps ``corral`` to this repository) are not run, so the fresh venv imports what it installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import NamedTuple

import pytest

from corral.nats_server import free_port, nats_server_binary
from tests.e2e.test_corral_up import wait_for_file

REPO = Path(__file__).resolve().parents[2]
ACME_ANSWER = "Order A-1004 (Anvil, 50 kg) is shipped, expected 2026-11-27."
# What a developer's tree holds that is not source: .git and the .gitignore's entries.
NOT_SOURCE = (
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*.pyc",
    ".*_cache",
    ".hypothesis",
    ".corral",
)

# Run by the fresh venv's interpreter: can pip build a wheel with what the .pth line reaches?
BUILD_BACKEND_PROBE = """
import importlib.util, json
try:
    import setuptools
except ImportError:
    print(json.dumps(None))
else:
    builder = ("setuptools.command.bdist_wheel", "wheel")  # built in from setuptools 70.1, else the wheel package
    print(json.dumps({"version": setuptools.__version__, "file": setuptools.__file__,
                      "bdist_wheel": any(importlib.util.find_spec(name) for name in builder)}))
"""
WHERE_IMPORTED = (
    "import json, contracts, corral, services; print(json.dumps([m.__file__ for m in (contracts, corral, services)]))"
)


def dev_site_packages() -> list[str]:
    """The directories the running (dev) interpreter installs packages into: the fresh venv's dependencies."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def isolated_environment(fresh_bin: Path, tools_bin: Path) -> dict[str, str]:
    """This environment without what would let the repository or the dev venv leak in, nor Corral settings."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not name.startswith("CORRAL_")
    }
    env["PATH"] = os.pathsep.join([str(fresh_bin), str(tools_bin), env.get("PATH", "")])
    return env


def run(command: list[str], *, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} exited with {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def process_tree(pid: int) -> list[int]:
    """``pid``'s descendants, from Linux's /proc (none where that is not available)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):  # a child belongs to the thread that started it
        with contextlib.suppress(OSError):
            children += [int(child) for child in task.read_text().split()]
    return [descendant for child in children for descendant in (child, *process_tree(child))]


def kill_with_descendants(process: subprocess.Popen) -> None:
    """SIGKILL a process and what it started: `corral up` runs each service in a session of its own,
    so killing `corral up` alone would leave them running."""
    for pid in process_tree(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.kill()
    process.wait()


class FreshInstall(NamedTuple):
    python: Path
    site_packages: Path
    env: dict[str, str]  # the environment to run it in
    cwd: Path  # a directory outside the repository, to run it from


@pytest.fixture
def fresh_install(tmp_path: Path) -> FreshInstall:
    """A new venv with the project installed from a wheel built from this tree."""
    venv = tmp_path / "venv"
    # Without its own pip: the dev venv's, reached through the .pth line, does the install.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    tools_bin = tmp_path / "tools-bin"  # nats-server and nothing else of the dev venv's bin/
    tools_bin.mkdir()
    (tools_bin / "nats-server").symlink_to(nats_server_binary())
    env = isolated_environment(venv / "bin", tools_bin)
    outside = tmp_path / "cwd"  # never the repository, whose folders would shadow the installed packages
    outside.mkdir()

    site_packages = Path(
        run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            cwd=outside,
            env=env,
            timeout=60,
        ).stdout.strip()
    )
    (site_packages / "dev_dependencies.pth").write_text("".join(f"{path}\n" for path in dev_site_packages()))

    backend = json.loads(run([str(python), "-c", BUILD_BACKEND_PROBE], cwd=outside, env=env, timeout=60).stdout)
    if backend is None or not backend["bdist_wheel"]:
        pytest.fail(
            f"pip cannot build the wheel offline: the dev venv ({', '.join(dev_site_packages())}) has "
            + ("no setuptools" if backend is None else f"setuptools {backend['version']} ({backend['file']})")
            + " and no bdist_wheel command (built into setuptools>=70.1, else from the `wheel` package)"
        )

    # setuptools builds in the source tree (build/, *.egg-info): build a copy, so that a stale build/
    # cannot leak into the wheel and the developer's tree is not written to.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*NOT_SOURCE), symlinks=True)
    install = [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir"]
    run([*install, str(source)], cwd=outside, env=env, timeout=180)
    return FreshInstall(python, site_packages, env, outside)


@pytest.mark.timeout(300)
def test_a_fresh_non_editable_install_runs_the_demo_from_its_package_data(fresh_install: FreshInstall, tmp_path):
    python, site_packages, env, outside = fresh_install
    imported = json.loads(run([str(python), "-c", WHERE_IMPORTED], cwd=outside, env=env, timeout=60).stdout)
    assert all(Path(file).is_relative_to(site_packages) for file in imported), imported  # not the editable finder's

    corral = str(python.parent / "corral")
    state_dir, log_dir = tmp_path / "state", tmp_path / "logs"
    up = subprocess.Popen(
        [corral, "up", "--port", str(free_port()), "--state-dir", str(state_dir), "--log-dir", str(log_dir)],
        cwd=outside,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_file(state_dir / "corral.json", up, timeout=120)
        packaged = site_packages / "corral" / "demo" / "definitions" / "demo.yaml"
        # The same file, but for its first line: the editor's schema, the installed one.
        copied = (state_dir / "definitions" / "demo.yaml").read_text().split("\n", 1)
        assert copied[1] == packaged.read_text().split("\n", 1)[1]
        schema = Path(copied[0].removeprefix("# yaml-language-server: $schema="))
        assert schema.is_relative_to(site_packages) and json.loads(schema.read_text())["title"]

        answer = run(
            [corral, "request", "--state-dir", str(state_dir), "--tenant", "acme", "where is my order?"],
            cwd=outside,
            env=env,
            timeout=120,
        )
        assert answer.stdout.splitlines()[-1] == ACME_ANSWER, answer.stdout

        up.send_signal(signal.SIGINT)
        output, _ = up.communicate(timeout=60)
        assert up.returncode == 0, output
    finally:
        if up.poll() is None:
            kill_with_descendants(up)
