"""The research notebooks run top to bottom on the venv's interpreter, without errors."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

torch.set_num_threads(1)

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
KERNEL = "medmoe-test-venv"


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A kernelspec running *this* interpreter (the venv's), one torch thread, found first on
    JUPYTER_PATH, so the notebooks never run on another Python."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "medmoe tests (venv)",
                "language": "python",
                "env": {"OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"},
            }
        )
    )
    patch = pytest.MonkeyPatch()
    patch.setenv("JUPYTER_PATH", str(root))
    yield KERNEL
    patch.undo()


def test_notebooks_exist() -> None:
    names = {p.name for p in NOTEBOOKS}
    assert {
        "01_custom_router.ipynb",
        "02_custom_allocation.ipynb",
        "03_routing_from_checkpoint.ipynb",
        "04_hf_trainer.ipynb",
    } <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_no_committed_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, kernel_name: str, tmp_path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    # a first cell reporting the kernel's interpreter (added to the in-memory copy only)
    notebook.cells.insert(0, nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))
    client = nbclient.NotebookClient(
        notebook,
        kernel_name=kernel_name,
        timeout=120,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    began = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    seconds = time.perf_counter() - began
    printed = "".join(o.get("text", "") for o in notebook.cells[0].outputs)
    assert Path(printed.strip()) == Path(sys.executable)
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            assert output.output_type != "error", (path.name, output)
    print(f"{path.name}: {seconds:.1f} s")
