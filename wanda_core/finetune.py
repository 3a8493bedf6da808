"""Recovery fine-tuning of a pruned model, and the steps of a progressive schedule.

Two recipes:
  lora    a LoRA adapter (peft) on some of the matrices; every base weight stays frozen, so the
          pruned weights stay exactly zero. The adapter is kept beside the sparse weights and
          evaluated unmerged: merging it adds a dense low-rank update to every targeted matrix
          (merge_lora re-applies the masks after merging, which changes the model).
  masked  full fine-tuning of the pruned matrices (everything else frozen); their gradients are
          masked and their pruned weights zeroed again after every optimizer step, so the
          sparsity never drifts. The result is a pruned-weights file like the one it started from.

Training data: non-overlapping windows of a token stream, visited in a seeded random order, one
permutation per epoch; step s always sees the same windows. Every `checkpoint_every` steps the
trainable weights, optimizer and random state go to <out>.checkpoint/state.pt (atomically), so a
killed run started again with the same inputs resumes there and ends with the same weights as an
uninterrupted run (on the CPU, bit for bit); a checkpoint of other inputs is discarded.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import WandaError, first_line
from .io import atomic_dir, atomic_path, write_json
from .masks import pack_mask
from .model import all_targets, check_sparsity, max_positions
from .pruned import load_pruned, read_masks, read_metadata, save_pruned

log = logging.getLogger("wanda_core")

KINDS = ("lora", "masked")
SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("auto", "fp32", "bf16")
# lr: locuslab/wanda's LoRA runs use 1e-4 (rank 8, alpha 16, dropout 0.05, q_proj and v_proj, C4);
# the seed fork's masked ("dense") fine-tuning between progressive steps uses 2e-5.
RECIPE = {
    "kind": "lora", "steps": 200, "batch_size": 1, "grad_accum": 1, "seqlen": 512, "lr": None,
    "weight_decay": 0.0, "warmup": 0, "schedule": "constant", "max_grad_norm": 1.0, "seed": 0,
    "rank": 8, "alpha": 16, "dropout": 0.05, "targets": ["q_proj", "v_proj"],
    "gradient_checkpointing": False, "precision": "auto", "checkpoint_every": 50,
}
LR = {"lora": 1e-4, "masked": 2e-5}
WORKFLOW_KEYS = ("label", "dataset")  # recipe keys of the workflow config that the library does not use

REPORT, ADAPTER, WEIGHTS = "finetune.json", "adapter", "pruned.safetensors"


# ---------------------------------------------------------------------------------------------
# recipes and data


def check_recipe(recipe: dict) -> dict:
    """Fill defaults and reject unknown or bad options, with one line naming the option."""
    recipe = {k: v for k, v in dict(recipe).items() if k not in WORKFLOW_KEYS}
    unknown = sorted(set(recipe) - set(RECIPE))
    if unknown:
        raise WandaError(f"fine-tuning recipe has no option {unknown[0]!r} (options: {', '.join(RECIPE)})")
    r = {**RECIPE, **recipe}
    if r["kind"] not in KINDS:
        raise WandaError(f"fine-tuning kind must be one of {', '.join(KINDS)}, got {r['kind']!r}")
    if r["lr"] is None:
        r["lr"] = LR[r["kind"]]

    def need(ok: bool, key: str, what: str):
        if not ok:
            raise WandaError(f"fine-tuning option {key} must be {what}, got {r[key]!r}")

    def integer(key, low):
        need(isinstance(r[key], int) and not isinstance(r[key], bool) and r[key] >= low, key, f"an integer >= {low}")

    for key, low in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("seqlen", 2), ("warmup", 0), ("rank", 1),
                     ("checkpoint_every", 1), ("seed", 0)):
        integer(key, low)
    for key in ("lr", "alpha"):
        need(isinstance(r[key], (int, float)) and not isinstance(r[key], bool) and r[key] > 0, key, "a positive number")
    for key in ("weight_decay", "max_grad_norm"):
        need(isinstance(r[key], (int, float)) and not isinstance(r[key], bool) and r[key] >= 0, key, "a number >= 0")
    need(isinstance(r["dropout"], (int, float)) and 0 <= r["dropout"] < 1, "dropout", "in [0, 1)")
    need(r["schedule"] in SCHEDULES, "schedule", f"one of {', '.join(SCHEDULES)}")
    need(r["precision"] in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}")
    need(isinstance(r["gradient_checkpointing"], bool), "gradient_checkpointing", "true or false")
    need(r["targets"] == "all-linear" or (isinstance(r["targets"], list) and r["targets"]
                                          and all(isinstance(t, str) for t in r["targets"])),
         "targets", "a list of module names (e.g. [q_proj, v_proj]) or 'all-linear'")
    need(r["warmup"] <= r["steps"], "warmup", f"at most steps ({r['steps']})")
    return r


def training_windows(token_ids, seqlen: int) -> torch.Tensor:
    """Non-overlapping windows of `seqlen` tokens: LongTensor [n, seqlen] (the tail is dropped)."""
    token_ids = torch.as_tensor(token_ids).reshape(-1).long()
    n = token_ids.numel() // seqlen
    if n < 1:
        raise WandaError(f"the training text has {token_ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    return token_ids[: n * seqlen].reshape(n, seqlen)


def batch_indices(n: int, micro_step: int, batch_size: int, seed: int) -> list[int]:
    """Windows of one micro-batch: sample i of the run is entry i % n of epoch i // n's permutation."""
    out, perms = [], {}
    for i in range(micro_step * batch_size, (micro_step + 1) * batch_size):
        epoch = i // n
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perms[epoch][i % n]))
    return out


