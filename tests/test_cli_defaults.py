"""Every CLI option that has a config field shows and uses that field's default (cli.py `_default`).

The configs are the one place a default lives: the library's callers (compare(), capture(), dump())
and the command line must not drift apart, as `capture torchvision --device` once did (auto on the
command line, cpu in CaptureConfig).
"""

import dataclasses

import click
import pytest

UNSET = click.Option(["--probe"]).get_default(click.Context(click.Command("probe")))  # click's 'no default'

import cli
from detector.capture.config import CaptureConfig, UltralyticsConfig
from detector.recipe import DumpConfig, TrainConfig
from misalign.settings import CompareSettings

COMMANDS = [  # (command path, its config class)
    (("report",), CompareSettings),
    (("capture", "torchvision"), CaptureConfig),
    (("capture", "ultralytics"), UltralyticsConfig),
    (("dump",), DumpConfig),
    (("train",), TrainConfig),
]


def _command(path):
    command = cli.main
    for name in path:
        command = command.commands[name]
    return command


@pytest.mark.parametrize("path,config", COMMANDS, ids=lambda v: " ".join(v) if isinstance(v, tuple) else v.__name__)
def test_option_defaults_are_the_config_defaults(path, config):
    fields = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    command = _command(path)
    ctx = click.Context(command)
    checked = 0
    for param in command.params:
        default = param.get_default(ctx) if isinstance(param, click.Option) else None
        if default in (None, UNSET) or param.required or param.is_flag or param.multiple:
            continue  # flags default to False; None defers to a recipe, a checkpoint or the data
        assert param.name in fields, f"{' '.join(path)} --{param.name}: no {config.__name__} field"
        assert default == fields[param.name], f"{' '.join(path)} --{param.name}"
        checked += 1
    assert checked >= 2
