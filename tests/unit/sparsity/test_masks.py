"""N:M masks: exact counts per group, deterministic ties, double-pruning density, errors."""
import pytest
import torch

from slope_megatron.sparsity import double_prune_mask, expected_double_pruned_density, nm_mask


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 4), (2, 8), (4, 8)])
def test_exactly_n_per_group_and_largest_kept(n, m):
    w = torch.randn(12, 8 * m)
    mask = nm_mask(w, n, m)
    groups = mask.view(12, 8, m)
    assert (groups.sum(-1) == n).all()
    # every kept |w| is >= every dropped |w| in the same group
    a = w.abs().view(12, 8, m)
    kept_min = torch.where(groups, a, torch.inf).amin(-1)
    dropped_max = torch.where(~groups, a, -torch.inf).amax(-1)
    assert (kept_min >= dropped_max).all()


def test_ties_are_deterministic_lower_index_wins():
    w = torch.ones(2, 8)
    mask = nm_mask(w, 2, 4)
    expected = torch.tensor([True, True, False, False] * 2).expand(2, 8)
    assert torch.equal(mask, expected)
    w2 = torch.tensor([[1.0, -3.0, 3.0, 0.5]])  # |-3| == |3|: both kept, in index order
    assert nm_mask(w2, 1, 4).tolist() == [[False, True, False, False]]


def test_double_prune_is_nm_along_out_and_subset_of_row_mask():
    torch.manual_seed(1)
    w = torch.randn(64, 128)
    row = nm_mask(w, 2, 4)
    sparse = w * row
    rc = double_prune_mask(sparse, 2, 4)
    assert (rc & ~row).sum() == 0
    per_col_group = rc.t().reshape(128, 16, 4).sum(-1)
    assert (per_col_group <= 2).all()


def test_double_prune_density_matches_the_lemma():
    torch.manual_seed(2)
    w = torch.randn(1024, 1024)
    sparse = w * nm_mask(w, 2, 4)
    density = double_prune_mask(sparse, 2, 4).float().mean().item()
    assert abs(expected_double_pruned_density(2, 4) - 0.40625) < 1e-9
    assert abs(density - 0.40625) < 0.005


@pytest.mark.parametrize("bad,match", [
    (dict(weight=torch.randn(4, 6), n=2, m=4), "not divisible by m=4"),
    (dict(weight=torch.randn(4, 8), n=4, m=4), "1 <= n < m"),
    (dict(weight=torch.randn(4, 8), n=0, m=4), "1 <= n < m"),
    (dict(weight=torch.randn(2, 4, 8), n=2, m=4), "2-D"),
])
def test_invalid_inputs_raise_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        nm_mask(**bad)


def test_double_prune_rejects_out_not_divisible():
    with pytest.raises(ValueError, match="dim 0 \\(out\\)"):
        double_prune_mask(torch.randn(6, 8), 2, 4)
