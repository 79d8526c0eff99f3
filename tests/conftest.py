"""Shared pytest fixtures."""

import pytest


@pytest.fixture
def notebook_runner(tmp_path):
    """Run a notebook headless in this test's ``tmp_path``; see ``notebook_harness.run_notebook``.

    Usage: ``rec = notebook_runner("03_index.ipynb", {"N_IMAGES": 40})``.
    """
    # Imported here so that tests which never run a notebook do not need papermill.
    from notebook_harness import run_notebook

    def run(name_or_path, parameters=None, **kwargs):
        return run_notebook(name_or_path, tmp_path, parameters, **kwargs)

    return run


@pytest.fixture
def unreachable_hub(monkeypatch):
    # A reserved, never-resolving endpoint makes the hub unreachable even on a networked CI.
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "https://modelscope.invalid")
    try:  # modelscope >= 1.3x caches its endpoint in a process-wide config object
        import modelscope_hub.config as hub_config
    except ImportError:
        pass
    else:
        monkeypatch.setattr(hub_config, "_default_config", None)


# Shared demo fixtures (tests/demo_fixtures.py builds each once per session); a module may override them.
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The sample data prepared with 20 % / 20 % valid / test."""
    from demo_fixtures import prepare_sample

    return prepare_sample(tmp_path_factory)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An output folder with runs/tiny-finetune and runs/tiny-kd-cosine (tiny students, 3 steps)."""
    from demo_fixtures import demo_output

    return demo_output(tmp_path_factory)


@pytest.fixture(scope="module")
def checkpoint(runs):
    return runs / "runs" / "tiny-finetune" / "checkpoints" / "epoch_latest.pt"


@pytest.fixture(scope="module")
def onnx_towers(checkpoint, tmp_path_factory) -> dict:
    """The tiny student's image and text towers in ONNX (fp32), exported once per session (read-only)."""
    from demo_fixtures import export_towers

    return export_towers(checkpoint, tmp_path_factory)


@pytest.fixture
def output_dir(tmp_path_factory, tmp_path):
    """A private copy of the shared output folder (runs/tiny-finetune, runs/tiny-kd-cosine; no index yet)."""
    from demo_fixtures import copy_output, demo_output

    return copy_output(demo_output(tmp_path_factory), tmp_path / "out")