def lr_at(recipe: dict, step: int) -> float:
    """Linear warm-up over `warmup` steps, then constant, linear decay to 0 or cosine decay to 0."""
    base, warm, steps = recipe["lr"], recipe["warmup"], recipe["steps"]
    if step < warm:
        return base * (step + 1) / warm
    frac = (step - warm) / max(1, steps - warm)
    if recipe["schedule"] == "linear":
        return base * (1.0 - frac)
    if recipe["schedule"] == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * frac))
    return base


# ---------------------------------------------------------------------------------------------
# the trainable part: a LoRA adapter or the pruned matrices under their masks


def _grad_view(t, grad: torch.Tensor) -> torch.Tensor:
    """The part of a parameter's gradient that belongs to target `t`, seen as [out, in] (like t.weight())."""
    if t.expert is not None:
        grad = grad[t.expert]
    return grad.t() if t.transposed else grad


class MaskedMatrices:
    """The pruned matrices as trainable parameters; pruned weights get no gradient and stay zero."""

    def __init__(self, model, masks: dict):
        self.targets = all_targets(model)
        missing = [t.name for t in self.targets if t.name not in masks]
        if missing:
            raise WandaError(f"no mask for {missing[0]}: the masks are of another model")
        device = next(model.parameters()).device
        self.keep = [masks[t.name].to(device) for t in self.targets]
        for p in model.parameters():
            p.requires_grad_(False)
        self.params = list({id(p): p for t in self.targets for p in [getattr(t.module, t.param)]}.values())
        for p in self.params:
            if p.dtype != torch.float32:
                raise WandaError(f"masked fine-tuning trains the weights themselves: load the model in float32, not {p.dtype}")
            p.requires_grad_(True)
        self.reapply()

    def mask_grads(self) -> None:
        for t, keep in zip(self.targets, self.keep):
            grad = getattr(t.module, t.param).grad
            if grad is not None:
                _grad_view(t, grad).masked_fill_(~keep, 0.0)

    @torch.no_grad()
    def reapply(self) -> None:
        for t, keep in zip(self.targets, self.keep):
            t.weight().masked_fill_(~keep, 0.0)


