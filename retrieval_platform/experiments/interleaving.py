"""Team-draft interleaving (Radlinski, Kurup & Joachims, "How does clickthrough data reflect
retrieval quality?", CIKM 2008).

Two rankings A and B are merged into one answer: in each round the team with fewer picks so
far (a coin flip on a tie) adds its highest-ranked product not yet shown, and the product is
credited to that team. A click credits its team; an impression whose clicks credit A more than
B is a win for A. Both rankers are judged on the same user, query and moment, which is why
interleaving needs far fewer users than an A/B split to find the better ranker (Chapelle et al.,
"Large-scale validation and analysis of interleaved search evaluation", TOIS 2012).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

TEAM_A, TEAM_B = 0, 1


def team_draft(a: Sequence[str], b: Sequence[str], k: int, rng: random.Random
               ) -> tuple[list[str], list[int]]:
    """(the interleaved top ``k`` of ``a`` and ``b``, each product's team: TEAM_A or TEAM_B)."""
    shown: list[str] = []
    teams: list[int] = []
    seen: set[str] = set()
    picks = [0, 0]
    heads = [0, 0]
    lists = (a, b)
    while len(shown) < k:
        # the team behind picks; a tie is a coin flip
        team = (TEAM_A if rng.random() < 0.5 else TEAM_B) if picks[0] == picks[1] \
            else (TEAM_A if picks[0] < picks[1] else TEAM_B)
        ranking = lists[team]
        while heads[team] < len(ranking) and ranking[heads[team]] in seen:
            heads[team] += 1
        if heads[team] >= len(ranking):  # this team has nothing new: the other one picks
            other = lists[1 - team]
            while heads[1 - team] < len(other) and other[heads[1 - team]] in seen:
                heads[1 - team] += 1
            if heads[1 - team] >= len(other):
                break  # both exhausted
            team, ranking = 1 - team, other
        product = ranking[heads[team]]
        shown.append(product)
        teams.append(team)
        seen.add(product)
        picks[team] += 1
    return shown, teams


def credit(teams: Sequence[int], clicked_ranks: Sequence[int]) -> tuple[int, int]:
    """(clicks credited to A, to B) of one impression; ``clicked_ranks`` are 0-based."""
    a = sum(1 for r in clicked_ranks if teams[r] == TEAM_A)
    return a, len(clicked_ranks) - a
