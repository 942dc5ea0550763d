"""Progress bars: drawn where a person watches (terminal, notebook), with loss and img/s;
silent when stderr is not a terminal, under CI=true and on MPI ranks other than 0."""
import numpy as np
import pytest

import mapet
from mapet import progress
from mapet.data import load_digits
from mapet.train import finetune, pretrain

TINY = dict(img_size=16, patch_size=4, embed_dim=24, depth=1, num_heads=3)


@pytest.fixture
def terminal(monkeypatch):
    monkeypatch.setattr(progress, "_stderr_is_terminal", lambda: True)
    monkeypatch.delenv("CI", raising=False)


def test_automatic_rule(monkeypatch, terminal):
    assert progress.enabled(None)
    for value in ("true", "1", "TRUE"):
        monkeypatch.setenv("CI", value)
        assert not progress.enabled(None)
        assert progress.enabled(True)          # asked for explicitly
    monkeypatch.setenv("CI", "false")
    assert progress.enabled(None)
    monkeypatch.setattr(progress, "_stderr_is_terminal", lambda: False)
    assert not progress.enabled(None)          # a pipe or a log file
    assert not progress.enabled(False)
    with pytest.raises(TypeError, match="progress"):
        progress.enabled("yes")


def test_only_rank_zero_draws(monkeypatch, terminal):
    class Rank1:
        is_main, rank, world_size, distributed = False, 1, 2, True

    monkeypatch.setattr(mapet.distributed, "context", lambda: Rank1())
    assert not progress.enabled(None) and not progress.enabled(True)
    assert progress.bar(10, "x", progress=True) is None


def test_training_bar_shows_loss_and_throughput(capsys, terminal):
    x, y = load_digits(16, "train")
    finetune("vit_tiny_patch16_224", (x[:64], y[:64]), epochs=1, batch_size=32, **TINY)
    err = capsys.readouterr().err
    assert "finetune" in err and "2/2" in err and "loss=" in err and "img_s=" in err
    tokens = np.zeros((64, 16), np.int32)
    model = mapet.create_model("mapet_tiny_patch16_224", num_tokens=4, least_number=4, **TINY)
    pretrain("mapet", model=model, data=x[:64], tokens=tokens, epochs=1, batch_size=32)
    err = capsys.readouterr().err
    assert "pretrain[mapet]" in err and "loss=" in err and "img_s=" in err
    pretrain("mapet", model=model, data=x[:64], tokens=tokens, epochs=1, batch_size=32, progress=False)
    assert capsys.readouterr().err == ""       # progress=False: nothing


def test_quiet_when_not_a_terminal(capsys, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    x, y = load_digits(16, "train")
    finetune("vit_tiny_patch16_224", (x[:64], y[:64]), epochs=1, batch_size=32, **TINY)
    mapet.KMeans(4, n_iter=2).fit(np.random.default_rng(0).random((100, 3), dtype=np.float32))
    assert capsys.readouterr().err == ""       # pytest captures stderr: not a terminal


def test_kmeans_and_tokenizer_bars(capsys, terminal):
    rng = np.random.default_rng(0)
    km = mapet.KMeans(4, n_iter=3, n_redo=2).fit(rng.random((300, 3), dtype=np.float32))
    err = capsys.readouterr().err
    assert "k-means 300×3 → 4" in err and "2/2" in err and "objective=" in err
    km.assign(rng.random((50, 3), dtype=np.float32), chunk_size=16)
    assert "50/50" in capsys.readouterr().err
    tok = mapet.PixelTokenizer(patch_size=4, n_tokens=8, n_iter=2)
    images = [rng.random((3, 3, 8, 8), dtype=np.float32) for _ in range(3)]
    tok.fit(images)
    tok.encode(images)
    err = capsys.readouterr().err
    assert "PixelTokenizer: collecting" in err and "PixelTokenizer: encoding" in err and "3/3" in err
