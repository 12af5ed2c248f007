"""The toy experiment of pMF Fig. 2: predicting x survives a high-dimensional observation space,
predicting u collapses (same velocity loss, same network, same one-step sampler).

Python API (importing has no side effects):

* ``DEFAULT_RECIPE`` (``= ToyConfig()``): the training recipe of ``make demo``, a frozen dataclass;
  ``sample_times(config, n, generator=...)`` draws its (r, t), ``learning_rate(config, step)`` is Adam's lr
  at a step and ``training_precision(config)`` is the context its training step runs in, so a
  hand-written loop can follow the recipe;
* ``run_sweep(dims=(2, 8, 16, 512), predictions=("x", "u"), seeds=(0,), dataset="swiss_roll", out=None,
  **overrides)`` -> list of ``ToyRun`` (``.record`` is one metrics.json row; ``.samples_2d``, ``.losses``
  for plots); ``overrides`` replace fields of the recipe, e.g. ``steps=500``;
* ``train(ToyConfig(...))`` -> one ``ToyRun`` (raises ``ToyDivergenceError`` when its loss becomes NaN or inf);
* ``plot_grid(runs, path=None)`` (the Fig. 2 layout) and ``plot_losses(runs, path=None)`` -> Figure;
* ``format_table(records)`` -> markdown; ``write_outputs(runs, out, overwrite=False)`` -> paths of the
  files written (refuses a folder holding an earlier run's files unless ``overwrite``);
* metrics: ``sliced_wasserstein``, ``energy_distance``, ``precision_distance``, ``coverage_distance``.

Command line: ``python -m toy --help``.
"""
from full.cli import quiet_interrupt

quiet_interrupt()   # under `python -m toy` only (before torch loads): Ctrl-C is one line and exit 130

from .data import DATASETS, embed, off_manifold, project, random_projection, sample_2d
from .metrics import coverage_distance, energy_distance, nearest_neighbour_distance, precision_distance, sliced_wasserstein
from .model import PREDICTIONS, ToyMLP
from .plots import plot_grid, plot_losses
from .sweep import (DEFAULT_DIMS, DEFAULT_RECIPE, format_table, run_sweep, sweep_configs,
                    write_outputs)
from .train import (COMPUTE_DTYPES, LR_SCHEDULES, TANGENTS, ToyConfig, ToyDivergenceError, ToyRun, evaluate,
                    learning_rate, sample_times, train, training_precision)

__all__ = [name for name in dir() if not name.startswith("_") and name != "quiet_interrupt"]
