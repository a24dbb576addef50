"""SimCTTrainer end to end on tiny models: a byte-level BPE student (tests/tiny.py) and a character-level teacher
(trl_opd.testbed), so the two vocabularies and tokenisations really differ."""

import copy
import math

import pytest
import torch

from tiny import cpu_args, prompt_dataset, tiny_model, tiny_tokenizer
from trl_opd import SimCTConfig, SimCTTrainer
from trl_opd.cross_tokenizer import (
    align_texts,
    shared_vocabulary,
    simct_loss,
    simct_segments,
    stack_segments,
    uld_loss,
)
from trl_opd.testbed.models import tiny_model as char_level_model
from trl_opd.testbed.tokenizers import char_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def teacher_tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def student(tokenizer):
    return tiny_model(tokenizer, hidden=32, seed=0)


@pytest.fixture(scope="module")
def teacher(teacher_tokenizer):
    return char_level_model(teacher_tokenizer, hidden=32, layers=1, heads=2, seed=1)


def simct(student, teacher, tokenizer, teacher_tokenizer, tmp_path, **overrides):
    args = SimCTConfig(output_dir=str(tmp_path / "simct"), **cpu_args(**overrides))
    return SimCTTrainer(
        copy.deepcopy(student), copy.deepcopy(teacher), args=args, train_dataset=prompt_dataset(),
        processing_class=tokenizer, teacher_processing_class=teacher_tokenizer,
    )


def test_builds_with_a_teacher_of_another_vocabulary(student, teacher, tokenizer, teacher_tokenizer, tmp_path):
    assert student.config.vocab_size != teacher.config.vocab_size
    trainer = simct(student, teacher, tokenizer, teacher_tokenizer, tmp_path)
    student_ids, teacher_ids = trainer._shared_ids
    assert len(student_ids) == len(teacher_ids) > 10  # digits, letters, punctuation and the EOS pair
    assert student_ids.max() < student.config.vocab_size and teacher_ids.max() < teacher.config.vocab_size


@pytest.mark.parametrize(("loss", "steps"), [("simct", 2), ("uld", 1)])
def test_training_moves_the_student(student, teacher, tokenizer, teacher_tokenizer, tmp_path, loss, steps):
    trainer = simct(student, teacher, tokenizer, teacher_tokenizer, tmp_path, cross_tokenizer_loss=loss,
                    max_steps=steps, per_device_train_batch_size=2)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == steps
    assert all(math.isfinite(entry["loss"]) and entry["loss"] > 0 for entry in logged)
    assert all(0 < entry["simct/aligned_share"] <= 1 for entry in logged)
    if loss == "uld":  # ULD compares every finest segment: every student token is covered
        assert all(entry["simct/aligned_share"] == 1 for entry in logged)
    moved = max((a - b).abs().max().item() for a, b in zip(trainer.model.parameters(), student.parameters()))
    assert moved > 1e-4
    unchanged = max((a - b).abs().max().item() for a, b in zip(trainer.teacher_model.parameters(), teacher.parameters()))
    assert unchanged == 0


# ---------------------------------------------------------------- the trainer's loss against the pure functions


PROMPTS = ["Compute 3+4.", "Compute 12+5."]
COMPLETIONS = [" 3+4=7. \\boxed{7}", " 12+5=17"]  # the second one is truncated: no EOS


def _left_pad(rows, pad_id):
    width = max(len(row) for row in rows)
    ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return ids, mask


def _micro_batch(tokenizer, teacher_tokenizer):
    """What `_generate_and_score_completions` hands to `_compute_loss`: left-padded prompts of both sides,
    right-padded sampled completions (the first ends with EOS)."""
    completions = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in COMPLETIONS]
    completions[0] = completions[0] + [tokenizer.eos_token_id]
    width = max(len(row) for row in completions)
    prompt_ids, prompt_mask = _left_pad([tokenizer(p)["input_ids"] for p in PROMPTS], tokenizer.pad_token_id)
    teacher_prompt_ids, teacher_prompt_mask = _left_pad(
        [teacher_tokenizer(p)["input_ids"] for p in PROMPTS], teacher_tokenizer.pad_token_id
    )
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "teacher_prompt_ids": teacher_prompt_ids,
        "teacher_prompt_mask": teacher_prompt_mask,
        "completion_ids": torch.tensor(
            [row + [tokenizer.pad_token_id] * (width - len(row)) for row in completions]
        ),
        "completion_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in completions]),
    }


