"""Reading PyTorch checkpoints without torch (mapet.torchfile) and converting them (mapet.convert).

Every file here is written by the test itself, opcode by opcode (tests/torch_writer.py), in the
layouts torch.save / torch.jit.save produce; no torch is imported anywhere.
"""
import json
import os

import numpy as np
import pytest

import mapet
from mapet.cli import main
from mapet.convert import convert, read_checkpoint, state_dict_of
from mapet.io import load_file
from mapet.torchfile import PickledNamespace, UnsafePickleError, load_torch_file, torch_file_format
from torch_writer import Call, Obj, OrderedDict, Storage, Tensor, tensors, write_legacy, write_torchscript, write_zip

RNG = np.random.default_rng(0)


def _storage_views():
    """Tensors that share storages, with offsets and non-contiguous strides, and what they must read as."""
    base = RNG.standard_normal(24).astype(np.float32)
    s = Storage("0", base)
    halfs = RNG.standard_normal(7).astype(np.float16)
    wide = RNG.standard_normal((3, 2)).astype(np.float64)
    ints = np.arange(-5, 5, dtype=np.int64)
    bools = np.array([True, False, True])
    bf = RNG.standard_normal((2, 3)).astype(np.float32)
    bf_bits = (bf.view(np.uint32) >> 16 << 16).view(np.float32)  # what a bf16 storage holds
    obj = OrderedDict([
        ("w", Tensor(s, (4, 6))),
        ("w_t", Tensor(s, (6, 4), (1, 6))),                 # transpose: same storage
        ("w_slice", Tensor(s, (2, 3), (6, 2), offset=7)),   # w[1:3, 1::2]
        ("h", Tensor(Storage("1", halfs), (7,))),
        ("d", Tensor(Storage("2", wide), (3, 2))),
        ("i", Tensor(Storage("3", ints), (10,))),
        ("b", Tensor(Storage("4", bools), (3,))),
        ("bf", Tensor(Storage("5", bf, bf16=True), (2, 3))),
        ("scalar", Tensor(s, (), (), offset=5)),
        ("empty", Tensor(s, (0, 3))),
    ])
    w = base.reshape(4, 6)
    expect = {"w": w, "w_t": w.T, "w_slice": w[1:3, 1::2], "h": halfs, "d": wide, "i": ints, "b": bools,
              "bf": bf_bits, "scalar": np.float32(base[5]), "empty": np.zeros((0, 3), np.float32)}
    return obj, expect


def _check_views(sd, expect):
    assert set(sd) == set(expect)
    for k, want in expect.items():
        got = sd[k]
        assert isinstance(got, np.ndarray) and got.flags.c_contiguous, k
        assert got.dtype == np.asarray(want).dtype and got.shape == np.shape(want), (k, got.dtype, got.shape)
        np.testing.assert_array_equal(got, want, err_msg=k)


@pytest.mark.parametrize("writer", [write_zip, write_legacy], ids=["zip", "legacy"])
def test_reads_tensors_of_every_dtype_and_layout_exactly(tmp_path, writer):
    obj, expect = _storage_views()
    ckpt = {"state_dict": obj, "epoch": 7, "best": 81.25,
            "args": Obj("argparse", "Namespace", {"lr": 1.5e-3, "model": "vit_tiny", "sizes": [1, 2], "big": 2 ** 40})}
    path = str(tmp_path / "ckpt.pth")
    writer(path, ckpt)
    assert torch_file_format(path) == ("zip" if writer is write_zip else "legacy")
    loaded = load_torch_file(path)
    assert loaded["epoch"] == 7 and loaded["best"] == 81.25
    assert isinstance(loaded["args"], PickledNamespace)
    assert (loaded["args"].lr, loaded["args"].model, loaded["args"].sizes, loaded["args"].big) == (1.5e-3, "vit_tiny", [1, 2], 2 ** 40)
    _check_views(loaded["state_dict"], expect)


