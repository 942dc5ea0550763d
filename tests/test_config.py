"""Configuration: files, overrides, the resolved copy, and the `python -m mapet` front end."""
import json
import os
import subprocess
import sys

import pytest

from mapet.config import apply_override, load_config, merge, parse_value, save_resolved_config

# Subprocesses import the same mapet as this process (installed, or the source tree in dev).
import mapet as _mapet

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(_mapet.__file__)))


def test_values_parse_as_json_then_words():
    assert parse_value("3") == 3 and parse_value("1e-3") == 1e-3 and parse_value("[1, 2]") == [1, 2]
    assert parse_value("true") is True and parse_value("False") is False and parse_value("None") is None
    assert parse_value("mapet_tiny_patch16_224") == "mapet_tiny_patch16_224"
    assert parse_value('"42"') == "42" and parse_value('{"a": 1}') == {"a": 1}


def test_file_then_overrides_refine_defaults(tmp_path):
    defaults = {"epochs": 300, "optim": {"lr": 1.5e-3, "wd": 0.05}, "model": "mapet_tiny_patch16_224"}
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"epochs": 5, "optim": {"lr": 1e-3}, "data": {"img_size": 32}}))
    cfg = load_config(str(path), ["optim.wd=0", "data.root=/tmp/x", "new.deep.key=[1,2]"], defaults=defaults)
    assert cfg == {"epochs": 5, "optim": {"lr": 1e-3, "wd": 0}, "model": "mapet_tiny_patch16_224",
                   "data": {"img_size": 32, "root": "/tmp/x"}, "new": {"deep": {"key": [1, 2]}}}
    assert defaults["optim"] == {"lr": 1.5e-3, "wd": 0.05}  # not mutated
    assert merge({"a": {"b": 1}}, {"a": 2}) == {"a": 2}


def test_yaml_needs_pyyaml_or_says_so(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 7\noptim:\n  lr: 0.002\n")
    try:
        import yaml  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="PyYAML"):
            load_config(str(path))
    else:
        assert load_config(str(path)) == {"epochs": 7, "optim": {"lr": 0.002}}


def test_config_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(ValueError, match="bad.json: invalid JSON"):
        load_config(str(bad))
    lst = tmp_path / "list.json"
    lst.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a mapping"):
        load_config(str(lst))
    with pytest.raises(ValueError, match="unknown config format"):
        load_config(str(tmp_path / "x.toml"))
    cfg = {"epochs": 3}
    with pytest.raises(ValueError, match="key=value"):
        apply_override(cfg, "epochs")
    with pytest.raises(ValueError, match="epochs is a int, not a mapping"):
        apply_override(cfg, "epochs.x=1")


def test_resolved_config_round_trips(tmp_path):
    cfg = {"b": [1, 2], "a": {"x": None, "y": "s"}}
    path = save_resolved_config(str(tmp_path / "out"), cfg)
    assert path == str(tmp_path / "out" / "config.json")
    assert load_config(path) == cfg
    with pytest.raises(TypeError, match="JSON"):
        save_resolved_config(str(tmp_path), {"f": object()})


def _cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
    return subprocess.run([sys.executable, "-m", "mapet", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def test_cli_help_config_file_overrides_and_saved_config(tmp_path):
    r = _cli("--help")
    assert r.returncode == 0 and "info" in r.stdout
    r = _cli("info", "--help")
    assert r.returncode == 0 and "--set KEY=VALUE" in r.stdout and "--config" in r.stdout
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"seed": 1, "optim": {"lr": 0.1}}))
    out = tmp_path / "out"
    r = _cli("info", "-c", str(conf), "--set", "optim.lr=0.5", "--set", "seed=2", "-o", str(out), "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "mapet" in r.stdout and "threads: 1" in r.stdout
    saved = json.loads((out / "config.json").read_text())
    assert saved == {"seed": 2, "optim": {"lr": 0.5}, "output_dir": str(out)}
    r = _cli("info", "-c", str(conf), "--print-config")
    assert r.returncode == 0 and json.loads(r.stdout) == {"seed": 1, "optim": {"lr": 0.1}}
    r = _cli("info", "--set", "nonsense")
    assert r.returncode == 2 and "key=value" in r.stderr
    r = _cli("info", "-c", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "missing.json" in r.stderr
