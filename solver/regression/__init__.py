"""The smallest complete task: regression of a noisy linear map with a small MLP.

It is the framework's test solver and the template for a new task: a solver in one file, a
config in `config/solver/regression.yaml`, nothing else.
"""

from .solver import RegressionSolver

__all__ = ['RegressionSolver']
