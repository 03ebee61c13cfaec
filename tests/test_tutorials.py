"""The tutorials in ``tutorials/``: executed with papermill on small CI parameters, failing on any cell error.

Each notebook ends with a cell that asserts what it demonstrates, so a broken API or a failed edit fails
here. The notebooks are committed without outputs; the executed copies go to a temporary folder.

The kernel is the interpreter running pytest (e.g. nox's virtualenv): a ``python3`` kernel spec pointing at
``sys.executable`` is written to a temporary folder on ``JUPYTER_PATH`` (which takes precedence over user
and system kernel specs) when the one Jupyter would pick does not already launch this interpreter, so
nothing outside the test run is changed. Kernels get one PyTorch thread unless ``OMP_NUM_THREADS`` is set
(see ``kernel_threads``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
KERNEL = "python3"

#: Parameters that shrink each notebook to a few minutes on 2 CPU cores (see each notebook's first cell).
CI_PARAMS: dict[str, dict] = {
    "01_quickstart.ipynb": {"TARGET_SENTENCES": 3, "STATS_TOKENS": 20_000},
    "02_how_anyedit_works.ipynb": {"TARGET_SENTENCES": 3, "STATS_TOKENS": 20_000},
    "03_any_format.ipynb": {"MAX_TARGET_TOKENS": 64, "STATS_TOKENS": 20_000},
    "04_benchmarks.ipynb": {
        "DATASETS": ["unkebench"],
        "METHODS": ["memit"],
        "ANYEDIT": [True],
        "INCLUDE_UNEDITED": True,
        "N_RECORDS": 2,
        "MAX_NEW_TOKENS": 48,
        "STATS_TOKENS": 20_000,
        "MIN_ROUGE_L_GAIN": 0.2,  # MEMIT+AnyEdit only; the default 0.05 also covers UnKE and AlphaEdit
    },
    "05_your_model_and_method.ipynb": {"STATS_TOKENS": 5_000},
}
NOTEBOOKS = sorted(CI_PARAMS)


def _read(name: str):
    nbformat = pytest.importorskip("nbformat")
    return nbformat.read(TUTORIALS / name, as_version=4)


def _launches_this_python(argv: list[str]) -> bool:
    """Whether a kernel spec's command starts this interpreter (jupyter_client maps a bare ``python``,
    ``python3`` or ``python3.X`` to ``sys.executable``)."""
    if not argv:
        return False
    bare = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}
    if argv[0] in bare:
        return True
    try:
        return Path(argv[0]).resolve() == Path(sys.executable).resolve()
    except OSError:
        return False


@pytest.fixture(scope="session")
def python3_kernel(tmp_path_factory) -> Iterator[str]:
    """A ``python3`` kernel that runs ``sys.executable`` with ipykernel, for papermill."""
    pytest.importorskip("papermill")
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        current = KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        current = None
    if current is not None and _launches_this_python(current.argv):
        yield KERNEL
        return
    folder = tmp_path_factory.mktemp("jupyter")
    spec_dir = folder / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python 3 ({sys.executable})",
        "language": "python",
        "metadata": {"debugger": True},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    previous = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(folder), *([previous] if previous else [])])
    try:
        assert _launches_this_python(KernelSpecManager().get_kernel_spec(KERNEL).argv)
        yield KERNEL
    finally:
        if previous is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = previous


@pytest.fixture(scope="session")
def kernel_threads() -> Iterator[None]:
    """``OMP_NUM_THREADS=1`` for the kernels unless the variable is already set.

    On a 2-core machine shared with other work, PyTorch's default of one thread per core was many times
    slower than one thread (notebook 01 with CI parameters: over 600 s against about 100 s).
    """
    if "OMP_NUM_THREADS" in os.environ:
        yield
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)


# ---- static checks (fast: no kernel) -------------------------------------------------------------------


def test_every_tutorial_has_ci_parameters():
    assert sorted(p.name for p in TUTORIALS.glob("*.ipynb")) == NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_clean(name):
    """python3 kernel metadata, a ``parameters`` cell first among code cells defining every CI parameter,
    no stored outputs, and a final code cell that asserts."""
    nb = _read(name)
    assert nb.metadata["kernelspec"]["name"] == KERNEL
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), "the first code cell must be tagged 'parameters'"
    defined = {line.split("=")[0].strip() for line in code[0].source.splitlines() if "=" in line}
    missing = set(CI_PARAMS[name]) - defined
    assert not missing, f"CI parameters not defined in the parameters cell: {sorted(missing)}"
    assert all(not cell.get("outputs") and cell.get("execution_count") is None for cell in code)
    assert "assert " in code[-1].source, "the last code cell must assert what the notebook demonstrates"


# ---- execution -------------------------------------------------------------------------------------------


@pytest.mark.notebooks
def test_kernel_is_this_interpreter(python3_kernel, tmp_path):
    """The notebooks run in the environment under test (e.g. nox's virtualenv), not some other Python."""
    import nbformat
    import papermill

    nb = nbformat.v4.new_notebook(
        metadata={"kernelspec": {"name": KERNEL, "display_name": "Python 3", "language": "python"}}
    )
    nb.cells = [nbformat.v4.new_code_cell("import sys\nprint(sys.executable)")]
    src, out = tmp_path / "probe.ipynb", tmp_path / "probe.out.ipynb"
    nbformat.write(nb, src)
    result = papermill.execute_notebook(str(src), str(out), kernel_name=python3_kernel, progress_bar=False)
    printed = result.cells[0].outputs[0]["text"].strip()
    assert Path(printed).resolve() == Path(sys.executable).resolve()


@pytest.mark.notebooks
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_tutorial_runs(name, python3_kernel, kernel_threads, tmp_path):
    import papermill

    papermill.execute_notebook(
        str(TUTORIALS / name),
        str(tmp_path / name),
        parameters=CI_PARAMS[name],
        kernel_name=python3_kernel,
        cwd=str(ROOT),
        progress_bar=False,
        start_timeout=180,  # a loaded 2-core machine can be slow to start a kernel
    )
