"""``python -m mapet study``: does a pre-training method beat another here? Methods × seeds × tokenizers.

Every (method, tokenizer, seed) run pre-trains with the same budget, then is linear-probed and
fine-tuned with one fine-tuning recipe (``finetune.*``); the ``scratch`` row (one per seed) fine-tunes a
randomly initialised ViT with its own from-scratch recipe (``scratch.*``: the class-token head, see
``bench/scratch_sweep.py`` for how it was chosen) and the same number of steps. The report says on
which seeds a row's fine-tune ends below its own linear probe. Rows are compared
paired by seed (a seed fixes the initialisation, the data order, the masks and the tokenizer's
k-means) with a Student-t confidence interval of the mean difference (:mod:`mapet.stats`).

Outputs under ``output_dir``: ``study.md`` (the table), ``study.json`` (every run's scores and the
summaries), ``study.png`` (mean ± std with error bars), and ``runs/`` with one record per finished
run, written atomically. Run it again on the same ``output_dir`` and finished runs are read back,
not redone (a killed study continues where it stopped; a pre-training interrupted mid-way resumes
from its last epoch checkpoint).

Tokenizers are named in ``tokenizers``: ``pixel`` is the CCViT pixel k-means tokenizer
(``tokenizer.*`` sets its vocabulary); ``kclip`` is k-CLIP, k-means on the patch features of a CLIP
ViT tower (the MaPeT paper's tokenizer): a small random tower sized for the model's patch grid and
seeded by the study seed (``kclip.width/layers/output_dim``), or the CLIP weights file given as
``kclip.clip``. Another tokenizer plugs in with :func:`register_tokenizer` (a function writing a
token cache for the training images).

Methods are named as the registry names them (``beit`` for MIM; the alias ``mim`` is accepted and
recorded under ``beit``).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from typing import Any, Dict, List, Optional

from . import stats
from .cli import command
from .commands import (_DATA, _MODEL, FINETUNE_DEFAULTS, OPTIONS, PRETRAIN_DEFAULTS, run_finetune, run_linprobe,
                       run_pretrain, tokenize_dataset)
from .io import atomic_write
from .registry import get_method, method_names
from .study_tokenizers import _TOKENIZERS, KCLIP_DEFAULTS, register_tokenizer  # noqa: F401

log = logging.getLogger(__name__)

#: The fine-tuning recipe of every pre-trained row (BEiT's: AdamW, wd 0.05, label smoothing 0.1, drop path
#: 0.1, warm-up then cosine, head on fc_norm of the mean patch token), with two changes for a 4-block ViT
#: fine-tuned for 10 epochs of 1438 digits: no layer decay (0.75 per block is a 12-block, 100-epoch device;
#: here it leaves the lower blocks nearly frozen) and batch 16, i.e. 900 optimizer steps instead of 225.
#: With BEiT's 0.75 and batch 64 every row stopped short of its own linear probe: training accuracy ended
#: level with test accuracy (~82%), an under-trained run, not an over-fitted one (README, "the seeded study").
FINETUNE_RECIPE: Dict[str, Any] = {"epochs": 10, "batch_size": 16, "lr": 1e-3, "layer_decay": 1.0}

#: The from-scratch row's recipe (keys override ``finetune.*`` for the scratch row only; same steps): the
#: classifier reads the class token, DeiT's from-scratch head (the mean of random patch tokens through a fresh
#: LayerNorm keeps little of what separates the digits); see ``bench/scratch_sweep.py``.
SCRATCH_RECIPE: Dict[str, Any] = {"lr": 1e-3, "layer_decay": 1.0, "warmup_epochs": 1, "drop_path_rate": 0.1,
                                  "global_pool": "token"}

STUDY_DEFAULTS: Dict[str, Any] = {
    **_DATA, "model": dict(_MODEL), "output_dir": "mapet-study", "precision": None,
    "seeds": [0, 1, 2, 3, 4],
    "methods": ["mapet", "beit"],
    "tokenizers": ["pixel"],
    "baseline": "beit",
    "confidence": 0.95,
    "tokenizer": {"n_tokens": 256, "n_iter": 20, "fit_images": 4096},
    "kclip": dict(KCLIP_DEFAULTS),
    "pretrain": {"epochs": 10, "batch_size": 64, "lr": 1.5e-3, "least_number": 16, "warmup_epochs": 1},
    "finetune": dict(FINETUNE_RECIPE),
    "scratch": dict(SCRATCH_RECIPE),
    "linprobe": {"epochs": 100, "lr": 0.1},
}

STUDY_OPTIONS: Dict[str, str] = {
    "seeds": "study: the seeds; every row runs once per seed and rows are compared paired by seed",
    "methods": "study: pre-training methods (mapet, pim, beit or its alias mim, ccvit), each run with every tokenizer "
               "and seed; rows carry the registry's name (mim: beit)",
    "tokenizers": "study: visual tokenizers the methods predict ('pixel': CCViT pixel k-means; 'kclip': k-means on "
                  "CLIP ViT patch features; others when registered)",
    "baseline": "study: the method every other row is compared with (besides scratch)",
    "kclip.clip": "study, kclip tokenizer: CLIP weights (.safetensors, its patch grid the model's); null: a random "
                  "CLIP ViT seeded by the study seed",
    "kclip.width": "study, kclip tokenizer: width of the random CLIP tower (a multiple of 64: one head per 64)",
    "kclip.layers": "study, kclip tokenizer: blocks of the random CLIP tower",
    "kclip.output_dim": "study, kclip tokenizer: projection width of the random CLIP tower (unused by k-CLIP)",
    "kclip.sample_fraction": "study, kclip tokenizer: share of each batch's patch features kept for k-means",
    "confidence": "study: coverage of the paired Student-t intervals",
    "scratch.lr": "from-scratch row: its own peak learning rate (the pre-trained rows use finetune.lr)",
    "scratch.layer_decay": "from-scratch row: layer-wise lr decay (1: off; random layers have nothing to preserve)",
    "scratch.warmup_epochs": "from-scratch row: linear warm-up epochs",
    "scratch.drop_path_rate": "from-scratch row: stochastic depth rate of the last block",
    "scratch.global_pool": "from-scratch row: 'token' (class token, DeiT's from-scratch recipe) or 'avg'",
}



def _token_method(name: Any) -> bool:
    """A registered pre-training method (or alias, e.g. ``mim``) that learns from visual tokens: the
    methods a study's tokenizers feed (DTM, which needs a teacher, is not one)."""
    try:
        return get_method(name).inputs == "tokens"
    except ValueError:
        return False

