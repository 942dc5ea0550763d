"""``python -m mapet <command>``: the command-line front end.

Every command shares the configuration machinery: ``-c/--config FILE`` (JSON or YAML),
``--set key=value`` overrides (repeatable, dotted keys for nesting), ``-o/--output-dir DIR``
where the resolved config is saved as ``config.json`` beside the command's outputs, and
``--threads``. Commands register themselves with ``command(...)``; each receives the parsed
arguments and the resolved config. A command that declares its defaults is strict: a key it
does not know (``--set epochz=3``) is an error naming the closest valid one, and
``--list-options`` prints every key with its default and meaning.

An output directory remembers its run: started again on a directory whose checkpoint was made
with another configuration, a command stops and says what differs, unless ``--resume``
(continue that checkpoint with the new values) or ``--fresh`` (delete its checkpoints and
start over) is given. Every such mistake is one line on stderr and exit status 2.
"""
import argparse
import json
import logging
import os
import sys
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence

from .config import RESOLVED, check_keys, config_differences, load_config, option_table, save_resolved_config

logger = logging.getLogger(__name__)

# name -> (help, description, configure(parser), run(args, cfg) -> int, defaults or None, meanings)
COMMANDS: Dict[str, tuple] = {}

# keys that change where or how a run is shown or how fast it goes, not what it computes
# (ignored when comparing runs; workers: the batches do not depend on it)
_NOT_THE_RUN = ("output_dir", "progress", "workers", "tensorboard")


