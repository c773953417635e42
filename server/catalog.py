"""The assignments the service offers, loaded from the assignments directory at start-up."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from server.assignments import AssignmentSpec, PhaseSpec, load_assignments
from server.errors import NotFound


@dataclass(frozen=True)
class Catalog:
    assignments: dict[str, AssignmentSpec]

    @classmethod
    def load(cls, directory: Path, *, visibility_timeout_s: float) -> Catalog:
        """Every spec under ``directory``; see :func:`server.assignments.load_assignments`."""
        return cls(load_assignments(directory, visibility_timeout_s=visibility_timeout_s))

    def phase(self, assignment: AssignmentSpec, phase_id: str) -> PhaseSpec:
        phase = assignment.phase(phase_id)
        if phase is None:
            known = ", ".join(p.id for p in assignment.phases)
            raise NotFound(f"Assignment {assignment.slug!r} has no phase {phase_id!r} ({known}).")
        return phase
