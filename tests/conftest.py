"""Shared pytest fixtures.

``fake_hub``: a fake Hugging Face Hub on 127.0.0.1 (tests/fake_hub.py) for model and dataset repos, with the
    environment pointed at it for the test: ``HF_ENDPOINT``, ``HF_HUB_DISABLE_XET=1``, a temporary ``HF_HOME``
    (no real token or cache), ``HF_TOKEN`` = the fake token, offline flags cleared; the import-time constants of
    ``huggingface_hub`` and ``datasets`` are patched too. Yields the :class:`tests.fake_hub.FakeHub` (``.url``,
    ``.repo(id, repo_type)``, ``.files(id, repo_type)``, ``.dump(id, folder, repo_type)``, ``.requests``,
    ``.unknown``). Subprocesses inherit the environment variables.
``_private_ctiqa_cache`` (autouse): ``CTIQA_CACHE_DIR`` points at a fresh temporary folder for the session.
``fake_gemini``: a started :class:`ctiqa.testing.fake_gemini.FakeGemini` (script empty: every answer is ``ok()``;
    call ``.set_script([...])``), with ``GEMINI_API_KEY`` set to a fake key.
``tiny`` (module): a fresh untrained tiny Gemma 3 (seed 0); a module may define its own.
``trained_tiny_model`` (session): the folder of a tiny Gemma 3 taught the answer format (tests/trained_tiny.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_hub import TOKEN, FakeHub  # noqa: E402

from ctiqa.testing.fake_gemini import FakeGemini  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _private_ctiqa_cache(tmp_path_factory):
    """Keep tests off the user's ~/.cache/ctiqa (sinogram cache, teacher answers): every run starts cold."""
    import os

    old = os.environ.get("CTIQA_CACHE_DIR")
    os.environ["CTIQA_CACHE_DIR"] = str(tmp_path_factory.mktemp("ctiqa_cache"))
    yield
    if old is None:
        os.environ.pop("CTIQA_CACHE_DIR", None)
    else:
        os.environ["CTIQA_CACHE_DIR"] = old


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    hub = FakeHub().start()
    home = tmp_path / "hf_home"
    home.mkdir()
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(home), "HF_TOKEN": TOKEN,
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_DATASETS_CACHE",
              "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    hub_cache = str(home / "hub")
    for name, value in {
        "ENDPOINT": hub.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(hc.HF_URL_HOSTS | {"127.0.0.1"}),
        "HF_HOME": str(home), "HF_HUB_CACHE": hub_cache, "HUGGINGFACE_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": str(home / "assets"), "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"), "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_XET": True,
    }.items():
        if hasattr(hc, name):
            monkeypatch.setattr(hc, name, value)
    try:
        import datasets.config as dc

        ds_cache = home / "datasets"
        for name, value in {
            "HF_ENDPOINT": hub.url,
            "HUB_DATASETS_URL": hub.url + "/datasets/{repo_id}/resolve/{revision}/{path}",
            "HF_CACHE_HOME": str(home), "HF_DATASETS_CACHE": ds_cache,
            "DOWNLOADED_DATASETS_PATH": ds_cache / "downloads",
            "EXTRACTED_DATASETS_PATH": ds_cache / "downloads" / "extracted",
            "HF_HUB_OFFLINE": False, "HF_DATASETS_OFFLINE": False,
        }.items():
            if hasattr(dc, name):
                monkeypatch.setattr(dc, name, value)
    except ImportError:  # pragma: no cover
        pass
    try:
        from huggingface_hub import HfFileSystem

        HfFileSystem.clear_instance_cache()
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    yield hub
    hub.stop()


@pytest.fixture
def fake_gemini(monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", "fake-gemini-key")
    with FakeGemini() as srv:
        yield srv


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A fresh untrained tiny Gemma 3 (:func:`ctiqa.tiny.build_tiny_model`, seed 0), one per test module."""
    from ctiqa.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def trained_tiny_model(tmp_path_factory):
    """One tiny Gemma 3 taught the answer format (tests/trained_tiny.py), shared by the modules that need real
    scores and rationales; read-only for its users."""
    from trained_tiny import train_tiny

    return train_tiny(tmp_path_factory.mktemp("trained_tiny") / "model")