def attach_lora(model, recipe: dict):
    """The model with a fresh LoRA adapter (peft); every base weight frozen. Returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=recipe["rank"], lora_alpha=recipe["alpha"], lora_dropout=recipe["dropout"],
                        target_modules=recipe["targets"], bias="none", task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft calls a transformers API renamed in 5.x
            return get_peft_model(model, config)
    except ValueError as e:
        raise WandaError(f"LoRA targets {recipe['targets']}: {first_line(e)}") from None


def _autocast(precision: str, device: torch.device):
    """bf16 autocast where supported (precision auto on CUDA, or bf16); fp32 otherwise (the CPU)."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if bf16:
        return "bf16", torch.autocast(device.type, dtype=torch.bfloat16)
    return "fp32", contextlib.nullcontext()


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over a batch of windows (in float32, as the perplexity)."""
    logits = model(input_ids=batch, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


# ---------------------------------------------------------------------------------------------
# training


def _rng_state(device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _load_checkpoint(folder, key: str):
    path = Path(folder) / "state.pt" if folder else None
    if path is None or not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a file that cannot be read is no checkpoint: start again
        log.warning("ignoring unreadable checkpoint %s (%s); starting from step 0", path, first_line(e))
        return None
    if state.get("key") != key:
        log.warning("checkpoint %s was made from other inputs or another recipe; starting from step 0", path)
        return None
    return state


def _trainable(model, r: dict, masks: dict | None):
    """What train() trains: (the PeftModel for lora, None) or (`model`, its MaskedMatrices) for masked."""
    if r["gradient_checkpointing"]:
        try:  # transformers 5 renamed it; the old name warns until v6
            model.activation_checkpointing_enable({"use_reentrant": False})
        except ValueError as e:
            raise WandaError(f"gradient_checkpointing: {first_line(e)}") from None
    torch.manual_seed(r["seed"])  # the adapter's initial weights, then dropout
    if r["kind"] == "lora":
        return attach_lora(model, r), None
    if masks is None:
        raise WandaError("masked fine-tuning needs the masks of the pruned weights")
    return model, MaskedMatrices(model, masks)


def train(model, recipe: dict, windows: torch.Tensor, masks: dict | None = None, checkpoint=None, key: str = "",
          progress: bool = True):
    """Fine-tune the pruned `model` (weights on one device) on `windows` [n, seqlen]; returns (net, report).

    recipe: see check_recipe. masks: {matrix name: bool keep [out, in]}, required by masked (lora
    freezes every base weight and needs none). checkpoint: a folder for resumable state, used when
    its `key` matches. For lora, `net` is the PeftModel wrapping `model`; for masked, `model` itself.
    """
    r = check_recipe(recipe)
    device = next(model.parameters()).device
    if windows.shape[1] != r["seqlen"]:
        raise WandaError(f"training windows have {windows.shape[1]} tokens, the recipe's seqlen is {r['seqlen']}")
    limit = max_positions(model)
    if limit and r["seqlen"] > limit:
        raise WandaError(f"seqlen {r['seqlen']} is longer than the model supports ({limit})")
    state = _load_checkpoint(checkpoint, key)
    precision, autocast = _autocast(r["precision"], device)
    net, masked = _trainable(model, r, masks)
    trainable = [(name, p) for name, p in net.named_parameters() if p.requires_grad]
    params = [p for _, p in trainable]
    opt = torch.optim.AdamW(params, lr=r["lr"], weight_decay=r["weight_decay"])
    start, losses = 0, []
    if state is not None:
        with torch.no_grad():
            for name, p in trainable:
                p.copy_(state["params"][name])
        opt.load_state_dict(state["optimizer"])
        start, losses = state["step"], list(state["losses"])
        _set_rng_state(state["rng"], device)
        log.info("resuming %s fine-tuning at step %d/%d from %s", r["kind"], start, r["steps"], checkpoint)

    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    net.train()
    t0, every = time.perf_counter(), max(1, r["steps"] // 10)
    bar = tqdm(range(start, r["steps"]), initial=start, total=r["steps"], desc=f"{r['kind']} fine-tuning {name}",
               disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(r, step)
        loss_sum = 0.0
        for micro in range(r["grad_accum"]):
            idx = batch_indices(windows.shape[0], step * r["grad_accum"] + micro, r["batch_size"], r["seed"])
            with autocast:
                loss = lm_loss(net, windows[idx].to(device)) / r["grad_accum"]
            loss.backward()
            loss_sum += loss.item()
        if not math.isfinite(loss_sum):
            raise WandaError(f"fine-tuning diverged: the loss is {loss_sum} at step {step + 1}; lower the learning rate ({r['lr']})")
        if masked:
            masked.mask_grads()
        if r["max_grad_norm"]:
            torch.nn.utils.clip_grad_norm_(params, r["max_grad_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if masked:
            masked.reapply()
        losses.append(loss_sum)
        bar.set_postfix(loss=f"{loss_sum:.4f}")
        if not progress and ((step + 1) % every == 0 or step + 1 == r["steps"]):
            log.info("%s %s fine-tuning: step %d/%d, loss %.4f (%.2f s/step)", name, r["kind"], step + 1, r["steps"],
                     loss_sum, (time.perf_counter() - t0) / (step + 1 - start))
        if checkpoint and (step + 1) % r["checkpoint_every"] == 0 and step + 1 < r["steps"]:
            _save_checkpoint(checkpoint, key, trainable, opt, step + 1, losses, device)
    net.eval()
    seconds = time.perf_counter() - t0
    k = max(1, min(10, len(losses) // 4))
    report = {
        "kind": r["kind"], "recipe": r, "steps": r["steps"], "resumed_at": start or None, "losses": losses,
        "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k, "seconds": seconds,
        "seconds_per_step": seconds / max(1, r["steps"] - start),
        "tokens_per_step": r["batch_size"] * r["grad_accum"] * r["seqlen"],
        "trainable_params": sum(p.numel() for p in params), "precision": precision,
        "training_windows": int(windows.shape[0]),
    }
    return net, report


def _save_checkpoint(folder, key, trainable, opt, step, losses, device) -> None:
    state = {"key": key, "step": step, "losses": losses, "rng": _rng_state(device),
             "params": {name: p.detach().cpu() for name, p in trainable}, "optimizer": opt.state_dict()}
    with atomic_path(Path(folder) / "state.pt") as tmp:
        torch.save(state, tmp)


# ---------------------------------------------------------------------------------------------
# results: save, load, merge


def file_id(path) -> str:
    """A hash of a file's bytes: what a fine-tuned result was made from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def save_finetuned(net, out, report: dict, masks: dict | None = None, pruned=None, metadata: dict | None = None) -> None:
    """Write the result folder: finetune.json, and adapter/ (lora) or pruned.safetensors (masked).

    masked: the file's metadata are those of `pruned` (the dense model's fingerprint, the method...),
    or `metadata` when the dense model itself was fine-tuned."""
    with atomic_dir(out) as tmp:
        if report["kind"] == "lora":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # peft warns that it cannot check a local model's config online
                net.save_pretrained(tmp / ADAPTER)
        else:
            meta = read_metadata(pruned) if pruned else dict(metadata or {})
            meta["finetune"] = json.dumps({k: report[k] for k in ("kind", "recipe", "steps", "loss_last")})
            save_pruned(net, tmp / WEIGHTS, {n: pack_mask(k) for n, k in masks.items()}, meta)
        write_json(report, tmp / REPORT)