def _completion_logits(model, prompt, completion):
    """Unpadded forward of one row; position k of the result predicts completion[k]."""
    ids = torch.tensor([prompt + completion])
    return model(input_ids=ids).logits[0, len(prompt) - 1 : len(ids[0]) - 1]


def _stacked(rows):
    """[B, T_max, V] with zero rows past each sequence (never read by the losses)."""
    out = torch.zeros(len(rows), max(len(row) for row in rows), rows[0].shape[-1])
    for index, row in enumerate(rows):
        out[index, : len(row)] = row
    return out


def _reference_loss(trainer, tokenizer, teacher_tokenizer, loss, num_items, reduction="sum"):
    """The loss rebuilt from the pure functions: each text encoded by each tokenizer on its own, each row run
    unpadded through each model, EOS appended only to the completion that had one. `reduction="none"` returns
    (per-segment losses, segments, student tokens per row) instead."""
    student_rows, teacher_rows, student_logits, teacher_logits, groups = [], [], [], [], []
    for prompt, text, ended in zip(PROMPTS, COMPLETIONS, [True, False]):
        student_ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] * ended
        teacher_ids = (
            teacher_tokenizer(text, add_special_tokens=False)["input_ids"] + [teacher_tokenizer.eos_token_id] * ended
        )
        student_logits.append(_completion_logits(trainer.model, tokenizer(prompt)["input_ids"], student_ids))
        with torch.no_grad():
            teacher_logits.append(
                _completion_logits(trainer.teacher_model, teacher_tokenizer(prompt)["input_ids"], teacher_ids)
            )
        (alignment,) = align_texts([text], tokenizer, teacher_tokenizer, append_eos=ended)
        assert alignment.student_ids.tolist() == student_ids and alignment.teacher_ids.tolist() == teacher_ids
        if loss == "uld":
            groups.append(alignment.segments)
        else:
            groups.append(simct_segments(alignment.segments, alignment.anchors, spans=loss == "simct"))
        student_rows.append(torch.tensor(student_ids))
        teacher_rows.append(torch.tensor(teacher_ids))
    student_ids = torch.nn.utils.rnn.pad_sequence(student_rows, batch_first=True)
    teacher_ids = torch.nn.utils.rnn.pad_sequence(teacher_rows, batch_first=True)
    arguments = (_stacked(student_logits), _stacked(teacher_logits), student_ids, teacher_ids, stack_segments(groups))
    if loss == "uld":
        total = uld_loss(*arguments, reduction=reduction)
    else:
        total = simct_loss(*arguments, shared_vocabulary(tokenizer, teacher_tokenizer), reduction=reduction)
    if reduction == "none":
        return total, arguments[-1], [len(row) for row in student_rows]
    return total / num_items


@pytest.mark.parametrize("loss", ["simct", "simple", "uld"])
def test_loss_matches_the_pure_functions(student, teacher, tokenizer, teacher_tokenizer, tmp_path, loss):
    trainer = simct(student, teacher, tokenizer, teacher_tokenizer, tmp_path, cross_tokenizer_loss=loss)
    trainer.model.eval()
    inputs = _micro_batch(tokenizer, teacher_tokenizer)
    num_items = 7.0  # e.g. the step's generated tokens per process under gradient accumulation
    value, entropy_sum, count = trainer._compute_loss(trainer.model, inputs, num_items)
    expected = _reference_loss(trainer, tokenizer, teacher_tokenizer, loss, num_items)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    assert count.item() == sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in COMPLETIONS) + 1
    assert torch.isfinite(entropy_sum) and entropy_sum > 0
    # same gradient on the student
    value.backward()
    trainer_grads = [p.grad.clone() for p in trainer.model.parameters()]
    trainer.model.zero_grad()
    expected.backward()
    for mine, theirs in zip(trainer_grads, (p.grad for p in trainer.model.parameters())):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-7)


