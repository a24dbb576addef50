"""OPRD pieces (methods.md §6): layer maps, positions, the representation loss, hook capture, projectors."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from trl_opd.representation import (
    BridgeProjector,
    HiddenStateCapture,
    RepresentationProjector,
    capture_hidden_states,
    find_decoder_layers,
    fit_bridge,
    layer_map,
    map_layers,
    pair_layers,
    representation_loss,
    representation_loss_per_layer,
    resolve_layers,
    select_positions,
    selected_layer_map,
)

VOCAB = 50


# ------------------------------------------------------------------------------------------------ layer maps


def eq11_one_indexed(l_s: int, num_student: int, num_teacher: int) -> int:
    """Eq. 11 in exact arithmetic; Python's round() on a Fraction rounds half to even."""
    return round(Fraction((l_s - 1) * (num_teacher - 1), num_student - 1)) + 1


@pytest.mark.parametrize("num_student,num_teacher", [(28, 36), (28, 32), (36, 36)])
def test_layer_map_matches_eq11(num_student, num_teacher):
    expected = [eq11_one_indexed(layer, num_student, num_teacher) - 1 for layer in range(1, num_student + 1)]
    assert layer_map(num_student, num_teacher) == expected


def test_layer_map_matches_eq11_wherever_there_is_no_exact_tie():
    for num_student in range(2, 30):
        for num_teacher in range(1, 30):
            exact = [Fraction(layer * (num_teacher - 1), num_student - 1) for layer in range(num_student)]
            if any(value.denominator == 2 for value in exact):
                continue  # float32 linspace may land either side of an exact half (documented)
            assert layer_map(num_student, num_teacher) == [round(value) for value in exact], (
                num_student,
                num_teacher,
            )


def test_layer_map_rounds_half_to_even_and_edge_cases():
    assert layer_map(3, 4) == [0, 2, 3]  # 1.5 → 2
    assert layer_map(5, 4) == [0, 1, 2, 2, 3]  # 0.75, 1.5 → 2, 2.25
    assert layer_map(1, 7) == [0]
    assert layer_map(4, 2) == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="num_teacher_layers"):
        layer_map(4, 0)
    with pytest.raises(ValueError, match="num_student_layers"):
        layer_map(2.0, 4)


def test_resolve_layers_forms():
    assert resolve_layers("last", 6) == [6]
    assert resolve_layers("all", 4) == [1, 2, 3, 4]
    assert resolve_layers("even", 6) == [1, 3, 5]
    assert resolve_layers("odd", 6) == [2, 4, 6]
    assert resolve_layers([4, 2], 6) == [4, 2]
    assert resolve_layers("3, 5", 6) == [3, 5]


@pytest.mark.parametrize(
    "spec,match",
    [
        ([0], "out of range"),
        ([7], "out of range"),
        ([2, 2], "repeats"),
        ([], "empty"),
        ("middle", "Unknown"),
        ([True], "out of range"),
    ],
)
def test_resolve_layers_rejects_bad_input(spec, match):
    with pytest.raises(ValueError, match=match):
        resolve_layers(spec, 6)


def test_map_layers_pairs_hf_indices():
    assert map_layers([1, 14, 28], 28, 36) == [eq11_one_indexed(layer, 28, 36) for layer in (1, 14, 28)]
    assert map_layers(resolve_layers("all", 5), 5, 5) == [1, 2, 3, 4, 5]
    assert map_layers([4], 4, 9) == [9]  # post-final-norm pairs with post-final-norm


def reference_hidden_state_indices(num_layers: int, spec: str) -> list[int]:
    """The reference code's `get_rep_distillation_hidden_state_indices`, from its HF `hidden_states` count L + 1."""
    if spec == "last":
        return [num_layers]
    if spec == "all":
        return list(range(1, num_layers + 1))
    return [1 + layer for layer in range(0 if spec == "even" else 1, num_layers, 2)]


