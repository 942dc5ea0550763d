"""The single-kernel wrappers (`mapet.ops`) at the boundary: the engine sizes every output the caller
leaves out, and every refused call is a TypeError/ValueError/MemoryError from the engine that names
the argument, what it expected and what arrived (Python only converts inputs)."""
import gc
import re

import numpy as np
import pytest

from mapet import ops
from mapet._native import _core

f32 = np.float32
X = np.ones((3, 4), f32)
Q, KV = np.ones((2, 3, 4), f32), np.ones((2, 5, 4), f32)
PROBS = np.full((2, 2, 3, 5), 0.2, f32)
IMG, W = np.ones((2, 3, 8, 8), f32), np.ones((5, 3, 4, 4), f32)
PATCHES = np.ones((2, 4, 48), f32)


def _strided(shape):
    """A float32 array of `shape` that is not C-contiguous (every other column of a wider one)."""
    return np.zeros(shape[:-1] + (2 * shape[-1],), f32)[..., ::2]


HOSTILE = [
    # wrong ndim
    ("matmul a 1-d", lambda: ops.matmul(np.ones(4, f32), X), ValueError, r"^a: expected .*\[\*, \*\], got 1-d"),
    ("layer_norm x 1-d", lambda: ops.layer_norm(np.ones(4, f32), np.ones(4, f32), np.ones(4, f32)),
     ValueError, r"^x: expected .*\[\*, \*\], got 1-d"),
    ("softmax x 3-d", lambda: ops.softmax(Q), ValueError, r"^x: .*got 3-d"),
    ("attention q 2-d", lambda: ops.attention(X, KV, KV, 2), ValueError, r"^q: .*got 2-d"),
    ("patch_embed images 3-d", lambda: ops.patch_embed(IMG[0], W), ValueError, r"^images: .*got 3-d"),
    ("residual x 2-d", lambda: ops.residual(X, X), ValueError, r"^x: .*got 2-d"),
    ("cross_entropy logits 1-d", lambda: ops.cross_entropy(np.ones(3, f32), np.zeros(3, int)), ValueError, r"^logits: "),
    # mismatched shapes
    ("matmul inner", lambda: ops.matmul(X, X), ValueError, r"^b: expected op\(b\) with 4 rows .*got op\(b\) \[3, 4\]"),
    ("gelu_backward x", lambda: ops.gelu_backward(X, X.T), ValueError, r"^x: expected .*\[3, 4\], got shape \[4, 3\]"),
    ("layer_norm weight", lambda: ops.layer_norm(X, np.ones(5, f32), np.ones(4, f32)), ValueError, r"^weight: .*\[4\]"),
    ("linear weight", lambda: ops.linear(X, np.ones((5, 3), f32)), ValueError, r"^weight: .*\[\*, 4\], got shape \[5, 3\]"),
    ("linear_backward dout", lambda: ops.linear_backward(np.ones((3, 6), f32), X, np.ones((5, 4), f32)),
     ValueError, r"^dout: .*\[3, 5\]"),
    ("attention v", lambda: ops.attention(Q, KV, KV[:, :4], 2), ValueError, r"^v: .*\[2, 5, 4\]"),
    ("attention heads", lambda: ops.attention(Q, KV, KV, 3), ValueError, r"^heads: "),
    ("attention mask", lambda: ops.attention(Q, KV, KV, 2, mask=np.ones((2, 3, 4), bool)), ValueError, r"^mask: .*\[2, 3, 5\]"),
    ("attention_backward probs", lambda: ops.attention_backward(Q, PROBS[:, :1], Q, KV, KV, 2), ValueError, r"^probs: "),
    ("dropout mask", lambda: ops.dropout(X, np.ones(3, f32)), ValueError, r"^mask: expected .*\[3, 4\], got 1-d"),
    ("drop_path keep", lambda: ops.drop_path(X, np.ones(4, f32)), ValueError, r"^keep: expected .*\[3\]"),
    ("patch_embed image side", lambda: ops.patch_embed(np.ones((2, 3, 6, 6), f32), W), ValueError, r"^images: .*divisible by 4"),
    ("patch_embed_backward patches", lambda: ops.patch_embed_backward(np.ones((2, 4, 5), f32), PATCHES[..., :47], W, 8),
     ValueError, r"^patches: .*\[\*, 4, 48\]"),
    ("mean_pool_backward dx", lambda: ops.mean_pool_backward(np.ones((2, 4), f32), 5, dx=np.zeros((2, 4, 4), f32)),
     ValueError, r"^dx: expected .*\[2, 5, 4\], got shape \[2, 4, 4\]"),
    ("cross_entropy targets", lambda: ops.cross_entropy(X, np.zeros(4, int)), ValueError, r"^targets: .*\[3\]"),
    # wrong dtype / kind of output
    ("gelu out float64", lambda: ops.gelu(X, out=np.zeros((3, 4))), TypeError, r"^out: expected a float32 .*got dtype float64"),
    ("matmul out int32", lambda: ops.matmul(X, X.T, np.zeros((3, 3), np.int32)), TypeError, r"^out: .*got dtype int32"),
    ("linear_backward dweight float64", lambda: ops.linear_backward(X, X, np.ones((4, 4), f32), dweight=np.zeros((4, 4))),
     TypeError, r"^dweight: .*float64"),
    ("attention_backward dk list", lambda: ops.attention_backward(Q, PROBS, Q, KV, KV, 2, dk=[0.0]), TypeError, r"^dk: .*got list"),
    ("softmax_backward dx read-only", lambda: ops.softmax_backward(X, X, dx=np.broadcast_to(np.zeros(4, f32), (3, 4))),
     ValueError, r"^dx: expected a writable array"),
    # non-contiguous outputs (the engine would write past a strided view)
    ("gelu out strided", lambda: ops.gelu(X, out=_strided((3, 4))), ValueError, r"^out: expected a C-contiguous array"),
    ("layer_norm_backward dx strided", lambda: ops.layer_norm_backward(X, X, np.ones(4, f32), np.ones(3, f32),
                                                                       np.ones(3, f32), dx=_strided((3, 4))),
     ValueError, r"^dx: expected a C-contiguous"),
    ("residual_backward dbranch strided", lambda: ops.residual_backward(Q, Q, dbranch=_strided((2, 3, 4))),
     ValueError, r"^dbranch: expected a C-contiguous"),
    ("patch_embed_backward dimages strided", lambda: ops.patch_embed_backward(np.ones((2, 4, 5), f32), PATCHES, W, 8,
                                                                             dimages=_strided((2, 3, 8, 8))),
     ValueError, r"^dimages: expected a C-contiguous"),
    ("matmul out with strided columns", lambda: ops.matmul(X, X.T, _strided((3, 3))), ValueError, r"^out: expected rows with unit stride"),
    # sizes: negative, overflowing, larger than the machine
    ("drop_path_keep batch -1", lambda: ops.drop_path_keep(-1, 0.1), ValueError, r"^batch: expected an int ≥ 0, got -1"),
    ("dropout_mask shape -1", lambda: ops.dropout_mask((3, -1), 0.1), ValueError, r"^shape\[1\]: expected an int ≥ 0, got -1"),
    ("dropout_mask shape float", lambda: ops.dropout_mask((3, 2.0), 0.1), TypeError, r"^shape\[1\]: expected an int, got float"),
    ("dropout_mask overflow", lambda: ops.dropout_mask((2**40, 2**40), 0.1), ValueError, r"^mask: the size .* does not fit in 64 bits"),
    ("dropout_mask 2**64", lambda: ops.dropout_mask((2**64,), 0.1), ValueError, r"^shape\[0\]: too large"),
    ("dropout_mask beyond memory", lambda: ops.dropout_mask((2**50,), 0.1), MemoryError, r"^dropout_mask: mask \[.*would need"),
    ("dropout_mask 9 dimensions", lambda: ops.dropout_mask((1,) * 9, 0.1), ValueError, r"^mask: expected at most 8 dimensions"),
    ("mean_pool_backward tokens 0", lambda: ops.mean_pool_backward(np.ones((2, 4), f32), 0), ValueError, r"^tokens: "),
    ("mean_pool_backward tokens 2**62", lambda: ops.mean_pool_backward(np.ones((2, 4), f32), 2**62), ValueError,
     r"^dx: the size .* does not fit"),
    ("patch_embed_backward img_size 2**40", lambda: ops.patch_embed_backward(np.ones((2, 4, 5), f32), PATCHES, W, 2**40),
     ValueError, r"^img_size: "),
    # everything else the Python layer used to check
    ("matmul beta without out", lambda: ops.matmul(X, X.T, beta=1.0), ValueError, r"^out: beta=1.0 reads out"),
    ("matmul precision", lambda: ops.matmul(X, X.T, precision="fp16"), ValueError, r"^precision: expected 'fp32' or 'bf16'"),
    ("attention precision", lambda: ops.attention(Q, KV, KV, 2, precision="half"), ValueError, r"^precision: "),
    ("input None", lambda: ops.softmax(None), TypeError, r"^x: expected an array, got None"),
]


