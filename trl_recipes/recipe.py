"""Recipe files: where a `--config` is found, and paths inside a recipe that are relative to the recipe itself.

* `--config PATH` is read as given; a path that does not exist there is looked up among the packaged recipes
  (`trl_recipes/recipes/`, with or without that prefix), so the documented commands work from any directory and from
  an installed package.
* In a recipe, a data path that starts with `./` or `../` (`dataset_name`, `calibration_dataset`) is relative to the
  recipe file: the packaged recipes name the packaged data this way. A value given on the command line is taken as it
  is (relative to the working directory, or a Hub id).
"""

from __future__ import annotations

import os
import sys
from typing import Callable

RECIPES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")
DEFAULT_RECIPE = os.path.join(RECIPES_DIR, "SmolLM2-135M-Instruct", "dude", "config_cpu.yaml")
RECIPE_RELATIVE_FIELDS = ("dataset_name", "calibration_dataset")
PACKAGE_PREFIX = "trl_recipes/recipes/"


class RecipeError(ValueError):
    """Bad command-line or recipe input: printed as one line, exit status 2."""


def resolve_recipe(path: str) -> str:
    """The recipe file `path` names: the file itself, or the packaged recipe of that name."""
    if os.path.isfile(path):
        return path
    name = path.replace(os.sep, "/")
    name = name[name.index(PACKAGE_PREFIX) + len(PACKAGE_PREFIX):] if PACKAGE_PREFIX in name else name
    packaged = os.path.join(RECIPES_DIR, *name.split("/"))
    if not os.path.isabs(path) and os.path.isfile(packaged):
        return packaged
    raise RecipeError(f"recipe '{path}' does not exist, here or among the packaged recipes in {RECIPES_DIR}. Fix: "
                      f"the path of a YAML recipe, or a packaged one such as "
                      f"{PACKAGE_PREFIX}SmolLM2-135M-Instruct/corda/config_kpm_cpu.yaml.")


def _given(argv: list[str], key: str) -> bool:
    return any(a == f"--{key}" or a.startswith(f"--{key}=") for a in argv)


def recipe_relative_flags(recipe: str, argv: list[str]) -> list[str]:
    """`--field ABSOLUTE_PATH` for each recipe-relative data path of `recipe` that `argv` does not set itself."""
    import yaml

    with open(recipe) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise RecipeError(f"recipe '{recipe}' is not a mapping of keys to values.")
    folder = os.path.dirname(os.path.abspath(recipe))
    flags = []
    for key in RECIPE_RELATIVE_FIELDS:
        value = values.get(key)
        if isinstance(value, str) and value.startswith(("./", "../")) and not _given(argv, key):
            flags += [f"--{key}", os.path.normpath(os.path.join(folder, value))]
    return flags


def parse_recipe(parser, argv: list[str], default_recipe: str):
    """The parsed argument dataclasses of a recipe script (TRL's `parse_args_and_config`): `--config` (default
    `default_recipe`) read, its recipe-relative paths resolved, unknown keys refused; a RecipeError with one line.
    Under a DeepSpeed launch on CPUs the gloo group is started first and kept by accelerate."""
    import json

    from .distributed import init_distributed_on_cpu

    argv = [part for a in argv for part in (a.split("=", 1) if a.startswith("--config=") else [a])]
    if init_distributed_on_cpu():
        argv += ["--accelerator_config", json.dumps({"use_configured_state": True})]
    if "--config" not in argv:
        argv = ["--config", default_recipe, *argv]
    at = argv.index("--config") + 1
    if at == len(argv):
        raise RecipeError("--config needs a recipe file. Fix: --config trl_recipes/recipes/<model>/<method>/<x>.yaml.")
    argv[at] = config_path = resolve_recipe(argv[at])
    argv += recipe_relative_flags(config_path, argv)
    try:
        return parser.parse_args_and_config(argv, fail_with_unknown_args=True)
    except ValueError as exc:
        msg = str(exc).splitlines()[0]
        if "Unknown arguments from config file" in msg:
            msg = f"recipe '{config_path}' has unknown keys: {msg.split(':', 1)[1].strip()}"
        raise RecipeError(msg) from exc


def run_cli(main: Callable, parse_args: Callable, argv=None) -> int:
    """A recipe script's console entry: exit status 2 with one line for bad input (a RecipeError or DataError)."""
    from .dataset import DataError

    try:
        main(*parse_args(argv))
    except (RecipeError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
