"""Transfer from pre-training to fine-tuning keeps every trunk tensor, or says why it cannot."""
import numpy as np
import pytest

import mapet
from mapet.interop import to_beit_layout
from mapet.models import is_trunk_key

SMALL = dict(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=3)


def _trained_like(model, seed=1):
    """Give every parameter distinct random values (a freshly built model has equal gammas)."""
    rng = np.random.default_rng(seed)
    for v in model.state_dict().values():
        v[...] = rng.standard_normal(v.shape).astype(np.float32)
    return model


@pytest.mark.parametrize("kind", ["mapet", "beit", "ccvit", "dtm"])
def test_pretrained_checkpoint_keeps_every_trunk_tensor(kind, tmp_path):
    extra = {"dtm": dict(output_dim=8)}.get(kind, dict(num_tokens=8))
    src = _trained_like(mapet.create_model(f"{kind}_tiny_patch16_224", **SMALL, **extra))
    path = str(tmp_path / "pre.safetensors")
    src.save(path)
    # no architecture given: the checkpoint's config decides (LayerScale included)
    vit = mapet.create_model("vit_tiny_patch16_224", num_classes=5, pretrained=path)
    mine, theirs = vit.state_dict(), src.state_dict()
    trunk = [k for k in theirs if is_trunk_key(k)]
    assert any(k.endswith("ls1.gamma") for k in trunk)
    for k in trunk:
        assert np.array_equal(mine[k], theirs[k]), k
    assert np.array_equal(mine["norm.weight"], theirs["norm.weight"])  # token pooling keeps the final norm
    report = vit.pretrained_report
    assert sorted(report["loaded"]) == sorted(trunk + ["norm.weight", "norm.bias"])
    assert not any(is_trunk_key(k) for k in report["skipped"])
    assert sorted(report["missing"]) == ["head.bias", "head.weight"]
    assert vit.config["init_values"] is not None and vit.config["depth"] == 2 and vit.config["img_size"] == 16


def test_readme_case_skips_only_the_decoder_and_the_positional_token(tmp_path):
    src = mapet.create_model("mapet_tiny_patch16_224", img_size=32, patch_size=4, depth=2, num_tokens=16,
                             least_number=16)
    path = str(tmp_path / "mapet.safetensors")
    src.save(path)
    vit = mapet.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, num_classes=10,
                             pretrained=path)
    assert sorted(vit.pretrained_report["skipped"]) == ["decoder.bias", "decoder.weight", "mask_positional_token"]


def test_avg_pool_skips_the_final_norm_as_a_head(tmp_path):
    src = _trained_like(mapet.create_model("mapet_tiny_patch16_224", **SMALL, num_tokens=8))
    vit = mapet.create_model("vit_tiny_patch16_224", num_classes=3, global_pool="avg", pretrained=src.state_dict())
    assert sorted(vit.pretrained_report["skipped"]) == ["decoder.bias", "decoder.weight", "mask_positional_token",
                                                        "norm.bias", "norm.weight"]
    assert "fc_norm.weight" in vit.pretrained_report["missing"]


def test_a_bare_state_dict_gives_its_architecture_by_shape():
    src = _trained_like(mapet.create_model("beit_tiny_patch16_224", **SMALL, num_tokens=8))
    vit = mapet.create_model("vit_tiny_patch16_224", num_classes=3, num_heads=3,
                             pretrained=dict(src.state_dict()))
    c = vit.config
    assert (c["img_size"], c["patch_size"], c["embed_dim"], c["depth"], c["mlp_ratio"]) == (16, 4, 24, 2, 4.0)
    assert c["init_values"] is not None
    for k, v in src.state_dict().items():
        if is_trunk_key(k):
            assert np.array_equal(vit.state_dict()[k], v), k
    # the BEiT reference layout (fused qkv, gamma_1/2) transfers the same way
    ref = mapet.create_model("vit_tiny_patch16_224", num_classes=3, pretrained=to_beit_layout(src.state_dict()))
    for k in ("blocks.1.ls2.gamma", "blocks.0.attn.q.weight", "blocks.0.attn.kv.weight", "pos_embed"):
        np.testing.assert_array_equal(ref.state_dict()[k], src.state_dict()[k])


def test_a_trunk_tensor_that_does_not_fit_is_an_error(tmp_path):
    src = mapet.create_model("mapet_tiny_patch16_224", **SMALL, num_tokens=8)
    path = str(tmp_path / "pre.safetensors")
    src.save(path)
    with pytest.raises(ValueError, match=r"blocks\.0\.ls1\.gamma"):
        mapet.create_model("vit_tiny_patch16_224", num_classes=3, init_values=None, pretrained=path)
    with pytest.raises(ValueError, match=r"pos_embed \[1, 17, 24\] \(model: \[1, 65, 24\]\)"):
        mapet.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32, pretrained=path)
    with pytest.raises(ValueError, match="trunk tensor"):
        mapet.create_model("vit_tiny_patch16_224", num_classes=3, depth=1, pretrained=path)
    # the library call can still load partially when asked to
    vit = mapet.create_model("vit_tiny_patch16_224", num_classes=3, depth=1)
    report = mapet.models.load_pretrained(vit, path, strict_trunk=False)
    assert "blocks.1.attn.q.weight" in report["skipped"]


def test_predict_gives_the_argmax_class_and_probabilities():
    vit = mapet.create_model("vit_tiny_patch16_224", **SMALL, num_classes=4)
    x = np.random.default_rng(0).random((7, 3, 16, 16), dtype=np.float32)
    logits = vit(x).astype(np.float64)
    assert np.array_equal(vit.predict(x, batch_size=3), np.argmax(logits, 1))
    p = vit.predict(x, batch_size=2, probabilities=True)
    ref = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(p, ref / ref.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="batch_size"):
        vit.predict(x, batch_size=0)
    with pytest.raises(ValueError, match="4-d"):
        vit.predict(x[0])
