"""The plan: which source key heads and value heads merge into each new head, layer by layer.

A plan is the inspectable artefact between a search (similarity, allocation) and the weights it
produces. It is a small JSON file:

    {"format": "dha-plan/1", "method": "gqa", "kv_budget": 0.33,
     "source_key_heads": [3, 3, ...], "source_value_heads": [3, 3, ...],
     "layers": [{"key_groups": [[0, 1, 2]], "value_groups": [[0], [1, 2]]}, ...]}

Group j of a layer's key_groups lists the source key heads that become new key head j. Every
source head belongs to exactly one group. A query head that read source key head k reads the
new head of the group holding k. Stdlib only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .atomic import write_json
from .errors import UserError

FORMAT = "dha-plan/1"


class PlanError(UserError):
    """A plan that is malformed or does not fit the model it is applied to."""


@dataclass
class LayerPlan:
    key_groups: list[list[int]]
    value_groups: list[list[int]]


@dataclass
class Plan:
    layers: list[LayerPlan]
    source_key_heads: list[int]
    source_value_heads: list[int]
    method: str = "identity"
    kv_budget: float | None = None
    notes: dict = field(default_factory=dict)  # free-form provenance (search settings, costs)

    # ---- accounting -------------------------------------------------------------------
    def key_heads(self) -> list[int]:
        return [len(l.key_groups) for l in self.layers]

    def value_heads(self) -> list[int]:
        return [len(l.value_groups) for l in self.layers]

    def kv_fraction(self) -> float:
        """KV cache kept, as a fraction of the source's (head counts; head_dim is unchanged)."""
        kept = sum(self.key_heads()) + sum(self.value_heads())
        return kept / (sum(self.source_key_heads) + sum(self.source_value_heads))

    # ---- checks -------------------------------------------------------------------------
    def validate(self, source_key_heads: list[int] | None = None, source_value_heads: list[int] | None = None):
        """Raise PlanError unless every layer's groups partition its source heads.

        With source head counts given (from the model the plan is applied to), also check that
        the plan was made for a model of that shape.
        """
        if source_key_heads is not None and (
            list(source_key_heads) != self.source_key_heads or list(source_value_heads) != self.source_value_heads
        ):
            raise PlanError(
                f"plan was made for a model with {len(self.source_key_heads)} layers and key/value heads "
                f"{_summary(self.source_key_heads)}/{_summary(self.source_value_heads)}; this model has "
                f"{len(source_key_heads)} layers and {_summary(source_key_heads)}/{_summary(source_value_heads)}"
            )
        if len(self.layers) != len(self.source_key_heads) or len(self.layers) != len(self.source_value_heads):
            raise PlanError(
                f"plan has {len(self.layers)} layers but source head counts for {len(self.source_key_heads)}"
            )
        for i, layer in enumerate(self.layers):
            for kind, groups, n in (
                ("key", layer.key_groups, self.source_key_heads[i]),
                ("value", layer.value_groups, self.source_value_heads[i]),
            ):
                flat = [h for g in groups for h in g]
                if not groups or any(not g for g in groups):
                    raise PlanError(f"layer {i}: {kind} groups must be non-empty, got {groups}")
                if sorted(flat) != list(range(n)):
                    raise PlanError(f"layer {i}: {kind} groups {groups} do not partition the {n} source {kind} heads")

    # ---- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "method": self.method,
            "kv_budget": self.kv_budget,
            "kv_fraction": round(self.kv_fraction(), 6),
            "source_key_heads": self.source_key_heads,
            "source_value_heads": self.source_value_heads,
            "layers": [{"key_groups": l.key_groups, "value_groups": l.value_groups} for l in self.layers],
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise PlanError(f'not a dha plan (expected "format": "{FORMAT}")')
        try:
            plan = cls(
                layers=[
                    LayerPlan(
                        [list(map(int, g)) for g in l["key_groups"]], [list(map(int, g)) for g in l["value_groups"]]
                    )
                    for l in d["layers"]
                ],
                source_key_heads=[int(x) for x in d["source_key_heads"]],
                source_value_heads=[int(x) for x in d["source_value_heads"]],
                method=d.get("method", "custom"),
                kv_budget=d.get("kv_budget"),
                notes=d.get("notes", {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"malformed plan: {e!r}") from None
        if not isinstance(plan.notes, dict):
            raise PlanError('malformed plan: "notes" must be a JSON object')
        plan.validate()
        return plan

    def save(self, path: str) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str) -> "Plan":
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise PlanError(f"plan file not found: {path}") from None
        except IsADirectoryError:
            raise PlanError(f"{path} is a directory: give its plan.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanError(f"plan file {path} is not valid JSON: {e}") from None
        except OSError as e:
            raise PlanError(f"cannot read plan file {path}: {e.strerror or e}") from None
        return cls.from_dict(d)


def contiguous_groups(num_heads: int, num_groups: int) -> list[list[int]]:
    """[[0..n-1], [n..2n-1], ...]: GQA's groups (Ainslie et al. 2023). num_groups must divide num_heads."""
    if num_groups < 1 or num_heads % num_groups:
        raise PlanError(f"{num_heads} heads cannot be split into {num_groups} equal contiguous groups")
    size = num_heads // num_groups
    return [list(range(g * size, (g + 1) * size)) for g in range(num_groups)]


def _summary(counts: list[int]) -> str:
    return str(counts[0]) if len(set(counts)) == 1 else str(counts)
