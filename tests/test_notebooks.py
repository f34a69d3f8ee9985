"""The tutorial notebooks execute without errors (small size: `JAXBAR_NOTEBOOK_SMALL=1`).

Each notebook runs in a fresh kernel started from this interpreter (a kernelspec for
`sys.executable` written to a temporary folder), with a temporary working directory, so
nothing is written into the repository. The committed notebooks keep their full-size outputs:
the executed copy is discarded.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from ipykernel.kernelspec import install as install_kernelspec  # noqa: E402
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("01_tour.ipynb", "02_your_own_model.ipynb", "03_hardware_aware_training.ipynb")
KERNEL = "jaxbar-notebook-test"


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    """A kernelspec folder whose kernel runs `sys.executable` (the test's virtualenv)."""
    prefix = tmp_path_factory.mktemp("kernelspec")
    path = Path(install_kernelspec(kernel_name=KERNEL, prefix=str(prefix)))
    return path.parent


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, kernel_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXBAR_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    km = KernelManager(kernel_name=KERNEL,
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]))
    assert km.kernel_spec.argv[0] == sys.executable
    client = nbclient.NotebookClient(nb, km=km, timeout=600,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