def test_torchscript_archive_gives_the_state_dict_of_its_module_tree(tmp_path):
    conv_w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    mean = RNG.standard_normal(4).astype(np.float32)
    proj = RNG.standard_normal((4, 2)).astype(np.float32)
    mask = np.ones((2, 2), np.float32)
    conv = Obj("__torch__.torch.nn.modules.conv", "Conv2d",
               {"weight": Tensor(Storage("0", conv_w), conv_w.shape), "training": False})
    bn = Obj("__torch__.torch.nn.modules.batchnorm", "BatchNorm2d",
             {"running_mean": Tensor(Storage("1", mean), (4,)), "eps": 1e-5, "training": False})
    visual = Obj("__torch__.model", "VisionTower",
                 {"conv1": conv, "bn1": bn, "proj": Tensor(Storage("2", proj), (4, 2)), "training": False})
    root = Obj("__torch__.model", "CLIP", {"visual": visual, "training": False,
                                           "attn_mask": Tensor(Storage("3", mask), (2, 2))})
    code = {
        "__torch__/model.py": "class CLIP(Module):\n  __parameters__ = []\n  __buffers__ = []\n  visual : __torch__.model.VisionTower\n"
                              "  attn_mask : Tensor\n  def forward(self): ...\n"
                              "class VisionTower(Module):\n  __parameters__ = [\"proj\", ]\n  __buffers__ = []\n",
        "__torch__/torch/nn/modules/conv.py": "class Conv2d(Module):\n  __parameters__ = [\"weight\", ]\n  __buffers__ = []\n",
        "__torch__/torch/nn/modules/batchnorm.py":
            "class BatchNorm2d(Module):\n  __parameters__ = []\n  __buffers__ = [\"running_mean\", ]\n",
    }
    path = str(tmp_path / "RN.pt")
    write_torchscript(path, root, code)
    assert torch_file_format(path) == "torchscript"
    sd = load_torch_file(path)
    # attn_mask is a plain attribute (not a parameter or buffer of CLIP): not in the state dict
    assert sorted(sd) == ["visual.bn1.running_mean", "visual.conv1.weight", "visual.proj"]
    np.testing.assert_array_equal(sd["visual.conv1.weight"], conv_w)
    np.testing.assert_array_equal(sd["visual.bn1.running_mean"], mean)
    # without code files every tensor attribute is taken
    write_torchscript(path, root, {})
    assert "attn_mask" in load_torch_file(path)


HOSTILE = [
    Call("os", "system", ("touch {marker}",)),
    Call("posix", "system", ("touch {marker}",)),
    Call("subprocess", "call", (["touch", "{marker}"],)),
    Call("builtins", "exec", ("open('{marker}', 'w').close()",)),
    Call("builtins", "eval", ("__import__('os').system('touch {marker}')",)),
    Obj("builtins", "getattr", {}),
    Call("torch", "load", ("{marker}",)),
    Call("numpy", "load", ("{marker}",)),
]


def _fill(x, marker):
    if isinstance(x, str):
        return x.format(marker=marker)
    if isinstance(x, (list, tuple)):
        return type(x)(_fill(v, marker) for v in x)
    return x


@pytest.mark.parametrize("attack", HOSTILE, ids=lambda a: f"{a.module}.{a.name}")
@pytest.mark.parametrize("writer", [write_zip, write_legacy], ids=["zip", "legacy"])
def test_hostile_pickles_are_refused_before_anything_runs(tmp_path, attack, writer):
    marker = str(tmp_path / "pwned")
    if isinstance(attack, Call):
        attack = Call(attack.module, attack.name, _fill(attack.args, marker))
    w = RNG.standard_normal(3).astype(np.float32)
    path = str(tmp_path / "evil.pth")
    writer(path, {"state_dict": OrderedDict(w=Tensor(Storage("0", w), (3,))), "payload": attack})
    with pytest.raises(UnsafePickleError, match=f"{attack.module}.{attack.name}"):
        load_torch_file(path)
    assert not os.path.exists(marker)
    with pytest.raises(UnsafePickleError):
        convert(path, str(tmp_path / "out.safetensors"))
    assert not os.path.exists(tmp_path / "out.safetensors") and not os.path.exists(marker)


