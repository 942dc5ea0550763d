"""Figures: what each one draws is read back from the matplotlib objects and compared with the
inputs and with masks rebuilt here from ALGORITHMS.md §2's rules; every figure has a title, axis labels,
named legends and a caption; PNGs are written and decode to the figure's size."""
import numpy as np
import pytest
from PIL import Image

import mapet
from mapet import viz


def _texts(fig):
    return [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]


def _legend_labels(fig):
    out = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
    for ax in fig.axes:
        if ax.get_legend() is not None:
            out += [t.get_text() for t in ax.get_legend().get_texts()]
    return out


def _rule_masks(ranks, least_number, predicted):
    """ALGORITHMS.md §2's may-attend rules in plain NumPy (float64-free: booleans), patch order."""
    N, P = len(ranks), len(predicted)
    ctx = ranks < least_number
    content = np.zeros((N + P, N + P), bool)
    for r in range(N):
        for c in range(N):
            content[r, c] = ctx[c] or ranks[c] < ranks[r] or c == r
    for r in range(N):
        for j, p in enumerate(predicted):
            content[r, N + j] = not content[r, p]
    for i in range(P):
        content[N + i, :N] = ctx
        content[N + i, N:] = True
    query = np.zeros((P, N + P), bool)
    for i, p in enumerate(predicted):
        for c in range(N):
            query[i, c] = ctx[c] or ranks[c] < ranks[p]
        for j, q in enumerate(predicted):
            query[i, N + j] = ranks[q] >= ranks[p]
    return content, query


def test_plot_masks_draws_both_orders_with_triangular_permutation_view(tmp_path):
    L = 5
    batch = mapet.PermutationSampler(16, least_number=L, seed=3).sample(3)
    fig = viz.plot_masks(batch, 1, path=str(tmp_path / "masks.png"))
    ranks, predicted = np.asarray(batch.ranks[1]), np.asarray(batch.predicted[1])
    content, query = _rule_masks(ranks, L, predicted)
    N, P = 17, 17 - L
    drawn = [np.asarray(ax.images[0].get_array()).astype(bool) for ax in fig.axes[:4]]
    np.testing.assert_array_equal(drawn[0], content)
    np.testing.assert_array_equal(drawn[2], query)
    order = np.concatenate([np.argsort(ranks), N + np.argsort(ranks[predicted])])
    np.testing.assert_array_equal(drawn[1], content[np.ix_(order, order)])
    np.testing.assert_array_equal(drawn[3], query[np.ix_(np.argsort(ranks[predicted]), order)])
    # in permutation order the token block is: context columns full, then lower triangular
    tok = drawn[1][:N, :N]
    assert tok[:, :L].all()
    np.testing.assert_array_equal(tok[L:, L:], np.tril(np.ones((N - L, N - L), bool)))
    # query stream: strictly earlier tokens, own and later placeholders
    np.testing.assert_array_equal(drawn[3][:, L:N], np.tril(np.ones((P, P), bool), -1))
    np.testing.assert_array_equal(drawn[3][:, N:], np.triu(np.ones((P, P), bool)))
    texts = _texts(fig)
    assert any(t.startswith("MaPeT attention masks") for t in texts)
    assert {"may attend", "blocked"} <= set(_legend_labels(fig))
    assert "sorted by the sampled permutation" in viz.caption_of(fig)
    for ax in fig.axes[:4]:
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
        assert any("context" in t.get_text() or "patches" in t.get_text() for t in ax.get_xticklabels())
    with Image.open(tmp_path / "masks.png") as im:
        assert im.size == (int(fig.get_figwidth() * 100), int(fig.get_figheight() * 100))
    with pytest.raises(ValueError, match="index"):
        viz.plot_masks(batch, 3)


def test_plot_masks_pim_has_no_placeholders():
    batch = mapet.PermutationSampler(9, least_number=3, seed=0).sample(1)
    fig = viz.plot_masks(batch, positional_tokens=False)
    assert fig.axes[0].images[0].get_array().shape == (10, 10)
    assert fig.axes[2].images[0].get_array().shape == (7, 10)
    assert "placeholder" not in viz.caption_of(fig)