def authors_pairs(spec: str, num_student: int, num_teacher: int) -> list[tuple[int, int]] | None:
    """§6.5 item 9 in exact arithmetic: each side selects its own list; the i-th student layer of n_S pairs with the
    teacher's layer of relative rank i/(n_S − 1) in its n_T (round half to even), one student layer with the
    teacher's last. None at an exact tie (the float32 grid may land either side, as for Eq. 11)."""
    student = reference_hidden_state_indices(num_student, spec)
    teacher = reference_hidden_state_indices(num_teacher, spec)
    n_s, n_t = len(student), len(teacher)
    if n_s == 1:
        return [(student[0], teacher[-1])]
    ranks = [Fraction(i * (n_t - 1), n_s - 1) for i in range(n_s)]
    if any(rank.denominator == 2 for rank in ranks):
        return None
    return [(layer, teacher[round(rank)]) for layer, rank in zip(student, ranks)]


def test_selected_layer_map_is_the_reference_map_over_each_sides_list():
    """28 → 36 with "even" (issue 16, item 3): the reference code keeps the teacher in its own even list; Eq. 11
    pairs by depth over all layers (methods.md §6.5 item 9)."""
    student, teacher = pair_layers("even", 28, 36, "selected")
    assert student == list(range(1, 28, 2))
    assert teacher == [1, 3, 7, 9, 11, 15, 17, 19, 21, 25, 27, 29, 33, 35]
    assert pair_layers("even", 28, 36, "depth")[1] == [1, 4, 6, 9, 11, 14, 17, 19, 22, 24, 27, 30, 32, 35]
    assert pair_layers("odd", 28, 36, "selected")[1] == [2, 4, 8, 10, 12, 16, 18, 20, 22, 26, 28, 30, 34, 36]
    assert pair_layers("even", 36, 28, "selected")[1] == [1, 3, 5, 5, 7, 9, 11, 11, 13, 15, 17, 17, 19, 21, 23, 23,
                                                          25, 27]
    compared = 0
    for spec in ("even", "odd", "all", "last"):
        for num_student in range(1, 30):
            for num_teacher in range(1, 40):
                if spec == "odd" and 1 in (num_student, num_teacher):
                    continue  # a 1-layer model has no odd layer: resolve_layers refuses the empty list
                expected = authors_pairs(spec, num_student, num_teacher)
                if expected is None:
                    continue
                student, teacher = pair_layers(spec, num_student, num_teacher, "selected")
                assert list(zip(student, teacher)) == expected, (spec, num_student, num_teacher)
                compared += 1
    assert compared > 3000


def test_the_two_layer_maps_agree_except_for_even_and_odd_across_depths():
    for num_student in range(2, 30):
        for num_teacher in range(1, 40):
            for spec in ("all", "last"):
                assert pair_layers(spec, num_student, num_teacher, "selected") == pair_layers(
                    spec, num_student, num_teacher, "depth"), (spec, num_student, num_teacher)
        for spec in ("even", "odd", "all", "last"):  # equal depths: both the identity
            assert pair_layers(spec, num_student, num_student, "selected")[1] == resolve_layers(spec, num_student)
    for spec in ("even", "odd", "all", "last", [3, 1]):
        assert pair_layers(spec, 5, 9, "depth") == (resolve_layers(spec, 5), map_layers(resolve_layers(spec, 5), 5, 9))
    assert pair_layers("all", 1, 4, "selected") == ([1], [4])  # one student layer: the teacher's last
    assert pair_layers("all", 1, 4, "depth") == ([1], [1])  # Eq. 11's grid: linspace(0, 3, 1) = [0]


def test_selected_layer_map_edge_cases_and_errors():
    assert selected_layer_map(3, 3) == [0, 1, 2]
    assert selected_layer_map(1, 5) == [4]
    assert selected_layer_map(4, 1) == [0, 0, 0, 0]
    assert selected_layer_map(14, 18) == torch.linspace(0, 17, 14).round().long().tolist()
    with pytest.raises(ValueError, match="gives the teacher no list|give the teacher no list"):
        pair_layers([2, 4], 4, 8, "selected")
    with pytest.raises(ValueError, match="Unknown layer map"):
        pair_layers("all", 4, 8, "proportional")


