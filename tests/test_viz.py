"""PNG output: the encoder decodes back (by an independent zlib decoder and by Pillow) to the
same pixels; grids, masks and curves put the right pixels in the right places."""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mapet import viz
from mapet.viz import PALETTE, encode_png, image_grid, plot_curves, plot_masks, write_png


def _decode_png(data: bytes) -> np.ndarray:
    """Minimal PNG reader for what encode_png writes: checks signature and CRCs, unfilters."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, ihdr, kinds = 8, b"", None, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        kinds.append(kind)
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND"
    w, h, depth, color, _, _, interlace = ihdr
    assert depth == 8 and interlace == 0
    c = {0: 1, 2: 3, 6: 4}[color]
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * c)
    assert np.all(raw[:, 0] == 0)  # filter type None on every row
    return raw[:, 1:].reshape(h, w, c)


@pytest.mark.parametrize("shape", [(5, 7), (6, 4, 3), (3, 9, 4), (1, 1)])
def test_png_round_trip(tmp_path, shape):
    px = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    data = encode_png(px)
    back = _decode_png(data)
    np.testing.assert_array_equal(back.reshape(px.shape), px)
    write_png(str(tmp_path / "x.png"), px)
    with Image.open(tmp_path / "x.png") as im:  # a second, independent decoder
        np.testing.assert_array_equal(np.asarray(im).reshape(px.shape), px)


def test_png_rejects_bad_pixels():
    with pytest.raises(TypeError, match="uint8"):
        encode_png(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="expected"):
        encode_png(np.zeros((2, 2, 2), np.uint8))


def test_image_grid_places_each_image(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.random((5, 3, 4, 6))
    imgs[0, 0, 0, 0] = 1.7  # clipped to 1
    px = image_grid(str(tmp_path / "g.png"), imgs, nrow=3, padding=2, scale=2)
    assert px.shape == (2 * (8 + 2) + 2, 3 * (12 + 2) + 2, 3)
    np.testing.assert_array_equal(_decode_png((tmp_path / "g.png").read_bytes()), px)
    for k in range(5):
        r, c = divmod(k, 3)
        top, left = 2 + r * 10, 2 + c * 14
        tile = px[top:top + 8, left:left + 12]
        ref = np.clip(imgs[k], 0, 1).transpose(1, 2, 0).repeat(2, 0).repeat(2, 1)
        np.testing.assert_array_equal(tile, np.floor(ref * 255 + 0.5).astype(np.uint8))
    assert np.all(px[:2] == 255) and np.all(px[12:, 30:] == 255)  # padding and the empty 6th cell
    gray = image_grid(None, rng.random((2, 4, 4)), nrow=2)
    assert np.array_equal(gray[..., 0], gray[..., 1])


def test_plot_masks_draws_each_entry(tmp_path):
    rng = np.random.default_rng(2)
    content, query = rng.random((9, 9)) < 0.4, rng.random((3, 9)) < 0.6
    px = plot_masks(str(tmp_path / "m.png"), content, query, cell=3, gap=4)
    np.testing.assert_array_equal(_decode_png((tmp_path / "m.png").read_bytes()), px)
    assert px.shape == (9 * 3 + 4 + 3 * 3, 27, 3)
    top, bottom = px[:27, :, 0], px[31:, :, 0]
    np.testing.assert_array_equal(top[1::3, 1::3] == 0, content)
    np.testing.assert_array_equal(bottom[1::3, 1::3] == 0, query)
    with pytest.raises(ValueError, match="same number of columns"):
        plot_masks(str(tmp_path / "bad.png"), content, query[:, :5])


def test_plot_curves_numpy_backend(tmp_path):
    rising, falling = np.linspace(0, 1, 50), np.linspace(1, 0, 20) ** 2
    used = plot_curves(str(tmp_path / "c.png"), {"up": rising, "down": falling, "nan": [np.nan, 0.5]},
                       backend="numpy", width=300, height=200)
    assert used == "numpy"
    px = _decode_png((tmp_path / "c.png").read_bytes())
    assert px.shape == (200, 300, 3)
    plot = px[:170]  # above the legend strip

    def pixels_of(color):
        ys, xs = np.nonzero(np.all(plot == color, axis=2))
        return ys, xs

    ys, xs = pixels_of(PALETTE[0])  # "up": its left end lies lower on screen than its right end
    assert len(xs) > 100
    assert ys[xs == xs.min()].mean() > ys[xs == xs.max()].mean() + 100
    ys, xs = pixels_of(PALETTE[1])  # "down" decreases
    assert ys[xs == xs.min()].mean() < ys[xs == xs.max()].mean() - 100
    legend = px[180:192]
    for k in range(3):
        assert np.any(np.all(legend == PALETTE[k], axis=2))
    with pytest.raises(ValueError, match="no curves"):
        plot_curves(str(tmp_path / "e.png"), {})


def test_plot_bars_numpy_heights_follow_values(tmp_path):
    path = tmp_path / "bars.png"
    table = {"scratch": {"probe": 0.25, "fine-tune": 1.0}, "mapet": {"probe": 0.5, "fine-tune": 0.0}}
    assert viz.plot_bars(str(path), table, backend="numpy", width=200, height=140) == "numpy"
    pixels = _decode_png(path.read_bytes())
    plot_h = 140 - 2 * 20
    for j, expected in enumerate([[0.25, 1.0], [0.5, 0.0]]):  # rows
        for k, v in enumerate(expected):  # columns → colours
            colour = viz.PALETTE[k]
            match = np.all(pixels == colour, axis=-1)
            group = slice(20 + int(j * 80), 20 + int((j + 1) * 80))
            heights = match[:, group].sum(axis=0)
            assert heights.max() == int(round(v * plot_h)), (j, k, heights.max())


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
