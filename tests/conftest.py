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
