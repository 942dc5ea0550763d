"""BEiT-family reference layout (fused qkv, q_bias/v_bias, gamma_1/2) ↔ mapet names."""
import numpy as np
import pytest

import mapet
from mapet.interop import from_beit_layout, is_beit_layout, to_beit_layout

ARCH = dict(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, drop_path_rate=0.0)
BLOCK_KEYS = {"norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.q_bias", "attn.v_bias", "attn.proj.weight",
              "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
              "mlp.fc2.bias", "gamma_1", "gamma_2"}


def _randomize(model, seed, key_bias=0.0):
    rng = np.random.default_rng(seed)
    C = model.config["embed_dim"]
    for k, v in model.state_dict().items():
        v[...] = rng.standard_normal(v.shape).astype(np.float32) * (0.3 if v.ndim > 1 else 0.1)
        if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k.endswith("norm.weight"):
            v += 1
        if k.endswith("attn.kv.bias"):
            v[:C] = key_bias * rng.standard_normal(C)
    return model


def test_reference_names_of_ccvit_follow_the_beit_blocks():
    m = mapet.create_model("ccvit_tiny_patch16_224", num_tokens=11, early_layers=1, head_layers=2, **ARCH)
    ref = to_beit_layout(m.state_dict())
    expected = {"cls_token", "mask_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                "norm.weight", "norm.bias", "lm_head.weight", "lm_head.bias", "cls_pt_norm.weight",
                "cls_pt_norm.bias", "cls_pt_lm_head.weight", "cls_pt_lm_head.bias"}
    for pre in ("blocks.0.", "blocks.1.", "cls_pt_layers.0.", "cls_pt_layers.1."):
        expected |= {pre + k for k in BLOCK_KEYS}
    assert set(ref) == expected
    assert ref["blocks.0.attn.qkv.weight"].shape == (48, 16) and ref["blocks.1.attn.v_bias"].shape == (16,)
    assert is_beit_layout(ref) and not is_beit_layout(m.state_dict())


@pytest.mark.parametrize("name", ["ccvit_tiny_patch16_224", "dtm_tiny_patch16_224", "beit_tiny_patch16_224"])
def test_round_trip_is_exact(name):
    m = _randomize(mapet.create_model(name, **ARCH), 1)
    back = from_beit_layout(to_beit_layout(m.state_dict()))
    assert sorted(back) == sorted(m.state_dict())
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    m2 = mapet.create_model(name, **ARCH)
    m2.load_state_dict(back)  # strict names and shapes


def _beit_layout_dtm_forward(w, images, num_heads):
    """float64 DTM student forward written against the fused reference layout."""
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    B, _, S, _ = images.shape
    C, _, P, _ = w["patch_embed.proj.weight"].shape
    g = S // P
    x = images.astype(np.float64).reshape(B, 3, g, P, g, P).transpose(0, 2, 4, 1, 3, 5).reshape(B, g * g, -1)
    x = x @ w["patch_embed.proj.weight"].reshape(C, -1).T + w["patch_embed.proj.bias"]
    x = np.concatenate([np.broadcast_to(w["cls_token"].reshape(1, 1, C), (B, 1, C)), x], 1) + w["pos_embed"]

    def ln(v, pre):
        mu, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
        return (v - mu) / np.sqrt(var + 1e-6) * w[pre + ".weight"] + w[pre + ".bias"]

    i = 0
    while f"blocks.{i}.attn.qkv.weight" in w:
        pre = f"blocks.{i}."
        h = ln(x, pre + "norm1")
        bias = np.concatenate([w[pre + "attn.q_bias"], np.zeros(C), w[pre + "attn.v_bias"]])
        qkv = (h @ w[pre + "attn.qkv.weight"].T + bias).reshape(B, -1, 3, num_heads, C // num_heads)
        q, k, v = (qkv[:, :, j].transpose(0, 2, 1, 3) for j in range(3))
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(C // num_heads)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = (a @ v).transpose(0, 2, 1, 3).reshape(B, -1, C) @ w[pre + "attn.proj.weight"].T + w[pre + "attn.proj.bias"]
        x = x + w[pre + "gamma_1"] * o
        h = ln(x, pre + "norm2") @ w[pre + "mlp.fc1.weight"].T + w[pre + "mlp.fc1.bias"]
        from math import erf
        h = 0.5 * h * (1 + np.vectorize(erf)(h / np.sqrt(2)))
        x = x + w[pre + "gamma_2"] * (h @ w[pre + "mlp.fc2.weight"].T + w[pre + "mlp.fc2.bias"])
        i += 1
    return ln(x, "norm")[:, 1:] @ w["lm_head.weight"].T + w["lm_head.bias"]


def test_exported_weights_give_the_same_outputs_in_the_reference_layout():
    # mapet's key bias (non-zero here on purpose) has no effect; the fused layout reproduces the
    # student's predictions in float64.
    m = _randomize(mapet.create_model("dtm_tiny_patch16_224", output_dim=6, **ARCH), 2, key_bias=0.5)
    x = np.random.default_rng(3).random((2, 3, 16, 16)).astype(np.float32)
    ref = _beit_layout_dtm_forward(to_beit_layout(m.state_dict()), x, 2)
    got = m(x)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_pretrained_from_a_beit_layout_checkpoint(tmp_path):
    src = _randomize(mapet.create_model("ccvit_tiny_patch16_224", num_tokens=11, early_layers=1, **ARCH), 4)
    path = str(tmp_path / "ref.safetensors")
    mapet.io.save_file(to_beit_layout(src.state_dict()), path)
    vit = mapet.create_model("vit_tiny_patch16_224", pretrained=path, global_pool="token", init_values=0.1, **ARCH)
    assert not [k for k in vit.pretrained_report["missing"] if k.startswith("blocks.")]
    own = mapet.create_model("vit_tiny_patch16_224", pretrained=src.state_dict(), global_pool="token",
                             init_values=0.1, **ARCH)
    x = np.random.default_rng(5).random((2, 3, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(vit.forward_features(x), own.forward_features(x))
