"""Perplexity over non-overlapping windows of a token stream, as in the Wanda paper's WikiText-2 figures,
with a 95% interval from the spread of the windows' losses."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import WandaError
from .model import max_positions


@torch.no_grad()
def window_nll(model, token_ids, seqlen: int = 2048, max_windows: int | None = None, batch_size: int = 1,
               progress: bool = True) -> torch.Tensor:
    """The mean negative log-likelihood of each window's predicted tokens (float64, one per window; the tail is dropped)."""
    token_ids = torch.as_tensor(token_ids).reshape(-1).long()
    limit = max_positions(model)
    if limit and seqlen > limit:
        raise WandaError(f"seqlen {seqlen} is longer than the model supports ({limit})")
    n = token_ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, int(max_windows))
    if n < 1:
        raise WandaError(f"the evaluation text has {token_ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    windows = token_ids[: n * seqlen].reshape(n, seqlen)
    device = model.get_input_embeddings().weight.device
    sums = []
    for start in tqdm(range(0, n, batch_size), desc="perplexity", disable=not progress):
        batch = windows[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits
        losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                                 reduction="none")
        per_window = losses.view(len(batch), -1).sum(1)
        if not torch.isfinite(per_window).all():
            what = "NaN" if torch.isnan(logits).any() else "infinite" if torch.isinf(logits).any() else "extreme"
            raise NonFinitePerplexity(f"the model's logits are {what} in windows {start}-{start + len(batch) - 1} "
                                      f"(dtype {logits.dtype}); the pruned model overflows or is broken")
        sums.append(per_window.double().cpu())
    return torch.cat(sums) / (seqlen - 1)


def perplexity(model, token_ids, seqlen: int = 2048, max_windows: int | None = None, batch_size: int = 1,
               progress: bool = True) -> float:
    """exp(mean negative log-likelihood) over every predicted token of the windows (the tail is dropped)."""
    return math.exp(window_nll(model, token_ids, seqlen, max_windows, batch_size, progress).mean().item())


def interval(nll, level: float = 0.95) -> tuple[float, float]:
    """The `level` confidence interval of the perplexity exp(mean NLL), from the windows' mean NLLs.

    Student's t over the windows for the mean NLL, mapped through exp (so it is not symmetric around
    the perplexity). It measures how much the figure depends on which text was evaluated, nothing else:
    not the calibration draw, nor the rounding of another CPU. Windows of one text are not quite
    independent samples, so it is a guide, not an exact coverage. (nan, nan) for a single window.
    """
    from scipy import stats

    nll = torch.as_tensor(nll, dtype=torch.float64).reshape(-1)
    n = nll.numel()
    if n < 2:
        return float("nan"), float("nan")
    mean, se = nll.mean().item(), nll.std().item() / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * se
    return math.exp(mean - half), math.exp(mean + half)


class NonFinitePerplexity(WandaError):
    """The loss of some window is NaN or infinite: a result to record as a failure, never as a number."""