def command(name: str, help: str, description: str = "", defaults: Optional[Dict[str, Any]] = None,
            options: Optional[Dict[str, str]] = None):
    """Register ``run(args, cfg) -> int`` as a subcommand; the decorated function may carry a
    ``configure(parser)`` attribute to add its own options.

    Args:
        name, help, description: the subcommand and its help texts.
        defaults: the command's configuration; when given, only its keys are accepted.
        options: meaning of each key (dotted, or the last part of a dotted key) for ``--list-options``.

    Example:
        >>> @command("pretrain", "pre-train a ViT", defaults={"epochs": 100}, options={"epochs": "passes over the data"})
        ... def pretrain_cmd(args, cfg): ...
    """
    def register(run: Callable):
        COMMANDS[name] = (help, description or help, getattr(run, "configure", None), run,
                          None if defaults is None else dict(defaults), dict(options or {}))
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
    g.add_argument("--list-options", action="store_true",
                   help="list every configuration key of this command with its default and meaning, and exit")
    run = g.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true",
                     help="continue the checkpoint in --output-dir even though the configuration changed")
    run.add_argument("--fresh", action="store_true",
                     help="delete the checkpoints in --output-dir and start over")
    g.add_argument("-v", "--verbose", action="count", default=0,
                   help="log INFO (-v) or DEBUG (-vv) messages to stderr")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, one subparser per registered command."""
    parser = argparse.ArgumentParser(
        prog="python -m mapet",
        description="mapet: masked and permuted pre-training of Vision Transformers (Swift engine).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'python -m mapet <command> --help' for the flags of one command and "
               "'python -m mapet <command> --list-options' for every configuration key with its default.")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (help_text, description, configure, _, defaults, _) in sorted(COMMANDS.items()):
        epilog = (f"Configuration keys: 'python -m mapet {name} --list-options' lists all {len(option_table(defaults, {}))}"
                  " with their defaults and meanings; set them with --set KEY=VALUE or -c FILE."
                  if defaults is not None else None)
        p = sub.add_parser(name, help=help_text, description=description, epilog=epilog)
        if configure is not None:
            configure(p)
        _add_common(p)
    return parser


def resolve(args: argparse.Namespace) -> Dict[str, Any]:
    """The command's defaults, refined by ``--config`` then ``--set``; ``--output-dir`` is recorded.

    Raises:
        ValueError: an unknown key (with the closest valid one) or a value of the wrong type.
    """
    defaults = COMMANDS[args.command][4]
    cfg = load_config(args.config, args.overrides, defaults=defaults or {})
    if defaults is not None:  # output_dir is every command's (a saved config.json holds it)
        check_keys({k: v for k, v in cfg.items() if k != "output_dir"}, defaults, where="config")
    if args.output_dir:
        cfg["output_dir"] = args.output_dir
    return cfg


def list_options(name: str) -> str:
    """The ``--list-options`` text of command ``name``: one line per key, default, meaning."""
    _, _, _, _, defaults, meanings = COMMANDS[name]
    if defaults is None:
        return f"{name}: no configuration keys\n"
    rows = option_table(defaults, meanings)
    width = max(len(k) + len(v) for k, v, _ in rows) + 3
    return "".join(f"{f'{k} = {v}':<{width}} {m}\n".rstrip() + "\n" for k, v, m in rows)


def _checkpoints(out: str) -> List[str]:
    """Every resumable checkpoint (``last.safetensors``) under a run directory."""
    found = []
    for dirpath, _, files in os.walk(out):
        found += [os.path.join(dirpath, f) for f in files if f == "last.safetensors"]
    return sorted(found)


def check_run_dir(out: str, cfg: Dict[str, Any], resume: bool = False, fresh: bool = False) -> None:
    """Refuse to resume a checkpoint in ``out`` made with another config (unless ``resume``);
    ``fresh`` deletes the checkpoints so the run starts over.

    Raises:
        ValueError: saying what differs and how to proceed.
    """
    checkpoints = _checkpoints(out) if os.path.isdir(out) else []
    if fresh:
        for path in checkpoints:
            os.unlink(path)
        if checkpoints:
            logger.info("--fresh: removed %s", checkpoints)
        return
    saved = os.path.join(out, RESOLVED)
    if not checkpoints or resume or not os.path.exists(saved):
        return
    try:
        with open(saved) as f:
            old = json.load(f)
    except ValueError:
        old = {}
    diff = config_differences(old, cfg, ignore=_NOT_THE_RUN)
    if diff:
        raise ValueError(f"{out} holds a checkpoint of a run with another configuration ({'; '.join(diff)}); "
                         "pass --resume to continue it with the new values, --fresh to start over, "
                         "or choose another --output-dir")


def fail(command: str, error: BaseException) -> NoReturn:
    """The one way the CLI reports a user's mistake: one line on stderr, exit status 2."""
    message = str(error).strip().replace("\n", " ") or type(error).__name__
    sys.stderr.write(f"python -m mapet {command}: error: {message}\n")
    sys.exit(2)


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
    if args.list_options:
        sys.stdout.write(list_options(args.command))
        return 0
    ctx = distributed.context()
    try:
        cfg = resolve(args)
        if args.print_config:
            print(json.dumps(cfg, indent=2, sort_keys=True))
            return 0
        if args.threads is not None and not 1 <= args.threads <= 1024:
            raise ValueError(f"--threads must be at least 1 and at most 1024, got {args.threads}")
        if args.threads:
            from ._runtime import set_num_threads
            set_num_threads(args.threads)
        out = cfg.get("output_dir")
        if out and ctx.is_main:
            check_run_dir(out, cfg, resume=args.resume, fresh=args.fresh)
            os.makedirs(out, exist_ok=True)
            logger.info("resolved config saved to %s", save_resolved_config(out, cfg))
        if out and ctx.distributed:
            ctx.barrier()  # --fresh has removed the checkpoints before any rank looks for one
        return int(COMMANDS[args.command][3](args, cfg) or 0)
    except (OSError, ValueError, TypeError, KeyError, MemoryError, ImportError) as e:
        if ctx.distributed or args.verbose > 1:
            raise  # under mpiexec the rank-failure hook aborts every rank; -vv shows the traceback
        fail(args.command, e)


def _load_commands() -> None:
    """Import the modules that register commands (those present in this build)."""
    import importlib

    for module in ("mapet.commands", "mapet.demo", "mapet.predict", "mapet.convert", "mapet.study"):
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
