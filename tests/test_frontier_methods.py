"""ALPS, the ADMM weight update and SparseSwaps (issue #24): each against a direct transcription of its
source (the authors' ALPS_admm and fasterprune, written the way their code is, on [in, out] matrices),
against its formulas, and through the engine and the command line."""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from wanda_core.errors import WandaError
from wanda_core.masks import parse_pattern
from wanda_core.methods import Stats, admm, alps, check_params, get_method, sparsegpt, sparseswaps, stats_kinds, wanda


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many small matrix products: on a shared machine two threads wait on each other (10-50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(seed=0, tokens=512, d=64):
    """Correlated inputs with uneven channel scales, so that X^T X is far from diagonal."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / math.sqrt(d) + torch.eye(d)
    return (torch.randn(tokens, d, generator=g) @ mix) * torch.logspace(-0.5, 0.5, d)


def _weight(seed=1, out=48, d=64):
    return torch.randn(out, d, generator=torch.Generator().manual_seed(seed))


def _stats(x, kinds=("hessian", "sqnorm")):
    s = Stats()
    s.add(x, kinds)
    return s


def _error(w_dense, w_pruned, hessian):
    """The layer's reconstruction error ||X W^T - X Wp^T||^2 = tr(E H E^T)."""
    e = (w_pruned - w_dense).double()
    return float(((e @ hessian.double()) * e).sum())


# ----------------------------------------------------------------------------- ALPS

def alps_reference(W, XtX, sp, nm_n=0, nm_m=0, rho=0.1, max_iter=300, update_iter=3, switch_iter=30):
    """ALPS_prune.ALPS_admm and cg_batch of mazumder-lab/ALPS (alps.py) transcribed step by step on the
    transposed [in, out] matrix, torch.topk and scatter as there (the error printouts left out)."""
    XtX = XtX.clone().float()
    XtX[range(len(XtX)), range(len(XtX))] += 0.01 * torch.mean(torch.diag(XtX)).item()
    X_norm = torch.diag(XtX).sqrt() + 1e-8
    XtX = XtX / X_norm
    XtX = (XtX.T / X_norm).T
    YtX = torch.matmul(W * X_norm, XtX)
    B = (W * X_norm).t().clone()
    B_orig = B.clone()
    V = torch.zeros_like(B)
    totp, num_cout = B.shape
    L, Q = torch.linalg.eigh(XtX.double())
    XTX_inv = (Q @ ((1 / (L + rho)) * Q).T).float()
    init_rho = False
    params = B.shape[0] * B.shape[1]
    k_spar = int(np.round((1 - sp) * params))

    def project(M):
        if nm_n == 0:
            M = M.reshape(-1).clone()
            _, loss_idx = torch.topk(-M ** 2, totp * num_cout - k_spar)
            M[loss_idx] = 0
            return M.reshape(totp, num_cout)
        M = M.t().reshape((totp * num_cout // nm_m, nm_m))
        _, loss_idx = torch.topk(-M ** 2, nm_m - nm_n, dim=1)
        M = M.scatter(src=torch.zeros((M.shape[0], nm_m - nm_n)), dim=1, index=loss_idx)
        return M.reshape(num_cout, totp).t()

    if nm_n:
        k_spar = totp * num_cout * nm_n / nm_m
    D = project(B)
    D_suppp = (D == 0).float()
    D_init = D.clone()
    for i_admm in range(max_iter):
        B = XTX_inv @ (YtX.T - V + rho * D)
        D = project((V + rho * B) / rho)
        V = V + rho * (B - D)
        if (i_admm + 1) % update_iter == 0:
            D_supp = (D == 0).float()
            supp_change = torch.sum((D_supp - D_suppp) ** 2)
            if supp_change / k_spar > 0.1:
                init_rho, rho = True, rho * 1.3
            elif supp_change / k_spar > 0.005:
                init_rho, rho = True, rho * 1.2
            elif supp_change > 0.5:
                if init_rho:
                    rho *= 1.1
                else:
                    rho /= 5
                    D, V = D_init.clone(), torch.zeros_like(B)
            else:
                if init_rho:
                    break
                rho /= 5
            D_suppp = D_supp.clone()
            rho = min(rho, 1e6)
            XTX_inv = (Q @ ((1 / (L + rho)) * Q).T).float()
            if i_admm >= switch_iter and supp_change / k_spar < 0.0003:
                break
    B = project(B)
    # cg_batch(XtX, YtX.T, (B != 0), X0=B, rtol=1e-4, maxiter=10), no preconditioner
    A, rhs, supp = XtX, YtX.T, (B != 0).float()
    X = B
    R = (rhs - A @ X) * supp
    P = R_prev = None
    stop = 1e-4 * torch.norm(rhs, dim=1)
    for k in range(1, 11):
        if k == 1:
            P = R
        else:
            den = (R_prev * R_prev).sum(0)
            den[den == 0] = 1e-8
            P = R + ((R * R).sum(0) / den).unsqueeze(0) * P
        den = (P * (A @ P)).sum(0)
        den[den == 0] = 1e-8
        alpha = (R * R).sum(0) / den
        X = X + alpha.unsqueeze(0) * P
        R_prev = R
        R = (R - alpha.unsqueeze(0) * (A @ P)) * supp
        if (torch.norm(A @ X - rhs, dim=1) <= stop).all():
            break
    return (X.t() / X_norm).reshape(W.shape)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_alps_matches_a_transcription_of_the_authors_admm(pattern):
    w, st = _weight(), _stats(_inputs())
    pat = parse_pattern(pattern, 0.7 if pattern == "unstructured" else None)
    result = alps.prune_matrix(w.clone(), st, pat)
    expected = alps_reference(w, st.hessian, pat.sparsity, pat.n, pat.m)
    assert torch.equal(result.keep, expected != 0)
    torch.testing.assert_close(result.weight, expected, rtol=1e-3, atol=1e-4)
    assert 3 <= result.info["alps_iters"] < 300


@pytest.mark.parametrize("change,grew,expected", [
    (200, False, (1.3, True, False, False)),  # > 10% of k = 1000
    (100, True, (1.2, True, False, False)),  # 10% exactly: the next rule
    (6, False, (1.2, True, False, False)),  # > 0.5%
    (5, True, (1.1, True, False, False)),  # some change, rho grew before
    (5, False, (0.2, False, True, False)),  # some change, rho never grew: shrink and restart
    (0, False, (0.2, False, False, False)),  # no change, never grew: shrink
    (0, True, (1.0, True, False, True)),  # no change once rho grew: done
])
def test_alps_rho_schedule(change, grew, expected):
    rho, *flags = alps.update_rho(1.0, change, 1000, grew)
    assert rho == pytest.approx(expected[0]) and tuple(flags) == expected[1:]
    assert alps.update_rho(9e5, 200, 1000, True)[0] == alps.RHO_CAP  # capped at 1e6


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_alps_weights_solve_the_least_squares_problem_on_their_support(pattern):
    w, st = _weight(), _stats(_inputs())
    pat = parse_pattern(pattern, 0.6 if pattern == "unstructured" else None)
    r = alps.prune_matrix(w.clone(), st, pat)
    if pat.kind == "unstructured":  # the whole matrix keeps exactly its share; rows differ
        assert int(r.keep.sum()) == w.numel() - int(w.numel() * 0.6) and len(set(r.keep.sum(1).tolist())) > 1
    else:
        assert (r.keep.reshape(48, -1, 4).sum(-1) == 2).all()
    assert torch.equal(r.weight != 0, r.keep)
    # On its support, the gradient of ||(B - B0) Hn^1/2||^2 vanishes (CG's 10 steps; Hn damped and scaled).
    Hn, s = alps.normalized_hessian(st.hessian, 0.01)
    B, B0 = r.weight.double() * s, w.double() * s
    grad = ((B - B0) @ Hn) * r.keep
    assert grad.norm() < 1e-3 * (B0 @ Hn).norm()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_alps_reconstructs_better_than_sparsegpt_at_high_sparsity(pattern):
    w, st = _weight(), _stats(_inputs())
    pat = parse_pattern(pattern, 0.7 if pattern == "unstructured" else None)
    ours = _error(w, alps.prune_matrix(w.clone(), st, pat).weight, st.hessian)
    obs = _error(w, sparsegpt.prune_matrix(w.clone(), st, pat).weight, st.hessian)
    assert ours < obs


def test_alps_shares_an_eigendecomposition_only_while_the_statistics_are_unchanged():
    st = _stats(_inputs())
    first = alps.eigen(st.hessian, 0.01)
    assert alps.eigen(st.hessian, 0.01) is first  # q/k/v: one Stats object, one eigh
    assert alps.eigen(st.hessian.clone(), 0.01) is not first and alps.eigen(st.hessian, 0.02) is not first
    st.hessian.add_(torch.eye(64))  # changed in place: computed again
    again = alps.eigen(st.hessian, 0.01)
    assert again is not first and not torch.equal(again[0], first[0])


# ----------------------------------------------------------------------------- ADMM (Boza)

def admm_reference(weight, XX, sparsity, prune_n=0, percdamp=0.1, iterative_prune=15, iters=20, per_out=False):
    """AdmmPruner.fasterprune of fmfi-compbio/admm-pruning (lib/admm.py) transcribed on the [in, out]
    matrix; its N:M branch is written for 2:4 (groups of 4, the two largest kept)."""
    XX = XX.clone().float()
    norm = torch.diag(XX).sqrt() + 1e-8
    XX = XX / norm
    XX = (XX.T / norm).T
    W = (weight.float() * norm).T
    rho0 = percdamp * torch.diag(XX).mean()
    diag = torch.arange(XX.shape[0])
    XX[diag, diag] += rho0
    rho = 1
    XY = XX.matmul(W)
    XX[diag, diag] += rho
    XXinv = torch.inverse(XX)
    U = torch.zeros_like(W)
    for itt in range(iters):
        if itt < iterative_prune:
            if prune_n != 0:
                sparsity = 0.5
                cur_sparsity = sparsity - sparsity * (1 - (itt + 1) / iterative_prune) ** 3
                WT = (W + U).T.reshape((W.shape[1] * W.shape[0] // 4, 4)).abs()
                mask = torch.zeros(WT.shape, dtype=torch.bool)
                sort_inds = WT.sort(dim=1)[1]
                mask[torch.arange(WT.shape[0]), sort_inds[:, 2]] = 1
                mask[torch.arange(WT.shape[0]), sort_inds[:, 3]] = 1
                mask = mask.reshape(W.T.shape).T
                Z2 = (W + U).abs()
                Z2[mask] = torch.inf
                thres = Z2.flatten().kthvalue(int(W.numel() * cur_sparsity) + 1)[0]
                mask = Z2 >= thres
            else:
                cur_sparsity = sparsity - sparsity * (1 - (itt + 1) / iterative_prune) ** 3
                if per_out:
                    thres = (W + U).abs().sort(dim=0)[0][int(W.shape[0] * cur_sparsity)]
                    mask = (W + U).abs() >= thres.unsqueeze(0)
                else:
                    topk = torch.topk((W + U).abs().flatten(), k=int(W.numel() * sparsity), largest=False)
                    mask = torch.ones(W.numel(), dtype=torch.bool)
                    mask[topk.indices] = 0
                    mask = mask.reshape(W.shape)
        Z = (W + U) * mask
        U = U + (W - Z)
        W = XXinv.matmul(XY + rho * (Z - U))
    Z = (W + U) * mask
    return (Z.T / norm).reshape(weight.shape)


@pytest.mark.parametrize("pattern,per_row", [("unstructured", False), ("unstructured", True), ("2:4", False)])
def test_admm_matches_a_transcription_of_fasterprune(pattern, per_row):
    w, st = _weight(), _stats(_inputs())
    pat = parse_pattern(pattern, 0.6 if pattern == "unstructured" else None)
    result = admm.prune_matrix(w.clone(), st, pat, per_row=per_row)
    expected = admm_reference(w, st.hessian, pat.sparsity, pat.n, per_out=per_row)
    assert torch.equal(result.keep, expected != 0)
    torch.testing.assert_close(result.weight, expected, rtol=1e-3, atol=1e-4)
    counts = result.keep.sum(1)
    if per_row:
        assert (counts == 64 - int(64 * 0.6)).all()
    elif pat.kind == "unstructured":  # whole matrix, by |W| ||X||
        assert int(counts.sum()) == w.numel() - int(w.numel() * 0.6) and len(set(counts.tolist())) > 1


def test_admm_mask_chosen_once_from_the_scaled_weights():
    """The authors' iterative_prune=0: one mask from |W| ||X|| (Wanda's score over the whole matrix), then
    the ADMM update on it; with iters=0 too, that mask and the dense weights."""
    w, st = _weight(), _stats(_inputs())
    pat = parse_pattern("unstructured", 0.6)
    expected = ~torch.zeros_like(w, dtype=torch.bool)
    score = (w * (st.hessian.diagonal().sqrt() + 1e-8)).abs().flatten()
    expected.view(-1)[torch.topk(score, int(w.numel() * 0.6), largest=False).indices] = False
    once = admm.prune_matrix(w.clone(), st, pat, mask_iters=0)
    assert torch.equal(once.keep, expected)
    assert _error(w, once.weight, st.hessian) < _error(w, w * expected, st.hessian)
    bare = admm.prune_matrix(w.clone(), st, pat, iters=0, mask_iters=0)
    torch.testing.assert_close(bare.weight, w * expected)


def test_admm_cubic_schedule():
    values = [admm.schedule(t, 0.5, 15) for t in range(15)]
    assert values[-1] == 0.5 and all(a < b for a, b in zip(values, values[1:]))
    assert values[0] == pytest.approx(0.5 - 0.5 * (14 / 15) ** 3)


def test_admm_generalises_nm_and_forces_the_schedule():
    w, st = _weight(), _stats(_inputs())
    r = admm.prune_matrix(w.clone(), st, parse_pattern("4:8"))
    assert (r.keep.reshape(48, -1, 8).sum(-1) == 4).all() and torch.equal(r.weight != 0, r.keep)
    pat = parse_pattern("unstructured", 0.6)
    gradual = admm.prune_matrix(w.clone(), st, pat, gradual=True)
    assert int(gradual.keep.sum()) == int(admm.prune_matrix(w.clone(), st, pat).keep.sum())
    assert not torch.equal(gradual.keep, admm.prune_matrix(w.clone(), st, pat).keep)
    # Both reconstruct far better than Wanda's mask with the dense weights kept.
    wanda_keep = wanda.prune_matrix(w.clone(), st, pat).keep
    assert _error(w, gradual.weight, st.hessian) < 0.5 * _error(w, w * wanda_keep, st.hessian)


# ----------------------------------------------------------------------------- SparseSwaps

def _swap_delta(w, keep, G, p, q):
    """Row error after pruning q and regrowing p, minus before, from scratch."""
    after = keep.clone()
    after[p], after[q] = True, False
    return float(sparseswaps.row_errors(w[None], after[None], G)[0] - sparseswaps.row_errors(w[None], keep[None], G)[0])


def test_sparseswaps_best_pair_is_the_lowest_delta_of_all_pairs():
    w, st = _weight(out=6, d=16), _stats(_inputs(d=16))
    keep = wanda.prune_matrix(w.clone(), st, parse_pattern("unstructured", 0.5)).keep
    G, W = st.hessian.double(), w.double()
    t = 2 * W * ((W * ~keep) @ G)
    sq = W * W * G.diagonal()
    delta, p, q = sparseswaps._best_pair(W, (sq + t).masked_fill(~keep, math.inf), (sq - t).masked_fill(keep, math.inf), G, None)
    for i in range(6):
        brute = {(a, b): _swap_delta(W[i], keep[i], G, a, b) for a in range(16) for b in range(16) if not keep[i, a] and keep[i, b]}
        best = min(brute, key=brute.get)
        assert (int(p[i]), int(q[i])) == best and float(delta[i]) == pytest.approx(brute[best], rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("pattern,candidates", [("unstructured", None), ("unstructured", 4), ("2:4", None)])
def test_sparseswaps_every_swap_lowers_the_row_error_and_keeps_the_row_sparsity(pattern, candidates):
    w, st = _weight(out=12, d=32), _stats(_inputs(d=32))
    pat = parse_pattern(pattern, 0.6 if pattern == "unstructured" else None)
    G = st.hessian.double()
    masks = [sparseswaps.prune_matrix(w.clone(), st, pat, max_swaps=t, candidates=candidates).keep for t in range(12)]
    start = wanda.prune_matrix(w.clone(), st, pat).keep
    assert torch.equal(masks[0], start)
    errors = [sparseswaps.row_errors(w, m, G) for m in masks]
    for t in range(1, len(masks)):
        changed = (masks[t] != masks[t - 1]).sum(1)
        assert set(changed.tolist()) <= {0, 2}  # at most one swap per row and step
        assert (errors[t][changed == 2] < errors[t - 1][changed == 2]).all()
        assert torch.equal(errors[t][changed == 0], errors[t - 1][changed == 0])
        assert torch.equal(masks[t].sum(1), start.sum(1))
        if pat.kind == "nm":
            assert (masks[t].reshape(12, -1, 4).sum(-1) == 2).all()
    assert (masks[-1] != start).any()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparseswaps_ends_one_swap_optimal(pattern):
    w, st = _weight(out=6, d=12), _stats(_inputs(d=12))
    pat = parse_pattern(pattern, 0.5 if pattern == "unstructured" else None)
    r = sparseswaps.prune_matrix(w.clone(), st, pat, max_swaps=1000)
    assert r.weight is None and r.info["swaps"] > 0 and r.info["swap_error_ratio"] < 1
    G = st.hessian.double()
    errors = sparseswaps.row_errors(w, r.keep, G)
    for i in range(6):
        keep = r.keep[i]
        for p in range(12):
            for q in range(12):
                if keep[p] or not keep[q] or (pat.kind == "nm" and p // 4 != q // 4):
                    continue
                assert _swap_delta(w[i].double(), keep, G, p, q) >= -1e-9 * float(errors[i]), (i, p, q)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparseswaps_rows_in_chunks_give_the_same_mask(pattern, monkeypatch):
    w, st = _weight(out=12, d=32), _stats(_inputs(d=32))
    pat = parse_pattern(pattern, 0.6 if pattern == "unstructured" else None)
    whole = sparseswaps.prune_matrix(w.clone(), st, pat)
    monkeypatch.setattr(sparseswaps, "CHUNK", {"cpu": 200})  # a few rows per block of deltas
    assert torch.equal(sparseswaps.prune_matrix(w.clone(), st, pat).keep, whole.keep)


def test_sparseswaps_warm_start_is_per_row_for_any_base():
    w, st = _weight(), _stats(_inputs())
    pat = parse_pattern("unstructured", 0.5)
    for base in sparseswaps.BASES:
        r = sparseswaps.prune_matrix(w.clone(), st, pat, base=base, max_swaps=0)
        assert (r.keep.sum(1) == 32).all(), base
    assert stats_kinds(sparseswaps, {"base": "magnitude"}) == ("hessian",)
    assert stats_kinds(sparseswaps, {}) == ("hessian", "sqnorm")


# ----------------------------------------------------------------------------- options

@pytest.mark.parametrize("method,pattern,params,message", [
    ("alps", "unstructured", {"max_iter": 0}, "ALPS max_iter must be a whole number >= 1"),
    ("alps", "2:4", {"rho": -1}, "ALPS rho must be a number > 0"),
    ("alps", "unstructured", {"cg_iters": 2.5}, "ALPS cg_iters must be a whole number >= 0"),
    ("admm", "unstructured", {"mask_iters": 30}, "must not exceed iters"),
    ("admm", "unstructured", {"iters": -1}, "ADMM iters must be a whole number >= 0"),
    ("admm", "2:4", {"per_row": True}, "per_row applies to unstructured patterns only"),
    ("admm", "unstructured", {"gradual": "yes"}, "ADMM gradual must be"),
    ("admm", "unstructured", {"percdamp": 0}, "ADMM percdamp must be a number > 0"),
    ("sparseswaps", "unstructured", {"base": "sparsegpt"}, "SparseSwaps base must be one of"),
    ("sparseswaps", "2:4", {"max_swaps": -1}, "max_swaps must be a whole number >= 0"),
    ("sparseswaps", "unstructured", {"candidates": 0}, "candidates must be a whole number >= 1 or null"),
])
def test_bad_options_are_named_by_check_alone(method, pattern, params, message):
    m, pat = get_method(method), parse_pattern(pattern, 0.7 if pattern == "unstructured" else None)
    with pytest.raises(WandaError) as e:
        m.check(pat, params)  # without running the method
    assert message in str(e.value)
    with pytest.raises(WandaError) as e:
        check_params(m, pat, params)
    assert message in str(e.value)


def test_defaults_pass_the_checks():
    for name in ("alps", "admm", "sparseswaps"):
        for pattern in (parse_pattern("unstructured", 0.7), parse_pattern("2:4")):
            assert check_params(get_method(name), pattern, {}) == get_method(name).PARAMS


def test_cli_bad_option_one_error_line_no_output(tmp_path):
    out = tmp_path / "out" / "pruned.safetensors"
    proc = subprocess.run([sys.executable, "-m", "wanda_core", "prune", "--model", str(tmp_path / "no-model"),
                           "--calibration", str(tmp_path / "none.safetensors"), "--method", "sparseswaps",
                           "--param", "base=lottery", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "SparseSwaps base must be one of" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and not out.parent.exists()


# ----------------------------------------------------------------------------- on a tiny model

@pytest.mark.parametrize("method", ["alps", "admm", "sparseswaps"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_on_a_tiny_model_through_the_engine(method, pattern):
    import wanda_core as wc
    from tiny_models import tiny_input_ids, tiny_model

    model = tiny_model("llama")
    report = wc.prune(model, method, pattern, 0.6 if pattern == "unstructured" else None,
                      tiny_input_ids(batch=4, seq=64), progress=False)
    assert report["sparsity"] == pytest.approx(0.6 if pattern == "unstructured" else 0.5, abs=0.01)  # per row: int(cols * 0.6)
    assert report["updates_weights"] is (method != "sparseswaps")
    for t in wc.all_targets(model):
        if pattern == "2:4":
            assert ((t.weight() != 0).reshape(t.shape[0], -1, 4).sum(-1) <= 2).all(), t.name
    if method == "sparseswaps":
        assert sum(r["swaps"] for r in report["layers"]) > 0


def test_prune_through_the_cli(tmp_path, tiny_dir, corpus, cli):
    import json

    calib = tmp_path / "calib.safetensors"
    assert cli("calibrate", "--model", tiny_dir, "--data", corpus, "--nsamples", 4, "--seqlen", 32, "--out", calib)[0] == 0
    for method, pattern in (("alps", "2:4"), ("sparseswaps", "unstructured")):
        out, report = tmp_path / f"{method}.safetensors", tmp_path / f"{method}.json"
        status, _, errors = cli("prune", "--model", tiny_dir, "--method", method, "--pattern", pattern, "--sparsity",
                                "0.5", "--param", "max_iter=50" if method == "alps" else "candidates=8",
                                "--calibration", calib, "--out", out, "--report", report, "--quiet")
        assert status == 0 and not errors and out.is_file(), errors
        assert json.loads(report.read_text())["sparsity"] == pytest.approx(0.5, abs=1e-3)
