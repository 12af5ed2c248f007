"""Shared pytest set-up: a hypothesis profile without deadlines (torch's first call is slow)."""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("default", deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks run fastest on one intra-op thread (no OpenMP hand-offs on a shared 2-core box).

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """A randomly initialised Inception-v3 in torch-fidelity's layout (FID plumbing tests; never downloaded)."""
    from random_inception import save_random_inception_weights

    return save_random_inception_weights(tmp_path_factory.mktemp("inception") / "random.pth", seed=0)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """root/<class>/<image>.png: 2 classes x 3 non-square images of different sizes."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    sizes = [(40, 28), (30, 50), (17, 16)]
    for name in ("cat", "dog"):
        (root / name).mkdir()
        for i, (height, width) in enumerate(sizes):
            array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(array).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Any download attempt fails the test; the torch hub cache is an empty folder. Returns that folder."""
    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    def refuse(*args, **kwargs):
        raise AssertionError("attempted a download")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"
