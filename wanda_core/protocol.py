"""How a figure was measured: the sequence-length rule of the Wanda code, and whether a published
figure's protocol is ours.

The Wanda code (locuslab/wanda main.py, line 25 at 8e8fc87) sets `model.seqlen =
model.config.max_position_embeddings` and uses that length for its calibration windows (lib/data.py)
and its WikiText-2 evaluation windows (lib/eval.py): 2048 tokens for LLaMA-1 and OPT, 4096 for
LLaMA-2. `seqlen: model` is that rule; the same pruned LLaMA-2 evaluated at 2048 reads about 7%
higher, so a figure is only set beside another measured with the same protocol.
"""
from __future__ import annotations

from .errors import WandaError

FROM_MODEL = "model"  # a sequence length that is the model's max_position_embeddings
UNKNOWN = "unknown"


def parse_seqlen(value) -> int | str:
    """A sequence length as a config or the command line gives it: a number of tokens (at least 2), or 'model'."""
    if isinstance(value, str) and value.strip().lower() == FROM_MODEL:
        return FROM_MODEL
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise WandaError(f"seqlen needs a number of tokens or 'model' (the model's max_position_embeddings), got {value!r}") from None
    if number < 2 or str(number) != str(value).strip():
        raise WandaError(f"seqlen needs a whole number of tokens of at least 2, or 'model', got {value!r}")
    return number


def resolve_seqlen(spec, positions: int | None, cap: int | None = None, what: str = "the model") -> int:
    """The length a sequence-length spec stands for: the number itself, or (spec 'model') the model's
    max_position_embeddings `positions`, at most `cap` tokens when a cap is given."""
    spec = parse_seqlen(spec)
    if spec != FROM_MODEL:
        return spec
    if not positions:
        raise WandaError(f"seqlen 'model': {what} states no max_position_embeddings; give a number of tokens")
    return min(int(positions), int(cap)) if cap else int(positions)


# --- published figures: their protocol against ours ---

def is_unknown(value) -> bool:
    """None, 'unknown', or a note that starts with it ('unknown (2048 inferred from ...)')."""
    return value is None or (isinstance(value, str) and value.strip().lower().startswith(UNKNOWN))


def published_protocol(block: dict) -> dict:
    """The protocol of a published.yaml block, flat: eval_seqlen, eval_windows, calibration_dataset,
    calibration_sampler, calibration_nsamples, calibration_seqlen, lm_eval, task_versions, seeds and
    protocol_from (where it was read); what the block does not state is 'unknown'."""
    given = block.get("protocol") or {}
    evaluation = given.get("eval", UNKNOWN)
    calibration = given.get("calibration", UNKNOWN)
    zeroshot = given.get("zeroshot", UNKNOWN)
    out = {"eval_seqlen": UNKNOWN, "eval_windows": UNKNOWN, "calibration_dataset": UNKNOWN,
           "calibration_sampler": UNKNOWN, "calibration_nsamples": UNKNOWN, "calibration_seqlen": UNKNOWN,
           "lm_eval": UNKNOWN, "task_versions": UNKNOWN,
           "seeds": given.get("seeds", UNKNOWN), "protocol_from": given.get("from", "")}
    if isinstance(zeroshot, dict):
        out.update(lm_eval=zeroshot.get("lm_eval", UNKNOWN), task_versions=zeroshot.get("task_versions", UNKNOWN))
    if isinstance(evaluation, dict):
        out.update(eval_seqlen=evaluation.get("seqlen", UNKNOWN), eval_windows=evaluation.get("windows", UNKNOWN))
    elif is_unknown(evaluation):
        out["eval_seqlen"] = evaluation or UNKNOWN  # with its note, if any: 'unknown (2048 inferred from ...)'
    else:
        raise WandaError(f"published block {block.get('source')!r}: protocol.eval must be a mapping or 'unknown'")
    if isinstance(calibration, dict):
        for key in ("dataset", "sampler", "nsamples", "seqlen"):
            out[f"calibration_{key}"] = calibration.get(key, UNKNOWN)
    elif not is_unknown(calibration):
        raise WandaError(f"published block {block.get('source')!r}: protocol.calibration must be a mapping or 'unknown'")
    return out


def _windows_text(windows) -> str:
    return "the whole test set" if windows == "all" else f"{windows} windows"


