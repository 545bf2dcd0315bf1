"""Retrievers behind one interface, so that evaluation and fusion treat them alike.

``search(queries, k)`` returns, per query, ``(product_id, score)`` pairs best first;
``score(query, product_ids)`` scores given products (for grade-order accuracy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

Hits = list[tuple[str, float]]


class Retriever(Protocol):
    name: str

    def search(self, queries: Sequence[str], k: int) -> list[Hits]: ...

    def score(self, query: str, product_ids: Sequence[str]) -> np.ndarray: ...