def _canonical(name: str) -> str:
    """The registry's name of a study method (``mim`` → ``beit``); ``scratch`` stays."""
    return name if name == "scratch" else get_method(name).name


def _check(cfg: Dict[str, Any]) -> None:
    seeds = cfg["seeds"]
    if (not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                              for s in seeds) or len(set(seeds)) != len(seeds)):
        raise ValueError(f"config: seeds must be a non-empty list of distinct integers, got {seeds!r}")
    methods = cfg["methods"]
    if not isinstance(methods, list) or not all(isinstance(m, str) and _token_method(m) for m in methods) or \
            len({get_method(m).name for m in methods}) != len(methods):
        known = [m for m in method_names() if _token_method(m)]
        raise ValueError(f"config: methods must be a list of distinct names among {', '.join(known)} "
                         f"(mim: beit), got {methods!r}")
    toks = cfg["tokenizers"]
    if not isinstance(toks, list) or not toks or len(set(toks)) != len(toks):
        raise ValueError(f"config: tokenizers must be a non-empty list of distinct names, got {toks!r}")
    for t in toks:
        if t not in _TOKENIZERS:
            raise ValueError(f"config: tokenizer {t!r} is not available here (known: {', '.join(sorted(_TOKENIZERS))})")
    if "ccvit" in {get_method(m).name for m in methods} and toks != ["pixel"]:
        raise ValueError(f"config: ccvit replaces patches by their pixel centroids: it needs tokenizers=['pixel'], "
                         f"got {toks!r}")
    kclip = cfg.get("kclip") or {}
    bad = sorted(set(kclip) - set(KCLIP_DEFAULTS))
    if bad:
        raise ValueError(f"config: kclip.{bad[0]} is not a k-CLIP option (known: {', '.join(KCLIP_DEFAULTS)})")
    if "kclip" in toks and kclip.get("clip") and not os.path.exists(str(kclip["clip"])):
        raise ValueError(f"config: kclip.clip {kclip['clip']!r} does not exist (a CLIP weights .safetensors, "
                         "or null for a random tower)")
    if not (isinstance(cfg["baseline"], str) and _token_method(cfg["baseline"]) or cfg["baseline"] == "scratch") \
            or _canonical(cfg["baseline"]) not in [get_method(m).name for m in methods] + ["scratch"]:
        raise ValueError(f"config: baseline must be one of methods or 'scratch', got {cfg['baseline']!r}")
    if not 0.0 < float(cfg["confidence"]) < 1.0:
        raise ValueError(f"config: confidence must be in (0, 1), got {cfg['confidence']!r}")
    for section, known in (("pretrain", PRETRAIN_DEFAULTS), ("finetune", FINETUNE_DEFAULTS),
                           ("scratch", FINETUNE_DEFAULTS)):
        bad = [k for k in cfg[section] if k not in known or k in _DATA or k in ("model", "seed", "output_dir")]
        if bad:
            raise ValueError(f"config: {section}.{bad[0]} is not a {section if section != 'scratch' else 'finetune'} "
                             "recipe key")


