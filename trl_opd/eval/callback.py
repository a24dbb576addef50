"""``MathEvalCallback``: evaluate on math benchmarks every N training steps and log the metrics."""

from __future__ import annotations

import math
from collections.abc import Sequence

from transformers import TrainerCallback

from trl_opd.eval.backends import SamplingSettings, TransformersBackend
from trl_opd.eval.grading import default_pool
from trl_opd.eval.prompts import DEFAULT_PROMPT_TEMPLATE, build_prompt
from trl_opd.eval.runner import generate_samples, resolve_benchmarks, score_samples

#: Entries of :func:`trl_opd.eval.runner.score_samples` logged besides the accuracy metrics.
_LOGGED_EXTRAS = ("mean_completion_tokens", "truncated_fraction", "no_answer_fraction")


class MathEvalCallback(TrainerCallback):
    """Sample, grade and log math accuracy every ``eval_steps`` optimizer steps.

    Works with any ``transformers.Trainer`` (OPDTrainer, RLADTrainer, TRL's trainers) whose model is a causal LM
    and whose ``processing_class`` is a tokenizer. Generation uses the transformers backend on the unwrapped model
    (DDP/FSDP/ZeRO-3 via TRL's ``unwrap_model_for_generation``), the problems split across processes; the main
    process grades and every process logs the same numbers with ``trainer.log``, under keys
    ``"<metric_prefix>/<benchmark>/<metric>"`` (e.g. ``math_eval/aime24/avg@4``).

    Note: TRL's GRPO-based trainers average their own metrics inside ``log``; an evaluation step therefore flushes
    those running averages into its log entry a little early.

    Usage::

        trainer = OPDTrainer(...)
        trainer.add_callback(MathEvalCallback(trainer, "aime24", eval_steps=50, n=4, max_new_tokens=4096))

    Args:
        trainer: the trainer to evaluate and log through.
        benchmarks: names or datasets, as for :func:`trl_opd.eval.evaluate_math`.
        eval_steps: evaluate when ``global_step % eval_steps == 0`` (default: the trainer's ``eval_steps``).
        n, temperature, top_p, top_k, max_new_tokens: sampling (defaults are cheap: 1 sample of 1,024 tokens).
        limit: evaluate only the first ``limit`` problems of each benchmark.
        batch_size: sequences per ``generate`` call (default: ``per_device_eval_batch_size``).
    """

    def __init__(
        self,
        trainer,
        benchmarks="aime24",
        *,
        eval_steps: int | None = None,
        n: int = 1,
        temperature: float = 0.6,
        top_p: float = 0.95,
        top_k: int | None = None,
        max_new_tokens: int = 1024,
        limit: int | None = None,
        batch_size: int | None = None,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        system_prompt: str | None = None,
        use_chat_template: bool | None = None,
        enable_thinking: bool | None = True,
        ks: Sequence[int] | None = None,
        grading_timeout: float = 5.0,
        seed: int = 0,
        metric_prefix: str = "math_eval",
    ) -> None:
        if eval_steps is not None and eval_steps < 1:
            raise ValueError(f"eval_steps must be >= 1, got {eval_steps}.")
        if n < 1:
            raise ValueError(f"n must be >= 1 sample per problem, got {n}.")
        self.trainer = trainer
        self.benchmarks = resolve_benchmarks(benchmarks, limit=limit)
        self.eval_steps, self.n, self.ks, self.seed = eval_steps, n, ks, seed
        self.sampling = SamplingSettings(
            temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens
        )
        self.batch_size = batch_size
        self.prompt_options = dict(
            template=prompt_template,
            system_prompt=system_prompt,
            use_chat_template=use_chat_template,
            enable_thinking=enable_thinking,
        )
        self.grading_timeout, self.metric_prefix = grading_timeout, metric_prefix
        self._last_step = -1

    def _tokenizer(self):
        processing_class = self.trainer.processing_class
        tokenizer = getattr(processing_class, "tokenizer", processing_class)  # processors wrap a tokenizer
        if tokenizer is None or not callable(getattr(tokenizer, "decode", None)):
            raise ValueError("MathEvalCallback needs a trainer whose processing_class is a tokenizer.")
        return tokenizer

    def on_step_end(self, args, state, control, **kwargs):
        steps = self.eval_steps or state.eval_steps or args.eval_steps
        if not steps:
            raise ValueError(
                "MathEvalCallback has no schedule: pass eval_steps= or set eval_steps in the config."
            )
        if state.global_step % int(steps) != 0 or state.global_step == self._last_step:
            return
        self._last_step = state.global_step
        self.trainer.log(self.evaluate())

    def evaluate(self) -> dict[str, float]:
        """Generate and grade now; returns the metrics (the same dict on every process)."""
        from accelerate.utils import broadcast_object_list, gather_object
        from trl.models.utils import unwrap_model_for_generation

        trainer, tokenizer = self.trainer, self._tokenizer()
        accelerator = trainer.accelerator
        gathered = {}
        with unwrap_model_for_generation(
            trainer.model_wrapped,
            accelerator,
            gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
        ) as model:
            was_training = model.training
            model.eval()
            try:
                backend = TransformersBackend(
                    model,
                    tokenizer,
                    self.sampling,
                    batch_size=self.batch_size or trainer.args.per_device_eval_batch_size,
                )
                for name, dataset in self.benchmarks:
                    gathered[name] = self._generate_shard(backend, name, dataset, tokenizer, gather_object)
            finally:
                model.train(was_training)
        metrics = [self._score(gathered) if accelerator.is_main_process else None]
        if accelerator.num_processes > 1:
            metrics = broadcast_object_list(metrics, from_process=0)
        return metrics[0]

    def _generate_shard(self, backend, name, dataset, tokenizer, gather_object) -> list[list[dict]]:
        """This process's share of the problems, generated; then every problem's samples, in order."""
        built = [build_prompt(problem, tokenizer, **self.prompt_options) for problem in dataset["problem"]]
        indices = list(range(len(dataset)))
        with self.trainer.accelerator.split_between_processes(indices) as shard:
            samples = generate_samples(
                backend,
                name,
                dataset.select(shard),
                [built[i][0] for i in shard],
                self.n,
                seed=self.seed,
                add_special_tokens=not (built and built[0][1]),
            )
            pairs = gather_object(list(zip(shard, samples)))
        ordered = dict(pairs)
        return [ordered[index] for index in indices]

    def _score(self, gathered: dict[str, list[list[dict]]]) -> dict[str, float]:
        pool = default_pool(self.grading_timeout, None)
        logs = {}
        for name, dataset in self.benchmarks:
            metrics, _ = score_samples(
                dataset, gathered[name], ks=self.ks, pool=pool, timeout=self.grading_timeout
            )
            for key, value in metrics.items():
                if ("@" in key or key in _LOGGED_EXTRAS) and not math.isnan(
                    value
                ):  # NaN: stderr of one problem
                    logs[f"{self.metric_prefix}/{name}/{key}"] = float(value)
        return logs
