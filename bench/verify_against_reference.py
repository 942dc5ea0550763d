"""Cross-check against the original MaPeT code (aimagelab/MaPeT), not part of the test run.

Needs torch + timm (the peer venv) and a checkout of https://github.com/aimagelab/MaPeT:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv-bench/bin/python \
        bench/verify_against_reference.py /path/to/MaPeT

Checks that (1) mapet's content/query masks equal the reference's
``attention_mask_full_mapet_1`` (additive 0 / -1e30) for sampled permutations, (2) the
``upper_limit`` selection equals the reference's ``index_vector & upper_values``, (3) the
reference model's state_dict keys equal those of tests/reference_twostream.random_weights and
(4) its logits equal tests/reference_twostream.mapet_forward in float64.
"""
import importlib.util
import os
import sys
import types
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import mapet  # noqa: E402
import reference_twostream as R  # noqa: E402


def load_reference(root):
    import timm.layers
    import torch  # noqa: F401
    # The reference imports timm 0.6 module paths; alias the two that timm 1.x dropped.
    for name, attrs in {"timm.models.layers.helpers": {"to_2tuple": timm.layers.to_2tuple},
                        "timm.models.layers.trace_utils": {"_assert": timm.layers._assert}}.items():
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        sys.modules.setdefault(name, mod)
    spec = importlib.util.spec_from_file_location("mapet_reference_model", os.path.join(root, "models/mapet/mapet.py"))
    model_module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = model_module
    spec.loader.exec_module(model_module)
    spec = importlib.util.spec_from_file_location("mapet_reference_utils", os.path.join(root, "utils/models.py"))
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    return model_module, utils.attention_mask_full_mapet_1


def main(root):
    import torch
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    model_module, reference_masks = load_reference(root)
    n, N, L, H, B = 16, 17, 5, 2, 3

    batch = mapet.PermutationSampler(n, least_number=L, seed=1).sample(B)
    mq, mh, iv = [], [], []
    for b in range(B):
        q, h, index_vector, _ = reference_masks(torch.from_numpy(batch.orders[b] + 1), H, L, N)
        assert ((q[0] == 0).numpy() == batch.query_mask(b)).all(), "query mask differs"
        assert ((h[0] == 0).numpy() == batch.content_mask(b)).all(), "content mask differs"
        assert (np.nonzero(index_vector.numpy())[0] == batch.predicted[b]).all()
        mq.append(q), mh.append(h), iv.append(index_vector)
    print("masks: equal to attention_mask_full_mapet_1")

    limited = mapet.PermutationSampler(n, least_number=L, upper_limit=10, seed=2).sample(8)
    for b in range(8):
        _, _, index_vector, upper = reference_masks(torch.from_numpy(limited.orders[b] + 1), H, L, 10)
        assert (np.nonzero((index_vector & upper).numpy())[0] == limited.predicted[b][limited.loss_mask[b]]).all()
    print("upper_limit: same selection as the reference")

    rng = np.random.default_rng(0)
    w = R.random_weights(rng, kind="mapet")
    model = model_module.XLeiTPositionalAugmented(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=H,
                                                  ntoken=11, init_values=0.5, least_number=L).double().eval()
    sd = model.state_dict()
    assert set(sd) == set(w), sorted(set(sd) ^ set(w))
    model.load_state_dict({k: torch.from_numpy(v.astype(np.float64)).reshape(sd[k].shape) for k, v in w.items()})
    images = rng.standard_normal((B, 3, 16, 16))
    with torch.no_grad():
        ref = model(torch.from_numpy(images), torch.stack(mq).double(), torch.stack(mh).double(),
                    torch.stack(iv)).transpose(-2, -1).numpy()
    ours = R.mapet_forward(w, images, batch.orders, L, H)
    diff = np.abs(ref - ours).max()
    print(f"forward: state_dict keys equal; logits {ours.shape}, max |diff| {diff:.2e}")
    assert diff < 1e-10


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
