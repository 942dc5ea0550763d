"""``python -m mapet <command>``: the command-line front end.

Every command shares the configuration machinery: ``-c/--config FILE`` (JSON or YAML),
``--set key=value`` overrides (repeatable, dotted keys for nesting), ``-o/--output-dir DIR``
where the resolved config is saved as ``config.json`` beside the command's outputs, and
``--threads``. Commands register themselves with ``command(...)``; each receives the parsed
arguments and the resolved config. The training commands (tokenize, pretrain, finetune,
linprobe, eval, demo) are registered by ``mapet.train`` once it exists.
"""
import argparse
import json
import logging
import math
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

from .config import load_config, save_resolved_config

logger = logging.getLogger(__name__)

# name -> (help, description, configure(parser), run(args, cfg) -> int, defaults)
COMMANDS: Dict[str, tuple] = {}


def command(name: str, help: str, description: str = "", defaults: Optional[Dict[str, Any]] = None):
    """Register ``run(args, cfg) -> int`` as a subcommand; the decorated function may carry a
    ``configure(parser)`` attribute to add its own options.

    Example:
        >>> @command("pretrain", "pre-train a ViT", defaults={"epochs": 100})
        ... def pretrain_cmd(args, cfg): ...
    """
    def register(run: Callable):
        COMMANDS[name] = (help, description or help, getattr(run, "configure", None), run, dict(defaults or {}))
        return run
    return register


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration")
    g.add_argument("-c", "--config", metavar="FILE",
                   help="configuration file (.json, or .yaml/.yml with PyYAML); values refine the command's defaults")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, applied after the file; dotted keys nest "
                        "(e.g. --set optim.lr=1e-3 --set epochs=5); values parse as JSON when they can")
    g.add_argument("-o", "--output-dir", metavar="DIR",
                   help="directory for the command's outputs; the resolved config is saved there as config.json")
    g.add_argument("--threads", type=int, metavar="N",
                   help="worker threads for mapet's Swift kernels (default: all cores)")
    g.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration as JSON and exit")
    g.add_argument("-v", "--verbose", action="count", default=0,
                   help="log INFO (-v) or DEBUG (-vv) messages to stderr")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, one subparser per registered command."""
    parser = argparse.ArgumentParser(
        prog="python -m mapet",
        description="mapet: masked and permuted pre-training of Vision Transformers (Swift engine).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'python -m mapet <command> --help' for the options of one command.")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (help_text, description, configure, _, _) in sorted(COMMANDS.items()):
        p = sub.add_parser(name, help=help_text, description=description)
        if configure is not None:
            configure(p)
        _add_common(p)
    return parser


def check_types(cfg: Dict[str, Any], defaults: Dict[str, Any], prefix: str = "") -> None:
    """Each value whose default is a number, bool, str or mapping must be one too (numbers finite).

    Raises:
        ValueError: naming the dotted key, what its default says it is, and the value given.
    """
    for key, default in defaults.items():
        if key not in cfg or default is None:
            continue
        v, name = cfg[key], prefix + key
        if isinstance(default, dict):
            if not isinstance(v, dict):
                raise ValueError(f"{name}: expected a mapping of options, got {v!r}")
            check_types(v, default, name + ".")
        elif isinstance(default, bool):
            if not isinstance(v, bool):
                raise ValueError(f"{name}: expected true or false, got {v!r}")
        elif isinstance(default, (int, float)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{name}: expected a number (default {default}), got {v!r}")
            if not math.isfinite(v):
                raise ValueError(f"{name}: expected a finite number, got {v!r}")
        elif isinstance(default, str) and not isinstance(v, str):
            raise ValueError(f"{name}: expected a string (default {default!r}), got {v!r}")


def resolve(args: argparse.Namespace) -> Dict[str, Any]:
    """The command's defaults, refined by ``--config`` then ``--set`` (types checked against the
    defaults); ``--output-dir`` is recorded."""
    defaults = COMMANDS[args.command][4]
    cfg = load_config(args.config, args.overrides, defaults=defaults)
    check_types(cfg, defaults)
    if args.output_dir:
        cfg["output_dir"] = args.output_dir
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m mapet``; returns the exit status."""
    _load_commands()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    from . import distributed
    if distributed.launched_by_mpi():
        # under mpiexec: join the job before anything can fail, so that an error on any rank
        # aborts all of them (and set a per-rank thread default that --threads overrides)
        distributed.init()
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = resolve(args)
    except (OSError, ValueError, ImportError) as e:
        parser.exit(2, f"python -m mapet {args.command}: error: {' '.join(str(e).split())}\n")
    if args.print_config:
        print(json.dumps(cfg, indent=2, sort_keys=True))
        return 0
    if args.threads is not None:
        if not 1 <= args.threads <= 1024:
            parser.exit(2, f"python -m mapet {args.command}: error: --threads: expected 1..1024, got {args.threads}\n")
        from ._runtime import set_num_threads
        set_num_threads(args.threads)
    try:
        out = cfg.get("output_dir")
        if out and distributed.context().is_main:
            os.makedirs(out, exist_ok=True)
            logger.info("resolved config saved to %s", save_resolved_config(out, cfg))
        return int(COMMANDS[args.command][3](args, cfg) or 0)
    except (ValueError, TypeError, KeyError, OSError, MemoryError) as e:
        # A user error (bad option value, missing file, model too large): one line, status 2.
        # -v shows the traceback.
        if args.verbose:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        if isinstance(e, OSError) and e.filename and str(e.filename) not in message:
            message = f"{e.filename}: {message}"
        message = " ".join(str(message).split()) or type(e).__name__
        parser.exit(2, f"python -m mapet {args.command}: error: {message} ({type(e).__name__}; -v for the traceback)\n")


def _load_commands() -> None:
    """Import the modules that register commands (those present in this build)."""
    import importlib

    for module in ("mapet.commands", "mapet.demo"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


@command("info", "print the mapet version, build and thread configuration")
def _info(args: argparse.Namespace, cfg: Dict[str, Any]) -> int:
    import mapet

    blas = mapet.blas_info()
    print(f"mapet {mapet.__version__}")
    print(f"threads: {mapet.get_num_threads()}")
    print(f"blas: {blas['corename']} ({blas['blas_threads']} thread); {blas['config']}")
    print(f"commands: {', '.join(sorted(COMMANDS))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
