"""Several teachers in one run (MOPD, arXiv 2606.30406): each row's `teacher_id` column picks its teacher.

    OPDConfig(teachers={"add": {"teacher_model_name_or_path": "out/add-teacher"},
                        "sub": {"teacher_model_server_url": "http://10.0.0.7:8000"}},   # vLLM by default
              teacher_id_column="teacher_id")

A teacher spec holds either `teacher_model_name_or_path` (loaded in each training process, like the single teacher)
or `teacher_model_server_url` with, optionally, `teacher_server_backend`, `teacher_server_top_k` and
`teacher_server_model` (as the single teacher's fields; the retry and timeout fields are shared). Every teacher must
share the student's tokenizer: the objective compares one vocabulary (a teacher with another tokenizer needs
`SimCTTrainer`, which takes one teacher). The objective reads the teachers as one (`objective.RoutedTeacher`: each
row's logits or log-probs from its own teacher), so weighting, reduction, TIP and the diagnostics act on the whole
batch; per teacher it logs `teachers/<name>/divergence` (or `kl_k1`) and `teachers/<name>/token_share`.

`validate_teachers` runs in `OPDConfig.__post_init__`; `TeacherRoutes` in the trainer: servers asked and the dataset's
column checked before any load, local teachers loaded after the student like the single teacher.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

from ..serving.backends import connect_teacher
from .prompt_checks import first_row
from .self_distillation import SELF_TEACHER

LOCAL_KEY, SERVED_KEY = "teacher_model_name_or_path", "teacher_model_server_url"
SERVED_OPTIONS = ("teacher_server_backend", "teacher_server_top_k", "teacher_server_model")


def validate_teachers(config) -> None:
    """`teachers` is a mapping name → spec that this config can run (parsed from JSON when given as a string)."""
    if isinstance(config.teachers, str):  # from the command line: a JSON object
        config.teachers = json.loads(config.teachers)
    if config.teachers is None:
        return
    if not isinstance(config.teachers, dict) or not config.teachers:
        raise ValueError(f"`teachers` must be a non-empty mapping name -> teacher spec, got {config.teachers!r}.")
    if config.teacher_model_name_or_path is not None or config.teacher_model_server_url is not None:
        raise ValueError("`teachers` names every teacher of the run: leave teacher_model_name_or_path and "
                         "teacher_model_server_url unset.")
    for what, refused in (("OPRD (representation_weight > 0)", config.representation_weight > 0),
                          ("seq_kd=True", config.seq_kd and config.lmbda < 1)):
        if refused:
            raise ValueError(f"{what} reads one teacher; with several `teachers` it is not supported. Use one "
                             "teacher, or turn it off.")
    for name, spec in config.teachers.items():
        _check_spec(config, name, spec)


def _check_spec(config, name, spec) -> None:
    where = f"teachers[{name!r}]"
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"Teacher names are non-empty strings without '/', got {name!r}.")
    if not isinstance(spec, dict) or (LOCAL_KEY in spec) == (SERVED_KEY in spec):
        raise ValueError(f"{where} must be a mapping with exactly one of {LOCAL_KEY!r} or {SERVED_KEY!r}, got {spec!r}.")
    unknown = set(spec) - {LOCAL_KEY, SERVED_KEY, *SERVED_OPTIONS}
    if unknown or (LOCAL_KEY in spec and set(spec) != {LOCAL_KEY}):
        allowed = [LOCAL_KEY] if LOCAL_KEY in spec else [SERVED_KEY, *SERVED_OPTIONS]
        raise ValueError(f"{where} has keys {sorted(set(spec) - set(allowed))} it cannot use; allowed: {allowed}.")
    if spec.get(LOCAL_KEY) == SELF_TEACHER:
        raise ValueError(f"{where}: the student's own weights ('self') cannot be one of several teachers.")
    if SERVED_KEY in spec:  # the single served teacher's checks (values, URL, what its backend can serve), on it
        try:
            served_settings(config, spec).validate_served_teacher_arguments()
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None


def served_settings(config, spec: dict):
    """A copy of `config` with this teacher's server fields (the retry and timeout fields, and what the method
    reads, stay the config's): what `connect_teacher` and the signal checks read."""
    settings = copy.copy(config)
    settings.teacher_model_server_url = spec[SERVED_KEY]
    for name in SERVED_OPTIONS:
        setattr(settings, name, spec.get(name, type(config).__dataclass_fields__[name].default))
    return settings


@dataclass
class Route:
    """One teacher of the run: a served backend, or a path loaded after the student (`module`, prepared)."""

    name: str
    served: object | None = None
    path: str | None = None
    module: object | None = None


class TeacherRoutes:
    """The run's teachers by name, in the order of `names` (the index a batch's `teacher_index` holds)."""

    def __init__(self, routes: list[Route], column: str):
        self.routes = routes
        self.column = column
        self.names = tuple(route.name for route in routes)

    @classmethod
    def connect(cls, args) -> TeacherRoutes | None:
        """None without `teachers`; otherwise every served teacher has answered (before any load)."""
        if getattr(args, "teachers", None) is None:
            return None
        routes = []
        for name, spec in args.teachers.items():
            if SERVED_KEY in spec:
                routes.append(Route(name, served=connect_teacher(served_settings(args, spec))))
            else:
                routes.append(Route(name, path=spec[LOCAL_KEY]))
        return cls(routes, args.teacher_id_column)

    def check_dataset(self, dataset, split: str) -> None:
        """Every row names one of the teachers in `teacher_id_column` (all rows of a Dataset; the first otherwise)."""
        if dataset is None:
            return
        columns = getattr(dataset, "column_names", None)
        values = dataset[self.column] if columns is not None and self.column in columns else None
        if columns is None:
            row = first_row(dataset)
            values = [row[self.column]] if isinstance(row, dict) and self.column in row else None
        if values is None:
            raise ValueError(f"The {split} dataset has no `{self.column}` column (teacher_id_column): with several "
                             f"teachers each row names its teacher, one of {list(self.names)}.")
        unknown = sorted({str(value) for value in values} - set(self.names))
        if unknown:
            raise ValueError(f"The {split} dataset's `{self.column}` holds {unknown[:5]}, which are not teachers of "
                             f"this run; `teachers` names {list(self.names)}.")

    def index_of(self, rows) -> list[int]:
        return [self.names.index(row[self.column]) for row in rows]