# ------------------------------------------------------------------------------------------------ positions


def test_select_positions_matches_loops():
    mask = torch.tensor(
        [[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 1]]
    ).bool()
    for last_k in (None, 1, 2, 10):
        positions, position_mask = select_positions(mask, last_k=last_k)
        expected_rows = []
        for row in mask.tolist():
            kept = [t for t, on in enumerate(row) if on]
            expected_rows.append(kept if last_k is None else kept[max(0, len(kept) - last_k) :])
        width = max(len(row) for row in expected_rows)
        assert positions.shape == position_mask.shape == (4, width)
        for b, kept in enumerate(expected_rows):
            assert positions[b, : len(kept)].tolist() == kept
            assert position_mask[b].tolist() == [True] * len(kept) + [False] * (width - len(kept))
            assert positions[b, len(kept) :].eq(0).all()


def test_select_positions_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        select_positions(torch.ones(3).bool())
    with pytest.raises(ValueError, match="last_k"):
        select_positions(torch.ones(2, 3).bool(), last_k=0)


# ------------------------------------------------------------------------------------------------ the loss


def brute_force_loss(student, teacher, mask, normalize):
    """Eq. 6 with explicit loops over layers, rows, positions and dimensions."""
    layer_losses = []
    for s_layer, t_layer in zip(student, teacher):
        total, count = 0.0, 0.0
        batch, length, width = s_layer.shape
        for b in range(batch):
            for t in range(length):
                if not mask[b, t]:
                    continue
                s_vec, t_vec = s_layer[b, t], t_layer[b, t].detach()
                if normalize:
                    s_vec = s_vec / torch.sqrt(sum(x * x for x in s_vec))
                    t_vec = t_vec / torch.sqrt(sum(x * x for x in t_vec))
                total = total + sum((s_vec[j] - t_vec[j]) ** 2 for j in range(width)) / width
                count += 1
        layer_losses.append(total / count if count else torch.zeros((), dtype=s_layer.dtype))
    return sum(layer_losses) / len(layer_losses)


@pytest.mark.parametrize("normalize", [False, True])
def test_representation_loss_matches_brute_force_value_and_gradient(normalize):
    generator = torch.Generator().manual_seed(0)
    shape = (2, 4, 3)
    student = [
        torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(2)
    ]
    teacher = [
        torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(2)
    ]
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])

    loss = representation_loss(student, teacher, mask, normalize=normalize)
    grads = torch.autograd.grad(loss, student)
    expected = brute_force_loss(student, teacher, mask, normalize)
    expected_grads = torch.autograd.grad(expected, student)

    torch.testing.assert_close(loss, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)
        assert (
            grad[0, 2:].abs().sum() == 0 and grad[1, 0].abs().sum() == 0
        )  # masked positions get no gradient


def test_representation_loss_gradient_reaches_only_the_student():
    student = [torch.randn(2, 3, 4, requires_grad=True)]
    teacher = [torch.randn(2, 3, 4, requires_grad=True)]
    representation_loss(student, teacher, torch.ones(2, 3)).backward()
    assert student[0].grad is not None and student[0].grad.abs().sum() > 0
    assert teacher[0].grad is None


