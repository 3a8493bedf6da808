import pytest
import torch

from wanda_core import WandaError
from wanda_core.masks import (nm_mask, pack_mask, parse_pattern, unpack_mask, unstructured_matrix_mask,
                              unstructured_row_mask)


def test_row_mask_prunes_lowest_per_row():
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.1, 0.4, 0.3, 0.2]])
    keep = unstructured_row_mask(score, 0.5)
    assert keep.tolist() == [[True, False, True, False], [False, True, True, False]]


def test_row_mask_counts_exact_per_row():
    score = torch.randn(7, 33)
    keep = unstructured_row_mask(score, 0.3)
    assert (keep.sum(1) == 33 - int(33 * 0.3)).all()


def test_matrix_mask_compares_whole_matrix():
    # Row 0 holds the four largest scores: a whole-matrix threshold keeps all of it and none of row 1.
    score = torch.tensor([[9.0, 8.0, 7.0, 6.0], [1.0, 2.0, 3.0, 4.0]])
    keep = unstructured_matrix_mask(score, 0.5)
    assert keep.tolist() == [[True] * 4, [False] * 4]


def test_ties_prune_lower_index_first():
    score = torch.ones(2, 4)
    assert unstructured_row_mask(score, 0.5).tolist() == [[False, False, True, True]] * 2
    assert nm_mask(score, 2, 4).tolist() == [[False, False, True, True]] * 2
    assert unstructured_matrix_mask(score, 0.5).tolist() == [[False] * 4, [True] * 4]


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_rows_with_and_without_ties_match_a_stable_sort(sparsity):
    # Few distinct values in some rows (ties at the k-th), distinct floats in the others: the
    # selection takes a fast path for untied rows only, and must agree with the definition.
    g = torch.Generator().manual_seed(0)
    score = torch.rand(64, 48, generator=g)
    score[::3] = torch.randint(0, 4, (22, 48), generator=g).float()
    assert torch.equal(unstructured_row_mask(score, sparsity), _keep_by_stable_sort(score, sparsity))
    flat = _keep_by_stable_sort(score.reshape(1, -1), sparsity).reshape(score.shape)
    assert torch.equal(unstructured_matrix_mask(score, sparsity), flat)


def _keep_by_stable_sort(score, sparsity):
    """The definition: each row drops its int(width * sparsity) lowest scores, lower index first among equals."""
    lowest = torch.argsort(score, dim=1, stable=True)[:, : int(score.shape[1] * sparsity)]
    return torch.ones_like(score, dtype=torch.bool).scatter_(1, lowest, False)


def test_nm_groups():
    score = torch.tensor([[1.0, 5.0, 2.0, 4.0, 8.0, 7.0, 6.0, 5.0]])
    assert nm_mask(score, 2, 4).tolist() == [[False, True, False, True, True, True, False, False]]
    assert nm_mask(score, 1, 4).tolist() == [[False, True, False, False, True, False, False, False]]
    keep = nm_mask(torch.randn(16, 64), 4, 8)
    assert (keep.reshape(16, 8, 8).sum(-1) == 4).all()


def test_nm_width_not_divisible():
    with pytest.raises(WandaError, match="not divisible by M=4"):
        nm_mask(torch.randn(4, 10), 2, 4)


@pytest.mark.parametrize("text,kind,sparsity", [("unstructured", "unstructured", 0.5), ("2:4", "nm", 0.5), ("4:8", "nm", 0.5), ("1:4", "nm", 0.75)])
def test_parse_pattern(text, kind, sparsity):
    p = parse_pattern(text, 0.5 if kind == "unstructured" else None)
    assert p.kind == kind and p.sparsity == pytest.approx(sparsity)


@pytest.mark.parametrize("text,sparsity,message", [
    ("unstructured", 1.0, "sparsity must be in"), ("unstructured", -0.1, "sparsity must be in"),
    ("4:4", None, "0 < N < M"), ("5:4", None, "0 < N < M"), ("0:4", None, "0 < N < M"),
    ("diagonal", 0.5, "unknown pattern"), ("2:4", 0.7, "implies sparsity"),
])
def test_bad_patterns(text, sparsity, message):
    with pytest.raises(WandaError, match=message):
        parse_pattern(text, sparsity)


def test_pack_roundtrip():
    keep = torch.rand(13, 29) > 0.4
    packed = pack_mask(keep)
    assert packed.dtype == torch.uint8 and packed.numel() == (13 * 29 + 7) // 8
    assert torch.equal(unpack_mask(packed, (13, 29)), keep)
