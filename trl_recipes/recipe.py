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