def test_without_num_items_divides_by_the_student_tokens(student, teacher, tokenizer, teacher_tokenizer, tmp_path):
    trainer = simct(student, teacher, tokenizer, teacher_tokenizer, tmp_path)
    inputs = _micro_batch(tokenizer, teacher_tokenizer)
    with torch.no_grad():
        by_count, _, count = trainer._compute_loss(trainer.model, inputs, None)
        by_one, _, _ = trainer._compute_loss(trainer.model, inputs, 1.0)
    torch.testing.assert_close(by_count * count.float(), by_one)


# ---------------------------------------------------------------- 1:1 alignment: exactly OPDTrainer


def _mask_specials(model, ids, value=-1e4):
    """Give the tied LM head a bias that puts (numerically) no probability on `ids`: the tokens outside V∩."""
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    biased.weight = head.weight  # stays tied to the input embeddings
    with torch.no_grad():
        biased.bias.zero_()
        biased.bias[ids] = value
    model.set_output_embeddings(biased)
    return model


def _renumber(model, order):
    """The same model for a tokenizer whose id s is the original id `order[s]` (rows of the tied embeddings and
    of the head bias permuted)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings.copy_(embeddings[order].clone())
        bias = model.get_output_embeddings().bias
        bias.copy_(bias[order].clone())
    return model


@pytest.mark.parametrize("loss", ["simct", "simple"])
def test_renumbered_vocabulary_trains_step_for_step_like_opd(tmp_path, loss):
    """The same character tokenizer with its characters renumbered: every segment is a 1:1 anchor and V∩ is the
    whole vocabulary but four special tokens (given no probability here), so SimCT must be OPDTrainer's full
    reverse KL, same loss and same update at every step (off-policy, lmbda=0, so both see the same completions)."""
    from trl_opd import OPDConfig, OPDTrainer
    from trl_opd.testbed.tokenizers import CHARACTERS

    teacher_tokenizer = char_tokenizer()
    renumbered = char_tokenizer(CHARACTERS[::-1])
    order = teacher_tokenizer.convert_tokens_to_ids(renumbered.convert_ids_to_tokens(list(range(len(renumbered)))))
    assert sorted(order) == list(range(len(renumbered))) and order != list(range(len(renumbered)))
    student_ids, teacher_ids = shared_vocabulary(renumbered, teacher_tokenizer, mode="decoded")
    assert [order[i] for i in student_ids.tolist()] == teacher_ids.tolist()
    outside = sorted(set(range(len(teacher_tokenizer))) - set(teacher_ids.tolist()))
    assert len(outside) == 4  # <pad>, <unk>, <|im_start|>, <|im_end|>: the same ids on both sides
    teacher = _mask_specials(char_level_model(teacher_tokenizer, hidden=32, layers=1, heads=2, seed=1), outside)
    student = _mask_specials(char_level_model(teacher_tokenizer, hidden=32, layers=1, heads=2, seed=0), outside)
    common = cpu_args(lmbda=0.0, max_steps=3, max_completion_length=12, temperature=1.0)
    opd = OPDTrainer(copy.deepcopy(student), copy.deepcopy(teacher),
                     args=OPDConfig(output_dir=str(tmp_path / "opd"), **common),
                     train_dataset=prompt_dataset(), processing_class=teacher_tokenizer)
    simct = SimCTTrainer(_renumber(student, order), copy.deepcopy(teacher),
                         args=SimCTConfig(output_dir=str(tmp_path / "simct"), cross_tokenizer_loss=loss,
                                          shared_vocabulary_mode="decoded", **common),
                         train_dataset=prompt_dataset(), processing_class=renumbered,
                         teacher_processing_class=teacher_tokenizer)
    opd.train()
    simct.train()
    opd_losses = [entry["loss"] for entry in opd.state.log_history if "loss" in entry]
    simct_losses = [entry["loss"] for entry in simct.state.log_history if "loss" in entry]
    assert len(opd_losses) == 3 and opd_losses[0] > 0
    assert simct_losses == pytest.approx(opd_losses, rel=1e-4)
    expected = _renumber(opd.model, order)  # OPD's trained student, in the renumbered ids
    for (name, mine), theirs in zip(simct.model.named_parameters(), expected.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6, msg=name)
    moved = max((a - b).abs().max().item() for a, b in zip(opd.model.parameters(), student.parameters()))
    assert moved > 1e-4


# ---------------------------------------------------------------- OPDTrainer's token weighting, per segment


def _brute_position_weight(segment, lengths, w_min=0.25, tau=0.30, slope=0.10, direction="increasing"):
    """Mean over the segment's student tokens of PW-OPSD's w = w_min + (1 - w_min)·σ((u - τ)/s), u = (i + ½)/L."""
    b, s0, s1 = segment[:3]
    values = []
    for k in range(s0, s1):
        u = (k + 0.5) / lengths[b]
        u = 1 - u if direction == "decreasing" else u
        values.append(w_min + (1 - w_min) / (1 + math.exp(-(u - tau) / slope)))
    return sum(values) / len(values)


@pytest.mark.parametrize("loss", ["simct", "uld"])
@pytest.mark.parametrize(
    ("overrides", "reduction"),
    [
        ({"position_weighting": "increasing", "loss_reduction": "sequence_mean"}, "sequence_mean"),
        ({"position_weighting": "decreasing"}, "token_mean"),
        ({"token_selection": "tip_divergence_only", "token_ratio": 0.5, "loss_reduction": "weighted_mean"},
         "weighted_mean"),
        ({"token_selection": "tip_divergence_only", "token_ratio": 0.5, "position_weighting": "increasing",
          "loss_reduction": "token_mean_microbatch"}, "token_mean_microbatch"),
    ],
)
def test_token_weighting_applies_per_segment(student, teacher, tokenizer, teacher_tokenizer, tmp_path, loss,
                                             overrides, reduction):
    """The trainer's weighted loss equals Σ_g c_g·ℓ_g with weights and normalisers computed by brute force."""
    trainer = simct(student, teacher, tokenizer, teacher_tokenizer, tmp_path, cross_tokenizer_loss=loss, **overrides)
    trainer.model.eval()  # micro-batch normalisers (no step counts, no accumulation)
    inputs = _micro_batch(tokenizer, teacher_tokenizer)
    num_items = 7.0
    value, _, _ = trainer._compute_loss(trainer.model, inputs, num_items)
    per_segment, segments, lengths = _reference_loss(trainer, tokenizer, teacher_tokenizer, loss, None, "none")
    rows = segments.tolist()
    weights = [1.0] * len(rows)
    if "position_weighting" in overrides:
        weights = [_brute_position_weight(row, lengths, direction=overrides["position_weighting"]) for row in rows]
    if "token_selection" in overrides:  # keep max(1, ⌊ρ·G_b⌋) segments per row, the largest losses
        values = per_segment.detach().tolist()
        for b in range(len(lengths)):
            mine = [g for g, row in enumerate(rows) if row[0] == b]
            keep = max(1, int(0.5 * len(mine)))
            kept = sorted(mine, key=lambda g: (-values[g], g))[:keep]
            weights = [w if (g not in mine or g in kept) else 0.0 for g, w in enumerate(weights)]
    sizes = [row[2] - row[1] for row in rows]
    if reduction == "token_mean":
        coefficients = [w / num_items for w in weights]
    elif reduction == "token_mean_microbatch":
        coefficients = [w / sum(lengths) for w in weights]
    elif reduction == "weighted_mean":
        coefficients = [w / sum(w * n for w, n in zip(weights, sizes)) for w in weights]
    else:
        coefficients = [w / (lengths[row[0]] * len(lengths)) for w, row in zip(weights, rows)]
    expected = (torch.tensor(coefficients) * per_segment).sum()
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7)
    if "token_selection" in overrides:
        assert 0 < sum(w > 0 for w in weights) < len(weights)


