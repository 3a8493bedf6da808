"""Perplexity over non-overlapping windows of a token stream, as in the Wanda paper's WikiText-2 figures."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import WandaError
from .model import max_positions


@torch.no_grad()
def perplexity(model, token_ids, seqlen: int = 2048, max_windows: int | None = None, batch_size: int = 1,
               progress: bool = True) -> float:
    """exp(mean negative log-likelihood) over every predicted token of the windows (the tail is dropped)."""
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
    nll, count = 0.0, 0
    for start in tqdm(range(0, n, batch_size), desc="perplexity", disable=not progress):
        batch = windows[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                               reduction="sum").item()
        if not math.isfinite(loss):
            what = "NaN" if torch.isnan(logits).any() else "infinite" if torch.isinf(logits).any() else "extreme"
            raise NonFinitePerplexity(f"the model's logits are {what} in windows {start}-{start + len(batch) - 1} "
                                      f"(dtype {logits.dtype}); the pruned model overflows or is broken")
        nll += loss
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


class NonFinitePerplexity(WandaError):
    """The loss of some window is NaN or infinite: a result to record as a failure, never as a number."""