@pytest.mark.parametrize("writer", [write_zip, write_legacy], ids=["zip", "legacy"])
def test_stub_unknown_loads_the_weights_and_still_runs_nothing(tmp_path, writer):
    marker = str(tmp_path / "pwned")
    w = RNG.standard_normal(3).astype(np.float32)
    path = str(tmp_path / "munch.pth")
    writer(path, {"model": OrderedDict(w=Tensor(Storage("0", w), (3,))),
                  "args": Obj("munch", "Munch", {"lr": 0.1}), "hook": Call("os", "system", (f"touch {marker}",))})
    with pytest.raises(UnsafePickleError, match="munch.Munch"):
        load_torch_file(path)
    out = str(tmp_path / "out.safetensors")
    report = convert(path, out, stub_unknown=True)
    np.testing.assert_array_equal(load_file(out)[0]["w"], w)
    assert sorted(report["skipped"]) == ["args (unknown global munch.Munch, not loaded)",
                                         "hook (unknown global os.system, not loaded)"]
    assert not os.path.exists(marker)


def test_inst_opcode_and_hostile_torchscript_names_run_nothing(tmp_path):
    import zipfile

    marker = str(tmp_path / "pwned")
    # protocol-0 INST opcode: MARK, args, 'i' module\nname\n
    blob = b"(S'touch " + marker.encode() + b"'\nios\nsystem\n."
    path = str(tmp_path / "inst.pth")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", blob)
    with pytest.raises(UnsafePickleError, match="os.system"):
        load_torch_file(path)
    # a __torch__.* class is only ever a data holder: no attribute lookup, no call
    write_torchscript(path, Obj("__torch__.os", "system", {"training": False}), {})
    assert load_torch_file(path) == {}
    assert not os.path.exists(marker)


def test_corrupt_files_raise_value_errors_naming_the_file(tmp_path):
    w = RNG.standard_normal((4, 4)).astype(np.float32)
    path = str(tmp_path / "bad.pth")
    write_zip(path, {"w": Tensor(Storage("0", w), (4, 4))}, truncate="0")
    with pytest.raises(ValueError, match="bad.pth.*bytes"):
        load_torch_file(path)
    write_zip(path, {"w": Tensor(Storage("0", w), (4, 5))})  # reaches past the storage
    with pytest.raises(ValueError, match="reaches element"):
        load_torch_file(path)
    with open(path, "wb") as f:
        f.write(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="bad.pth"):
        load_torch_file(path)
    with pytest.raises(FileNotFoundError):
        load_torch_file(str(tmp_path / "missing.pth"))


def test_state_dict_is_found_in_its_wrapper_and_ddp_prefixes_go():
    w = np.zeros(2, np.float32)
    assert state_dict_of({"a": w})[0].keys() == {"a"}
    sd, skipped = state_dict_of({"model": {"module.a": w, "module.b": w}, "epoch": 3, "optimizer": {}})
    assert sorted(sd) == ["a", "b"] and sorted(skipped) == ["epoch (checkpoint entry)", "optimizer (checkpoint entry)"]
    assert list(state_dict_of({"state_dict": {"_orig_mod.x": w}})[0]) == ["x"]
    with pytest.raises(ValueError, match="no state dict"):
        state_dict_of({"epoch": 1, "optimizer": {}})


def test_mapet_checkpoint_converts_and_loads_into_a_vit(tmp_path):
    """An official-MaPeT-style fine-tuning checkpoint (timm saver: state_dict + args + optimizer,
    DDP prefix) → safetensors → create_model(pretrained=...) reproduces the weights exactly."""
    src_model = mapet.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=5,
                                   global_pool="avg", init_values=0.1, seed=3)
    sd = {"module." + k: np.array(v) for k, v in src_model.state_dict().items()}
    path = str(tmp_path / "vit_standard_tiny_patch16_224_KCLIP.tar")
    write_zip(path, {"epoch": 99, "arch": "vit_standard_tiny_patch16_224", "state_dict": tensors(sd),
                     "optimizer": {"state": {}, "param_groups": [{"lr": 0.001}]}, "version": 2,
                     "args": Obj("argparse", "Namespace", {"model": "vit_standard_tiny_patch16_224"})})
    out = str(tmp_path / "mapet.safetensors")
    report = convert(path, out)
    assert report["layout"] == "mapet" and report["written"] == len(sd)
    assert sorted(s.split(" ")[0] for s in report["skipped"]) == ["arch", "args", "epoch", "optimizer", "version"]
    written, meta = load_file(out)
    assert meta["source"] == os.path.basename(path) and meta["source_format"] == "zip" and meta["layout"] == "mapet"
    m = mapet.create_model("vit_tiny_patch16_224", pretrained=out, num_classes=5, global_pool="avg")
    for k, v in src_model.state_dict().items():
        np.testing.assert_array_equal(m.state_dict()[k], v, err_msg=k)


