"""The demo's offline zero-shot task (workflow/tasks/pydoc_cloze): its examples, lm-eval loading it, and
that it separates a dense model from a badly pruned one."""
import importlib.util
import math
from collections import Counter
from pathlib import Path

from wanda_core.data import pydoc_topics

TASKS = Path(__file__).resolve().parents[1] / "workflow" / "tasks"


def _cloze():
    spec = importlib.util.spec_from_file_location("pydoc_cloze", TASKS / "pydoc_cloze" / "pydoc_cloze.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_examples_are_seeded_and_fair():
    cloze = _cloze()
    texts = pydoc_topics("evaluation")
    examples = cloze.cloze_examples(texts, 60, seed=0)
    assert len(examples) == 60
    assert examples == cloze.cloze_examples(texts, 60, seed=0)
    assert examples != cloze.cloze_examples(texts, 60, seed=1)
    counts = Counter(w for t in texts for w in cloze.WORD.findall(t))
    for e in examples:
        answer = e["choices"][e["label"]]
        assert len(set(e["choices"])) == 4 and 0 <= e["label"] < 4
        assert len(e["context"].split()) <= cloze.CONTEXT_WORDS
        assert any(f"{e['context']} {answer}." in " ".join(t.split()) for t in texts)  # the sentence's own last word
        for word in e["choices"]:
            assert abs(len(word) - len(answer)) <= 2 and abs(math.log2(counts[word] / counts[answer])) <= 1
            assert word == answer or word not in cloze.WORD.findall(e["context"])
    assert len({e["label"] for e in examples}) == 4


def test_lm_eval_loads_it_offline():
    from wanda_core import zeroshot

    loaded = zeroshot.load_tasks(["pydoc_cloze"], TASKS)
    task = loaded["tasks"]["pydoc_cloze"]
    docs = list(task.eval_docs)
    assert len(docs) == 60
    assert task.doc_to_choice(docs[0])[task.doc_to_target(docs[0])] == docs[0]["choices"][docs[0]["label"]]


def test_dense_smollm2_beats_chance_and_magnitude(smollm2_dir):
    """Dense SmolLM2-135M well above chance (25%) and above magnitude 50% (the demo's table shows the order)."""
    import torch

    import wanda_core as wc
    from wanda_core import zeroshot

    torch.set_num_threads(1)
    loaded = zeroshot.load_tasks(["pydoc_cloze"], TASKS)
    acc = {}
    for method in ("dense", "magnitude"):
        model, tokenizer = wc.load_model(smollm2_dir, "float32", "cpu")
        if method != "dense":
            wc.prune(model, method, "unstructured", 0.5, progress=False)
        rows = zeroshot.evaluate(model, tokenizer, loaded, batch_size=16)
        acc[method] = next(r["value"] for r in rows if r["metric"] == "acc")
    assert acc["dense"] >= 0.7 and acc["dense"] >= acc["magnitude"] + 0.2, acc
