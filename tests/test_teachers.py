"""Several teachers in one run (issue 15 item 2, MOPD): each row's `teacher_id` picks its teacher.

The objective reads them as one teacher (`objective.RoutedTeacher`): checked against each row's own teacher by brute
force (float64, values and gradients, local and served signals mixed); the trainer with two copies of one teacher
trains exactly like that teacher alone; per-teacher metrics; a served teacher among them; bad specs and datasets
fail before any load.
"""

from __future__ import annotations

import copy

import pytest
import torch

from servers import start_trl_opd_server, stop
from tiny import cpu_args, prompt_dataset, save_tiny, tiny_model, tiny_tokenizer
from trl_opd import OPDConfig, OPDTrainer
from trl_opd.losses import OutputHead, SparseTeacherLogits, per_token_divergence
from trl_opd.objective import CompletionBatch, LocalTeacher, OPDObjective, RoutedTeacher, ServedTeacher
from trl_opd.reduction import StepNormalisers

# ---------------------------------------------------------------- the routed signal against each row's own teacher


def test_routed_teachers_give_each_rows_own_divergence_and_gradient():
    generator = torch.Generator().manual_seed(0)
    batch, width, vocab = 4, 5, 11

    def randn(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator)

    student_hidden, student_weight = randn(batch, width, 6), randn(vocab, 6)
    heads = [OutputHead(randn(vocab, 7)), OutputHead(randn(vocab, 3))]  # two local teachers of other widths
    teacher_hidden = [randn(batch, width, 7), randn(batch, width, 3)]
    served_logits = 2 * randn(batch, width, vocab)  # a third teacher, served: its top-6 log-probs
    top = served_logits.log_softmax(-1).topk(6)
    owner = torch.tensor([2, 0, 1, 0])
    valid = torch.rand(batch, width, generator=generator) > 0.2
    valid[:, 0] = True
    completion_ids = torch.randint(0, vocab, (batch, width), generator=generator)

    def rows_of(index):
        return owner == index

    signals = [LocalTeacher(teacher_hidden[i][rows_of(i)], heads[i]) for i in (0, 1)]
    signals.append(ServedTeacher(completion_ids[rows_of(2)], vocab, 1.0, None, top.indices[rows_of(2)],
                                 top.values[rows_of(2)]))
    routed = RoutedTeacher(owner, signals, ("a", "b", "served"))

    # Brute force: each row's teacher logits over the vocabulary (the served one: its log-probs + leftover mass).
    sparse = SparseTeacherLogits(top.indices.reshape(-1, 6), top.values.reshape(-1, 6), vocab)
    dense_served = sparse.logits(torch.arange(batch * width)).reshape(batch, width, vocab)
    expected_logits = torch.stack([
        (teacher_hidden[0][b] @ heads[0].weight.t()) if owner[b] == 0
        else (teacher_hidden[1][b] @ heads[1].weight.t()) if owner[b] == 1 else dense_served[b]
        for b in range(batch)])

    objective = OPDObjective.from_config(OPDConfig(output_dir="unused", use_cpu=True, bf16=False, loss_top_k=6,
                                                   loss_top_k_source="teacher", loss_top_k_tail=True))
    leaf = student_hidden.clone().requires_grad_(True)
    batch_in = CompletionBatch(valid, completion_ids, leaf, OutputHead(student_weight), routed)
    output = objective(batch_in, StepNormalisers(training=False, num_items=valid.sum()))
    output.loss.backward()

    reference_leaf = student_hidden.clone().requires_grad_(True)
    per_token = per_token_divergence(reference_leaf @ student_weight.t(), expected_logits, top_k=6,
                                     top_k_source="teacher", top_k_tail=True)
    reference = (per_token * valid).sum() / valid.sum()
    reference.backward()
    # The reduction's coefficients are float32 (reduction.py), so the loss is float64 up to ~1e-8 relative.
    torch.testing.assert_close(output.loss, reference, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(leaf.grad, reference_leaf.grad, rtol=1e-6, atol=1e-9)
    for index, name in enumerate(routed.names):
        mine = valid & (owner == index).unsqueeze(1)
        total, count = output.stats[f"teachers/{name}/divergence"]
        torch.testing.assert_close(total.double() / count.double(), (per_token * mine).sum() / mine.sum(),
                                   rtol=1e-5, atol=1e-7)
        assert output.stats[f"teachers/{name}/token_share"][0] == mine.sum()


# ---------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("teachers")
    return (save_tiny(directory / "a", tokenizer, hidden=48, seed=1),
            save_tiny(directory / "b", tokenizer, hidden=64, seed=2))


@pytest.fixture(scope="module")
def student(tokenizer):
    return tiny_model(tokenizer, hidden=32, seed=0)


def routed_dataset():
    return prompt_dataset(8).add_column("teacher_id", ["a", "b"] * 4)


def run(student, tokenizer, tmp_path, dataset=None, **settings) -> list[dict]:
    args = OPDConfig(output_dir=str(tmp_path), **{**cpu_args(max_steps=2), **settings})
    trainer = OPDTrainer(copy.deepcopy(student), args=args, train_dataset=dataset or routed_dataset(),
                         processing_class=tokenizer)
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_two_copies_of_one_teacher_train_like_that_teacher(student, tokenizer, teachers, tmp_path):
    path, _ = teachers
    alone = run(student, tokenizer, tmp_path / "one", teacher_model_name_or_path=path)
    routed = run(student, tokenizer, tmp_path / "two", teachers={"a": {"teacher_model_name_or_path": path},
                                                                 "b": {"teacher_model_name_or_path": path}})
    assert [entry["loss"] for entry in routed] == [entry["loss"] for entry in alone]
    for entry in routed:
        shares = entry["teachers/a/token_share"] + entry["teachers/b/token_share"]
        assert shares == pytest.approx(1.0)


def test_each_teacher_scores_its_own_rows(student, tokenizer, teachers, tmp_path):
    """Teacher a's rows are scored alike whoever scores the b rows; the b rows differ with another b."""
    path_a, path_b = teachers
    same = run(student, tokenizer, tmp_path / "same", teachers={"a": {"teacher_model_name_or_path": path_a},
                                                                "b": {"teacher_model_name_or_path": path_a}})
    mixed = run(student, tokenizer, tmp_path / "mixed", teachers={"a": {"teacher_model_name_or_path": path_a},
                                                                  "b": {"teacher_model_name_or_path": path_b}})
    assert mixed[0]["teachers/a/divergence"] == pytest.approx(same[0]["teachers/a/divergence"], rel=1e-6)
    assert mixed[0]["teachers/b/divergence"] != pytest.approx(same[0]["teachers/b/divergence"], rel=1e-3)


def test_a_served_teacher_among_local_ones(student, tokenizer, teachers, tmp_path):
    path_a, path_b = teachers
    url, process = start_trl_opd_server(path_b, tmp_path / "server.log")
    try:
        served = run(student, tokenizer, tmp_path / "served",
                     teachers={"a": {"teacher_model_name_or_path": path_a},
                               "b": {"teacher_model_server_url": url, "teacher_server_backend": "trl_opd"}})
    finally:
        stop(process)
    local = run(student, tokenizer, tmp_path / "local", teachers={"a": {"teacher_model_name_or_path": path_a},
                                                                  "b": {"teacher_model_name_or_path": path_b}})
    for expected, got in zip(local, served):
        for key in ("loss", "teachers/a/divergence", "teachers/b/divergence"):
            assert got[key] == pytest.approx(expected[key], rel=1e-6), key


@pytest.mark.parametrize("dataset, words", [
    (prompt_dataset(8), "no `teacher_id` column"),
    (prompt_dataset(8).add_column("teacher_id", ["a", "c"] * 4), r"holds \['c'\]"),
])
def test_a_dataset_that_names_no_known_teacher_fails_before_loading(dataset, words, tokenizer, teachers, tmp_path,
                                                                    no_model_loading):
    path, _ = teachers
    args = OPDConfig(output_dir=str(tmp_path), teachers={"a": {"teacher_model_name_or_path": path}}, **cpu_args())
    with pytest.raises(ValueError, match=words):
        OPDTrainer("unused/student", args=args, train_dataset=dataset, processing_class=tokenizer)


@pytest.mark.parametrize("settings, words", [
    ({"teachers": {"a": {}}}, "exactly one of"),
    ({"teachers": {"a": {"teacher_model_name_or_path": "p", "teacher_server_top_k": 5}}}, "cannot use"),
    ({"teachers": {"a": {"teacher_model_name_or_path": "self"}}}, "'self'"),
    ({"teachers": {"a/b": {"teacher_model_name_or_path": "p"}}}, "without '/'"),
    ({"teachers": {"a": {"teacher_model_name_or_path": "p"}}, "teacher_model_name_or_path": "q"}, "leave"),
    ({"teachers": {"a": {"teacher_model_name_or_path": "p"}}, "representation_weight": 0.1}, "OPRD"),
    ({"teachers": {"a": {"teacher_model_server_url": "http://127.0.0.1:9"}}}, r"teachers\['a'\]: the full-vocab"),
    ({"teachers": '{"a": {"teacher_model_name_or_path": "p"}}', "teacher_id_column": 3}, "teacher_id_column"),
])
def test_bad_teacher_specs_are_refused_at_construction(settings, words, tmp_path):
    with pytest.raises(ValueError, match=words):
        OPDConfig(output_dir=str(tmp_path), **{**cpu_args(), **settings})


def test_teachers_from_the_command_line_are_json(tmp_path):
    config = OPDConfig(output_dir=str(tmp_path), teachers='{"a": {"teacher_model_name_or_path": "p"}}', **cpu_args())
    assert config.teachers == {"a": {"teacher_model_name_or_path": "p"}}
