"""The runnable ``Example:`` blocks of the public modules execute and print what they claim.

(Modules whose examples need outside files or an MPI launch — checkpoint, config, data, distributed,
viz — show illustrative fragments and are not listed.)"""
import doctest
import importlib

import pytest

MODULES = ["mapet._runtime", "mapet.profiling", "mapet.interop", "mapet.kmeans", "mapet.models", "mapet.objectives", "mapet.ops",
           "mapet.optim", "mapet.pretrain_models", "mapet.sampling", "mapet.schedules", "mapet.tokenizers"]


@pytest.mark.parametrize("name", MODULES)
def test_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write files
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no runnable example"
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} example lines failed"