def test_representation_loss_per_layer_and_reductions():
    student = [torch.ones(1, 2, 2), torch.zeros(1, 2, 2)]
    teacher = [torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)]
    per_layer = representation_loss_per_layer(student, teacher, torch.ones(1, 2))
    torch.testing.assert_close(per_layer, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(representation_loss(student, teacher, torch.ones(1, 2)), torch.tensor(0.5))
    empty = representation_loss(student, teacher, torch.zeros(1, 2))
    assert empty.item() == 0.0


def test_representation_loss_computes_in_fp32_for_bf16_states():
    student = [torch.randn(2, 3, 8).to(torch.bfloat16)]
    teacher = [torch.randn(2, 3, 8).to(torch.bfloat16)]
    loss = representation_loss(student, teacher, torch.ones(2, 3))
    assert loss.dtype == torch.float32
    expected = (student[0].float() - teacher[0].float()).pow(2).mean()
    torch.testing.assert_close(loss, expected)


def test_representation_loss_rejects_bad_input():
    states = [torch.zeros(2, 3, 4)]
    with pytest.raises(ValueError, match="width 4 != teacher width 6"):
        representation_loss(states, [torch.zeros(2, 3, 6)], torch.ones(2, 3))
    with pytest.raises(ValueError, match="one teacher state per student"):
        representation_loss(states, states * 2, torch.ones(2, 3))
    with pytest.raises(ValueError, match="same shape"):
        representation_loss(states, [torch.zeros(2, 2, 4)], torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask"):
        representation_loss(states, states, torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"\[B, T, d\]"):
        representation_loss([torch.zeros(3, 4)], [torch.zeros(3, 4)], torch.ones(3))


# ------------------------------------------------------------------------------------------------ capture


def tiny_causal_lm(family: str, hidden: int = 16, layers: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    common = {
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
    }
    if family == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(head_dim=hidden // 4, **common)).eval()
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    if family == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(head_dim=hidden // 4, **common)).eval()
    return LlamaForCausalLM(LlamaConfig(**common)).eval()


def batch_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (2, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0  # a left-padded row
    completion = torch.zeros_like(input_ids, dtype=torch.bool)
    completion[0, 3:] = True
    completion[1, 4:6] = True
    return input_ids, attention_mask, completion


def reference_states(model, input_ids, attention_mask, layers, positions, position_mask):
    with torch.no_grad():
        hidden_states = model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
        ).hidden_states
    gathered = []
    for index in layers:
        rows = [hidden_states[index][b, positions[b][position_mask[b]]] for b in range(input_ids.shape[0])]
        gathered.append(rows)
    return gathered


def assert_matches_reference(captured, reference, position_mask):
    assert len(captured) == len(reference)
    for states, rows in zip(captured, reference):
        for b, row in enumerate(rows):
            torch.testing.assert_close(states[b][position_mask[b]], row, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen3", "llama", "qwen2", "gemma2"])
def test_hooks_capture_what_output_hidden_states_gives(family):
    model = tiny_causal_lm(family)
    input_ids, attention_mask, completion = batch_inputs()
    layers = resolve_layers("all", 3)  # includes index 3 = post-final-norm
    positions, position_mask = select_positions(completion, last_k=2)
    with torch.no_grad(), HiddenStateCapture(model, layers, positions=positions) as capture:
        model(input_ids=input_ids, attention_mask=attention_mask)
    states = capture.states
    assert [tuple(s.shape) for s in states] == [(2, 2, 16)] * 3
    expected = reference_states(model, input_ids, attention_mask, layers, positions, position_mask)
    assert_matches_reference(states, expected, position_mask)

    # A boolean mask works as `positions` too; without positions the full [B, T, d] states come back.
    with torch.no_grad(), HiddenStateCapture(model, [2], positions=completion) as capture:
        model(input_ids=input_ids, attention_mask=attention_mask)
    full = reference_states(model, input_ids, attention_mask, [2], *select_positions(completion))
    assert_matches_reference(capture.states, full, capture.position_mask)
    with torch.no_grad(), HiddenStateCapture(model, [1, 3]) as capture:
        output = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    torch.testing.assert_close(capture.states[0], output.hidden_states[1])
    torch.testing.assert_close(capture.states[1], output.hidden_states[3])


def test_hooks_are_removed_and_only_selected_layers_are_hooked():
    model = tiny_causal_lm("qwen3")
    stack = find_decoder_layers(model)
    with HiddenStateCapture(model, [2]):
        hooked = [len(layer._forward_hooks) for layer in stack.layers] + [
            len(stack.final_norm._forward_hooks)
        ]
        assert hooked == [0, 1, 0, 0]
    assert all(len(layer._forward_hooks) == 0 for layer in stack.layers)
    with pytest.raises(RuntimeError, match="inside the `with` block"):
        with HiddenStateCapture(model, [2]) as capture:
            pass
        _ = capture.states


def test_backbone_only_capture_never_runs_the_lm_head_and_gradients_flow():
    model = tiny_causal_lm("llama").train()
    head_calls = []
    model.lm_head.register_forward_hook(lambda *args: head_calls.append(1))
    input_ids, attention_mask, completion = batch_inputs()
    positions, position_mask = select_positions(completion)
    states = capture_hidden_states(
        model, [1, 3], positions=positions, input_ids=input_ids, attention_mask=attention_mask
    )
    assert head_calls == []
    representation_loss(states, [torch.zeros_like(s) for s in states], position_mask).backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert not model.config.tie_word_embeddings and model.lm_head.weight.grad is None

    teacher_states = capture_hidden_states(
        model, [1, 3], positions=positions, grad=False, input_ids=input_ids, attention_mask=attention_mask
    )
    assert not any(s.requires_grad for s in teacher_states)
    model.eval()
    expected = reference_states(model, input_ids, attention_mask, [1, 3], positions, position_mask)
    assert_matches_reference([s.detach() for s in teacher_states], expected, position_mask)


def test_capture_with_gradient_checkpointing_matches_plain_gradients():
    input_ids, attention_mask, completion = batch_inputs()
    positions, position_mask = select_positions(completion)
    grads = []
    for checkpointing in (False, True):
        model = tiny_causal_lm("qwen3", seed=3).train()
        model.config.attention_dropout = 0.0
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        states = capture_hidden_states(
            model, [1, 2, 3], positions=positions, input_ids=input_ids, attention_mask=attention_mask
        )
        representation_loss(states, [torch.ones_like(s) for s in states], position_mask).backward()
        grads.append(model.model.layers[0].mlp.up_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_capture_under_peft_lora():
    model = tiny_causal_lm("qwen3")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:  # non-zero B so the adapter changes the states
            torch.nn.init.normal_(parameter, std=0.5)
    stack = find_decoder_layers(peft_model)
    assert stack.backbone is model.model and stack.num_layers == 3
    input_ids, attention_mask, completion = batch_inputs()
    positions, position_mask = select_positions(completion)
    with torch.no_grad(), HiddenStateCapture(peft_model, [2, 3], positions=positions) as capture:
        peft_model(input_ids=input_ids, attention_mask=attention_mask)
    expected = reference_states(peft_model, input_ids, attention_mask, [2, 3], positions, position_mask)
    assert_matches_reference(capture.states, expected, position_mask)

    # The backbone path runs the adapted layers; disable_adapter() gives the base model's states
    # (the self-distillation teacher).
    states = capture_hidden_states(
        peft_model, [3], positions=positions, grad=False, input_ids=input_ids, attention_mask=attention_mask
    )
    assert_matches_reference(states, expected[1:], position_mask)
    with peft_model.disable_adapter():
        base_states = capture_hidden_states(
            peft_model,
            [3],
            positions=positions,
            grad=False,
            input_ids=input_ids,
            attention_mask=attention_mask,
        )
    assert not torch.allclose(base_states[0], states[0])


def test_find_decoder_layers_errors_and_wrappers():
    with pytest.raises(ValueError, match="Cannot find the decoder layers of Linear"):
        find_decoder_layers(torch.nn.Linear(2, 2))
    model = tiny_causal_lm("llama")

    class Wrapper(torch.nn.Module):  # stands for DDP: the model under `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert find_decoder_layers(Wrapper(model)).backbone is model.model
    with pytest.raises(ValueError, match="out of range"):
        HiddenStateCapture(model, [4])


def test_capture_rejects_positions_beyond_the_sequence():
    model = tiny_causal_lm("qwen3")
    input_ids, _, _ = batch_inputs()
    with pytest.raises(ValueError, match="only 7 positions"):
        capture_hidden_states(model, [1], positions=torch.tensor([[8], [0]]), grad=False, input_ids=input_ids)
    with pytest.raises(ValueError, match="batch size 2"):
        capture_hidden_states(model, [1], positions=torch.tensor([[1]]), grad=False, input_ids=input_ids)


# ------------------------------------------------------------------------------------------------ projectors


def test_representation_projector_maps_widths_trains_and_round_trips():
    projector = RepresentationProjector(student_dim=4, teacher_dim=6, num_layers=2)
    student = [torch.randn(2, 3, 4, dtype=torch.float64) for _ in range(2)]
    projected = projector(student)
    assert [tuple(p.shape) for p in projected] == [(2, 3, 6)] * 2
    torch.testing.assert_close(projected[1], (student[1].float() @ projector.projections[1].weight.T))
    representation_loss(projected, [torch.zeros(2, 3, 6)] * 2, torch.ones(2, 3)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())

    host = torch.nn.Module()
    host.add_module("oprd_projector", projector)
    assert sorted(name for name, _ in host.named_parameters()) == [
        "oprd_projector.projections.0.weight",
        "oprd_projector.projections.1.weight",
    ]
    restored = RepresentationProjector(4, 6, 2)
    restored.load_state_dict(projector.state_dict())
    torch.testing.assert_close(restored(student)[0], projected[0].detach())
    with pytest.raises(ValueError, match="built for 2"):
        projector(student[:1])


def test_representation_projector_is_drawn_from_its_seed_not_the_global_rng():
    """Every process builds the same projector whatever its RNG state (TRL reseeds per process before a subclass
    builds one; FSDP2 keeps each rank's shard of its own weights), with nn.Linear's default distribution
    U(-1/sqrt(d_S), 1/sqrt(d_S)); another seed, another draw; the global RNG is left where it was."""
    torch.manual_seed(1)
    first = RepresentationProjector(64, 96, 2, seed=7)
    torch.manual_seed(2)
    state = torch.get_rng_state()
    second = RepresentationProjector(64, 96, 2, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    for a, b in zip(first.projections, second.projections):
        assert torch.equal(a.weight, b.weight) and a.weight.requires_grad and a.weight.dtype == torch.float32
    assert not torch.equal(first.projections[0].weight, first.projections[1].weight)
    assert not torch.equal(first.projections[0].weight, RepresentationProjector(64, 96, 2, seed=8).projections[0].weight)
    weights = torch.cat([projection.weight.flatten() for projection in first.projections]).double()
    bound = 1 / math.sqrt(64)
    assert weights.abs().max() <= bound and weights.abs().max() > 0.99 * bound
    assert weights.var().item() == pytest.approx(bound**2 / 3, rel=0.05)  # a uniform's variance


def correlated_states(rows=200, student_dim=5, teacher_dim=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(rows, 3, generator=generator, dtype=torch.float64) * torch.tensor(
        [3.0, 2.0, 1.0], dtype=torch.float64
    )
    teacher = latent @ torch.randn(3, teacher_dim, generator=generator, dtype=torch.float64) + 2.0
    teacher = teacher + 0.1 * torch.randn(rows, teacher_dim, generator=generator, dtype=torch.float64)
    student = latent @ torch.randn(3, student_dim, generator=generator, dtype=torch.float64)
    student = student + 0.1 * torch.randn(rows, student_dim, generator=generator, dtype=torch.float64)
    return student, teacher


def numpy_bridge(student, teacher, rank, pca_rows):
    """Eq. 12–13 by numpy: PCA (eigh of the covariance) on the first rows, then least squares on all rows."""
    rows = teacher[:pca_rows].numpy()
    mean = rows.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(rows, rowvar=False, bias=True))
    top = eigenvectors[:, np.argsort(eigenvalues)[::-1][:rank]].T
    return mean, top


def test_fit_bridge_matches_numpy_pca_and_lstsq():
    layers = [correlated_states(seed=0), correlated_states(seed=1)]
    bridge = fit_bridge([s for s, _ in layers], [t for _, t in layers], rank=2, max_rows=150)
    assert bridge.student_projection.shape == (2, 2, 5) and bridge.teacher_projection.shape == (2, 2, 7)
    for layer, (student, teacher) in enumerate(layers):
        mean, top = numpy_bridge(student, teacher, rank=2, pca_rows=150)
        fitted = bridge.teacher_projection[layer].double().numpy()
        np.testing.assert_allclose(bridge.teacher_mean[layer].double().numpy(), mean, rtol=1e-6)
        np.testing.assert_allclose(
            np.abs(np.sum(fitted * top, axis=1)), [1.0, 1.0], rtol=1e-5
        )  # same directions
        assert all(row[np.argmax(np.abs(row))] > 0 for row in fitted)  # sign convention
        targets = (teacher.numpy() - bridge.teacher_mean[layer].double().numpy()) @ fitted.T
        solution = np.linalg.lstsq(student.numpy(), targets, rcond=None)[0]
        np.testing.assert_allclose(
            bridge.student_projection[layer].double().numpy(), solution.T, rtol=1e-4, atol=1e-6
        )
    # Student and teacher share a 3-d latent; a rank-2 bridge aligns them almost perfectly.
    cosine = bridge.alignment_cosine([s for s, _ in layers], [t for _, t in layers])
    assert cosine.min() > 0.95


def test_bridge_projections_feed_the_normalised_loss():
    student, teacher = correlated_states()
    bridge = fit_bridge([student], [teacher], rank=2)
    student_coords, teacher_coords = bridge([student.float().requires_grad_()], [teacher.float()])
    expected_teacher = (teacher.float() - bridge.teacher_mean[0]) @ bridge.teacher_projection[0].T
    torch.testing.assert_close(teacher_coords[0], expected_teacher)
    torch.testing.assert_close(student_coords[0], student.float() @ bridge.student_projection[0].T)
    loss = representation_loss(
        [student_coords[0][None]], [teacher_coords[0][None]], torch.ones(1, 200), normalize=True
    )
    loss.backward()
    assert 0 < loss.item() < 0.05
    assert not any(buffer.requires_grad for buffer in bridge.buffers()) and list(bridge.parameters()) == []


def test_unfitted_bridge_raises_unless_random_projector_allowed():
    student, teacher = correlated_states()
    bridge = BridgeProjector(5, 7, num_layers=1, rank=2)
    with pytest.raises(ValueError, match="not fitted"):
        bridge([student], [teacher])
    bridge.fit_teacher([teacher])
    with pytest.raises(ValueError, match="allow_random_projector=True"):
        bridge.project_student([student])

    random_bridge = BridgeProjector(5, 7, num_layers=1, rank=2, allow_random_projector=True, seed=3)
    random_bridge.fit_teacher([teacher])
    first = random_bridge.project_student([student])[0]
    again = BridgeProjector(5, 7, num_layers=1, rank=2, allow_random_projector=True, seed=3)
    torch.testing.assert_close(again.student_projection, random_bridge.student_projection)
    assert first.shape == (200, 2)

    with pytest.raises(ValueError, match="Fit the teacher PCA first"):
        BridgeProjector(5, 7, 1, 2).fit_student([student], [teacher])
    with pytest.raises(ValueError, match="more rows than the rank"):
        BridgeProjector(5, 7, 1, 2).fit_teacher([teacher[:2]])
    with pytest.raises(ValueError, match="cannot exceed"):
        BridgeProjector(5, 7, 1, 8)
    with pytest.raises(ValueError, match=r"\[N, 7\]"):
        BridgeProjector(5, 7, 1, 2).fit_teacher([teacher[:, :6]])


def test_bridge_state_dict_round_trip_keeps_the_fit():
    student, teacher = correlated_states()
    bridge = fit_bridge([student], [teacher], rank=2)
    restored = BridgeProjector(5, 7, num_layers=1, rank=2)
    restored.load_state_dict(bridge.state_dict())
    assert bool(restored.student_fitted) and bool(restored.teacher_fitted)
    for got, expected in zip(restored([student], [teacher]), bridge([student], [teacher])):
        torch.testing.assert_close(got[0], expected[0])