def test_teacher_coverage_drops_the_rows_the_teacher_barely_covers(student, teacher, tokenizer, teacher_tokenizer,
                                                                   tmp_path):
    from trl_opd.cross_tokenizer import segment_teacher_coverage

    trainer = simct(student, teacher, tokenizer, teacher_tokenizer, tmp_path, simct_min_teacher_coverage=0.5)
    trainer.model.eval()
    inputs = _micro_batch(tokenizer, teacher_tokenizer)
    batch = trainer._cross_tokenize(inputs)
    teacher_logits = trainer._completion_logits(None, inputs["teacher_prompt_ids"], inputs["teacher_prompt_mask"],
                                                batch.teacher_ids, batch.teacher_mask, teacher=True)
    coverage = segment_teacher_coverage(teacher_logits, batch.teacher_ids, batch.segments, trainer._shared_ids[1])
    value, _, _ = trainer._compute_loss(trainer.model, inputs, 7.0)
    per_segment, _, _ = _reference_loss(trainer, tokenizer, teacher_tokenizer, "simct", None, "none")
    expected = (per_segment * (coverage >= 0.5).float()).sum() / 7.0
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7)


def test_weighted_training_runs_and_logs_the_selection(student, teacher, tokenizer, teacher_tokenizer, tmp_path):
    trainer = simct(student, teacher, tokenizer, teacher_tokenizer, tmp_path, token_selection="tip_soft_or",
                    token_ratio=0.5, position_weighting="increasing", loss_reduction="weighted_mean",
                    per_device_train_batch_size=2)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(math.isfinite(entry["loss"]) for entry in logged)
    assert all(0 < entry["simct/selected_share"] < 1 for entry in logged)
    assert all(0.25 <= entry["simct/segment_weight"] < 1 for entry in logged)


