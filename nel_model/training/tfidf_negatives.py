"""DIM's TF-IDF negative sampling (``--negatives tfidf``): negatives that share a salient description word with the
gold entity, the way GHMFC's and DIM's preprocessing builds its ``neg.json`` tables.

The recipe, per entity description (the KB's ``description``, or the name where there is none):

* tokens: words and punctuation marks, minus DIM's stop list (punctuation, and attribute labels such as "Sex",
  "Occupation" that start every WikiMEL description);
* ``word -> entities`` index, each entity repeated as often as the word occurs in its description;
* ``entity -> words``: each word repeated ``int(100 * tfidf)`` times (tf-idf with log2 idf, L2-normalised per
  description, as gensim's default model);
* a negative for gold entity g: with probability 0.95 a word drawn from g's weighted words, then an entity drawn from
  that word's weighted entities; otherwise (or when g has no word) a uniformly random entity; never g itself (a draw
  that gives g is drawn again, up to 10 times, then uniformly).

Sampling is vectorised and draws from the epoch's generator, so epochs stay a pure function of (seed, epoch).
Tokenisation is a regular expression instead of NLTK's tokenizer (docs/DIVERGENCES.md).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

STOP_WORDS = frozenset({",", ".", "!", ":", "'", '"', ";", "/", "\\", "Sex", "Name", "Nick", "Occupation", "Birth",
                        "Languages", "Religion", "Alma", "mater", ""})
TOKEN_RE = re.compile(r"\w+|[^\w\s]")
WORD_PROBABILITY = 0.95
SCALE = 100
MAX_TRIES = 10   # then the uniform draw


def tokenize(text: str) -> list[str]:
    return [t for t in TOKEN_RE.findall(text) if t not in STOP_WORDS]


@dataclass
class TfidfNegatives:
    """Both tables in CSR form: ``words[word_ptr[e]:word_ptr[e+1]]`` are entity e's weighted words,
    ``entities[ent_ptr[w]:ent_ptr[w+1]]`` word w's weighted entities."""

    word_ptr: np.ndarray
    words: np.ndarray
    ent_ptr: np.ndarray
    entities: np.ndarray

    @property
    def num_entities(self) -> int:
        return len(self.word_ptr) - 1

    @classmethod
    def build(cls, texts: Sequence[str]) -> "TfidfNegatives":
        vocab: dict[str, int] = {}
        docs = []
        for text in texts:
            counts = Counter(vocab.setdefault(tok, len(vocab)) for tok in tokenize(text))
            docs.append(counts)
        n_docs = len(docs)
        df = np.zeros(len(vocab), dtype=np.int64)
        for counts in docs:
            for w in counts:
                df[w] += 1
        idf = np.log2(n_docs / np.maximum(df, 1))
        by_word: list[list[int]] = [[] for _ in vocab]
        word_lists: list[list[int]] = []
        for e, counts in enumerate(docs):
            for w, f in counts.items():
                by_word[w].extend([e] * f)
            weights = {w: f * idf[w] for w, f in counts.items()}
            norm = math.sqrt(sum(v * v for v in weights.values())) or 1.0
            word_lists.append([w for w, v in weights.items() for _ in range(int(v / norm * SCALE))])
        return cls(*_csr(word_lists), *_csr(by_word))

    def sample(self, rng: np.random.Generator, gold: np.ndarray, n: int) -> np.ndarray:
        """``[len(gold), n]`` negative entity rows for the gold rows (see the module docstring)."""
        E = self.num_entities
        if E < 2:
            raise ValueError("negative sampling needs at least 2 entities in the KB")
        g = np.repeat(gold.astype(np.int64), n)
        out = rng.integers(0, E - 1, size=g.shape)
        out += out >= g                                          # uniform over the entities other than g
        todo = np.arange(len(g))
        for _ in range(MAX_TRIES):                               # DIM draws again until the entity is not g
            if not len(todo) or not len(self.words):
                break
            gt = g[todo]
            n_words = self.word_ptr[gt + 1] - self.word_ptr[gt]
            word = self.words[np.minimum(self.word_ptr[gt] + (rng.random(len(gt)) * n_words).astype(np.int64),
                                         len(self.words) - 1)]
            n_ents = self.ent_ptr[word + 1] - self.ent_ptr[word]
            cand = self.entities[self.ent_ptr[word] + (rng.random(len(gt)) * n_ents).astype(np.int64)]
            by_word = (rng.random(len(gt)) < WORD_PROBABILITY) & (n_words > 0)
            take = by_word & (cand != gt)
            out[todo[take]] = cand[take]
            todo = todo[by_word & ~take]                         # the others keep their uniform draw
        return out.reshape(len(gold), n)


def _csr(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    ptr = np.zeros(len(lists) + 1, dtype=np.int64)
    ptr[1:] = np.cumsum([len(x) for x in lists])
    flat = np.fromiter((v for x in lists for v in x), dtype=np.int64, count=int(ptr[-1]))
    return ptr, flat
