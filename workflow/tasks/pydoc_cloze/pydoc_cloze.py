"""An offline multiple-choice cloze task for the demo, made from the pydoc evaluation topics.

Each example shows the 8 words before the last word of a prose sentence of Python's own
documentation; the answer is that last word. The three distractors are words that end other
sentences of the same corpus (so they fit the end of a sentence too), none of the sentence's own
words, with about the same frequency (count within a factor of 2) and length (within 2 letters), so
neither frequency nor length gives the answer away. Drawn by a seeded random.Random: the same Python
(the same pydoc topics) gives the same examples. With Python 3.11's topics, SmolLM2-135M gets
dense 87%, Wanda 50% 83%, Wanda 2:4 68%, magnitude 50% 53%, magnitude 2:4 33% of the first 60
(chance 25%).
"""
from __future__ import annotations

import math
import random
import re
from collections import Counter

WORD = re.compile(r"\b[a-z]{3,}\b")  # whole lower-case words ("ython" of "Python" is none)
CONTEXT_WORDS = 8  # a whole sentence made the task too easy (dense SmolLM2-135M 91%) and slower
ENDING = re.compile(r"(.*\S) ([a-z]{3,})\.")  # a sentence that ends in a plain word and a full stop


def prose_sentences(text: str) -> list[str]:
    """The sentences of a topic's prose paragraphs (indented blocks are grammar or code: skipped)."""
    sentences = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = paragraph.splitlines()
        if not lines or any(line.startswith(" ") or set(line.strip()) <= set("*=-") for line in lines):
            continue
        prose = " ".join(line.strip() for line in lines)
        sentences += re.split(r"(?<=[.!?])\s+(?=[A-Z])", prose)
    return sentences


def cloze_examples(texts: list[str], n: int, seed: int = 0, min_words: int = 6, max_words: int = 24) -> list[dict]:
    """Up to `n` examples {"context", "choices", "label"} (choices[label] is the answer)."""
    counts = Counter(w for text in texts for w in WORD.findall(text))
    endings = [m.groups() for text in texts for s in prose_sentences(text) if (m := ENDING.fullmatch(s))]
    final_words = sorted({answer for _, answer in endings})
    candidates = sorted({(context, answer) for context, answer in endings
                         if min_words <= len(context.split()) + 1 <= max_words})
    rng = random.Random(seed)
    rng.shuffle(candidates)
    examples = []
    for context, answer in candidates:
        used = set(WORD.findall(context)) | {answer}
        pool = [w for w in final_words if w not in used and abs(len(w) - len(answer)) <= 2
                and abs(math.log2(counts[w] / counts[answer])) <= 1]
        if len(pool) < 3:
            continue
        choices = rng.sample(pool, 3)
        label = rng.randrange(4)
        choices.insert(label, answer)
        examples.append({"context": " ".join(context.split()[-CONTEXT_WORDS:]), "choices": choices, "label": label})
        if len(examples) == n:
            break
    return examples


def load(n: int = 100, seed: int = 0, **_metadata):
    """lm-eval's custom_dataset hook: the task's examples as a DatasetDict with a test split."""
    import datasets

    from wanda_core.data import pydoc_topics

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(cloze_examples(pydoc_topics("evaluation"), n, seed))})
