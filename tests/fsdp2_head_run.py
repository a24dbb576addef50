"""FSDP2 (torch's `fully_shard`) around the LM-head passes of the OPD objective, on 2 CPU processes (gloo), against
the same global batch on one process; used by tests/test_fsdp2.py (not a test module itself).

Under FSDP2 every parameter is a DTensor sharded over the processes, the LM heads included. `trainers.lm_head.output_head`
gathers each head whole once per micro-batch (`full_tensor()`, whose backward reduce-scatters the gradient, as
TRL's DistillationTrainer does): every pass over the heads (TIP's scoring pass, the fused loss, the diagnostics, the
sampled-token log-probs) then reads one plain tensor. OPRD's hooks find the decoder layers of the sharded model.

The objective: top-k reverse KL, TIP (`tip_divergence_only`: a row's selection depends on the row alone, so it is the
same on any process layout), OPRD at every layer (equal hidden sizes, no projector), the diagnostics; then the
sampled-token k3 estimator with the evidence mask (a fixed threshold: the quantile mode is per micro-batch). Each process holds half of the rows; rows are all full length,
so the per-process means (token mean, OPRD's masked mean) average to the global ones.
"""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny import tiny_model, tiny_tokenizer  # noqa: E402
from trl.models.utils import _ForwardRedirection  # noqa: E402
from trl_opd import OPDConfig  # noqa: E402
from trl_opd.objective import CompletionBatch, LocalTeacher, OPDObjective  # noqa: E402
from trl_opd.reduction import StepNormalisers  # noqa: E402
from trl_opd.representation import CaptureRequest, HiddenStateCapture  # noqa: E402
from trl_opd.trainers.lm_head import output_head  # noqa: E402

ROWS, PROMPT, COMPLETION = 4, 5, 6
SETTINGS = {
    "tip_top_k_oprd": dict(token_selection="tip_divergence_only", token_ratio=0.5, loss_top_k=8,
                           representation_weight=0.1, diagnostics_steps=1),
    "k3_evidence": dict(estimator="k3", evidence_mode="threshold", evidence_threshold=-0.05),  # per token: any layout
    # the other loss implementation, several chunks per micro-batch: still no gather per chunk
    "checkpointed_chunks": dict(loss_implementation="checkpointed", loss_chunk_size=4, beta=0.5),
}


def models():
    tokenizer = tiny_tokenizer()
    return tiny_model(tokenizer, hidden=32, seed=0), tiny_model(tokenizer, hidden=32, seed=1).eval()


def batch_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (ROWS, PROMPT + COMPLETION), generator=torch.Generator().manual_seed(0))


def step(student, teacher, ids, objective, num_items) -> torch.Tensor:
    """One micro-batch as OPDTrainer runs it: the loss inside the student's forward (TRL's forward redirection, so
    FSDP2 holds the student's root parameters, its head included, unsharded), the teacher's forward redirected
    through its own wrapper (after which its head is a sharded DTensor again); OPRD's capture around each."""
    layers, redirect = [1, 2], _ForwardRedirection()
    positions = torch.arange(PROMPT - 1, PROMPT - 1 + COMPLETION).expand(len(ids), -1)

    def last_hidden(model):
        return model.model(input_ids=ids).last_hidden_state[:, PROMPT - 1:-1]

    states = {}

    def loss_inside_the_students_forward():
        with HiddenStateCapture(student, layers, positions=positions) as student_capture:
            student_hidden = last_hidden(student)
        with torch.no_grad(), HiddenStateCapture(teacher, layers, positions=positions) as teacher_capture:
            teacher_hidden = redirect(teacher, teacher, last_hidden, teacher)
        request = CaptureRequest(student_capture, teacher_capture,
                                 torch.ones(len(ids), COMPLETION, dtype=torch.bool))
        batch = CompletionBatch(
            valid=torch.ones(len(ids), COMPLETION, dtype=torch.bool),
            completion_ids=ids[:, PROMPT:],
            student_hidden=student_hidden,
            student_head=output_head(student),
            teacher=LocalTeacher(teacher_hidden, output_head(teacher)),
            representation=request.states() if objective.representation is not None else None,
        )
        states.update(student=student_hidden.detach(), teacher=teacher_hidden)
        return objective(batch, StepNormalisers(training=True, num_items=num_items), diagnostics=True,
                         selection_seed=0).loss

    loss = redirect(student, student, loss_inside_the_students_forward)
    loss.backward()
    return loss.detach(), states


def diagnose_outside_a_forward(student, teacher, states, ids) -> dict:
    """The diagnostics pass outside any forward (a callback, an analysis): under FSDP2 both heads are sharded
    DTensors then, and `output_head` gathers each whole once. Returns the stats' (sum, count)."""
    objective = OPDObjective.from_config(OPDConfig(output_dir="unused", use_cpu=True, bf16=False,
                                                   diagnostics_steps=1, loss_top_k=8))
    batch = CompletionBatch(torch.ones(len(ids), COMPLETION, dtype=torch.bool), ids[:, PROMPT:], states["student"],
                            output_head(student), LocalTeacher(states["teacher"], output_head(teacher)))
    with torch.no_grad():
        return objective.diagnose(batch)


def full(tensor):
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    gathers = {"count": 0}
    original = DTensor.full_tensor

    def counting_full_tensor(self, *args, **kwargs):
        gathers["count"] += 1
        return original(self, *args, **kwargs)

    results = {}
    for name, settings in SETTINGS.items():
        objective = OPDObjective.from_config(OPDConfig(output_dir="unused", use_cpu=True, bf16=False, **settings))
        student, teacher = models()
        reference_student = copy.deepcopy(student)
        ids = batch_ids(student.config.vocab_size)
        reference_teacher = copy.deepcopy(teacher)
        reference_loss, reference_states = step(reference_student, reference_teacher, ids, objective,
                                                num_items=ROWS * COMPLETION)
        reference_stats = diagnose_outside_a_forward(reference_student, reference_teacher, reference_states, ids)

        for module in (student, teacher):
            for layer in module.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(module, mesh=mesh)
        rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
        DTensor.full_tensor = counting_full_tensor
        gathers["count"] = 0
        try:
            loss, states = step(student, teacher, ids[rows], objective, num_items=ROWS * COMPLETION / world)
            head_gathers = gathers["count"]
            gathers["count"] = 0
            stats = diagnose_outside_a_forward(student, teacher, states, ids[rows])
            diagnostics_gathers = gathers["count"]
        finally:
            DTensor.full_tensor = original
        stats_error = 0.0
        for key, (total, count) in stats.items():
            if key.startswith("tip/"):  # TIP's quadrants split at each micro-batch's medians: layout-dependent
                continue
            pair = torch.stack([total.float(), count.float()])
            dist.all_reduce(pair)
            expected = reference_stats[key][0].float() / reference_stats[key][1].float()
            stats_error = max(stats_error, abs((pair[0] / pair[1] - expected).item()))
        dist.all_reduce(loss)
        grads = {param_name: full(param.grad) for param_name, param in student.named_parameters()}
        reference = dict(reference_student.named_parameters())
        results[name] = {
            "loss": (loss / world).item(),
            "reference_loss": reference_loss.item(),
            "max_grad_error": max((grads[key] - reference[key].grad).abs().max().item() for key in grads),
            "max_grad": max(reference[key].grad.abs().max().item() for key in grads),
            "head_gathers": head_gathers,
            "diagnostics_gathers": diagnostics_gathers,
            "diagnostics_error": stats_error,
            "heads_are_dtensors": isinstance(student.lm_head.weight, DTensor),
        }
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