@pytest.mark.parametrize("call, exc, pattern", [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_calls_are_refused_by_the_engine_naming_the_argument(call, exc, pattern):
    with pytest.raises(exc) as info:
        call()
    assert re.search(pattern, str(info.value)), str(info.value)


def test_a_refused_call_keeps_none_of_the_outputs_it_already_allocated():
    gc.collect()
    before = _core.live_storages()
    # dx and dweight are allocated by the engine before dbias (wrong shape) is refused
    with pytest.raises(ValueError, match=r"^dbias: "):
        ops.layer_norm_backward(X, X, np.ones(4, f32), np.ones(3, f32), np.ones(3, f32), dbias=np.zeros(5, f32))
    with pytest.raises(ValueError, match=r"^dv: "):
        ops.attention_backward(Q, PROBS, Q, KV, KV, 2, dv=np.zeros((2, 5, 3), f32))
    assert _core.live_storages() == before


def test_zero_size_dimensions_give_empty_results_of_the_right_shape():
    e = np.zeros((0, 4), f32)
    assert ops.matmul(e, np.ones((4, 3), f32)).shape == (0, 3)
    assert ops.matmul(np.ones((3, 0), f32), np.ones((0, 2), f32)).tolist() == [[0, 0]] * 3  # K = 0: zeros
    assert ops.gelu(np.zeros((2, 0, 3), f32)).shape == (2, 0, 3)
    assert [a.shape for a in ops.layer_norm(e, np.ones(4, f32), np.zeros(4, f32))] == [(0, 4), (0,), (0,)]
    assert [a.shape for a in ops.linear_backward(np.zeros((0, 5), f32), e, np.ones((5, 4), f32))] == [(0, 4), (5, 4), (5,)]
    d = ops.linear_backward(np.zeros((0, 5), f32), e, np.ones((5, 4), f32))
    assert not d[1].any() and not d[2].any()  # nothing to accumulate: the new gradients stay zero
    q = np.zeros((0, 3, 4), f32)
    out, probs = ops.attention(q, np.zeros((0, 5, 4), f32), np.zeros((0, 5, 4), f32), 2)
    assert out.shape == (0, 3, 4) and probs.shape == (0, 2, 3, 5)
    assert ops.drop_path_keep(0, 0.5).shape == (0,)
    assert ops.dropout_mask((2, 0), 0.5).shape == (2, 0)
    assert ops.drop_path(np.zeros((0, 3), f32), np.zeros(0, f32)).shape == (0, 3)
    assert ops.mean_pool_backward(np.zeros((0, 4), f32), 5).shape == (0, 5, 4)
    loss, losses, p = ops.cross_entropy(np.zeros((0, 3), f32), np.zeros(0, int))
    assert loss == 0.0 and losses.shape == (0,) and p.shape == (0, 3)
    dimages, dweight, dbias = ops.patch_embed_backward(np.zeros((0, 4, 5), f32), np.zeros((0, 4, 48), f32), W, 8)
    assert dimages.shape == (0, 3, 8, 8) and dweight.shape == W.shape and not dweight.any() and not dbias.any()


def test_given_outputs_are_written_in_place_and_returned_as_themselves():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 4)).astype(f32), rng.standard_normal((5, 4)).astype(f32)
    dout = rng.standard_normal((3, 5)).astype(f32)
    new = ops.linear_backward(dout, x, w)
    given = tuple(np.ones(s, f32) for s in ((3, 4), (5, 4), (5,)))
    back = ops.linear_backward(dout, x, w, *given)
    assert all(b is g for b, g in zip(back, given))
    for b, n in zip(back, new):  # accumulated onto the ones (summed in another order); new ones start at zero
        np.testing.assert_allclose(b, np.float32(1) + n, rtol=0, atol=4 * np.finfo(f32).eps * (1 + np.abs(n).max()))
    # references in float64, written here: dx = dout·w, dweight = doutᵀ·x, dbias = Σ dout
    d64, x64, w64 = dout.astype(np.float64), x.astype(np.float64), w.astype(np.float64)
    for n, ref in zip(new, (d64 @ w64, d64.T @ x64, d64.sum(0))):
        np.testing.assert_allclose(n, ref, rtol=1e-5, atol=1e-5)
    out = np.full((3, 3), 7, f32)
    assert ops.matmul(x, x, out, trans_b=True) is out
    np.testing.assert_allclose(out, x.astype(np.float64) @ x.astype(np.float64).T, rtol=1e-5, atol=1e-5)
    # a column slice with contiguous rows is a valid GEMM output and is written in place
    big = np.zeros((3, 6), f32)
    assert ops.matmul(x, x, big[:, :3], trans_b=True).base is big
    np.testing.assert_array_equal(big[:, :3], out)
    assert not big[:, 3:].any()


def test_elementwise_outputs_keep_the_input_shape():
    x = np.linspace(-3, 3, 24, dtype=f32).reshape(2, 3, 4)
    g = ops.gelu(x)
    assert g.shape == x.shape
    from math import erf, sqrt
    ref = np.array([v * 0.5 * (1 + erf(v / sqrt(2))) for v in x.astype(np.float64).ravel()]).reshape(x.shape)
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6)
    m = ops.dropout_mask((2, 3, 4), 0.5, seed=1)
    assert m.shape == (2, 3, 4) and set(np.unique(m)) <= {0.0, 2.0}
    np.testing.assert_array_equal(ops.dropout(x, m), x * m)
    keep = np.array([0.0, 2.0], f32)
    np.testing.assert_array_equal(ops.drop_path(x, keep), x * keep[:, None, None])
    np.testing.assert_array_equal(ops.drop_path_backward(x, keep), x * keep[:, None, None])
