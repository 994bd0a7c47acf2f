"""The label values of a served calibration version in the metrics (`ServedVersion`): its
budgets as `eps` (`:g`) with `served="true"` on the served one, and its class names as `class`,
capped (MARGINWATCH_CLASS_LABELS) to the classes most predicted on the calibration's big set plus
one overflow value, so that a version with 1,000 classes adds tens of series, not thousands. The
choice is fixed per loaded version, so a counter of a class never moves to another value.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import numpy as np

from marginwatch.artifact.answers import Budget, answers_of
from marginwatch.artifact.schema import CalibrationRecord

OTHER_CLASSES: Final = "other"  # the `class` of the classes beyond the cap (`_other` if taken)


def class_label_values(record: CalibrationRecord, most: int) -> tuple[np.ndarray, list[str]]:
    """The `class` label value of each class, as (index into the values per class, the values):
    every class name when there are at most `most`; else the `most` classes most predicted on the
    calibration's big set (ties and records without the counts: by label) and `other` for the
    rest (`_other` where a class is named `other`)."""
    names = record.class_names
    if len(names) <= most:
        return np.arange(len(names)), list(names)
    counts = record.predicted_class_counts
    order = (
        np.arange(len(names)) if counts is None else np.argsort(-np.asarray(counts), kind="stable")
    )
    own = np.sort(order[:most])
    overflow = OTHER_CLASSES
    while overflow in names:
        overflow = f"_{overflow}"
    slots = np.full(len(names), most)
    slots[own] = np.arange(most)
    return slots, [*(names[index] for index in own), overflow]


def eps_label_values(grid: list[float]) -> list[str]:
    """The `eps` label value of each budget: `:g`, or every digit where `:g`'s six would merge
    two budgets into one series."""
    labels = [f"{eps:g}" for eps in grid]
    return labels if len(set(labels)) == len(labels) else [repr(eps) for eps in grid]


@dataclass(frozen=True, eq=False)
class ServedVersion:
    """A calibration version as its metrics label it: its budgets (increasing ε') with their
    `eps` values and the served one's index, and the `class` value of each class."""

    record: CalibrationRecord
    budgets: tuple[Budget, ...]
    eps: tuple[str, ...]
    served: int
    class_slots: np.ndarray  # class index -> index into `classes`
    classes: tuple[str, ...]

    @classmethod
    def of(cls, record: CalibrationRecord, class_labels: int) -> ServedVersion:
        answers = answers_of(record)
        slots, classes = class_label_values(record, class_labels)
        eps = eps_label_values(answers.grid)
        return cls(record, answers.budgets, tuple(eps), answers.served, slots, tuple(classes))

    def budget_labels(self) -> Iterator[tuple[str, str, Budget]]:
        """(eps, served, budget) for each budget of the grid: "true" for the served one."""
        for index, (eps, budget) in enumerate(zip(self.eps, self.budgets, strict=True)):
            yield eps, "true" if index == self.served else "false", budget