def read_report(path) -> dict:
    try:
        return json.loads((Path(path) / REPORT).read_text())
    except FileNotFoundError:
        raise WandaError(f"{path} is not a fine-tuned model folder (no {REPORT})") from None
    except ValueError as e:
        raise WandaError(f"cannot read {Path(path) / REPORT}: {e}") from None


def load_finetuned(model, path, pruned=None, merge: bool = False):
    """Put a fine-tuned result into the dense `model`.

    masked: its pruned-weights file. lora: the pruned weights it was trained on (`pruned`), then
    the adapter, unmerged (the model's modules change in place); merge=True adds the adapter into
    the weights and zeroes the pruned weights again, which is another model than the one trained
    (the masked part of the update is lost). `pruned` must be the file the result was made from.
    Returns the model to evaluate (the same object unless merged).
    """
    report = read_report(path)
    base = report.get("base")
    if base and not pruned:
        raise WandaError(f"the fine-tuned result {path} was trained on pruned weights {base['path']}: give them (--pruned)")
    if pruned and (not base or file_id(pruned) != base["id"]):
        made_from = f"made from {base['path']}" if base else "made from the dense model"
        raise WandaError(f"the fine-tuned result {path} was trained on other weights than {pruned} ({made_from})")
    if report["kind"] == "masked":
        load_pruned(model, Path(path) / WEIGHTS)
        return model
    if pruned:
        load_pruned(model, pruned)
    from peft import PeftModel

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = PeftModel.from_pretrained(model, str(Path(path) / ADAPTER))
    except Exception as e:
        raise WandaError(f"cannot load the LoRA adapter {path}: {first_line(e)}") from None
    if not merge:
        return model
    merged = peft_model.merge_and_unload()
    if pruned:
        apply_keep(merged, read_masks(pruned))
    return merged


