"""Methods on one weight matrix: SparseGPT's reconstruction, Wanda's variant, the registry."""
import pytest
import torch

from wanda_core.masks import parse_pattern
from wanda_core.methods import METHODS, Stats, magnitude, sparsegpt, wanda


def _layer(seed=0, tokens=2048, d=128, out=64):
    g = torch.Generator().manual_seed(seed)
    # Correlated inputs: a few strong directions mixed into every feature, with uneven scales.
    z = torch.randn(tokens, d, generator=g)
    mix = torch.randn(d, d, generator=g) * 0.3 + torch.eye(d)
    x = (z @ mix) * torch.logspace(-1, 1, d)
    x = x + torch.randn(tokens, 1, generator=g) * 3.0  # a shared component: strong correlation
    w = torch.randn(out, d, generator=g)
    return x, w


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(pattern):
    x, w = _layer()
    pat = parse_pattern(pattern, 0.5 if pattern == "unstructured" else None)
    errors = {}
    for m in (magnitude, wanda, sparsegpt):
        stats = Stats()
        if m.STATS:
            stats.add(x, m.STATS)
        r = m.prune_matrix(w.clone(), stats, pat, **m.PARAMS)
        new = r.weight if r.weight is not None else w * r.keep
        assert (new[~r.keep] == 0).all()
        assert (1 - r.keep.float().mean()).item() == pytest.approx(0.5)
        errors[m.NAME] = torch.linalg.norm(x @ w.t() - x @ new.t()).item()
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_sparsegpt_dead_inputs_zero_their_columns():
    x, w = _layer(d=64)
    x[:, 5] = 0.0
    stats = Stats()
    stats.add(x, "hessian")
    r = sparsegpt.prune_matrix(w.clone(), stats, parse_pattern("unstructured", 0.25))
    assert (r.weight[:, 5] == 0).all()


def test_wanda_variant_meets_target_with_one_alpha():
    x, w = _layer(seed=3)
    stats = Stats()
    stats.add(x, "sqnorm")
    r = wanda.prune_matrix(w.clone(), stats, parse_pattern("unstructured", 0.5), variant=True)
    sparsity = 1 - r.keep.float().mean().item()
    assert abs(sparsity - 0.5) <= 0.002 and 0 < r.info["alpha"] < 0.8
    # Rows differ in how much they prune (unlike plain Wanda), since the threshold is a share of each row's total.
    assert len(set((~r.keep).sum(1).tolist())) > 1


def test_registry_lists_all_methods():
    assert {"dense", "magnitude", "wanda", "sparsegpt", "three_tier", "block", "block_topk", "hybrid_nm",
            "ria", "owl", "dsnot"} <= set(METHODS)
    kinds = {"sqnorm", "hessian", "moments"}
    for m in METHODS.values():
        stats = (m.STATS,) if isinstance(m.STATS, str) else m.STATS or ()
        assert set(stats) <= kinds and callable(m.prune_matrix)


def test_stats_accumulate_in_float32():
    s = Stats()
    s.add(torch.ones(3, 4, dtype=torch.bfloat16), "sqnorm")
    s.add(torch.ones(2, 4, dtype=torch.bfloat16) * 2, "sqnorm")
    assert s.sqnorm.dtype == torch.float32 and s.count == 5 and s.sqnorm.tolist() == [11.0] * 4


def test_sparsegpt_is_the_same_on_any_number_of_threads():
    """LAPACK's Cholesky rounds differently with more threads; SparseGPT factors on one, so its result
    does not depend on torch's thread count (nor do the tables)."""
    x, w = _layer(tokens=1024, d=768, out=32)
    stats = Stats()
    stats.add(x, "hessian")
    saved, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(sparsegpt.prune_matrix(w.clone(), stats, parse_pattern("2:4")))
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(results[0].keep, results[1].keep) and torch.equal(results[0].weight, results[1].weight)