# ---------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", ["simct.yaml", "toy/simct.yaml"])
def test_recipes_parse(name):
    """Every key of the recipes is a field of RecipeArguments, SimCTConfig or ModelConfig (no model is loaded)."""
    from pathlib import Path

    import yaml
    from trl import ModelConfig, TrlParser

    from trl_opd.recipes import RecipeArguments

    recipes = Path(__file__).resolve().parent.parent / "recipes"
    config = yaml.safe_load((recipes / name).read_text())
    config.pop("env")
    config["bf16"] = False  # the real recipe asks for bf16 on GPUs
    parsed = TrlParser((RecipeArguments, SimCTConfig, ModelConfig)).parse_dict(config, allow_extra_keys=False)
    assert isinstance(parsed[1], SimCTConfig) and parsed[1].cross_tokenizer_loss == "simct"


# ---------------------------------------------------------------- bad input


def test_same_tokenizer_points_to_opd_trainer(student, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="OPDTrainer"):
        simct(student, student, tokenizer, tokenizer, tmp_path)


def test_teacher_tokenizer_that_cannot_be_found(student, teacher, tokenizer, tmp_path):
    args = SimCTConfig(output_dir=str(tmp_path / "x"), **cpu_args())
    with pytest.raises(ValueError, match="teacher_tokenizer_name_or_path"):
        SimCTTrainer(copy.deepcopy(student), copy.deepcopy(teacher), args=args, train_dataset=prompt_dataset(),
                     processing_class=tokenizer)
    args = SimCTConfig(output_dir=str(tmp_path / "y"), teacher_tokenizer_name_or_path=str(tmp_path / "missing"),
                       **cpu_args())
    with pytest.raises(ValueError, match="Could not load the teacher's tokenizer"):
        SimCTTrainer(copy.deepcopy(student), copy.deepcopy(teacher), args=args, train_dataset=prompt_dataset(),
                     processing_class=tokenizer)


