"""A served teacher in the trainers: connected and checked before any weights load; OPRD's teacher states from it.

The backends (`trl_opd.serving.backends`) talk to the servers; this module holds what the trainers decide around
them: that the config and the `teacher_model` argument agree, which vocabulary the loss compares, and the capture that
stands for a teacher forward when the teacher's layers come from trl_opd's server (`ServedCapture`).
"""

from __future__ import annotations

from ..serving.backends import TrlOpdTeacher, connect_teacher
from .prompt_checks import first_row
from .teacher import model_config

_PROBE = "Compute 59+63-15. 59+63=122. 122-15=107. \\boxed{107}"


def connect_served_teacher(teacher_model, args):
    """The served teacher `args.teacher_model_server_url` names (its server answered), or None for a local teacher."""
    if not getattr(args, "served_teacher", False):
        return None
    if teacher_model is not None:
        raise ValueError(
            f"teacher_model_server_url={args.teacher_model_server_url!r} serves the teacher, and a `teacher_model` "
            "was passed too: the teacher is either loaded here or served. Pass no teacher_model."
        )
    return connect_teacher(args)


def probe_text(train_dataset) -> str:
    """A text both tokenizers must split alike: the first training prompt when it is plain text."""
    row = first_row(train_dataset) if train_dataset is not None else None
    prompt = row.get("prompt") if isinstance(row, dict) else None
    return prompt if isinstance(prompt, str) and prompt else _PROBE


def served_vocab_size(teacher, model, student_tokenizer, train_dataset, args) -> int | None:
    """The vocabulary the loss compares with a served teacher (None: the student's whole head), after checking that
    the server's tokenizer is the student's."""
    if student_tokenizer is not None:
        teacher.check_tokenizer(student_tokenizer, probe_text(train_dataset))
    if not isinstance(teacher, TrlOpdTeacher):
        return None  # vLLM: its ids are checked against the student's head width on every answer
    student_vocab = model_config(model, args).get_text_config().vocab_size
    teacher_vocab = teacher.info["vocab_size"]
    if student_vocab == teacher_vocab:
        return None
    if student_tokenizer is None or len(student_tokenizer) > min(student_vocab, teacher_vocab):
        raise ValueError(
            f"The student's LM head has {student_vocab} rows and the served teacher's {teacher_vocab}, and the "
            "student's tokenizer does not fit both: OPDTrainer needs one shared tokenizer (SimCTTrainer for another)."
        )
    return len(student_tokenizer)  # heads padded differently around one tokenizer (methods.md §0.8)


class ServedCapture:
    """Stands where a `HiddenStateCapture` of the teacher stands (OPRD): no hooks; the trainer asks the server for
    `layers` at `positions` (`request()`) and hands its answer back (`fill`)."""

    def __init__(self, layers, positions):
        self.layers = list(layers)
        self.positions = positions
        self._states = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        return None

    def request(self) -> dict:
        return {"layers": self.layers, "positions": self.positions}

    def fill(self, fetched: dict) -> None:
        self._states = [fetched[f"layer_{index}"] for index in self.layers]

    @property
    def states(self):
        if self._states is None:
            raise RuntimeError("The served teacher's layer states were not fetched for this micro-batch.")
        return self._states
