"""Assignment specs (`assignments/<slug>/assignment.toml` or `.yaml`): schema and loader."""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from graders.architectures import Architecture
from graders.defense_scoring import DefenseEvalConfig
from graders.preprocessing import PreprocessingKind
from graders.threat_model import Norm, ThreatModel
from graders.version import DEFENSE_EVALUATOR_VERSION, EVALUATOR_VERSION

SPEC_FILE_NAMES = ("assignment.toml", "assignment.yaml", "assignment.yml")
SLUG_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"

Slug = Annotated[str, Field(pattern=SLUG_PATTERN)]
MAX_SPEC_BYTES = 1024 * 1024
MAX_SPEC_VALUES = 100_000
"""Values a spec may hold with its YAML aliases expanded; real specs hold a few hundred."""


class SpecError(ValueError):
    """An assignment spec is invalid; the message names the file, the field and the reason."""


class Track(StrEnum):
    """``attack``: students upload perturbed images, scored on hidden models (lower wins).
    ``defense``: students upload a checkpoint, scored by robust accuracy (higher wins)."""

    ATTACK = "attack"
    DEFENSE = "defense"


class Metric(StrEnum):
    """How a submission is scored: for attacks, the mean over hidden models of their accuracy on
    the batch (lower wins); for defenses, robust accuracy under the phase's suite (higher wins)."""

    MEAN_ACCURACY = "mean_accuracy"
    ROBUST_ACCURACY = "robust_accuracy"

    @property
    def higher_is_better(self) -> bool:
        return self is Metric.ROBUST_ACCURACY


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArtifactRef(_Spec):
    """A hidden file in the data directory, pinned by its sha256 (checked whenever it is loaded)."""

    file: str = Field(min_length=1, max_length=255)
    sha256: str = Field(pattern=SHA256_PATTERN)

    @field_validator("file")
    @classmethod
    def _plain_relative_name(cls, value: str) -> str:
        parts = Path(value).parts
        if Path(value).is_absolute() or ".." in parts or "\\" in value:
            raise ValueError("must be a relative path inside the data directory, without '..'")
        return value


class PreprocessingSpec(_Spec):
    kind: PreprocessingKind
    quality: int | None = Field(default=None, ge=1, le=100)
    bits: int | None = Field(default=None, ge=1, le=8)

    @model_validator(mode="after")
    def _params_match_kind(self) -> PreprocessingSpec:
        if self.kind is PreprocessingKind.JPEG and self.quality is None:
            raise ValueError("jpeg preprocessing needs `quality` (1-100)")
        if self.kind is PreprocessingKind.BIT_DEPTH and self.bits is None:
            raise ValueError("bit_depth preprocessing needs `bits` (1-8)")
        return self

    @property
    def params(self) -> dict[str, int]:
        return {k: v for k, v in (("quality", self.quality), ("bits", self.bits)) if v is not None}


class HiddenModelSpec(_Spec):
    """One hidden model: a registry architecture (or a TA factory) plus pinned weights."""

    name: Slug
    architecture: Architecture | None = None
    factory: str | None = Field(default=None, pattern=r"^[\w.-]+\.py:[A-Za-z_]\w*$")
    weights: ArtifactRef
    preprocessing: PreprocessingSpec | None = None

    @model_validator(mode="after")
    def _one_source(self) -> HiddenModelSpec:
        if (self.architecture is None) == (self.factory is None):
            raise ValueError(
                "give exactly one of `architecture` (one of "
                f"{', '.join(a.value for a in Architecture)}) or `factory` ('file.py:function')"
            )
        return self


class ThreatModelSpec(_Spec):
    norm: Norm = Norm.LINF
    eps: float = Field(default=8.0, gt=0, le=255, description="on the 0-255 pixel scale")

    def to_threat_model(self) -> ThreatModel:
        return ThreatModel(norm=self.norm, eps=self.eps)


class TimeLimits(NamedTuple):
    """How long scoring one submission may take. At ``soft_s`` the grader is interrupted and the
    submission fails with a reason (not counted); at ``hard_s`` the worker process is killed."""

    soft_s: float
    hard_s: float


