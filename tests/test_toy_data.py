"""Toy data: normalisation, the orthonormal embedding P and the plane projections."""
import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from toy.data import DATASETS, embed, off_manifold, project, random_projection, sample_2d

dims = st.sampled_from([2, 3, 8, 16, 512, 1024])
FEW = settings(max_examples=10)  # each example is a cheap QR; ten cover the dims list well
seeds = st.integers(0, 2**31 - 1)


@FEW
@given(dim=dims, seed=seeds)
def test_projection_is_column_orthonormal(dim, seed):
    projection = random_projection(dim, seed=seed)
    assert projection.shape == (dim, 2)
    torch.testing.assert_close(projection.T.double() @ projection.double(), torch.eye(2, dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_projection_depends_only_on_seed():
    torch.testing.assert_close(random_projection(64, seed=3), random_projection(64, seed=3), atol=0, rtol=0)
    assert not torch.allclose(random_projection(64, seed=3), random_projection(64, seed=4))


@FEW
@given(dim=dims, seed=seeds)
def test_embedding_round_trip_stays_on_plane(dim, seed):
    generator = torch.Generator().manual_seed(seed)
    projection = random_projection(dim, seed=seed)
    x_2d = torch.randn(64, 2, generator=generator)
    x = embed(x_2d, projection)
    torch.testing.assert_close(project(x, projection), x_2d, atol=1e-5, rtol=1e-5)
    assert off_manifold(x, projection).max() < 1e-4 * (1 + x.norm(dim=1).max())


@FEW
@given(dim=st.sampled_from([3, 8, 64]), seed=seeds)
def test_off_manifold_is_norm_of_orthogonal_part(dim, seed):
    # Oracle: an explicit orthogonal complement of P from a full QR (independent of the code's formula).
    generator = torch.Generator().manual_seed(seed)
    projection = random_projection(dim, seed=seed).double()
    basis, _ = torch.linalg.qr(torch.cat([projection, torch.randn(dim, dim - 2, generator=generator,
                                                                     dtype=torch.float64)], dim=1))
    complement = basis[:, 2:]                                                    # (D, D - 2)
    on_plane = torch.randn(16, 2, generator=generator, dtype=torch.float64)
    away = torch.randn(16, dim - 2, generator=generator, dtype=torch.float64)
    x = on_plane @ projection.T + away @ complement.T
    torch.testing.assert_close(off_manifold(x, projection), away.norm(dim=1), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", DATASETS)
def test_datasets_normalised_and_seeded(name):
    x_2d = sample_2d(name, 20_000, seed=5)
    assert x_2d.shape == (20_000, 2) and x_2d.dtype == torch.float32
    assert x_2d.mean(dim=0).abs().max() < 0.05
    assert abs(float(x_2d.square().mean()) - 1.0) < 0.05    # unit RMS, one isotropic scale
    torch.testing.assert_close(sample_2d(name, 100, seed=5), sample_2d(name, 100, seed=5), atol=0, rtol=0)


def test_bad_dataset_and_dim_raise():
    with pytest.raises(ValueError, match="dataset must be one of"):
        sample_2d("spiral", 10, seed=0)
    with pytest.raises(ValueError, match="dim must be >= 2"):
        random_projection(1, seed=0)
