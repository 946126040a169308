"""The demo notebook runs top to bottom on the toy trained model, offline (nbclient), and is the one
``notebooks/make_demo.py`` writes."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOK = NOTEBOOKS / "diffseg_demo.ipynb"


def test_notebook_is_generated_and_without_outputs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_demo", NOTEBOOKS / "make_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    on_disk = nbformat.read(NOTEBOOK, as_version=4)
    assert [c.source for c in on_disk.cells] == [c.source for c in module.build().cells], (
        "diffseg_demo.ipynb differs from make_demo.py: run python notebooks/make_demo.py"
    )
    assert all(not c.get("outputs") for c in on_disk.cells if c.cell_type == "code")


def test_notebook_runs_offline(monkeypatch):
    # The kernel inherits the environment: one thread (tests share the cores), no hub, no W&B.
    for key, value in {
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
    }.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # No warning a reader cannot act on (IProgress: a progress bar without ipywidgets).
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    assert "IProgress" not in stderr and "torchvision" not in stderr, stderr
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # scene, attention, aggregation, iterations, proposals
    text = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "| DiffSeg | COCO-Stuff-27 | 72.5 | not run |" in text


if __name__ == "__main__":
    pytest.main([__file__])
