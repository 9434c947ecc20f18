"""`solver new NAME`: a project of your own, in your own repository, built on the framework.

The task it writes is the framework's regression solver (`solver/regression/`, the solver the
framework's own tests train), renamed: the template is code that is run and tested every day,
not a copy that drifts. Around it: an entry point (`project_main`), a primary config that extends
the framework's shared keys through Hydra's search path, a Dora grid, a test, a pyproject.toml.
"""

from __future__ import annotations

import keyword
import re
import textwrap
from pathlib import Path

from . import locations
from .errors import UserError

TEMPLATE = Path(__file__).resolve().parent / 'regression'


def camel(name: str) -> str:
    return ''.join(part.capitalize() for part in name.split('_'))


def check_name(name: str) -> None:
    """A project name is a lowercase Python identifier that shadows nothing we import."""
    if not re.fullmatch(r'[a-z][a-z0-9_]*', name) or keyword.iskeyword(name):
        raise UserError(f"solver new {name!r}: a project name is a lowercase Python identifier "
                        "(letters, digits, _), e.g. my_task.")
    if name in {'solver', 'dora', 'hydra', 'flashy', 'torch', 'tests', 'test', 'config', 'data'}:
        raise UserError(f"solver new {name!r}: that name would shadow a package the project imports; pick another.")


def files(name: str) -> dict[str, str]:
    """The project's files, path -> text: the template solver and its config renamed, and the
    files around them."""
    cls = camel(name) + 'Solver'
    solver_source = (TEMPLATE / 'solver.py').read_text().replace(
        '"""RegressionSolver: a StandardSolver in one file (see the package docstring)."""',
        '"""RegressionSolver: a StandardSolver in one file. It starts as the framework\'s regression of a\n'
        'noisy linear map: fill in build_dataloaders, build_model, run_step, evaluate and generate."""',
    ).replace('RegressionSolver', cls)
    config = (locations.shipped('config') / 'solver' / 'regression.yaml').read_text()
    config = config.replace('solver.regression.RegressionSolver', f'{name}.solver.{cls}')
    config = re.sub(r"^# The framework's smallest task.*\n", f"# {name}: the solver and its settings. "
                    "Keys not set here come from the framework's base.yaml.\n", config, flags=re.M)
    around = {
        'pyproject.toml': f'''\
            [build-system]
            requires = ["setuptools>=61"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{name}"
            version = "0.1.0"
            requires-python = ">=3.10"
            # solver>=0.1: the framework (install it first); an unrelated "solver" 0.0.x is on PyPI.
            dependencies = ["solver>=0.1"]

            [tool.setuptools.packages.find]
            include = ["{name}*"]

            [tool.setuptools.package-data]
            "{name}" = ["config/*.yaml", "config/**/*.yaml"]

            [tool.pytest.ini_options]
            testpaths = ["tests"]
            ''',
        'README.md': f'''\
            # {name}

            A task on the solver framework. From this folder:

            ```bash
            pip install -e .                        # the solver framework installed first
            dora run solver={name}                  # train; rerun the same command to resume
            dora run solver={name} continue_from=//sig/SIG   # fine-tune from another experiment
            dora grid {name} --dry_run              # the grid of {name}/grids/{name}.py
            solver ls                               # the experiments, in outputs/
            python -m pytest -q
            ```
            Experiments go to `outputs/` here (or `$SOLVER_DORA_DIR`). The config is
            `{name}/config/config.yaml` (the framework's shared keys, then `solver/{name}.yaml`).
            ''',
        f'{name}/__init__.py': f'"""{name}: a task on the solver framework."""\n',
        f'{name}/train.py': f'''\
            """Entry point of `dora run` for {name} (Dora imports `{name}.train.main`)."""

            from solver.train import project_main

            main = project_main(__name__)
            ''',
        f'{name}/config/config.yaml': f'''\
            # {name}'s primary config: the framework's shared keys (solver's base.yaml, found through
            # the search path below), then this project's solver (solver/{name}.yaml).
            defaults:
              - base
              - _self_
              - solver: {name}

            dora:
              grid_package: {name}.grids

            hydra:
              searchpath:
                - pkg://solver.config
            ''',
        f'{name}/grids/__init__.py': '"""Dora grids: `dora grid <file name>`."""\n',
        f'{name}/grids/{name}.py': f'''\
            """Two learning rates: `dora grid {name} --dry_run` lists them with their signatures."""

            from dora import Explorer, Launcher


            @Explorer
            def explorer(launcher: Launcher) -> None:
                launcher.bind_({{'solver': '{name}'}})
                for lr in [1e-2, 3e-3]:
                    launcher({{'optim.lr': lr}})
            ''',
        f'tests/test_{name}.py': f'''\
            """{name} trains through real `dora run`, and a rerun resumes it."""

            import json
            import os
            import subprocess
            import sys
            from pathlib import Path

            ROOT = Path(__file__).resolve().parents[1]


            def dora_run(dora_dir, *overrides):
                env = {{**os.environ, 'SOLVER_DORA_DIR': str(dora_dir)}}
                return subprocess.run([sys.executable, '-m', 'dora', 'run', 'solver={name}', *overrides], cwd=ROOT,
                                      env=env, capture_output=True, text=True, timeout=300)


            def test_trains_and_resumes(tmp_path):
                proc = dora_run(tmp_path, 'optim.epochs=1')
                assert proc.returncode == 0, proc.stderr
                (xp,) = (tmp_path / 'xps').iterdir()
                assert len(json.loads((xp / 'history.json').read_text())) == 1
                proc = dora_run(tmp_path, 'optim.epochs=1')
                assert proc.returncode == 0 and 'is complete' in proc.stdout + proc.stderr
            ''',
    }
    return {f'{name}/solver.py': solver_source, f'{name}/config/solver/{name}.yaml': config,
            **{path: textwrap.dedent(text) for path, text in around.items()}}


def write_project(name: str, parent: Path) -> Path:
    """Write project `name` into `parent/name` (which must not exist, or be empty); return it."""
    check_name(name)
    root = Path(parent).expanduser().resolve() / name
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UserError(f"solver new {name}: {root} already exists and is not an empty folder; "
                        "pick another name or --dir.")
    for relative, text in files(name).items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root