def _versions_text(versions) -> str:
    return ", ".join(f"{task} {v}" for task, v in versions.items()) if isinstance(versions, dict) else str(versions)


def describe(p: dict, zeroshot: bool = False) -> str:
    """A protocol in a few words: 'eval 4096 tokens, the whole test set; calibration c4 128 x 4096 (c4_documents); 1 seed'
    (zero-shot: 'lm-eval 0.4.13, task versions boolq 2.0, ...' in place of the evaluation length)."""
    first = ("lm_eval", "task_versions") if zeroshot else ("eval_seqlen",)
    if all(is_unknown(p.get(k)) for k in first) and is_unknown(p.get("calibration_nsamples")):
        note = p.get(first[0])
        return note.strip() if isinstance(note, str) and note.strip() else UNKNOWN
    parts = []
    if zeroshot:
        parts.append(f"lm-eval {p.get('lm_eval')}" + ("" if is_unknown(p.get("task_versions"))
                                                      else f", task versions {_versions_text(p['task_versions'])}"))
    else:
        seqlen = p.get("eval_seqlen")
        parts.append(f"eval {seqlen}" + ("" if is_unknown(seqlen) else " tokens")
                     + ("" if is_unknown(p.get("eval_windows")) else f", {_windows_text(p['eval_windows'])}"))
    if p.get("calibration_nsamples") is not None:
        if is_unknown(p.get("calibration_nsamples")):
            parts.append("calibration unknown")
        else:
            parts.append(f"calibration {p.get('calibration_dataset')} {p['calibration_nsamples']} x {p.get('calibration_seqlen')}"
                         + ("" if is_unknown(p.get("calibration_sampler")) else f" ({p['calibration_sampler']})"))
    seeds = p.get("seeds")
    if seeds is not None and not is_unknown(seeds):
        parts.append(f"mean of {seeds} seeds" if int(seeds) > 1 else "1 seed")
    return "; ".join(parts)


def differences(ours: dict, published: dict, calibrated: bool = True, zeroshot: bool = False) -> list[str]:
    """What keeps a published figure from being set beside ours: each field that differs or that either
    side does not state ('published at 4096, ours at 2048'). [] when the protocols agree.

    Compared: the evaluation length and window count (zero-shot: the lm-eval version and each task's
    version), and for methods that calibrate the calibration set, sampler, sample count and length.
    Not compared: the seeds (a mean over 5 seeds and one seed estimate the same thing; both are shown).
    """
    out = []

    def check(field, name, show=str):
        theirs, mine = published.get(field), ours.get(field)
        if is_unknown(theirs):
            note = theirs.strip()[len(UNKNOWN):] if isinstance(theirs, str) else ""
            out.append(f"published {name} unknown{note}")
        elif is_unknown(mine):
            out.append(f"our {name} unknown")
        elif str(theirs) != str(mine):
            out.append(f"{name}: published {show(theirs)}, ours {show(mine)}")

    if zeroshot:
        check("lm_eval", "lm-eval")
        theirs, mine = published.get("task_versions"), ours.get("task_versions")
        if is_unknown(theirs):
            out.append("published task versions unknown")
        elif is_unknown(mine):
            out.append("our task versions unknown")
        else:
            mine = {t: str(v) for t, v in mine.items()}
            theirs = {t: str(v) for t, v in theirs.items()}
            if {t: theirs.get(t) for t in mine} != mine:
                out.append(f"task versions: published {_versions_text(theirs)}, ours {_versions_text(mine)}")
    else:
        theirs, mine = published.get("eval_seqlen"), ours.get("eval_seqlen")
        if not is_unknown(theirs) and not is_unknown(mine) and str(theirs) != str(mine):
            out.append(f"published at {theirs}, ours at {mine}")  # the usual one, said plainly
        else:
            check("eval_seqlen", "eval length")
        check("eval_windows", "eval windows", _windows_text)
    if calibrated:
        if is_unknown(published.get("calibration_nsamples")) and is_unknown(published.get("calibration_seqlen")):
            out.append("published calibration unknown")
        else:
            check("calibration_dataset", "calibration set")
            check("calibration_sampler", "calibration sampler")
            check("calibration_nsamples", "calibration samples")
            check("calibration_seqlen", "calibration length")
    return out
