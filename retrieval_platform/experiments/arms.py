"""An experiment's arms and the assignment of requests to them.

Assignment is deterministic by a request key (a user or session id): the key, salted with the
experiment's name, hashes to a point u in [0, 1), and the arm is the one whose share of the
cumulative weights holds u. The same key always gets the same arm while the weights stand; a
ramp moves only the keys whose point falls in a changed share. Requests without a key get an
arm at random by weight, and their answer says so.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from retrieval_platform.errors import PlatformError

Method = Literal["ab", "interleave"]
Assignment = Literal["key", "random"]


class ExperimentError(PlatformError, ValueError):
    """An experiment that cannot run as configured (nothing is changed when it is raised)."""


@dataclass(frozen=True)
class Arm:
    name: str
    version: str  # the index version it serves (its own model)
    weight: float  # a share of the traffic, relative to the other arms' weights


@dataclass(frozen=True)
class Experiment:
    """Two or more arms and their traffic weights. ``interleave``: every request is answered
    by the first two arms' rankings interleaved (team draft), the weights unused."""

    name: str
    arms: tuple[Arm, ...]
    method: Method = "ab"
    _bounds: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_name("experiment", self.name)
        names = [a.name for a in self.arms]
        if len(names) < 2 and self.method == "interleave":
            raise ExperimentError("an interleaving experiment needs two arms")
        if not names:
            raise ExperimentError("an experiment needs at least one arm")
        if len(set(names)) != len(names):
            raise ExperimentError(f"arm names repeat: {names}")
        for a in self.arms:
            _check_name("arm", a.name)
            if not isinstance(a.weight, int | float) or not math.isfinite(a.weight) \
                    or a.weight < 0:
                raise ExperimentError(f"arm {a.name}: weight {a.weight!r} must be a finite "
                                      "number >= 0")
        total = sum(a.weight for a in self.arms)
        if self.method == "ab" and total <= 0:
            raise ExperimentError("the arms' weights must sum to a positive number")
        cumulative = [sum(a.weight for a in self.arms[: i + 1]) / (total or 1)
                      for i in range(len(self.arms))]
        object.__setattr__(self, "_bounds", tuple(cumulative))

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise ExperimentError(f"experiment {self.name} has no arm {name!r} (arms: "
                              f"{[a.name for a in self.arms]})")

    def assign(self, key: str | None, rng: random.Random | None = None
               ) -> tuple[Arm, Assignment]:
        """The arm of a request with ``key`` (sticky), or a random one by weight."""
        if key:
            u, how = key_point(self.name, key), "key"
        else:
            u, how = (rng or random).random(), "random"
        for a, bound in zip(self.arms, self._bounds, strict=True):
            if u < bound and a.weight > 0:
                return a, how  # type: ignore[return-value]
        return next(a for a in reversed(self.arms) if a.weight > 0), how  # type: ignore

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method,
                "arms": [asdict(a) for a in self.arms]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Experiment:
        try:
            arms = tuple(Arm(str(a["name"]), str(a["version"]), a["weight"])
                         for a in d.get("arms") or [])
            return cls(str(d["name"]), arms, d.get("method", "ab"))
        except (KeyError, TypeError) as exc:
            raise ExperimentError(f"experiment config {d!r}: {exc!r}") from None


def _check_name(what: str, name: str) -> None:
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ExperimentError(f"{what} name {name!r}: use letters, digits, - and _")


def key_point(experiment: str, key: str) -> float:
    """A key's uniform point in [0, 1) for ``experiment`` (salted: one user's arms in two
    experiments are independent)."""
    digest = hashlib.sha256(f"{experiment}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def key_hash(key: str | None) -> str | None:
    """What the impression log stores of a key: a hash, never the user id itself."""
    return hashlib.sha256(key.encode()).hexdigest()[:16] if key else None