def _row(method: str, tokenizer: Optional[str], tokenizers: List[str]) -> str:
    """A run's row: the method, or ``method/tokenizer`` when the study has several (scratch has none)."""
    return method if method == "scratch" or len(tokenizers) == 1 else f"{method}/{tokenizer}"


def _fingerprint(cfg: Dict[str, Any], method: str, tokenizer: Optional[str]) -> str:
    """What a run's result depends on (seed apart): a changed recipe is not mistaken for a finished run."""
    keys = {k: cfg.get(k) for k in (*_DATA, "model", "precision", "linprobe")}
    keys = {k: v for k, v in keys.items() if k not in ("workers", "progress")}
    if method == "scratch":
        keys.update(finetune=cfg["finetune"], scratch=cfg["scratch"])
    else:
        keys.update(finetune=cfg["finetune"], pretrain=cfg["pretrain"], tokenizer=cfg["tokenizer"],
                    method=method, tokenizer_name=tokenizer)
        if tokenizer == "kclip":
            keys.update(kclip=cfg["kclip"])
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def _transfer(cfg: Dict[str, Any], seed: int, pretrained: Optional[str], recipe: Dict[str, Any],
              directory: str) -> Dict[str, float]:
    """Linear probe and fine-tune of one initialisation; returns the record's scores."""
    base = {k: v for k, v in cfg.items() if k in _DATA}
    base.update(seed=seed, precision=cfg.get("precision"), model={k: None for k in _MODEL})
    if pretrained is None:
        base["model"] = dict(cfg["model"])
    probe = run_linprobe(dict(base, pretrained=pretrained, pool="avg", init_values=None, **cfg["linprobe"]))
    fcfg = copy.deepcopy(FINETUNE_DEFAULTS)
    fcfg.update(base, pretrained=pretrained, output_dir=directory, validate_every_epoch=False)
    fcfg.update(recipe)
    _, history, metrics = run_finetune(fcfg)
    return {"linear_probe_top1": float(probe["val_top1"]), "finetune_top1": float(metrics["top1"]),
            "finetune_final_loss": float(history["loss"][-1])}


