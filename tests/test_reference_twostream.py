"""Checks of the float64 reference forwards the model tests compare against (reference_twostream.py).

Its dense masks must equal the engine's rules, and its forwards must have the information
flow the rules demand: a prediction never depends on the pixels of its own patch or of any
patch ranked after it (MaPeT, PIM), and MIM predictions never see masked pixels.
"""
import numpy as np
import pytest

import mapet
import reference_twostream as R


@pytest.mark.parametrize("positional", [True, False])
@pytest.mark.parametrize("N,L", [(2, 1), (17, 1), (17, 16), (50, 13)])
def test_reference_masks_equal_engine_rules(positional, N, L):
    batch = mapet.PermutationSampler(N - 1, least_number=L, seed=N + L).sample(5)
    content, query, predicted = R.two_stream_masks(batch.orders, L, positional)
    assert (predicted == batch.predicted).all()
    for i in range(5):
        np.testing.assert_array_equal(content[i], batch.content_mask(i, positional))
        np.testing.assert_array_equal(query[i], batch.query_mask(i, positional))


def _patch_slice(t, grid=4, p=4):
    r, c = divmod(t - 1, grid)
    return np.s_[:, r * p:(r + 1) * p, c * p:(c + 1) * p]


@pytest.mark.parametrize("forward", [R.mapet_forward, R.pim_forward])
def test_two_stream_prediction_ignores_its_own_and_later_patches(forward):
    rng = np.random.default_rng(0)
    kind = "mapet" if forward is R.mapet_forward else "pim"
    w = R.random_weights(rng, kind=kind)
    L = 6
    batch = mapet.PermutationSampler(16, least_number=L, seed=4).sample(1)
    img = rng.standard_normal((1, 3, 16, 16))
    base = forward(w, img, batch.orders, L, 2)
    ranks, predicted = batch.ranks[0], batch.predicted[0]
    # perturb the patch of the predicted token with the middle rank
    j = int(np.argsort(batch.predicted_ranks[0])[len(predicted) // 2])
    t = int(predicted[j])
    img2 = img.copy()
    img2[0][_patch_slice(t)] += 3.0
    moved = np.abs(forward(w, img2, batch.orders, L, 2) - base).max(axis=-1)[0]
    for k, p in enumerate(predicted):
        if ranks[p] <= ranks[t]:
            assert moved[k] == 0.0, f"prediction of {p} (rank {ranks[p]}) saw patch {t} (rank {ranks[t]})"
        else:
            assert moved[k] > 1e-6, f"prediction of {p} ignores earlier patch {t}"


def test_mim_predictions_never_see_masked_pixels():
    rng = np.random.default_rng(1)
    w = R.random_weights(rng, kind="mim")
    mask = mapet.BlockMaskGenerator(4, 6, min_num_patches=2, seed=0).sample(2)
    img = rng.standard_normal((2, 3, 16, 16))
    base = R.mim_forward(w, img, mask, 2)
    assert base.shape == (2, 6, 11)
    img2 = img.copy()
    for b in range(2):
        for t in np.nonzero(mask[b])[0]:
            img2[b][_patch_slice(int(t) + 1)] = rng.standard_normal((3, 4, 4))
    np.testing.assert_array_equal(R.mim_forward(w, img2, mask, 2), base)
    t = int(np.nonzero(~mask[0])[0][0])  # a visible patch does matter
    img2[0][_patch_slice(t + 1)] += 1.0
    assert np.abs(R.mim_forward(w, img2, mask, 2) - base).max() > 1e-6


def test_losses_and_drop_path():
    rng = np.random.default_rng(2)
    w = R.random_weights(rng, kind="mapet", num_tokens=7)
    batch = mapet.PermutationSampler(16, least_number=10, upper_limit=12, seed=1).sample(3)
    img = rng.standard_normal((3, 3, 16, 16))
    tokens = rng.integers(0, 7, (3, 16))
    logits = R.mapet_forward(w, img, batch.orders, 10, 2)
    full = R.two_stream_loss(logits, tokens, batch.predicted)
    # mean CE written out per element
    ce = []
    for b in range(3):
        for j, p in enumerate(batch.predicted[b]):
            z = logits[b, j]
            ce.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[tokens[b, p - 1]])
    assert np.isclose(full, np.mean(ce), rtol=1e-12)
    kept = R.two_stream_loss(logits, tokens, batch.predicted, batch.loss_mask)
    assert np.isclose(kept, np.mean(np.array(ce)[batch.loss_mask.reshape(-1)]), rtol=1e-12)
    # drop path: ones change nothing; dropping every branch of one sample leaves x + pos only
    ones = np.ones((2, 2, 3))
    np.testing.assert_array_equal(R.mapet_forward(w, img, batch.orders, 10, 2, drop_path=ones), logits)
    dp = ones.copy()
    dp[:, :, 1] = 0.0
    dropped = R.mapet_forward(w, img, batch.orders, 10, 2, drop_path=dp)
    np.testing.assert_array_equal(dropped[[0, 2]], logits[[0, 2]])
    w64 = R.as_float64(w)
    g = w64["mask_positional_token"].reshape(-1) + w64["pos_embed"][0][batch.predicted[1]]
    want = R.linear(R.layer_norm(g, w64["norm.weight"], w64["norm.bias"]), w64, "decoder")
    np.testing.assert_allclose(dropped[1], want, rtol=1e-12)
