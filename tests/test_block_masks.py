"""Block masks (three-tier, block, block top-k, hybrid N:M) and their method modules."""
import math

import pytest
import torch

from wanda_core import block_masks as bm
from wanda_core.errors import WandaError
from wanda_core.masks import Pattern, nm_mask
from wanda_core.methods import Stats, block, block_topk, check_params, hybrid_nm, three_tier


def leveled(rb, cb, b, seed=0):
    """Scores whose block means are ordered by a random permutation `level` (distinct values
    everywhere); returns (score, level) with level[r, c] = rank key of block (r, c)."""
    g = torch.Generator().manual_seed(seed)
    level = torch.randperm(rb * cb, generator=g).reshape(rb, cb).float()
    inside = torch.rand(rb * b, cb * b, generator=g)  # in [0, 1): never reorders blocks
    score = level.repeat_interleave(b, 0).repeat_interleave(b, 1) * 10 + inside
    return score, level


def blocks_of(x, b):
    rb, cb = x.shape[0] // b, x.shape[1] // b
    return x.reshape(rb, b, cb, b).permute(0, 2, 1, 3)


def extent(shape, b, r, c):
    return slice(r * b, min((r + 1) * b, shape[0])), slice(c * b, min((c + 1) * b, shape[1]))


def ref_topk(s, k):
    flat = s.reshape(-1).tolist()
    keep = torch.zeros(len(flat), dtype=torch.bool)
    # lower index pruned first among ties, as in masks.py
    for j in sorted(range(len(flat)), key=lambda j: (flat[j], j))[-k:] if k else []:
        keep[j] = True
    return keep.reshape(s.shape)


def ref_nm(s, n, m):
    keep = torch.zeros(s.shape, dtype=torch.bool)
    for row in range(s.shape[0]):
        for start in range(0, s.shape[1], m):
            vals = s[row, start:start + m].tolist()
            for j in sorted(range(len(vals)), key=lambda j: (vals[j], j))[-min(n, len(vals)):]:
                keep[row, start + j] = True
    return keep