def _run_one(cfg: Dict[str, Any], out: str, method: str, tokenizer: Optional[str], seed: int) -> Dict[str, Any]:
    t = time.perf_counter()
    name = "scratch" if method == "scratch" else f"{method}-{tokenizer}"
    # keyed by the recipe too: an interrupted run's checkpoint is resumed only by the same recipe
    directory = os.path.join(out, "work", f"{name}-seed{seed}-{_fingerprint(cfg, method, tokenizer)[:8]}")
    if method == "scratch":
        scores = _transfer(cfg, seed, None, dict(cfg["finetune"], **cfg["scratch"]), os.path.join(directory, "finetune"))
    else:
        cache = _TOKENIZERS[tokenizer](cfg, seed, os.path.join(out, "work", f"tokens-{tokenizer}-seed{seed}"))
        pcfg = copy.deepcopy(PRETRAIN_DEFAULTS)
        pcfg.update({k: v for k, v in cfg.items() if k in _DATA})
        pcfg.update(seed=seed, method=method, model=dict(cfg["model"]), tokens=cache, precision=cfg.get("precision"),
                    tokenizer=dict(PRETRAIN_DEFAULTS["tokenizer"], **cfg["tokenizer"],
                                   path=os.path.join(os.path.dirname(cache), "tokenizer.safetensors")),
                    output_dir=os.path.join(directory, "pretrain"))
        pcfg.update(cfg["pretrain"])
        for key in ("least_number", "num_masking_patches"):
            if key not in get_method(method).reads:
                pcfg[key] = None  # one budget for all: each option is read by its methods alone
        model_file = os.path.join(directory, "pretrain", "model.safetensors")
        if not os.path.exists(os.path.join(directory, "pretrain.done")):
            run_pretrain(pcfg)
            atomic_write(os.path.join(directory, "pretrain.done"), lambda f: f.write(b"ok\n"))
        scores = _transfer(cfg, seed, model_file, cfg["finetune"], os.path.join(directory, "finetune"))
    return dict(scores, row=_row(method, tokenizer, cfg["tokenizers"]), method=method, tokenizer=tokenizer,
                seed=seed, seconds=time.perf_counter() - t, fingerprint=_fingerprint(cfg, method, tokenizer))


def _plan(cfg: Dict[str, Any]) -> List[tuple]:
    """(method, tokenizer, seed) of every run, seed-major so a stopped study has whole seeds."""
    runs = []
    for seed in cfg["seeds"]:
        for tok in cfg["tokenizers"]:
            runs += [(m, tok, seed) for m in cfg["methods"]]
        runs.append(("scratch", None, seed))
    return runs


def _record_path(out: str, method: str, tokenizer: Optional[str], seed: int) -> str:
    name = "scratch" if method == "scratch" else f"{method}-{tokenizer}"
    return os.path.join(out, "runs", f"{name}-seed{seed}.json")


def summarize(records: List[Dict[str, Any]], baseline: str = "beit", confidence: float = 0.95) -> Dict[str, Any]:
    """Mean ± std per row and paired differences to ``baseline`` and to ``scratch``.

    Args:
        records: one dict per run with ``row``, ``seed``, ``linear_probe_top1`` and ``finetune_top1``.
        baseline: the row (method name, or ``method/tokenizer`` with several tokenizers) others are
            compared with, besides ``scratch``; a missing row is skipped.
        confidence: coverage of the paired t intervals.

    Returns:
        {"rows": {row: {metric: mean_std}}, "differences": [{row, reference, metric, **paired_difference}],
        "finetune_below_probe": {row: [seeds where fine-tune < linear probe]}}.
    """
    metrics = ("linear_probe_top1", "finetune_top1")
    by_row: Dict[str, Dict[str, Dict[int, float]]] = {}
    for r in records:
        for m in metrics:
            by_row.setdefault(r["row"], {}).setdefault(m, {})[int(r["seed"])] = float(r[m])
    order = sorted(by_row, key=lambda r: r != "scratch")  # the reference row first, then as recorded
    rows = {row: {m: stats.mean_std([by_row[row][m][s] for s in sorted(by_row[row][m])]) for m in metrics}
            for row in order}
    diffs = []
    for row in by_row:
        if row == "scratch":
            continue  # every other row is compared with it
        refs = [ref for ref in (baseline, "scratch") if ref in by_row and ref != row]
        refs += [r for r in by_row if r != row and r.split("/")[0] == baseline.split("/")[0] and r not in refs
                 and "/" in row and r.split("/", 1)[1] == row.split("/", 1)[1]]  # same tokenizer's baseline
        for ref in refs:
            for m in metrics:
                d = stats.paired_difference(by_row[row][m], by_row[ref][m], confidence)
                diffs.append(dict(d, row=row, reference=ref, metric=m))
    below = {row: sorted(s for s in v["finetune_top1"] if v["finetune_top1"][s] < v["linear_probe_top1"].get(s, -1))
             for row, v in by_row.items()}
    return {"rows": rows, "differences": diffs, "finetune_below_probe": below, "confidence": confidence}


def _name(row: str) -> str:
    method, _, tok = row.partition("/")
    title = "from scratch" if method == "scratch" else get_method(method).title if _token_method(method) else method
    return title + (f" ({tok} tokens)" if tok else "")


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:+.1f}"


