"""PyTorch checkpoints → safetensors under mapet's names (``python -m mapet convert IN OUT``).

Reads the file with :mod:`mapet.torchfile` (no PyTorch, nothing in the file is executed), takes
the weights out of their wrapper (``{"state_dict": ...}`` of timm / MaPeT, ``{"model": ...}`` of
BEiT / CCViT / DTM, a bare state dict of open_clip, the module tree of a TorchScript ``.pt``),
drops the ``module.`` / ``_orig_mod.`` prefixes of DDP and ``torch.compile``, and maps names by
layout:

* ``mapet`` — MaPeT's official checkpoints (aimagelab/MaPeT ``XLeiTPositionalAugmented`` and its
  fine-tuned ``StandardVisionTransformer``) already use mapet's names (``attn.q`` / ``attn.kv``,
  ``ls1.gamma``, ``mask_positional_token``, ``decoder``); older ones are normalised the way the
  reference's ``init_from_pretraining`` does (``encoder.`` dropped, ``blocks_i`` → ``blocks.i``,
  ``Double`` removed).
* ``beit`` — BEiT / CCViT / DTM (fused ``attn.qkv``, ``q_bias`` / ``v_bias``, ``gamma_1/2``) →
  mapet's split layout via :func:`mapet.interop.from_beit_layout`. Relative position biases
  have no place in mapet's ViT: they are skipped and named in the report (a model trained with
  them is then not reproduced exactly; a warning says so).
* ``clip`` — OpenAI CLIP / open_clip: mapet's CLIP towers use CLIP's own names, so names are
  kept; the bookkeeping tensors ``input_resolution`` / ``context_length`` / ``vocab_size`` of
  OpenAI's TorchScript files and BatchNorm's ``num_batches_tracked`` are skipped.

Floating tensors are written as float32 (bfloat16 / float16 widen exactly); integer tensors keep
their type. The output is written atomically, with the source recorded in its metadata.

Example:
    >>> from mapet.convert import convert   # doctest: +SKIP
    >>> report = convert("RN50.pt", "clip_rn50.safetensors")   # doctest: +SKIP
    >>> report["layout"], len(report["skipped"])   # doctest: +SKIP
    ('clip', 3)
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from .io import save_file
from .torchfile import PickledNamespace, UnknownGlobal, load_torch_file, torch_file_format

__all__ = ["convert", "read_checkpoint", "state_dict_of", "to_mapet_names", "LAYOUTS"]

log = logging.getLogger(__name__)

LAYOUTS = ("auto", "mapet", "beit", "clip")
_WRAPPERS = ("state_dict", "model", "module", "net", "params")
_PREFIXES = ("module.", "_orig_mod.")
_CLIP_BOOKKEEPING = {"input_resolution", "context_length", "vocab_size"}
_REL_POS = re.compile(r"(^|\.)(relative_position_bias_table|relative_position_index|rel_pos_bias\.)")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())


def state_dict_of(obj: Any) -> Tuple[Dict[str, np.ndarray], List[str]]:
    """The weights inside a loaded checkpoint, and the names of what was left out.

    A mapping whose values are all arrays is the state dict; otherwise the first of
    ``state_dict``, ``model``, ``module``, ``net``, ``params`` that holds one (``model_ema`` /
    ``state_dict_ema`` and other entries — optimizer, epoch, args — are reported as skipped).
    ``module.`` and ``_orig_mod.`` prefixes shared by every key are removed.

    Raises:
        ValueError: no state dict found (the message lists the top-level keys).
    """
    skipped: List[str] = []
    sd = None
    if _is_state_dict(obj):
        sd = dict(obj)
    elif isinstance(obj, Mapping):
        for key in _WRAPPERS:
            if key in obj and _is_state_dict(obj[key]):
                sd = dict(obj[key])
                skipped = [f"{k} (unknown global {obj[k].type_name}, not loaded)" if isinstance(obj[k], UnknownGlobal)
                           else f"{k} (checkpoint entry)" for k in obj if k != key]
                break
        if sd is None and isinstance(obj, Mapping):
            # a state dict with a few non-tensor entries (e.g. a saved step count)
            arrays = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, np.ndarray)}
            if arrays and len(arrays) >= len(obj) / 2:
                sd = arrays
                skipped = [f"{k} (not a tensor)" for k in obj if k not in arrays]
    if sd is None:
        keys = list(obj)[:12] if isinstance(obj, Mapping) else type(obj).__name__
        what = "namespace" if isinstance(obj, PickledNamespace) else f"keys {keys}" if isinstance(obj, Mapping) else keys
        raise ValueError(f"no state dict found in the checkpoint ({what}); expected a name → tensor mapping, "
                         f"possibly under one of {list(_WRAPPERS)}")
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd, skipped


def detect_layout(sd: Mapping[str, Any]) -> str:
    """``"clip"``, ``"beit"`` or ``"mapet"`` from the names of a state dict."""
    from .interop import is_beit_layout

    if any(k.startswith("visual.") or k.startswith("attnpool.") or k.startswith("transformer.resblocks.")
           or k in ("positional_embedding", "class_embedding", "text_projection", "logit_scale") for k in sd):
        return "clip"
    if is_beit_layout(sd):
        return "beit"
    return "mapet"


def to_mapet_names(sd: Mapping[str, np.ndarray], layout: str = "auto") -> Tuple[Dict[str, np.ndarray], List[str], str]:
    """(tensors under mapet's names, skipped names with reasons, the layout used)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if layout == "auto":
        layout = detect_layout(sd)
    skipped: List[str] = []
    out: Dict[str, np.ndarray] = {}
    if layout == "clip":
        for k, v in sd.items():
            last = k.rsplit(".", 1)[-1]
            if k in _CLIP_BOOKKEEPING or last == "num_batches_tracked":
                skipped.append(f"{k} (bookkeeping, not a weight)")
            elif last == "attn_mask":
                skipped.append(f"{k} (constant causal mask, rebuilt by the model)")
            else:
                out[k] = v
    elif layout == "beit":
        from .interop import from_beit_layout

        kept = {}
        for k, v in sd.items():
            if _REL_POS.search(k):
                skipped.append(f"{k} (relative position bias: mapet's ViT has none)")
            else:
                kept[k] = v
        if any("relative_position_bias_table" in s for s in skipped):
            log.warning("convert: the checkpoint uses relative position biases, which mapet's ViT does not have; "
                        "they are skipped, so the converted model differs from the original")
        ints = {k: v for k, v in kept.items() if v.dtype.kind not in "f"}
        out = from_beit_layout({k: v for k, v in kept.items() if k not in ints})
        out.update(ints)
    else:
        for k, v in sd.items():
            name = k
            if name.startswith("encoder."):
                name = name[len("encoder."):]
            name = re.sub(r"(^|\.)blocks_(\d+)", r"\1blocks.\2", name).replace("Double", "")
            if name in out:
                raise ValueError(f"two tensors map to the name {name!r}")
            out[name] = v
    for k in list(out):
        v = out[k]
        if v.dtype.kind == "f" and v.dtype != np.float32:
            out[k] = v.astype(np.float32)
        elif v.dtype.kind not in "biuf":
            skipped.append(f"{k} (dtype {v.dtype})")
            del out[k]
    return out, skipped, layout


def read_checkpoint(path: str, layout: str = "auto",
                    stub_unknown: bool = False) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """Read a PyTorch checkpoint into mapet names without running code from it.

    ``stub_unknown``: see :func:`mapet.torchfile.load_torch_file` (globals outside the allow-list
    become inert placeholders instead of refusing the file; still nothing runs).

    Returns:
        (tensors, report) with report keys ``source_format`` (zip / torchscript / legacy),
        ``layout`` and ``skipped`` (names with the reason each was left out).
    """
    obj = load_torch_file(path, stub_unknown=stub_unknown)
    sd, skipped = state_dict_of(obj)
    tensors, more, used = to_mapet_names(sd, layout)
    return tensors, {"source_format": torch_file_format(path), "layout": used, "skipped": skipped + more}


def convert(src: str, dst: str, layout: str = "auto", visual_only: bool = False,
            stub_unknown: bool = False) -> Dict[str, Any]:
    """Convert a PyTorch checkpoint into a safetensors file of mapet names (written atomically).

    Args:
        src: ``torch.save`` file (zip or legacy; MaPeT ``.tar``/``.pth``, BEiT / CCViT / DTM,
            open_clip ``.bin``) or TorchScript archive (OpenAI CLIP ``.pt``).
        dst: the ``.safetensors`` file to write.
        layout: ``"auto"`` (from the names), ``"mapet"``, ``"beit"`` or ``"clip"``.
        visual_only: for CLIP, keep only the image tower (``visual.*``, prefix kept).
        stub_unknown: globals outside the allow-list (e.g. training arguments saved as a custom
            class) become inert placeholders instead of refusing the file; nothing runs either way.

    Returns:
        {"written": n, "layout": ..., "source_format": ..., "skipped": [...], "path": dst}.

    Raises:
        mapet.torchfile.UnsafePickleError: the file names code to run (nothing was run).
        ValueError: not a checkpoint, or no state dict in it; FileNotFoundError.
    """
    tensors, report = read_checkpoint(src, layout, stub_unknown)
    if visual_only:
        if report["layout"] != "clip":
            raise ValueError(f"visual_only applies to CLIP checkpoints; {src} has the {report['layout']} layout")
        report["skipped"] += [f"{k} (text tower)" for k in tensors if not k.startswith("visual.")]
        tensors = {k: v for k, v in tensors.items() if k.startswith("visual.")}
    if not tensors:
        raise ValueError(f"{src}: no tensors left to write (skipped: {report['skipped'][:8]})")
    metadata = {"format": "mapet-converted", "source": os.path.basename(os.fspath(src)),
                "source_format": report["source_format"], "layout": report["layout"],
                "skipped": json.dumps(report["skipped"])}
    save_file(tensors, dst, metadata)
    log.info("convert: %s → %s: %d tensors (%s layout); skipped %d", src, dst, len(tensors), report["layout"],
             len(report["skipped"]))
    return dict(report, written=len(tensors), path=os.fspath(dst))


def _by_reason(skipped: List[str]) -> Dict[str, List[str]]:
    """"name (reason)" entries grouped by reason, in first-seen order."""
    groups: Dict[str, List[str]] = {}
    for entry in skipped:
        name, _, reason = entry.partition(" (")
        groups.setdefault(reason.rstrip(")") or "skipped", []).append(name)
    return groups


def _register_command() -> None:
    from .cli import command

    def configure(p) -> None:
        p.add_argument("input", help="PyTorch checkpoint (.pth/.tar/.bin/.pt, zip, legacy or TorchScript)")
        p.add_argument("output", help="safetensors file to write")
        p.add_argument("--layout", choices=LAYOUTS, default="auto",
                       help="name layout of the source (default: detected from the names)")
        p.add_argument("--visual-only", action="store_true", help="CLIP: keep only the image tower (visual.*)")
        p.add_argument("--stub-unknown", action="store_true",
                       help="read files that pickle objects of other classes (e.g. training arguments): those "
                            "objects become inert placeholders and are skipped; nothing from the file is run")

    def _convert(args, cfg) -> int:
        report = convert(args.input, args.output, layout=args.layout, visual_only=args.visual_only,
                         stub_unknown=args.stub_unknown)
        print(f"wrote {report['written']} tensors to {report['path']} ({report['layout']} layout, "
              f"{report['source_format']} file); skipped {len(report['skipped'])}")
        for reason, names in _by_reason(report["skipped"]).items():
            print(f"  {len(names)} × {reason}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}")
        return 0

    _convert.configure = configure
    command("convert", "convert a PyTorch checkpoint to safetensors under mapet's names (no torch needed)",
            description="Read a PyTorch checkpoint without PyTorch and without running code from it (an "
                        "allow-list unpickler), map its names to mapet's and write a safetensors file.")(_convert)


_register_command()
