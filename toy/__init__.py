"""The toy experiment of pMF Fig. 2: predicting x survives a high-dimensional observation space,
predicting u collapses (same velocity loss, same network, same one-step sampler).

Python API (importing has no side effects):

* ``run_sweep(dims=(2, 8, 16, 512), predictions=("x", "u"), dataset="swiss_roll", steps=..., out=None, ...)``
  -> list of ``ToyRun`` (``.record`` is one metrics.json row; ``.samples_2d``, ``.losses`` for plots);
* ``train(ToyConfig(...))`` -> one ``ToyRun``;
* ``plot_grid(runs, path=None)`` (the Fig. 2 layout) and ``plot_losses(runs, path=None)`` -> Figure;
* ``format_table(records)`` -> markdown; ``write_outputs(runs, out)`` -> paths of the files written.

Command line: ``python -m toy --help``.
"""
from .data import DATASETS, embed, off_manifold, project, random_projection, sample_2d
from .metrics import energy_distance, sliced_wasserstein
from .model import PREDICTIONS, ToyMLP
from .plots import plot_grid, plot_losses
from .sweep import DEFAULT_DIMS, format_table, reference_floor, run_sweep, write_outputs
from .train import TANGENTS, ToyConfig, ToyRun, evaluate, train

__all__ = [name for name in dir() if not name.startswith("_")]