def test_plot_bars_labels_every_bar_with_its_value(tmp_path):
    table = {"from scratch": {"linear probe": 0.25, "fine-tune": 1.0},
             "MaPeT": {"linear probe": 0.5, "fine-tune": 0.875}}
    fig = viz.plot_bars(table, title="top-1", caption="what it shows", path=str(tmp_path / "bars.png"))
    ax = fig.axes[0]
    widths = sorted(round(p.get_width(), 6) for p in ax.patches)
    assert widths == sorted([25.0, 100.0, 50.0, 87.5])
    assert {"25.0%", "100.0%", "50.0%", "87.5%"} <= set(_texts(fig))
    assert [t.get_text() for t in ax.get_yticklabels()] == ["from scratch", "MaPeT"]
    assert _legend_labels(fig) == ["linear probe", "fine-tune"]
    assert ax.get_xlabel() == "top-1 accuracy (%)" and "top-1" in _texts(fig)
    assert viz.caption_of(fig) == "what it shows"
    assert (tmp_path / "bars.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="table"):
        viz.plot_bars({})


def test_plot_curves_panels_lines_and_legends(tmp_path):
    rising, falling = np.linspace(0, 1, 50), np.linspace(1, 0, 20) ** 2
    fig = viz.plot_curves({"pre-training": {"up": rising, "nan": [np.nan, 0.5, np.inf]},
                           "fine-tuning": {"down": falling}}, caption="loss per step", path=str(tmp_path / "c.png"))
    a, b = fig.axes[:2]
    assert [a.get_title(), b.get_title()] == ["pre-training", "fine-tuning"]
    np.testing.assert_array_equal(a.lines[0].get_ydata(), rising)
    np.testing.assert_array_equal(a.lines[0].get_xdata(), np.arange(50))
    nan_line = np.asarray(a.lines[1].get_ydata())
    assert np.isnan(nan_line[0]) and nan_line[1] == 0.5 and np.isnan(nan_line[2])
    np.testing.assert_array_equal(b.lines[0].get_ydata(), falling)
    assert set(_legend_labels(fig)) == {"up", "nan", "down"}
    assert a.get_xlabel() == "optimizer step" and a.get_ylabel() == "loss"
    assert viz.caption_of(fig) == "loss per step"
    single = viz.plot_curves({"x": [3.0, 2.0, 1.0]}, logy=True)
    assert single.axes[0].get_yscale() == "log" and _legend_labels(single) == ["x"]
    with pytest.raises(ValueError, match="curves"):
        viz.plot_curves({})


def test_image_rows_tiles_each_row_under_its_caption(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.random((3, 1, 4, 5)), rng.random((3, 3, 4, 5))
    fig = viz.image_rows([("inputs", a), ("reconstructions", b)], title="rows", caption="two rows",
                         path=str(tmp_path / "rows.png"))
    top, bottom = (np.asarray(ax.images[0].get_array()) for ax in fig.axes[1::2])
    assert top.shape == (4, 3 * 5 + 2, 3)
    for k in range(3):
        np.testing.assert_array_equal(top[:, k * 6:k * 6 + 5], np.repeat(a[k, 0][:, :, None], 3, axis=2))
        np.testing.assert_array_equal(bottom[:, k * 6:k * 6 + 5], b[k].transpose(1, 2, 0))
    assert (top[:, 5] == 1.0).all()  # white gap between images
    assert [ax.texts[0].get_text() for ax in fig.axes[0::2]] == ["inputs", "reconstructions"]
    assert viz.caption_of(fig) == "two rows"
    with pytest.raises(ValueError, match="images"):
        viz.image_rows([("bad", np.zeros((2, 2, 3, 3)))])


def test_figures_render_for_notebooks_and_save_atomically(tmp_path):
    fig = viz.plot_curves({"x": [1.0, 0.5]})
    png = fig._repr_png_()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    path = tmp_path / "sub" / "f.png"
    assert fig.save(str(path)) == str(path)
    with Image.open(path) as im:
        assert im.size == (1000, 520)
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.png"]  # no temporary left behind


def test_group_overlay_paints_merged_groups_only():
    x = np.full((1, 1, 8, 8), 0.5)
    g = np.array([[0, 0, 1, 2]])          # patches 0 and 1 merged; 2 and 3 alone
    out = viz.group_overlay(x, g, alpha=1.0)
    assert out.shape == (1, 3, 8, 8)
    np.testing.assert_array_equal(out[0, :, :4, :4], out[0, :, :4, 4:])     # one group, one colour
    assert not np.allclose(out[0, :, :4, :4], 0.5)
    np.testing.assert_array_equal(out[0, :, 4:, :], 0.5)                    # singletons untouched
    with pytest.raises(ValueError, match="membership must be"):
        viz.group_overlay(x, np.zeros((1, 3), int))


def test_confusion_figure_draws_row_shares_and_counts(tmp_path):
    counts = np.array([[5, 1, 0], [0, 0, 0], [2, 0, 9]])
    fig = viz.plot_confusion(counts, ["cat", "dog", "owl"], path=str(tmp_path / "c.png"))
    ax = fig.axes[0]
    drawn = np.asarray(ax.images[0].get_array())
    want = counts / np.maximum(counts.sum(1, keepdims=True), 1)  # an empty row stays 0, no NaN
    np.testing.assert_allclose(drawn, want)
    cells = sorted((round(t.get_position()[1]), round(t.get_position()[0]), t.get_text()) for t in ax.texts)
    assert cells == [(0, 0, "5"), (0, 1, "1"), (2, 0, "2"), (2, 2, "9")]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cat", "dog", "owl"]
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"
    assert "17 images, top-1 82.4%" in viz.caption_of(fig)
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match=r"matrix: expected \[3, 3\]"):
        viz.plot_confusion(np.zeros((2, 2)), ["a", "b", "c"])
