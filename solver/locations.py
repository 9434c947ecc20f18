"""Where a project's files are: its configs, its root (outputs/, pretrained/, relative data paths),
and the framework's own shipped files.

A *project* is the package `dora` runs: this repository's `solver`, or a package of your own made
by `solver new` whose `train.py` calls `solver.train.project_main`. In a source checkout (an
editable install) the project's root is the folder above the package, the one holding
`pyproject.toml`; for an installed wheel it is the folder the command was launched from, so that
experiments never land inside site-packages. The framework's configs and bundled data are the
packages `solver.config` and `solver.data`: the repository's `config/` and `data/` in a checkout,
folders inside the package in a wheel (pyproject.toml maps them).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DORA_DIR_ENV = 'SOLVER_DORA_DIR'
PRETRAINED_ENV = 'SOLVER_PRETRAINED_DIR'
DORA_PACKAGE_ENV = 'DORA_PACKAGE'
FRAMEWORK = Path(__file__).resolve().parent


def shipped(name: str) -> Path:
    """The folder of the framework's package `solver.<name>` (`config` or `data`), wherever
    Python imports it from (the checkout's `config/`, or `solver/config/` of a wheel), else the
    checkout's folder when the checkout is imported without being installed."""
    spec = importlib.util.find_spec(f'solver.{name}')
    if spec is not None and spec.origin is not None:
        return Path(spec.origin).parent
    checkout = FRAMEWORK.parent / name  # a checkout imported from its folder, not installed
    if (checkout / '__init__.py').is_file():
        return checkout
    raise FileNotFoundError(f"solver.{name} is not installed: reinstall the solver package (pip install -e .)")


def config_dir(package_dir: Path) -> Path:
    """The folder of the primary `config.yaml` of the project whose package is `package_dir`: its
    own `config/`, else the framework's (this repository's checkout keeps it at the root)."""
    own = Path(package_dir) / 'config'
    return own if (own / 'config.yaml').is_file() else shipped('config')


def project_root(package_dir: Path) -> Path:
    """The root of the project whose package is `package_dir`: the folder above it when that holds
    a pyproject.toml (a source checkout), else the current directory (an installed package)."""
    parent = Path(package_dir).resolve().parent
    return parent if (parent / 'pyproject.toml').is_file() else Path.cwd()


def project_package() -> Path:
    """The package of the project `dora` would run from here, found the way Dora finds it:
    $DORA_PACKAGE, else the one folder of the current directory holding `__init__.py` and
    `train.py`; else the framework itself."""
    name = os.environ.get(DORA_PACKAGE_ENV, '').strip()
    if name:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin is not None:
            return Path(spec.origin).parent
    found = [p for p in Path.cwd().iterdir() if (p / '__init__.py').is_file() and (p / 'train.py').is_file()] \
        if os.access(Path.cwd(), os.R_OK) else []
    return found[0] if len(found) == 1 else FRAMEWORK


_root: Path | None = None


def use_project(package_dir: Path) -> None:
    """Make `package_dir`'s project the one whose root this process uses (a project's train
    module calls it on import, in every process that runs it)."""
    global _root
    _root = project_root(package_dir)


def root() -> Path:
    """The current project's root (see `use_project`; else the project found from here)."""
    return _root if _root is not None else project_root(project_package())


def dora_dir() -> Path:
    """Dora's folder: $SOLVER_DORA_DIR, `~` expanded and made absolute; unset or empty: outputs/
    at the project's root."""
    value = os.environ.get(DORA_DIR_ENV, '').strip()
    return Path(os.path.abspath(os.path.expanduser(value))) if value else root() / 'outputs'


def pretrained_dir() -> Path:
    """Where `//pretrained/NAME` is looked up: $SOLVER_PRETRAINED_DIR, else `pretrained/` at the
    project's root."""
    value = os.environ.get(PRETRAINED_ENV, '').strip()
    return Path(os.path.abspath(os.path.expanduser(value))) if value else root() / 'pretrained'


def find(value: str | Path) -> Path:
    """A path from a config (`dataset.path: data/drums`): as given if absolute or present from
    the launch directory, else under the project's root, else under the framework's shipped files
    (so the bundled corpus is found from a wheel too). The first candidate if none exists."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    candidates = [path, root() / path, shipped('data').parent / path]
    return next((p for p in candidates if p.exists()), candidates[1])
