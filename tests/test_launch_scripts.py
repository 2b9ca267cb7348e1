"""Every train.py command in the launch scripts and their README uses flags that
exist: absl flags of train.py (incl. the multi-host ones) and --config.a.b keys of
the config. A renamed flag breaks this test, not a TPU job."""

import pathlib
import re

import pytest
from absl import flags

import train  # noqa: F401  (defines train.py's flags)
from configs import default

ROOT = pathlib.Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "experiments" / "tpu").glob("*.sh")) + [
    ROOT / "experiments" / "tpu" / "README.md"
]


def train_commands(text: str) -> list[str]:
    """The text of each `python train.py ...` command, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [m.group(1) for m in re.finditer(r"python train\.py([^\n;&|]*)", joined)]


def flag_names(command: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"(?:^|\s)[\"']?--([\w.]+)", command)]


def has_key(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_train_commands_use_real_flags(path):
    commands = train_commands(path.read_text())
    assert commands, f"no train.py command found in {path}"
    config = default.get_config()
    for command in commands:
        for name in flag_names(command):
            if name.startswith("config."):
                assert has_key(config, name.removeprefix("config.")), (path.name, name)
            else:
                assert name in flags.FLAGS, (path.name, name)


def test_parser_sees_flags():
    cmd = train_commands("python train.py --multihost \\\n  --config.mesh.data=2 --nope=1")
    assert flag_names(cmd[0]) == ["multihost", "config.mesh.data", "nope"]
    assert not has_key(default.get_config(), "mesh.nope")