DEFAULT_TIME_LIMITS = {
    Track.ATTACK: TimeLimits(soft_s=300.0, hard_s=360.0),
    Track.DEFENSE: TimeLimits(soft_s=3 * 3600.0, hard_s=3 * 3600.0 + 600.0),
}
"""Time limits of a phase whose spec sets none: a few minutes to score an attack batch, a few
hours to evaluate a defense. The gap between the two is what the grader gets to record the
failure once it has been interrupted."""


class LimitsSpec(_Spec):
    max_per_day: int | None = Field(default=10, ge=1)
    max_total: int | None = Field(default=None, ge=1)
    max_upload_mb: float = Field(default=16.0, gt=0, le=1024)
    soft_time_limit_s: float | None = Field(
        default=None, gt=0, description="scoring is interrupted and fails (default by track)"
    )
    time_limit_s: float | None = Field(
        default=None, gt=0, description="the worker process is killed (default by track)"
    )

    def resolve_time_limits(self, track: Track) -> TimeLimits:
        """The limits for a phase of ``track``: a limit left out is the track's default, or, if
        only the other one is set, keeps the default gap to it."""
        default = DEFAULT_TIME_LIMITS[track]
        gap = default.hard_s - default.soft_s
        soft, hard = self.soft_time_limit_s, self.time_limit_s
        if hard is None:
            return default if soft is None else TimeLimits(soft_s=soft, hard_s=soft + gap)
        if soft is None:
            if hard <= gap:
                raise ValueError(
                    f"limits: time_limit_s = {hard:g} leaves no room for the default "
                    f"{gap:g} s between the soft and the hard limit; set soft_time_limit_s too"
                )
            return TimeLimits(soft_s=hard - gap, hard_s=hard)
        if soft >= hard:
            raise ValueError(
                f"limits: soft_time_limit_s ({soft:g} s) must be below time_limit_s ({hard:g} s): "
                "the soft limit interrupts the grader so it can record the failure before the "
                "hard limit kills the worker"
            )
        return TimeLimits(soft_s=soft, hard_s=hard)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class Selection(StrEnum):
    """Which submission of a student counts for the final (private) board and the grade."""

    BEST = "best"
    """the one with the best public score"""
    LAST = "last"
    """the latest scored one"""
    MARKED = "marked"
    """the best (private score) of up to ``max_marked`` the student marks; best public if none"""


class RevealMode(StrEnum):
    AUTO = "auto"
    """the private board opens once the phase (and every extension) has closed"""
    MANUAL = "manual"
    """the private board opens when staff reveal it"""


class Feedback(StrEnum):
    FULL = "full"
    """students see every number of their results"""
    AGGREGATE = "aggregate"
    """until the private board opens, students see only their public score (rounded), not the
    per-model or per-attack breakdown"""


class BoardSpec(_Spec):
    """The ``[phases.leaderboard]`` table: public/private boards, final selection, feedback."""

    selection: Selection = Selection.BEST
    max_marked: int = Field(default=2, ge=1, le=20)
    public_models: list[Slug] | None = Field(
        default=None,
        description="attack phases: the hidden models that score the public board (default all)",
    )
    public_fraction: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="defense phases: the share of evaluation points scoring the public board",
    )
    reveal: RevealMode = RevealMode.AUTO
    feedback: Feedback = Feedback.FULL
    round_to: int | None = Field(
        default=None, ge=0, le=6, description="decimals of the scores students see in the phase"
    )


class GradingSpec(_Spec):
    """The ``[phases.grading]`` table: points from the final score, linear between two baselines
    (``zero_at`` earns nothing, ``full_at`` earns all ``points``; clamped outside)."""

    points: float = Field(default=10.0, gt=0)
    zero_at: float = Field(ge=0, le=1)
    full_at: float = Field(ge=0, le=1)

    def points_for(self, score: float | None) -> float:
        if score is None:
            return 0.0
        share = (score - self.zero_at) / (self.full_at - self.zero_at)
        return round(self.points * min(1.0, max(0.0, share)), 4)