def markdown(summary: Dict[str, Any], budget: str) -> str:
    """The study's tables as Markdown: mean ± std per row, then the paired differences."""
    lines = ["| method | linear probe top-1 | fine-tune top-1 | seeds |", "|---|---|---|---|"]
    for row, v in summary["rows"].items():
        lp, ft = v["linear_probe_top1"], v["finetune_top1"]
        lines.append(f"| {_name(row)} | {100 * lp['mean']:.1f} ± {100 * lp['std']:.1f}% | "
                     f"{100 * ft['mean']:.1f} ± {100 * ft['std']:.1f}% | {ft['n']} |")
    c = int(round(100 * summary["confidence"]))
    lines += ["", f"Paired by seed (points of top-1; {c}% Student-t interval of the mean difference; "
                  "wins: seeds where the row is ahead):", "",
              "| difference | metric | mean | std | " + f"{c}% CI | wins |", "|---|---|---|---|---|---|"]
    for d in summary["differences"]:
        metric = "linear probe" if d["metric"] == "linear_probe_top1" else "fine-tune"
        lines.append(f"| {_name(d['row'])} − {_name(d['reference'])} | {metric} | {_pct(d['mean'])} | "
                     f"{100 * d['std']:.1f} | [{_pct(d['low'])}, {_pct(d['high'])}] | {d['wins']}/{d['n']} |")
    below = {r: s for r, s in summary["finetune_below_probe"].items() if s}
    lines += ["", "Fine-tune ≥ linear probe on every seed of every row." if not below else
              "Fine-tune below the linear probe: " + "; ".join(f"{_name(r)} on seeds {s}" for r, s in below.items())
              + "."]
    return "\n".join(lines) + "\n\nBudget: " + budget + "\n"


def plot(summary: Dict[str, Any], path: str, caption: str) -> Any:
    """study.png: each row's mean top-1 with ±1 std error bars, linear probe and fine-tune side by side."""
    import numpy as np

    from . import viz

    rows = list(summary["rows"])
    metrics = [("linear_probe_top1", "linear probe"), ("finetune_top1", "fine-tune")]
    fig = viz._new_figure(9.0, 1.6 + 0.7 * len(rows))
    ax = fig.subplots()
    y = np.arange(len(rows))
    h = 0.38
    for j, (key, label) in enumerate(metrics):
        mean = np.array([100 * summary["rows"][r][key]["mean"] for r in rows])
        std = np.array([100 * summary["rows"][r][key]["std"] for r in rows])
        pos = y + (j - 0.5) * h
        bars = ax.barh(pos, mean, h * 0.92, xerr=std, capsize=4, label=label, color=viz._color(j),
                       error_kw={"elinewidth": 1.2, "ecolor": "#222222"})
        ax.bar_label(bars, labels=[f"{m:.1f} ± {s:.1f}" for m, s in zip(mean, std)], padding=6, fontsize=9)
    ax.set_yticks(y, [_name(r) for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 118)
    ax.set_xlabel("top-1 accuracy on the held-out split (%), mean ± std over seeds")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=9, frameon=False)
    return viz._finish(fig, "Pre-training methods compared over seeds", caption, path)


