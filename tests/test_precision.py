"""Mixed precision (ALGORITHMS.md §7, issue 14): ``precision="bf16"`` rounds the inputs of every matrix
product to bfloat16 and accumulates in fp32; everything else stays fp32.

References: the float64 NumPy transcriptions of the models (tests/test_vit.py ``reference_step``
with ``bf16=True``; tests/reference_twostream.py and reference_objectives.py inside
``bf16_matmuls()``) round the same matmul inputs to bf16 and multiply in float64.

Tolerances, from bf16 rounding (one rounding has relative error ≤ 2⁻⁸; one bf16 ulp is ≤ 2⁻⁷
relative):
* engine vs the bf16 reference: both round the same values, so they differ only by fp32
  arithmetic (≈ 2⁻²⁴ relative per operation) — except where that tiny difference moves an
  activation across a bf16 rounding boundary and the rounded input changes by one ulp. Such
  flips are rare and sparse, so (a) the *median* element error must stay at fp32 level: at most
  2⁻⁸ of the median effect of bf16 rounding itself (|bf16 reference − exact reference|, made of
  2⁻⁸-sized roundings; fp32 vs bf16 precision is a factor 2⁻¹⁶, so 2⁻⁸ leaves room and still
  tells an engine that skips the rounding of any product apart); (b) the *largest* error may
  reach the effect of a flipped rounding: ≤ 2⁻⁷ of the output scale (one bf16 ulp).
  (a) relies on the short reductions of these tiny models (≤ 4·17 rows per weight gradient):
  in long ones every gradient element sums over rows where a flip happened, plus fp32
  accumulation error, and the ratio grows (≈ 1/20 measured at 64·17 rows, still far from 1).
* bf16 vs fp32 engine: "of bf16 size" — at least 2⁻¹² (far above fp32's ≈ 2⁻²⁰ noise) and at
  most 2⁻⁴ relative (sixteen bf16 roundings, for the ~15 chained products of these models).
The median/maximum statistics hold whatever the accumulation order of the bf16 kernel.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_objectives as ro  # noqa: E402
import reference_twostream as ref  # noqa: E402
import test_ccvit_dtm_models as tcd  # noqa: E402
import test_pretrain_models as tpm  # noqa: E402
import test_vit as tv  # noqa: E402

import mapet  # noqa: E402
from mapet.data import load_digits  # noqa: E402
from mapet.io import load_file  # noqa: E402
from mapet.train import evaluate, finetune, linear_probe, pretrain  # noqa: E402

from _helpers import TINY_VIT as FT, digits_subset, finetune_tiny  # noqa: E402

ACTIVE = mapet.bf16_info()["active"]
needs_bf16 = pytest.mark.skipif(
    not ACTIVE, reason="bf16 products are not active in this process (MAPET_BF16=off or no bf16 kernel on this "
                       "CPU); test_fallback_* and test_a_bf16_request_runs_bf16_when_active_* cover that path")

MEDIAN_RATIO, MAX_TOL = 2.0 ** -8, 2.0 ** -7
BF16_SIZE = (2.0 ** -12, 2.0 ** -4)


def check_follows_bf16_reference(got, want16, want64, what):
    """Criteria (a) and (b) of the module docstring for one output tensor."""
    got, want16, want64 = (np.asarray(a, np.float64) for a in (got, want16, want64))
    scale = float(np.abs(want16).max())
    med = float(np.median(np.abs(got - want16)))
    bf16_effect = float(np.median(np.abs(want16 - want64)))
    worst = float(np.abs(got - want16).max()) / scale
    assert bf16_effect > 2.0 ** -20 * scale, f"{what}: bf16 rounding has no visible effect here ({bf16_effect:.2e})"
    assert med <= MEDIAN_RATIO * bf16_effect, f"{what}: median error {med:.2e} vs the bf16 reference, bf16 effect {bf16_effect:.2e}"
    assert worst <= MAX_TOL, f"{what}: largest error {worst:.2e} of the output scale vs the bf16 reference"


def bf16_size(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ------------------------------------------------------------------ the switch

def test_precision_is_a_validated_settable_property():
    vit = mapet.create_model("vit_tiny_patch16_224", depth=1, img_size=16, patch_size=4)
    assert vit.precision == "fp32"
    vit.precision = "bf16"
    assert vit.precision == "bf16"
    assert mapet.create_model("vit_tiny_patch16_224", depth=1, precision="bf16").precision == "bf16"
    for name in ("mapet", "pim", "beit", "ccvit", "dtm"):
        m = mapet.create_model(f"{name}_tiny_patch16_224", depth=2, img_size=16, patch_size=4, num_tokens=8,
                               least_number=4, precision="bf16")
        assert m.precision == "bf16"
        m.precision = "fp32"
        assert m.precision == "fp32"
        with pytest.raises(ValueError, match=r"precision: expected 'fp32' or 'bf16', got 'fp16'"):
            m.precision = "fp16"
        with pytest.raises(TypeError, match=r"precision: expected a str, got int"):
            m.precision = 16
        assert m.precision == "fp32"
    with pytest.raises(ValueError, match=r"precision: expected 'fp32' or 'bf16', got 'half'"):
        mapet.create_model("vit_tiny_patch16_224", depth=1, precision="half")
    with pytest.raises(ValueError, match=r"precision: expected 'fp32' or 'bf16', got 'BF16'"):
        vit.precision = "BF16"
    info = mapet.bf16_info()
    assert set(info) == {"native", "active", "kernel"} and (info["native"] or not info["active"])


# ------------------------------------------------------------------ against the bf16 references

@needs_bf16
@pytest.mark.parametrize("kw", [dict(), dict(global_pool="avg", init_values=0.5), dict(qkv_bias=False)])
def test_vit_bf16_forward_loss_and_gradients_follow_the_bf16_reference(kw):
    rng = np.random.default_rng(1)
    m = tv.tiny(seed=3, precision="bf16", **kw)
    cfg = dict(tv.TINY, **kw)
    sd = m.state_dict()
    for v in sd.values():
        v[...] = rng.standard_normal(v.shape) * 0.3
    x, y = tv.batch(rng, 4)
    loss16, logits16, G16, feats16 = tv.reference_step(sd, x, y, cfg, smoothing=0.1, bf16=True)
    loss64, logits64, G64, feats64 = tv.reference_step(sd, x, y, cfg, smoothing=0.1)
    check_follows_bf16_reference(m(x), logits16, logits64, "logits")
    check_follows_bf16_reference(m.forward_features(x), feats16, feats64, "features")
    loss, logits = m.train_step(x, y, label_smoothing=0.1, return_logits=True)
    check_follows_bf16_reference(logits, logits16, logits64, "training logits")
    # the loss is a mean over rows: a flipped rounding moves it by far less than 2⁻⁸ of itself
    assert abs(loss - loss16) <= 2.0 ** -10 * abs(loss16), (loss, loss16, loss64)
    grads = m.grads()
    assert set(grads) == set(G16)
    for name in G16:  # the backward GEMMs (dX = dY·W, dW = dYᵀ·X, attention) round their inputs too
        check_follows_bf16_reference(grads[name], G16[name], G64[name], name)


def _two_stream_case(kind, seed, B=4):
    rng = np.random.default_rng(seed)
    m, w = tpm.make(kind, rng)
    x = rng.standard_normal((B, 3, tpm.IMG, tpm.IMG)).astype(np.float32)
    tokens = rng.integers(0, tpm.V, (B, tpm.n))
    arg = tpm.random_masks(rng, B, 5) if kind == "beit" else mapet.PermutationSampler(tpm.n, 5, seed=seed).sample(B)
    return m, w, x, tokens, arg


@needs_bf16
@pytest.mark.parametrize("kind", ["mapet", "pim", "beit"])
@pytest.mark.parametrize("seed", [11, 14])
def test_two_stream_and_mim_bf16_forward_and_loss_follow_the_bf16_reference(kind, seed):
    m, w, x, tokens, arg = _two_stream_case(kind, seed)
    m.precision = "bf16"
    want64, loss64 = tpm.ref_logits(kind, w, x, arg), tpm.ref_loss(kind, w, x, tokens, arg)
    with ref.bf16_matmuls():
        want16, loss16 = tpm.ref_logits(kind, w, x, arg), tpm.ref_loss(kind, w, x, tokens, arg)
    check_follows_bf16_reference(m(x, arg).reshape(want16.shape), want16, want64, f"{kind} logits")
    loss, logits = m.train_step(x, tokens, arg, return_logits=True)
    check_follows_bf16_reference(logits.reshape(want16.shape), want16, want64, f"{kind} training logits")
    assert abs(loss - loss16) <= 2.0 ** -10 * abs(loss16), (loss, loss16, loss64)


@needs_bf16
@pytest.mark.parametrize("kind", ["mapet", "pim"])
def test_two_stream_bf16_gradients_are_exact_gradients_up_to_bf16_error(kind):
    """bf16 gradients against central differences of the exact float64 loss (h = 1e-5: the
    difference quotient is accurate to ~1e-10). Along random directions d over all parameters the
    bf16 directional derivative may differ from the exact one by bf16 error only: at most
    2⁻⁸·‖g‖‖d‖ (one rounding of every term of the dot product g·d, Cauchy–Schwarz), while fp32
    stays within 1e-4 relative as in test_pretrain_models. Per tensor, bf16 and fp32 gradients
    differ by bf16 size."""
    m, w, x, tokens, arg = _two_stream_case(kind, 1000)
    grads = {}
    for precision in ("fp32", "bf16"):
        m.precision = precision
        m.zero_grad()
        m.train_step(x, tokens, arg)
        grads[precision] = {k: v.astype(np.float64) for k, v in m.grads().items()}
    W = {k: v.astype(np.float64) for k, v in w.items()}
    f = lambda weights: tpm.ref_loss(kind, weights, x, tokens, arg)  # noqa: E731
    rng = np.random.default_rng(7)
    norm_g = np.sqrt(sum(float((g ** 2).sum()) for g in grads["fp32"].values()))
    for _ in range(3):
        d = {k: rng.standard_normal(v.shape) for k, v in W.items()}
        norm_d = np.sqrt(sum(float((v ** 2).sum()) for v in d.values()))
        fd = (f(tpm._perturbed(W, d, 1e-5)) - f(tpm._perturbed(W, d, -1e-5))) / 2e-5
        d32 = sum(float((grads["fp32"][k] * d[k]).sum()) for k in W)
        d16 = sum(float((grads["bf16"][k] * d[k]).sum()) for k in W)
        assert abs(d32 - fd) <= 1e-4 * abs(fd), (fd, d32)
        assert abs(d16 - fd) <= 2.0 ** -8 * norm_g * norm_d, (fd, d16, norm_g * norm_d)
    sizes = {k: bf16_size(grads["bf16"][k], grads["fp32"][k]) for k in W}
    assert all(BF16_SIZE[0] <= e <= BF16_SIZE[1] for e in sizes.values()), sizes


@needs_bf16
def test_ccvit_bf16_outputs_and_losses_follow_the_bf16_reference():
    rng = np.random.default_rng(20)
    m, w = tcd.make_ccvit(rng, early_layers=2)
    m.precision = "bf16"
    x, tokens, targets, mask, replaced = tcd.ccvit_data(rng)
    loss, logits, pixels = m.train_step(x, tokens, targets, mask, replaced, return_outputs=True)
    want64 = ro.ccvit_forward(w, x, mask, replaced, tcd.HEADS, 2)
    with ref.bf16_matmuls():
        want16 = ro.ccvit_forward(w, x, mask, replaced, tcd.HEADS, 2)
    check_follows_bf16_reference(logits, want16[0], want64[0], "ccvit token logits")
    check_follows_bf16_reference(pixels, want16[1], want64[1], "ccvit pixels")
    total16 = ro.ccvit_losses(*want16, tokens, targets, mask, replaced)[0]
    assert abs(loss - total16) <= 2.0 ** -10 * abs(total16)
    inference = m(x, mask, replaced)
    check_follows_bf16_reference(inference[0], want16[0], want64[0], "ccvit inference logits")


@needs_bf16
def test_dtm_bf16_predictions_and_loss_follow_the_bf16_reference():
    rng = np.random.default_rng(52)
    m, w = tcd.make_dtm(rng)
    m.precision = "bf16"
    x, target, mask = tcd.dtm_data(rng)
    mem = np.broadcast_to(np.arange(tcd.n), (2, x.shape[0], tcd.n))
    loss, pred = m.train_step(x, target, mask, mem, return_pred=True)
    want64 = ro.dtm_forward(w, x, mask, tcd.HEADS)
    with ref.bf16_matmuls():
        want16 = ro.dtm_forward(w, x, mask, tcd.HEADS)
    check_follows_bf16_reference(pred, want16, want64, "dtm predictions")
    loss16 = ro.dtm_loss(want16, target, mem, 2.0)
    assert abs(loss - loss16) <= 2.0 ** -10 * abs(loss16)


# ------------------------------------------------------------------ bf16 vs fp32

@needs_bf16
def test_bf16_differs_from_fp32_by_bf16_size():
    rng = np.random.default_rng(3)
    x, y = tv.batch(rng, 4)
    vit = tv.tiny(seed=1, init_values=0.5)
    out = {}
    for precision in ("fp32", "bf16"):
        vit.precision = precision
        vit.zero_grad()
        loss, logits = vit.train_step(x, y, return_logits=True)
        out[precision] = (loss, logits, vit.flat_grads.copy(), vit(x))
    assert BF16_SIZE[0] <= bf16_size(out["bf16"][1], out["fp32"][1]) <= BF16_SIZE[1]
    assert BF16_SIZE[0] <= bf16_size(out["bf16"][2], out["fp32"][2]) <= BF16_SIZE[1]
    assert BF16_SIZE[0] <= bf16_size(out["bf16"][3], out["fp32"][3]) <= BF16_SIZE[1]
    assert 0 < abs(out["bf16"][0] - out["fp32"][0]) <= 2.0 ** -6 * out["fp32"][0]
    # evaluate / linear_probe run at a requested precision and restore the model's own
    vit.precision = "fp32"
    data = (x, y)
    assert evaluate(vit, data, precision="bf16")["loss"] != evaluate(vit, data)["loss"]
    assert evaluate(vit, data, precision="bf16") == pytest.approx(evaluate(vit, data), rel=2.0 ** -4)
    assert vit.precision == "fp32"
    linear_probe(vit, data, epochs=1, precision="bf16")
    assert vit.precision == "fp32"


def test_a_bf16_request_runs_bf16_when_active_and_exactly_fp32_otherwise():
    rng = np.random.default_rng(3)
    x, y = tv.batch(rng, 4)
    a, b = tv.tiny(seed=1), tv.tiny(seed=1, precision="bf16")
    la, lb = a.train_step(x, y), b.train_step(x, y)
    if ACTIVE:
        assert BF16_SIZE[0] <= bf16_size(b.flat_grads, a.flat_grads) <= BF16_SIZE[1] and la != lb
    else:  # the same fp32 GEMM calls: bitwise equal
        assert la == lb and np.array_equal(a.flat_grads, b.flat_grads) and np.array_equal(a(x), b(x))


# ------------------------------------------------------------------ fallback

_CHILD = r"""
import logging, sys
import numpy as np
import mapet
sys.path.insert(0, {tests!r})
import test_vit as tv
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="LOG %(name)s: %(message)s")
mapet.set_num_threads({threads})
rng = np.random.default_rng(3)
x, y = tv.batch(rng, 4)
vit = tv.tiny(seed=1, precision="bf16")
loss = vit.train_step(x, y)
mp = mapet.create_model("mapet_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=3,
                        num_tokens=11, least_number=5, precision="bf16")
