"""KR3's ratings as control (data.condition=rating): their names, their control tokens, and `Condition` — a
rating-conditioned model's rating → control token id — the one value that prepare writes, the trainer's rating loss,
decoding (a rating's prompt, guidance) and the classifier (stage=evaluate) read. meta.json and checkpoints record it
as `Condition.record()`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kr3.errors import UserError

NAMES = {0: "negative", 1: "positive", 2: "ambiguous"}  # KR3's Rating column
PIECES = {r: f"<|{name}|>" for r, name in NAMES.items()}  # the control tokens' text in a tokenizer's vocabulary


@dataclass(frozen=True)
class Condition:
    """rating → the id of its control token, for KR3's ratings the data held."""

    controls: dict[int, int]

    @property
    def ratings(self) -> list[int]:
        return sorted(self.controls)

    @property
    def ids(self) -> list[int]:
        """The control token ids in rating order."""
        return [self.controls[r] for r in self.ratings]

    @property
    def names(self) -> dict[int, str]:
        return {r: NAMES[r] for r in self.ratings}

    def control(self, rating) -> int:
        """The control token id of `rating`: a name ("negative") or a number (0, "1")."""
        by_name = {name: r for r, name in self.names.items()}
        text = str(rating).strip()
        key = by_name.get(text.lower(), int(text) if text.lstrip("-").isdigit() else None)
        if key not in self.controls:
            raise UserError(f"rating={rating} is not a rating — use one of: {', '.join(self.names.values())} or "
                            f"0 to {len(self.controls) - 1}")
        return self.controls[key]

    def prior(self, splits: dict) -> np.ndarray:
        """P(r) in rating order: each rating's share of the train split's rated reviews (meta.json's `splits`)."""
        counts = np.array([splits["train"]["ratings"].get(str(r), 0) for r in self.ratings], dtype=float)
        return counts / counts.sum()

    def record(self) -> dict:
        """As meta.json and checkpoints keep it."""
        return {"kind": "rating", "controls": {str(r): i for r, i in self.controls.items()},
                "names": {str(r): name for r, name in self.names.items()}}

    @classmethod
    def of(cls, record: dict | Condition | None) -> Condition | None:
        """The condition a record holds (None: the data is not rating-conditioned)."""
        if record is None or isinstance(record, Condition):
            return record
        return cls({int(r): int(i) for r, i in record["controls"].items()})


def control(rating, condition: Condition | None) -> int | None:
    """The control token id of `rating` under `condition`; None for no rating; a rating for a model trained without
    ratings is one line."""
    if rating is None:
        return None
    if condition is None:
        raise UserError(f"rating={rating}: this checkpoint is not rating-conditioned, it was trained without ratings — "
                        "train with data.condition=rating, or leave the rating out")
    return condition.control(rating)