def run_study(cfg: Dict[str, Any], stop_after: Optional[int] = None) -> Dict[str, Any]:
    """Run (or continue) the study per ``cfg`` (see ``STUDY_DEFAULTS``); returns the summary and records.

    Args:
        cfg: the resolved study config.
        stop_after: run at most this many not-yet-finished runs, then write the report of the finished
            ones, marked in progress (0: only report what is there).
    """
    _check(cfg)
    # rows, records and comparisons under the registry's names (mim is beit)
    cfg = dict(cfg, methods=[_canonical(m) for m in cfg["methods"]], baseline=_canonical(cfg["baseline"]),
               kclip=dict(KCLIP_DEFAULTS, **(cfg.get("kclip") or {})))
    out = cfg.get("output_dir") or "mapet-study"
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    t0 = time.perf_counter()
    records, done_now, pending = [], 0, 0
    plan = _plan(cfg)
    for k, (method, tok, seed) in enumerate(plan):
        path = _record_path(out, method, tok, seed)
        want = _fingerprint(cfg, method, tok)
        if os.path.exists(path):
            with open(path) as f:
                rec = json.load(f)
            if rec.get("fingerprint") != want:
                raise ValueError(f"{path} was made with another recipe; use another output_dir or delete "
                                 f"{os.path.join(out, 'runs')} to start the study over")
            # a study given another tokenizer later names its rows method/tokenizer: the records follow
            rec["row"] = _row(method, tok, cfg["tokenizers"])
            records.append(rec)
            continue
        if stop_after is not None and done_now >= stop_after:
            pending += 1
            continue
        print(f"[{time.perf_counter() - t0:6.0f} s] run {k + 1}/{len(plan)}: {method}"
              f"{'' if tok is None else ' / ' + tok} seed {seed}", flush=True)
        rec = _run_one(cfg, out, method, tok, seed)
        blob = json.dumps(rec, indent=2).encode()
        atomic_write(path, lambda f: f.write(blob))
        records.append(rec)
        done_now += 1
        if len(records) < len(plan):
            report(cfg, records, complete=False)  # the table so far, readable while the study runs
    if pending:
        return report(cfg, records, complete=False) if records else {"complete": False, "records": records}
    return report(cfg, records, complete=True)


def report(cfg: Dict[str, Any], records: List[Dict[str, Any]], complete: bool = True) -> Dict[str, Any]:
    """Write study.md, study.json and study.png for the finished ``records`` (also while a study is
    still running: then the report says how many runs it covers); returns the result dict."""
    out = cfg.get("output_dir") or "mapet-study"
    baseline = cfg["baseline"]
    if len(cfg["tokenizers"]) > 1 and baseline != "scratch":
        baseline = f"{baseline}/{cfg['tokenizers'][0]}"
    summary = summarize(records, baseline=baseline, confidence=float(cfg["confidence"]))
    m, p, f = cfg["model"], cfg["pretrain"], cfg["finetune"]
    run_seconds = sum(r["seconds"] for r in records)
    planned = len(_plan(cfg))
    budget = (f"ViT embed_dim {m['embed_dim']}, depth {m['depth']}, {m['num_heads']} heads, {m['img_size']} px, "
              f"patch {m['patch_size']}; seeds {cfg['seeds']}; tokenizers {cfg['tokenizers']} "
              f"(k={cfg['tokenizer']['n_tokens']}); pre-training {p.get('epochs')} epochs per method; fine-tuning "
              f"{f.get('epochs')} epochs (pre-trained rows: {json.dumps(f)}; scratch: {json.dumps(cfg['scratch'])}); "
              f"linear probe {cfg['linprobe'].get('epochs')} epochs; precision {cfg.get('precision') or 'fp32'}; "
              f"data {cfg.get('data')}; {len(records)} of {planned} runs, {run_seconds / 60:.1f} min of run time")
    title = "# mapet study\n\n" if complete else f"# mapet study (in progress: {len(records)} of {planned} runs)\n\n"
    text = title + markdown(summary, budget)
    atomic_write(os.path.join(out, "study.md"), lambda fh: fh.write(text.encode()))
    result = {"complete": complete, "summary": summary, "records": records, "budget": budget,
              "run_seconds": run_seconds}
    blob = json.dumps(result, indent=2).encode()
    atomic_write(os.path.join(out, "study.json"), lambda fh: fh.write(blob))
    seeds = max(v["finetune_top1"]["n"] for v in summary["rows"].values())
    plot(summary, os.path.join(out, "study.png"),
         caption=f"Mean top-1 over {seeds} seeds, error bars ±1 standard deviation across seeds; "
                 "every pre-trained row uses one fine-tuning recipe (finetune.*), the from-scratch row its own "
                 "(scratch.*). Paired differences with confidence intervals are in study.md."
                 + ("" if complete else f" In progress: {len(records)} of {planned} runs."))
    if complete:
        print(text)
        print(f"Outputs in {out}/ (study.md, study.json, study.png, runs/)")
    return result


@command("study", "seeded comparison of pre-training methods (× tokenizers) against MIM and training from scratch, "
                  "paired by seed with confidence intervals; resumable", defaults=STUDY_DEFAULTS,
         options=dict(OPTIONS, **STUDY_OPTIONS))
def _study(args, cfg) -> int:
    run_study(cfg)
    return 0
