"""One short real training run: x-prediction on D = 2 learns the Swiss roll (well under 60 s)."""
import torch

from toy.data import random_projection
from toy.model import ToyMLP
from toy.train import SEED_PROJECTION, ToyConfig, evaluate, train


def test_trained_x_prediction_beats_untrained_swd():
    config = ToyConfig(dim=2, prediction="x", steps=300, batch_size=256, width=128, depth=4, seed=0)
    torch.manual_seed(config.seed)
    untrained = ToyMLP(config.dim, depth=config.depth, width=config.width)
    baseline, _ = evaluate(untrained, config, random_projection(config.dim, seed=config.seed + SEED_PROJECTION))
    trained = train(config, progress=False).record
    assert trained["swd"] < 0.5 * baseline["swd"], (trained["swd"], baseline["swd"])
    assert trained["energy"] < 0.25 * baseline["energy"], (trained["energy"], baseline["energy"])
    assert trained["precision"] < 0.5 * baseline["precision"], (trained["precision"], baseline["precision"])