class DefenseSpec(DefenseEvalConfig):
    """The ``[phases.defense]`` table: what students may upload and how it is evaluated."""

    allowed_architectures: list[Architecture] = Field(min_length=1)
    max_checkpoint_mb: float = Field(default=200.0, gt=0, le=4096)
    transfer_from: list[Slug] = Field(
        default_factory=list,
        description="attack phases of this assignment whose scored batches also attack defenses",
    )

    @property
    def max_checkpoint_bytes(self) -> int:
        return int(self.max_checkpoint_mb * 1024 * 1024)


class PhaseSpec(_Spec):
    id: Slug
    title: str = Field(min_length=1)
    description: str = ""
    track: Track
    opens_at: datetime
    due_at: datetime
    threat_model: ThreatModelSpec = ThreatModelSpec()
    evaluation_set: ArtifactRef
    hidden_models: list[HiddenModelSpec] = Field(default_factory=list)
    defense: DefenseSpec | None = None
    metric: Metric | None = None
    limits: LimitsSpec = LimitsSpec()
    leaderboard: BoardSpec = BoardSpec()
    grading: GradingSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> PhaseSpec:
        names = [m.name for m in self.hidden_models]
        if len(set(names)) != len(names):
            raise ValueError(f"hidden model names must be unique, got {names}")
        if self.opens_at.tzinfo is not None and self.due_at <= self.opens_at:
            raise ValueError("due_at must be after opens_at")
        if self.track is Track.ATTACK:
            if not self.hidden_models:
                raise ValueError("an attack phase needs at least one [[phases.hidden_models]]")
            if self.defense is not None:
                raise ValueError("a [phases.defense] table belongs to defense phases only")
            expected = Metric.MEAN_ACCURACY
        else:
            if self.defense is None:
                raise ValueError(
                    "a defense phase needs a [phases.defense] table with at least "
                    "`allowed_architectures`"
                )
            if self.hidden_models:
                raise ValueError("a defense phase has no hidden models (students upload them)")
            expected = Metric.ROBUST_ACCURACY
        if self.metric is None:
            object.__setattr__(self, "metric", expected)
        elif self.metric is not expected:
            raise ValueError(f"a {self.track.value} phase is scored by {expected.value!r}")
        self._check_boards(names)
        soft, hard = self.limits.resolve_time_limits(self.track)
        limits = self.limits.model_copy(update={"soft_time_limit_s": soft, "time_limit_s": hard})
        object.__setattr__(self, "limits", limits)
        return self

    def _check_boards(self, model_names: list[str]) -> None:
        board = self.leaderboard
        if board.public_models is not None:
            if self.track is not Track.ATTACK:
                raise ValueError("leaderboard.public_models belongs to attack phases")
            unknown = sorted(set(board.public_models) - set(model_names))
            if unknown or not board.public_models:
                raise ValueError(
                    f"leaderboard.public_models must name hidden models of this phase "
                    f"({', '.join(model_names)}); unknown: {', '.join(unknown) or 'none given'}"
                )
        if board.public_fraction is not None and self.track is not Track.DEFENSE:
            raise ValueError("leaderboard.public_fraction belongs to defense phases")
        if self.grading is not None:
            higher = self.track is Track.DEFENSE
            zero, full = self.grading.zero_at, self.grading.full_at
            if (full <= zero) if higher else (full >= zero):
                better = "higher" if higher else "lower"
                raise ValueError(
                    f"grading: full_at ({full:g}) must be {better} than zero_at ({zero:g}): in a "
                    f"{self.track.value} phase {better} scores are better"
                )

    @property
    def scoring_metric(self) -> Metric:
        """The metric, always set after validation."""
        return self.metric or Metric.MEAN_ACCURACY

    @property
    def time_limits(self) -> TimeLimits:
        """The phase's time limits, always set after validation (track defaults filled in)."""
        return self.limits.resolve_time_limits(self.track)

    def is_open(self, now: datetime) -> bool:
        return self.opens_at <= now < self.due_at

    @property
    def evaluator_version(self) -> str:
        return DEFENSE_EVALUATOR_VERSION if self.track is Track.DEFENSE else EVALUATOR_VERSION

    @property
    def scoring_key(self) -> str:
        """A hash of everything that decides a score in this phase: the evaluator version, the
        threat model, the pinned data and hidden-model hashes and the defense evaluation settings.
        Two scores with the same key and the same uploaded file are the same score."""
        decisive = self.model_dump(
            mode="json",
            include={
                "track",
                "threat_model",
                "evaluation_set",
                "hidden_models",
                "defense",
                "metric",
            },
        )
        decisive["evaluator_version"] = self.evaluator_version
        encoded = json.dumps(decisive, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(encoded).hexdigest()


class AssignmentSpec(_Spec):
    slug: Slug
    title: str = Field(min_length=1)
    description: str = ""
    timezone: str = "UTC"
    public_leaderboard: bool = Field(
        default=False,
        description="anyone may read the leaderboards (API and page) without logging in",
    )
    phases: list[PhaseSpec] = Field(min_length=1)

    _folder: Path = PrivateAttr(default=Path("."))
    _path: Path = PrivateAttr(default=Path("assignment.toml"))

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown IANA timezone {value!r} (e.g. 'Europe/Zurich')") from exc
        return value

    @model_validator(mode="before")
    @classmethod
    def _localize_times(cls, data: Any) -> Any:
        """Phase times without an offset are in the course timezone; all are stored in UTC."""
        if not isinstance(data, dict) or not isinstance(data.get("phases"), list):
            return data
        try:
            zone = ZoneInfo(str(data.get("timezone", "UTC")))
        except (ZoneInfoNotFoundError, ValueError):
            return data  # the field validator reports it
        phases = []
        for phase in data["phases"]:
            if isinstance(phase, dict):
                phase = dict(phase)
                for key in ("opens_at", "due_at"):
                    value = phase.get(key)
                    if isinstance(value, str):
                        try:
                            value = datetime.fromisoformat(value)
                        except ValueError:
                            continue
                    if isinstance(value, datetime):
                        if value.tzinfo is None:
                            value = value.replace(tzinfo=zone)
                        phase[key] = value.astimezone(UTC)
            phases.append(phase)
        return {**data, "phases": phases}

    @model_validator(mode="after")
    def _unique_phases(self) -> AssignmentSpec:
        ids = [p.id for p in self.phases]
        if len(set(ids)) != len(ids):
            raise ValueError(f"phase ids must be unique, got {ids}")
        tracks = {p.id: p.track for p in self.phases}
        for phase in self.phases:
            for source in phase.defense.transfer_from if phase.defense else []:
                if tracks.get(source) is not Track.ATTACK:
                    raise ValueError(
                        f"phase {phase.id!r}: transfer_from names {source!r}, which is not an "
                        f"attack phase of this assignment (attack phases: "
                        f"{[i for i, t in tracks.items() if t is Track.ATTACK]})"
                    )
        return self

    @property
    def folder(self) -> Path:
        """The assignment's folder (where a TA factory file lives)."""
        return self._folder

    @property
    def path(self) -> Path:
        """The spec file it was read from."""
        return self._path

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def phase(self, phase_id: str) -> PhaseSpec | None:
        return next((p for p in self.phases if p.id == phase_id), None)


def _read_document(path: Path) -> dict[str, Any]:
    """The parsed spec file; YAML is read with the safe loader (no Python tags), and the file's
    size, its nesting and what its YAML aliases expand to are bounded."""
    with path.open("rb") as handle:
        raw = handle.read(MAX_SPEC_BYTES + 1)
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: over {MAX_SPEC_BYTES // 2**20} MiB; a spec is a few KiB of text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
        values = _expanded_size(data, {}, set())
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise SpecError(f"{path}: not valid {path.suffix.lstrip('.').upper()}: {exc}") from exc
    except RecursionError:
        raise SpecError(f"{path}: nested too deeply to be an assignment spec") from None
    except _SelfReference:
        raise SpecError(f"{path}: a YAML alias refers to the value that contains it") from None
    if values > MAX_SPEC_VALUES:
        raise SpecError(
            f"{path}: its YAML aliases expand it to over {MAX_SPEC_VALUES} values (a 'billion "
            "laughs' document); write the values out or use fewer aliases"
        )
    if not isinstance(data, dict):
        raise SpecError(f"{path}: the document must be a table/mapping at the top level")
    return data


class _SelfReference(Exception):
    pass


def _expanded_size(value: Any, sizes: dict[int, int], open_: set[int]) -> int:
    """How many values ``value`` holds once every shared (aliased) part is counted each time it
    is referred to; ``sizes`` remembers shared parts, so this costs one visit per distinct one."""
    if not isinstance(value, dict | list):
        return 1
    key = id(value)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise _SelfReference
    open_.add(key)
    children = [*value.keys(), *value.values()] if isinstance(value, dict) else value
    total = 1 + sum(_expanded_size(child, sizes, open_) for child in children)
    open_.discard(key)
    sizes[key] = total
    return total


def _describe(path: Path, exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "(top level)"
        lines.append(f"{path}: {field}: {error['msg']}")
    return "\n".join(lines)


def load_assignment(folder: Path) -> AssignmentSpec:
    """Read and validate the spec in ``folder``; the slug is the folder's name."""
    candidates = [folder / name for name in SPEC_FILE_NAMES if (folder / name).is_file()]
    if not candidates:
        raise SpecError(f"{folder}: no {' or '.join(SPEC_FILE_NAMES)} found")
    if len(candidates) > 1:
        raise SpecError(f"{folder}: several spec files ({', '.join(c.name for c in candidates)})")
    path = candidates[0]
    data = _read_document(path)
    if "slug" in data and data["slug"] != folder.name:
        raise SpecError(f"{path}: slug: {data['slug']!r} differs from the folder name")
    if not re.match(SLUG_PATTERN, folder.name):
        raise SpecError(f"{path}: the folder name must be a slug matching {SLUG_PATTERN}")
    try:
        spec = AssignmentSpec.model_validate({**data, "slug": folder.name})
    except ValidationError as exc:
        raise SpecError(_describe(path, exc)) from exc
    spec._folder = folder.resolve()
    spec._path = path
    return spec


def check_time_limits(spec: AssignmentSpec, *, visibility_timeout_s: float) -> None:
    """Refuse a phase whose hard time limit reaches the broker's visibility timeout: Redis
    would hand a task still running to a second worker (``AUTOGRADER_VISIBILITY_TIMEOUT_S``)."""
    for index, phase in enumerate(spec.phases):
        hard = phase.time_limits.hard_s
        if hard >= visibility_timeout_s:
            raise SpecError(
                f"{spec.path}: phases.{index}.limits.time_limit_s: phase {phase.id!r} may run "
                f"{hard:g} s, which is not below the broker's visibility timeout "
                f"({visibility_timeout_s:g} s, AUTOGRADER_VISIBILITY_TIMEOUT_S); a task still "
                "running would be delivered again. Lower the limit or raise the timeout."
            )


def load_assignments(directory: Path, *, visibility_timeout_s: float) -> dict[str, AssignmentSpec]:
    """Every assignment under ``directory`` (one folder each), by slug; an invalid one, or one
    with a time limit the broker cannot honour (:func:`check_time_limits`), fails."""
    if not directory.is_dir():
        return {}
    specs: dict[str, AssignmentSpec] = {}
    for folder in sorted(p for p in directory.iterdir() if p.is_dir()):
        if any((folder / name).is_file() for name in SPEC_FILE_NAMES):
            spec = load_assignment(folder)
            check_time_limits(spec, visibility_timeout_s=visibility_timeout_s)
            specs[spec.slug] = spec
    return specs