def ref_three_tier(score, inner, dense, nm, k, b, n, m):
    """Loop-per-block reference for three_tier_mask."""
    rb, cb = math.ceil(score.shape[0] / b), math.ceil(score.shape[1] / b)
    imp = [score[extent(score.shape, b, i // cb, i % cb)].double().mean().item() for i in range(rb * cb)]
    order = sorted(range(rb * cb), key=lambda i: (-imp[i], i))
    n_dense, n_nm = int(len(order) * dense + 1e-9), int(len(order) * nm + 1e-9)
    keep = torch.ones(score.shape, dtype=torch.bool)
    for rank, i in enumerate(order):
        sl = extent(score.shape, b, i // cb, i % cb)
        if n_dense <= rank < n_dense + n_nm:
            keep[sl] = ref_nm(inner[sl], n, m)
        elif rank >= n_dense + n_nm:
            keep[sl] = ref_topk(inner[sl], k) if inner[sl].numel() > k else True
    return keep, {"dense": n_dense, "nm": n_nm, "topk": len(order) - n_dense - n_nm}


# ---------------------------------------------------------------------------------------------
# three-tier


def test_tier_counts_and_treatment_per_tier():
    b, k, n, m = 4, 5, 2, 4
    score, level = leveled(6, 8, b)  # 48 blocks
    keep, counts = bm.three_tier_mask(score, k=k, b=b, n=n, m=m)
    assert counts == {"dense": 16, "nm": 21, "topk": 11}  # floor(48*.35), floor(48*.45), rest
    kb, sb = blocks_of(keep, b), blocks_of(score, b)
    rank = torch.argsort(torch.argsort(level.reshape(-1), descending=True)).reshape(level.shape)
    seen = {"dense": 0, "nm": 0, "topk": 0}
    for r in range(6):
        for c in range(8):
            blk_keep, blk_score = kb[r, c], sb[r, c]
            if rank[r, c] < 16:
                seen["dense"] += 1
                assert blk_keep.all()
            elif rank[r, c] < 37:
                seen["nm"] += 1
                groups = blk_keep.reshape(b, b // m, m)
                assert (groups.sum(-1) == n).all()  # n:m in every row group
                assert torch.equal(blk_keep, nm_mask(blk_score, n, m))  # and it is the n best
            else:
                seen["topk"] += 1
                assert blk_keep.sum() == k
                assert torch.equal(blk_keep, ref_topk(blk_score, k))
    assert seen == counts


def test_matches_loop_reference_on_odd_shape():
    g = torch.Generator().manual_seed(1)
    score, inner = torch.rand(37, 45, generator=g), torch.rand(37, 45, generator=g)
    keep, counts = bm.three_tier_mask(score, inner, dense=0.3, nm=0.5, topk=0.2, k=5, b=8, n=2, m=4)
    ref_keep, ref_counts = ref_three_tier(score, inner, 0.3, 0.5, 5, 8, 2, 4)
    assert counts == ref_counts
    assert torch.equal(keep, ref_keep)


def test_many_ties_match_loop_reference():
    # small integer scores: ties between blocks, inside N:M groups and at the k-th value
    score = torch.randint(0, 3, (22, 26), generator=torch.Generator().manual_seed(10)).float()
    keep, counts = bm.three_tier_mask(score, dense=0.2, nm=0.4, topk=0.4, k=5, b=4, n=2, m=4)
    ref_keep, ref_counts = ref_three_tier(score, score, 0.2, 0.4, 5, 4, 2, 4)
    assert counts == ref_counts
    assert torch.equal(keep, ref_keep)
    one = torch.ones(4, 4)
    one[0, 0] = one[1, 1] = 5.0  # two clear winners, then a tie for the third place
    keep, _ = bm.block_topk_mask(one, 1.0, k=3, b=4)
    assert keep.reshape(-1).nonzero().flatten().tolist() == [0, 5, 15]


def test_default_sparsity_on_multiple_of_16_shapes():
    expected = 0.45 * 0.5 + 0.20 * 241 / 256  # 0.41328...
    # 320 blocks: the fractions are exact
    keep, counts = bm.three_tier_mask(torch.rand(320, 256, generator=torch.Generator().manual_seed(0)))
    assert counts == {"dense": 112, "nm": 144, "topk": 64}
    assert abs((1 - keep.float().mean().item()) - expected) < 1e-6
    # 4096 blocks: floor rounding moves a block or two to the top-k tier
    keep, counts = bm.three_tier_mask(torch.rand(1024, 1024, generator=torch.Generator().manual_seed(0)))
    sparsity = 1 - keep.float().mean().item()
    assert abs(sparsity - 0.4133) < 5e-4
    assert sparsity == pytest.approx((counts["nm"] * 128 + counts["topk"] * 241) / 1024**2, abs=1e-9)


def test_odd_shape_100x70():
    g = torch.Generator().manual_seed(2)
    score = torch.rand(100, 70, generator=g)
    keep, counts = bm.three_tier_mask(score)
    assert keep.shape == (100, 70) and keep.dtype == torch.bool
    assert counts == {"dense": 12, "nm": 15, "topk": 8}  # 7 x 5 = 35 blocks
    ref_keep, ref_counts = ref_three_tier(score, score, 0.35, 0.45, 15, 16, 2, 4)
    assert counts == ref_counts
    assert torch.equal(keep, ref_keep)


def test_block_importance_divides_by_true_counts():
    score = torch.arange(100 * 70, dtype=torch.float32).reshape(100, 70) % 7
    imp = bm.block_importance(score, 16)
    assert imp.shape == (7, 5)
    for r in range(7):
        for c in range(5):
            want = score[extent(score.shape, 16, r, c)].mean()
            assert imp[r, c].item() == pytest.approx(want.item(), rel=1e-6)
    # a constant matrix has the same mean in every block, edge blocks included
    assert torch.allclose(bm.block_importance(torch.full((100, 70), 3.0), 16), torch.tensor(3.0))


def test_small_edge_block_keeps_all_in_topk_tier():
    # 18 x 18 with b=16: the corner block has 2 x 2 = 4 <= k elements; make it the least important
    score = torch.rand(18, 18, generator=torch.Generator().manual_seed(3)) + 1
    score[16:, 16:] = 0.01
    keep, counts = bm.three_tier_mask(score, dense=0.25, nm=0.25, topk=0.5)
    assert counts == {"dense": 1, "nm": 1, "topk": 2}
    assert keep[16:, 16:].all()
    # the other top-k block (an edge block of 16 x 2 = 32 elements) keeps exactly k
    imp = bm.block_importance(score, 16).reshape(-1)
    other = sorted(range(4), key=lambda i: (-imp[i].item(), i))[2]
    assert keep[extent(score.shape, 16, other // 2, other % 2)].sum() == 15


def test_partial_nm_group_keeps_min_n_width():
    # 8 x 10, b=8, m=4: the right blocks are 2 columns wide (one partial group of width 2)
    score = torch.rand(8, 10, generator=torch.Generator().manual_seed(4))
    score[:, 8:] += 5  # right blocks most important -> with dense=0 they get N:M
    keep, counts = bm.three_tier_mask(score, dense=0.0, nm=0.5, topk=0.5, k=3, b=8, n=2, m=4)
    assert counts == {"dense": 0, "nm": 1, "topk": 1}
    assert keep[:, 8:].all()  # width 2 <= n: the whole partial group stays
    keep1, _ = bm.three_tier_mask(score, dense=0.0, nm=0.5, topk=0.5, k=3, b=8, n=1, m=4)
    assert (keep1[:, 8:].sum(1) == 1).all()  # n=1: one of the two


def test_ties_broken_by_block_index_deterministically():
    score = torch.ones(64, 64)  # 16 equal blocks
    keep, counts = bm.three_tier_mask(score, k=15)
    assert counts == {"dense": 5, "nm": 7, "topk": 4}
    kb = blocks_of(keep, 16).reshape(16, 16, 16)
    per_block = kb.reshape(16, -1).sum(1).tolist()
    assert per_block == [256] * 5 + [128] * 7 + [15] * 4  # lower block index ranks higher
    # inside blocks, ties follow masks.py: the lower index is pruned first
    assert torch.equal(kb[5], nm_mask(torch.ones(16, 16), 2, 4))
    assert kb[15].reshape(-1)[-15:].all() and not kb[15].reshape(-1)[:-15].any()
    assert torch.equal(bm.three_tier_mask(score, k=15)[0], keep)
    # enough equal blocks (1024) that an unstable sort would reorder them
    keep, counts = bm.three_tier_mask(torch.ones(128, 128), k=5, b=4)
    assert counts == {"dense": 358, "nm": 460, "topk": 206}
    per_block = blocks_of(keep, 4).reshape(1024, -1).sum(1).tolist()
    assert per_block == [16] * 358 + [8] * 460 + [5] * 206


def test_tier_counts_floor_is_robust_to_float_error():
    # 100 * 0.29 == 28.999999999999996 in floating point; the intended floor is 29
    keep, counts = bm.three_tier_mask(torch.rand(20, 20), dense=0.29, nm=0.51, topk=0.20, k=1, b=2, n=1, m=2)
    assert counts == {"dense": 29, "nm": 51, "topk": 20}


def test_inner_score_changes_choices_not_tiers():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(64, 64, generator=g)
    stats = Stats(1, sqnorm=torch.rand(64, generator=g) * 100)  # reorders |W| strongly
    pattern = Pattern("unstructured", 0.5)
    s = w.abs() * stats.sqnorm.sqrt()
    by_wanda = three_tier.prune_matrix(w.clone(), stats, pattern)
    by_mag = three_tier.prune_matrix(w.clone(), stats, pattern, inner_score="magnitude")
    assert torch.equal(by_wanda.keep, bm.three_tier_mask(s)[0])
    assert torch.equal(by_mag.keep, bm.three_tier_mask(s, inner=w.abs())[0])
    assert by_wanda.info == by_mag.info == {"tier_dense": 5, "tier_nm": 7, "tier_topk": 4}
    assert not torch.equal(by_wanda.keep, by_mag.keep)
    # the same blocks are dense in both, and both keep the same number per block
    kw, km = blocks_of(by_wanda.keep, 16).reshape(16, -1), blocks_of(by_mag.keep, 16).reshape(16, -1)
    assert torch.equal(kw.sum(1), km.sum(1))
    assert torch.equal(kw.all(1), km.all(1))


# ---------------------------------------------------------------------------------------------
# block, block top-k, hybrid N:M


def test_block_mask_zeroes_least_important_blocks():
    score, level = leveled(4, 5, 4, seed=6)  # 20 blocks
    keep, counts = bm.block_mask(score, 0.5, b=4)
    assert counts == {"dense": 10, "zeroed": 10}
    kb = blocks_of(keep, 4)
    low = level < 10
    assert not kb[low].any() and kb[~low].all()
    assert bm.block_mask(score, 0.0, b=4)[0].all()


def test_block_topk_mask():
    score, level = leveled(4, 5, 4, seed=7)
    keep, counts = bm.block_topk_mask(score, 0.3, k=3, b=4)
    assert counts == {"dense": 14, "topk": 6}
    kb, sb = blocks_of(keep, 4), blocks_of(score, 4)
    for r in range(4):
        for c in range(5):
            if level[r, c] < 6:
                assert torch.equal(kb[r, c], ref_topk(sb[r, c], 3))
            else:
                assert kb[r, c].all()


def test_hybrid_nm_threshold_rule():
    b = 4
    rb, cb = 2, 5  # 10 blocks, top 6 are candidates
    level = torch.arange(rb * cb, 0, -1).float().reshape(rb, cb)  # block 0 most important
    peaky = torch.tensor([1.0, 1.0, 0.01, 0.01]).repeat(b, 1)  # 2:4 keeps 2/2.02 of it
    flat = torch.full((b, b), 0.505)  # same mean; 2:4 keeps half
    score = torch.zeros(rb * b, cb * b)
    for i in range(rb * cb):
        r, c = divmod(i, cb)
        score[r * b:(r + 1) * b, c * b:(c + 1) * b] = level[r, c] * (peaky if i % 2 == 0 else flat)
    keep, counts = bm.hybrid_nm_mask(score, top_ratio=0.6, threshold=0.8, k=3, b=b)
    assert counts == {"dense": 3, "nm": 3, "topk": 4}
    kb = blocks_of(keep, b).reshape(-1, b, b)
    for i in range(10):
        if i < 6 and i % 2 == 0:
            assert torch.equal(kb[i], peaky > 0.5)  # n:m kept 99% >= 80%
        elif i < 6:
            assert kb[i].all()  # n:m would keep only 50%: stays dense
        else:
            assert kb[i].sum() == 3
    # threshold 0 takes N:M for every candidate, threshold 1 for none of these
    assert bm.hybrid_nm_mask(score, 0.6, 0.0, 3, b)[1] == {"dense": 0, "nm": 6, "topk": 4}
    assert bm.hybrid_nm_mask(score, 0.6, 1.0, 3, b)[1] == {"dense": 6, "nm": 0, "topk": 4}
    # exactly at the threshold counts as enough: 2:4 keeps 3 of [2, 1, 1, 0], i.e. 0.75
    exact = torch.tensor([2.0, 1.0, 1.0, 0.0]).repeat(8, 2)
    assert bm.hybrid_nm_mask(exact, 1.0, 0.75, 3, b)[1] == {"dense": 0, "nm": 4, "topk": 0}
    assert bm.hybrid_nm_mask(exact, 1.0, 0.76, 3, b)[1] == {"dense": 4, "nm": 0, "topk": 0}


def test_hybrid_nm_odd_shape_ignores_padding():
    score = torch.rand(30, 22, generator=torch.Generator().manual_seed(8))
    keep, counts = bm.hybrid_nm_mask(score, top_ratio=1.0, threshold=0.0, b=8)
    assert counts == {"dense": 0, "nm": 12, "topk": 0}
    assert torch.equal(keep, ref_three_tier(score, score, 0.0, 1.0, 15, 8, 2, 4)[0])


# ---------------------------------------------------------------------------------------------
# method modules and errors


def test_method_modules_protocol_and_info():
    g = torch.Generator().manual_seed(9)
    w = torch.randn(48, 64, generator=g)
    stats = Stats(1, sqnorm=torch.rand(64, generator=g))
    s = w.abs() * stats.sqnorm.sqrt()
    for mod in (three_tier, block, block_topk, hybrid_nm):
        assert mod.STATS == "sqnorm" and mod.PATTERNS == ("unstructured",)
        res = mod.prune_matrix(w.clone(), stats, Pattern("unstructured", 0.5), **mod.PARAMS)
        assert res.keep.shape == w.shape and res.keep.dtype == torch.bool and res.weight is None
    assert three_tier.NAME == "three_tier" and three_tier.PARAMS["inner_score"] == "wanda"
    res = block.prune_matrix(w.clone(), stats, Pattern("unstructured", 0.5))
    assert res.info == {"blocks_dense": 6, "blocks_zeroed": 6}
    assert torch.equal(res.keep, bm.block_mask(s, 0.5)[0])
    res = block_topk.prune_matrix(w.clone(), stats, Pattern("unstructured", 0.25), k=7)
    assert res.info == {"blocks_dense": 9, "blocks_topk": 3}
    assert torch.equal(res.keep, bm.block_topk_mask(s, 0.25, k=7)[0])
    res = hybrid_nm.prune_matrix(w.clone(), stats, Pattern("unstructured", 0.5))
    assert set(res.info) == {"blocks_dense", "blocks_nm", "blocks_topk"} and res.info["blocks_topk"] == 5
    # three_tier ignores the pattern's sparsity
    a = three_tier.prune_matrix(w.clone(), stats, Pattern("unstructured", 0.1)).keep
    assert torch.equal(a, three_tier.prune_matrix(w.clone(), stats, Pattern("unstructured", 0.9)).keep)


@pytest.mark.parametrize("kwargs, words", [
    ({"dense": 0.5, "nm": 0.45, "topk": 0.2}, "sum to 1"),
    ({"dense": -0.1, "nm": 0.9, "topk": 0.2}, "dense"),
    ({"k": 256}, "k must be"),
    ({"k": 16, "b": 4}, "k must be"),
    ({"b": 0}, "block size"),
    ({"n": 4, "m": 4}, "0 < n < m"),
    ({"n": 0}, "0 < n < m"),
    ({"b": 6, "m": 4, "k": 3}, "multiple of m"),
    ({"k": 2.5}, "integer"),
])
def test_three_tier_bad_params(kwargs, words):
    with pytest.raises(WandaError, match=words):
        bm.three_tier_mask(torch.rand(32, 32), **kwargs)


def test_other_bad_params():
    s = torch.rand(32, 32)
    with pytest.raises(WandaError):
        bm.block_mask(s, 1.5)
    with pytest.raises(WandaError):
        bm.block_mask(s, 0.5, b=0)
    with pytest.raises(WandaError):
        bm.block_topk_mask(s, 0.5, k=256)
    with pytest.raises(WandaError):
        bm.hybrid_nm_mask(s, threshold=1.5)
    with pytest.raises(WandaError):
        bm.hybrid_nm_mask(s, n=3, m=2)
    with pytest.raises(WandaError):
        bm.three_tier_mask(torch.rand(4, 4, 4))
    with pytest.raises(WandaError):
        bm.three_tier_mask(s, inner=torch.rand(16, 32))
    # The methods' options fail in check_params, before any model is loaded and without running the method.
    p = Pattern("unstructured", 0.5)
    with pytest.raises(WandaError, match="inner_score"):
        check_params(three_tier, p, {"inner_score": "hessian"})
    with pytest.raises(WandaError, match="sum to 1"):
        check_params(three_tier, p, {"dense": 0.9})
    with pytest.raises(WandaError, match="block size must be >= 1"):
        check_params(hybrid_nm, p, {"block_size": 0})
    with pytest.raises(WandaError, match="threshold must be in"):
        check_params(hybrid_nm, p, {"threshold": 1.5})
    with pytest.raises(WandaError, match="k must be in"):
        check_params(block_topk, p, {"k": 256})
    with pytest.raises(WandaError, match="block size must be an integer"):
        check_params(block, p, {"block_size": 2.5})
    with pytest.raises(WandaError, match="does not support pattern 2:4"):
        check_params(three_tier, Pattern("nm", 0.5, 2, 4), {})


def test_k_zero_and_tiny_matrices():
    keep, counts = bm.three_tier_mask(torch.rand(32, 32), dense=0, nm=0, topk=1, k=0)
    assert counts == {"dense": 0, "nm": 0, "topk": 4} and not keep.any()
    for shape in [(1, 1), (3, 17), (0, 5)]:
        keep, counts = bm.three_tier_mask(torch.rand(shape), b=4, k=3)
        assert keep.shape == shape and sum(counts.values()) == math.ceil(shape[0] / 4) * math.ceil(shape[1] / 4)
