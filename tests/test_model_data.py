"""Offline text sources: disjoint calibration and evaluation parts."""

import pytest

from sparsegpt_kernels.model import load_text
from sparsegpt_kernels.model.data import DataUnavailableError


@pytest.mark.parametrize("name", ["shakespeare", "kjv"])
def test_offline_sources_split_disjointly(name):
    s = load_text(name)
    assert len(s.calibration) > 100_000 and len(s.evaluation) > 10_000
    assert s.evaluation[:2000] not in s.calibration


def test_kjv_reads_the_verses():
    s = load_text("kjv")
    assert s.calibration.startswith("In the beginning God created the heaven and the earth.")
    assert "{" not in s.calibration[:10_000]


def test_datasets_sources_need_the_package(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataUnavailableError, match="datasets"):
        load_text("wikitext2")