def base_sparsity(model) -> float:
    """Fraction of zeros in the pruned set; the layers of an attached LoRA adapter are not counted."""
    zeros = total = 0
    for t in all_targets(model):
        if ".lora_" not in t.name:
            w = t.weight()
            zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    return zeros / max(total, 1)


@torch.no_grad()
def apply_keep(model, masks: dict) -> None:
    """Zero every weight the masks drop."""
    for t in all_targets(model):
        t.weight().masked_fill_(~masks[t.name].to(t.weight().device), 0.0)


def merge_lora(model, pruned, finetuned, out) -> dict:
    """A LoRA result merged into its pruned weights, masks re-applied: a pruned-weights file at `out`."""
    masks = read_masks(pruned)
    merged = load_finetuned(model, finetuned, pruned, merge=True)
    meta = read_metadata(pruned)
    meta["merged_lora"] = json.dumps({"adapter": str(finetuned), "recipe": read_report(finetuned)["recipe"]})
    save_pruned(merged, out, {n: pack_mask(k) for n, k in masks.items()}, meta)
    return check_sparsity(merged)


# ---------------------------------------------------------------------------------------------
# progressive pruning: each step prunes the previous step's fine-tuned weights


def load_start(model, pruned, finetuned=None) -> dict:
    """Put the weights a progressive step starts from into the dense `model`: the previous step's
    pruned file, then its fine-tuned result (a LoRA adapter merged, masks re-applied). Returns the
    previous masks, which the step's masks must stay inside (a pruned weight never comes back)."""
    masks = read_masks(pruned)
    if not finetuned:
        load_pruned(model, pruned)
    elif load_finetuned(model, finetuned, pruned, merge=True) is not model:
        raise RuntimeError("merging the LoRA adapter did not give back the model it was attached to")
    return masks


@torch.no_grad()
def restrict_masks(model, packed: dict, previous: dict) -> tuple[dict, float]:
    """Keep-masks (packed, from prune(keep_masks=True)) ANDed with the previous step's, applied to the
    model's weights; returns the new packed masks and the overall sparsity of the pruned set."""
    from .masks import unpack_mask

    out, pruned, total = {}, 0, 0
    for t in all_targets(model):
        w = t.weight()
        keep = unpack_mask(packed[t.name], tuple(w.shape)) & previous[t.name]
        w.masked_fill_(~keep.to(w.device), 0.0)
        out[t.name] = pack_mask(keep)
        pruned += int((~keep).sum())
        total += keep.numel()
    return out, pruned / max(total, 1)


def finish_checkpoint(folder) -> None:
    """A run that completed needs its checkpoint no more."""
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
