"""Lexical match: BM25 over item text, and the one tokenizer that items, queries and the category
queries of the search protocol share (lower-cased words of 2+ characters, English stop words dropped;
the index and the queries it reads are Snowball-stemmed, so "beans" finds "Whole Bean Coffee").

BM25 comes from `bm25s` (maintained, numpy-only, sparse precomputed term scores) and stemming from
PyStemmer (Snowball, as Lucene's English analyzer): the field's standard tools rather than
hand-written copies of them.
"""

from __future__ import annotations

import functools

import bm25s
import numpy as np


@functools.lru_cache(maxsize=1)
def _stemmer():
    import Stemmer

    return Stemmer.Stemmer("english")


def words(texts: list[str], stem: bool = False) -> list[list[str]]:
    """Each text's words: lower case, stop words dropped (bm25s' English list), stemmed when asked."""
    tokens = bm25s.tokenize(list(texts), lower=True, stopwords="en", return_ids=False, show_progress=False,
                            stemmer=_stemmer().stemWords if stem else None)
    return [[w for w in doc if w] for doc in tokens]


class LexicalIndex:
    """BM25 (Lucene variant, k1 and b as given) over one document per item."""

    def __init__(self, documents: list[str], k1: float = 1.5, b: float = 0.75):
        self.n_docs = len(documents)
        self.bm25 = bm25s.BM25(k1=k1, b=b)
        tokens = words(documents, stem=True)
        # bm25s needs a non-empty vocabulary; a catalogue without any text simply never matches.
        self.empty = not any(tokens)
        if not self.empty:
            self.bm25.index(tokens, show_progress=False)

    def scores(self, queries: list[str]) -> np.ndarray:
        """(len(queries), n_docs) float32 BM25 scores; 0 where no query word is in the item."""
        out = np.zeros((len(queries), self.n_docs), dtype=np.float32)
        if self.empty:
            return out
        for row, query in enumerate(words(queries, stem=True)):
            known = [w for w in query if w in self.bm25.vocab_dict]
            if known:
                out[row] = self.bm25.get_scores(known)
        return out