batch = mp.sampler(seed=0).sample(4)
tokens = np.random.default_rng(4).integers(0, 11, (4, 16))
mloss = mp.train_step(x, tokens, batch)
np.savez({out!r}, logits=vit(x), grads=vit.flat_grads, loss=loss, mlogits=mp(x, batch), mgrads=mp.flat_grads,
         mloss=mloss, active=mapet.bf16_info()["active"], precision=[vit.precision, mp.precision])
"""


@pytest.mark.bitwise
def test_fallback_forced_by_the_environment_equals_fp32(tmp_path):
    # MAPET_BF16=off in a fresh process: models asked for bf16 compute exactly the fp32 path
    # (same GEMM calls, same thread count: bitwise equal) and one log line says so.
    threads = mapet.get_num_threads()
    out = tmp_path / "child.npz"
    code = _CHILD.format(tests=os.path.dirname(os.path.abspath(__file__)), threads=threads, out=str(out))
    env = dict(os.environ, MAPET_BF16="off",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(mapet.__file__))),
                                           os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if "bf16" in line and "running in fp32" in line]
    assert len(notes) == 1 and "MAPET_BF16=off" in notes[0], r.stderr
    child = np.load(out)
    assert not bool(child["active"]) and list(child["precision"]) == ["bf16", "bf16"]
    rng = np.random.default_rng(3)
    x, y = tv.batch(rng, 4)
    vit = tv.tiny(seed=1)
    loss = vit.train_step(x, y)
    mp = mapet.create_model("mapet_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=3,
                            num_tokens=11, least_number=5)
    batch = mp.sampler(seed=0).sample(4)
    tokens = np.random.default_rng(4).integers(0, 11, (4, 16))
    mloss = mp.train_step(x, tokens, batch)
    assert float(child["loss"]) == loss and float(child["mloss"]) == mloss
    assert np.array_equal(child["logits"], vit(x)) and np.array_equal(child["grads"], vit.flat_grads)
    assert np.array_equal(child["mlogits"], mp(x, batch)) and np.array_equal(child["mgrads"], mp.flat_grads)


# ------------------------------------------------------------------ training runs

@pytest.fixture(scope="module")
def digits():
    return digits_subset(192)


_finetune = finetune_tiny


@pytest.mark.bitwise
def test_bf16_finetune_resumes_bitwise_and_keeps_its_precision(digits, tmp_path):
    full, h_full = _finetune(digits, tmp_path / "full", precision="bf16")
    _finetune(digits, tmp_path / "cut", stop_after=5, precision="bf16")
    # started again without naming a precision: the checkpoint's bf16 is kept
    resumed, h_resumed = _finetune(digits, tmp_path / "cut")
    assert resumed.precision == "bf16" and len(h_full["loss"]) == 12
    assert h_resumed["loss"] == h_full["loss"]
    assert np.array_equal(resumed.flat_params, full.flat_params)
    fp32, _ = _finetune(digits, tmp_path / "fp32")
    assert fp32.precision == "fp32"
    if ACTIVE:
        assert not np.array_equal(fp32.flat_params, full.flat_params)
    from mapet.checkpoint import find_checkpoint, load_checkpoint
    assert load_checkpoint(find_checkpoint(str(tmp_path / "full")))[1]["config"]["precision"] == "bf16"


@pytest.mark.bitwise
def test_bf16_pretraining_resumes_bitwise(digits, tmp_path):
    tokens = np.random.default_rng(0).integers(0, 16, (len(digits[0]), 16))

    def run(out, stop_after=None, precision="bf16"):
        model = mapet.create_model("mapet_tiny_patch16_224", seed=2, num_tokens=16, least_number=6, **FT)
        return pretrain("mapet", model=model, data=digits[0], tokens=tokens, epochs=2, batch_size=32, lr=2e-3,
                        seed=4, output_dir=str(out), checkpoint_every=2, stop_after=stop_after, precision=precision)

    full, h_full = run(tmp_path / "full")
    run(tmp_path / "cut", stop_after=5)
    resumed, h_resumed = run(tmp_path / "cut")
    assert resumed.precision == "bf16"
    assert h_resumed["loss"] == h_full["loss"] and np.array_equal(resumed.flat_params, full.flat_params)


@pytest.mark.bitwise
def test_checkpoints_are_fp32_and_move_between_precisions(tmp_path):
    rng = np.random.default_rng(5)
    x, y = tv.batch(rng, 3)
    a = tv.tiny(seed=2, precision="bf16")
    opt = mapet.AdamW(a, lr=1e-2)
    a.train_step(x, y)
    opt.step()
    a.save(str(tmp_path / "bf16.safetensors"))
    tensors, meta = load_file(str(tmp_path / "bf16.safetensors"))
    assert all(t.dtype == np.float32 for t in tensors.values()) and "precision" not in meta["config"]
    b = mapet.load(str(tmp_path / "bf16.safetensors"))            # a bf16 run's file in an fp32 model
    assert b.precision == "fp32" and np.array_equal(b.flat_params, a.flat_params)
    a.precision = "fp32"
    assert np.array_equal(b(x), a(x))
    c = tv.tiny(seed=9, precision="bf16", pretrained=str(tmp_path / "bf16.safetensors"))
    b.save(str(tmp_path / "fp32.safetensors"))                     # and an fp32 file in a bf16 model
    d = tv.tiny(seed=7, precision="bf16", pretrained=str(tmp_path / "fp32.safetensors"))
    assert d.precision == "bf16" and np.array_equal(d.flat_params, b.flat_params)
    assert np.array_equal(c(x), d(x))
    mp = mapet.create_model("mapet_tiny_patch16_224", img_size=16, patch_size=4, depth=1, num_tokens=8,
                            least_number=4, precision="bf16")
    mp.save(str(tmp_path / "mapet.safetensors"))
    loaded = mapet.load(str(tmp_path / "mapet.safetensors"))
    assert loaded.precision == "fp32" and np.array_equal(loaded.flat_params, mp.flat_params)


def test_cli_sets_precision_and_records_it(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(mapet.__file__))))
    args = ["finetune", "--set", "model.img_size=16", "--set", "model.patch_size=4", "--set", "model.embed_dim=24",
            "--set", "model.depth=2", "--set", "model.num_heads=3", "--set", "epochs=1", "--set", "precision=bf16",
            "--threads", "2", "-o", "ft"]
    r = subprocess.run([sys.executable, "-m", "mapet", *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert 0.0 <= json.loads(r.stdout.strip().splitlines()[-1])["top1"] <= 1.0
    with open(tmp_path / "ft" / "config.json") as f:
        assert json.load(f)["precision"] == "bf16"
    from mapet.checkpoint import find_checkpoint, load_checkpoint
    state = load_checkpoint(find_checkpoint(str(tmp_path / "ft" / "checkpoints")))[1]
    assert state["config"]["precision"] == "bf16"
    r = subprocess.run([sys.executable, "-m", "mapet", "finetune", "--set", "precision=fp16", "-o", "bad"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode != 0 and "precision: expected 'fp32' or 'bf16', got 'fp16'" in r.stderr


def test_bf16_finetuning_on_digits_reaches_fp32_accuracy():
    # Fine-tuning in a stable regime (lr 1e-3, 15 epochs): there, one run's trajectory is not chaotic,
    # so what separates the bf16 and the fp32 run is the precision, not the seed-to-seed noise
    # (at lr 3e-3 the same pair differs by ±2 points whatever the precision). Measured: 84-85% top-1,
    # the two precisions agree on 99.7-100% of the test digits. A bf16 product that corrupted the
    # forward or the backward would show up as lost accuracy or disagreement.
    x, y = load_digits(16, "train")
    xt, yt = load_digits(16, "test")
    for seed in (0, 1):
        pred = {}
        for precision in ("fp32", "bf16"):
            model, _ = finetune("vit_tiny_patch16_224", (x, y), epochs=15, batch_size=64, lr=1e-3, seed=seed,
                                layer_decay=None, warmup_epochs=1, label_smoothing=0.0, img_size=16, patch_size=4,
                                embed_dim=48, depth=2, num_heads=4, drop_path_rate=0.0, global_pool="avg",
                                precision=precision)
            pred[precision] = model(xt).argmax(1)
        acc = {p: float((v == yt).mean()) for p, v in pred.items()}
        assert acc["fp32"] > 0.8, acc
        assert acc["bf16"] >= acc["fp32"] - 0.01, (seed, acc)
        assert (pred["bf16"] == pred["fp32"]).mean() >= 0.98, seed