def test_old_mapet_pretraining_names_are_normalised():
    w = np.ones(2, np.float32)
    from mapet.convert import to_mapet_names
    out, _, layout = to_mapet_names({"encoder.blocks_0.attn.q.weight": w, "encoder.cls_token": w,
                                     "mask_positional_token": w}, "mapet")
    assert sorted(out) == ["blocks.0.attn.q.weight", "cls_token", "mask_positional_token"]


def test_beit_checkpoint_maps_to_split_attention_and_reports_relative_position_bias(tmp_path):
    C = 8
    qkv = RNG.standard_normal((3 * C, C)).astype(np.float32)
    qb, vb = RNG.standard_normal(C).astype(np.float32), RNG.standard_normal(C).astype(np.float32)
    g1 = RNG.standard_normal(C).astype(np.float32)
    sd = {"blocks.0.attn.qkv.weight": qkv, "blocks.0.attn.q_bias": qb, "blocks.0.attn.v_bias": vb,
          "blocks.0.gamma_1": g1, "blocks.0.attn.relative_position_bias_table": np.zeros((10, 2), np.float32),
          "blocks.0.attn.relative_position_index": np.zeros((5, 5), np.int64),
          "cls_token": np.zeros((1, 1, C), np.float16)}
    path = str(tmp_path / "beit.pth")
    write_zip(path, {"model": tensors(sd), "epoch": 1})
    got, report = read_checkpoint(path)
    assert report["layout"] == "beit"
    np.testing.assert_array_equal(got["blocks.0.attn.q.weight"], qkv[:C])
    np.testing.assert_array_equal(got["blocks.0.attn.kv.weight"], qkv[C:])
    np.testing.assert_array_equal(got["blocks.0.attn.kv.bias"], np.concatenate([np.zeros(C, np.float32), vb]))
    np.testing.assert_array_equal(got["blocks.0.ls1.gamma"], g1)
    assert got["cls_token"].dtype == np.float32
    rel = [s for s in report["skipped"] if "relative position" in s]
    assert len(rel) == 2 and not any("relative_position" in k for k in got)


def test_clip_checkpoint_keeps_names_and_skips_bookkeeping(tmp_path):
    sd = {"visual.conv1.weight": RNG.standard_normal((4, 3, 3, 3)).astype(np.float32),
          "visual.bn1.num_batches_tracked": np.array(5, np.int64),
          "positional_embedding": RNG.standard_normal((7, 4)).astype(np.float32),
          "input_resolution": np.array(224, np.int64), "transformer.resblocks.0.attn_mask": np.zeros((3, 3), np.float32)}
    path = str(tmp_path / "open_clip_pytorch_model.bin")
    write_zip(path, tensors(sd))
    out = str(tmp_path / "clip.safetensors")
    report = convert(path, out)
    assert report["layout"] == "clip"
    assert sorted(load_file(out)[0]) == ["positional_embedding", "visual.conv1.weight"]
    assert len(json.loads(load_file(out)[1]["skipped"])) == 3
    convert(path, out, visual_only=True)
    assert sorted(load_file(out)[0]) == ["visual.conv1.weight"]


def test_cli_convert_writes_the_file_and_refuses_hostile_input(tmp_path, capsys):
    w = RNG.standard_normal((2, 2)).astype(np.float32)
    src, dst = str(tmp_path / "in.pth"), str(tmp_path / "out.safetensors")
    write_legacy(src, {"state_dict": tensors({"head.weight": w}), "epoch": 2})
    assert main(["convert", src, dst]) == 0
    assert "wrote 1 tensors" in capsys.readouterr().out
    np.testing.assert_array_equal(load_file(dst)[0]["head.weight"], w)
    write_zip(src, {"state_dict": tensors({"head.weight": w}), "x": Call("os", "system", ("true",))})
    with pytest.raises(SystemExit) as e:
        main(["convert", src, str(tmp_path / "never.safetensors")])
    assert e.value.code == 2
    assert "refused to load global os.system" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "never.safetensors")