def test_tokenizer_without_offsets_is_explained_before_any_model_loads(student, teacher, tokenizer, tmp_path):
    """A pure-Python tokenizer (transformers' `PythonBackend`, like `MistralCommonBackend`) has no character
    offsets: no fallback, a clear error, raised before any model is loaded (the teacher is a path that does not
    exist)."""
    from transformers.tokenization_python import PythonBackend

    class PythonCharTokenizer(PythonBackend):
        def __init__(self, **kwargs):
            self._vocab = {c: i for i, c in enumerate(["<eos>", *"abc "])}
            super().__init__(eos_token="<eos>", **kwargs)

        def get_vocab(self):
            return dict(self._vocab)

        @property
        def vocab_size(self):
            return len(self._vocab)

        def _tokenize(self, text, **kwargs):
            return list(text)

        def _convert_token_to_id(self, token):
            return self._vocab.get(token, 0)

        def _convert_id_to_token(self, index):
            return {i: c for c, i in self._vocab.items()}[index]

    slow = PythonCharTokenizer()
    assert not slow.is_fast
    args = SimCTConfig(output_dir=str(tmp_path / "x"), **cpu_args())
    for student_side, teacher_side in ((tokenizer, slow), (slow, tokenizer)):
        with pytest.raises(ValueError, match="not a fast"):
            SimCTTrainer(copy.deepcopy(student), str(tmp_path / "no-teacher-here"), args=args,
                         train_dataset=prompt_dataset(), processing_class=student_side,
                         teacher_processing_class=teacher_side)


def test_teacher_tokenizer_loads_from_its_directory(student, teacher, tokenizer, teacher_tokenizer, tmp_path):
    teacher_tokenizer.save_pretrained(tmp_path / "teacher-tokenizer")
    args = SimCTConfig(output_dir=str(tmp_path / "z"),
                       teacher_tokenizer_name_or_path=str(tmp_path / "teacher-tokenizer"), **cpu_args())
    trainer = SimCTTrainer(copy.deepcopy(student), copy.deepcopy(teacher), args=args, train_dataset=prompt_dataset(),
                           processing_class=tokenizer)
    assert trainer.teacher_tokenizer.get_vocab() == teacher_tokenizer.get_vocab()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"cross_tokenizer_loss": "kl"}, "cross_tokenizer_loss"),
        ({"simct_span_score": "max"}, "simct_span_score"),
        ({"shared_vocabulary_mode": "exact"}, "shared_vocabulary_mode"),
        ({"uld_merge": "last"}, "uld_merge"),
        ({"simct_min_teacher_coverage": 1.5}, "simct_min_teacher_coverage"),
        ({"token_selection": "tip_q3"}, "token_selection"),
        ({"token_selection": "tip_entropy_sample", "token_importance_weighting": True}, "token_importance_weighting"),
        ({"evidence_mode": "threshold"}, "evidence_mode"),
        ({"guided_fraction": 0.25}, "guided_fraction"),
        ({"divergence": "forward_kl"}, "divergence"),
        ({"loss_reduction": "sum"}, "loss_reduction"),
        ({"seq_kd": True}, "seq_kd"),
        ({"teacher_model_name_or_path": "self"}, "OPDTrainer"),
    ],
)
def test_config_rejects_bad_values(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        SimCTConfig(output_dir=str(tmp_path), **cpu_args(), **overrides)


def test_trainer_needs_a_simct_config(student, teacher, tokenizer, teacher_tokenizer):
    from trl_opd import OPDConfig

    with pytest.raises(TypeError, match="SimCTConfig"):
        SimCTTrainer(student, teacher, args=OPDConfig(output_dir="unused", **cpu_args()),
                     processing_class=tokenizer, teacher_processing_class=teacher_tokenizer)
