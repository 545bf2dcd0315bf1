"""BM25 baseline with bm25s (Lù, 2024) and a Snowball stemmer (PyStemmer)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import bm25s
import numpy as np
import Stemmer

from retrieval_platform.retrievers import ScoredIds

IDS_FILE = "product_ids.json"


class BM25Retriever:
    name = "bm25"

    def __init__(self, product_ids: Sequence[str], texts: Sequence[str] | None = None, *,
                 k1: float = 1.5, b: float = 0.75, language: str = "english",
                 index: bm25s.BM25 | None = None, avg_doc_len: float | None = None) -> None:
        self.product_ids = list(product_ids)
        self.language = language
        self.stemmer = Stemmer.Stemmer(language)
        if index is None:
            if texts is None:
                raise ValueError("give texts to index, or a loaded index")
            index = bm25s.BM25(k1=k1, b=b)
            tokenized = self._tokenize(texts)
            # as bm25s computes it; kept so that live writes score new documents alike
            avg_doc_len = float(np.mean([len(d) for d in tokenized.ids])) if texts else 1.0
            index.index(tokenized, show_progress=False)
        self.index = index
        self.avg_doc_len = avg_doc_len  # None: an index saved before it was recorded

    def terms(self, text: str) -> list[str]:
        """The terms BM25 indexes of ``text`` (stopwords dropped, stemmed)."""
        return self._tokenize([text], return_ids=False)[0]

    def _tokenize(self, texts: Sequence[str], return_ids: bool = True):
        return bm25s.tokenize(list(texts), stopwords="en", stemmer=self.stemmer,
                              return_ids=return_ids, show_progress=False)

    def search(self, queries: Sequence[str], k: int,
               mask: np.ndarray | None = None) -> list[ScoredIds]:
        """Top-k per query; products with zero score (no shared term) are not returned.
        ``mask`` (N,) bool keeps only those products (catalog filters)."""
        if not queries:
            return []
        k = min(k, len(self.product_ids))
        weight = None if mask is None else mask.astype(np.float32)
        tokens = self._tokenize(queries, return_ids=False)
        out: list[ScoredIds] = [[] for _ in queries]
        asked = [i for i, t in enumerate(tokens) if t]  # a query of stopwords only matches none
        if not asked:
            return out
        docs, scores = self.index.retrieve([tokens[i] for i in asked], k=k, show_progress=False,
                                           weight_mask=weight, n_threads=1)
        for i, row_d, row_s in zip(asked, docs, scores, strict=True):
            out[i] = [(self.product_ids[int(d)], float(s))
                      for d, s in zip(row_d, row_s, strict=True) if s > 0]
        return out

    def all_scores(self, query: str) -> np.ndarray:
        """(N,) BM25 score of every product for one query."""
        tokens = self._tokenize([query], return_ids=False)[0]
        if not tokens:
            return np.zeros(len(self.product_ids), np.float32)
        return self.index.get_scores(tokens)

    def score(self, query: str, product_ids: Sequence[str]) -> np.ndarray:
        all_scores = self.all_scores(query)
        pos = self._positions()
        return np.asarray([all_scores[pos[p]] for p in product_ids], np.float64)

    def _positions(self) -> dict[str, int]:
        if not hasattr(self, "_pos"):
            self._pos = {p: i for i, p in enumerate(self.product_ids)}
        return self._pos

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.index.save(str(path), show_progress=False)  # npy + json, no pickle
        (path / IDS_FILE).write_text(json.dumps({"language": self.language,
                                                 "avg_doc_len": self.avg_doc_len,
                                                 "product_ids": self.product_ids}))

    @classmethod
    def load(cls, path: str | Path) -> BM25Retriever:
        path = Path(path)
        meta = json.loads((path / IDS_FILE).read_text())
        index = bm25s.BM25.load(str(path), allow_pickle=False, show_progress=False)
        return cls(meta["product_ids"], language=meta["language"], index=index,
                   avg_doc_len=meta.get("avg_doc_len"))
