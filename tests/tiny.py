"""Tiny tokenizers and models built in code, for tests that need a real (if random) causal LM."""

from __future__ import annotations

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [f"Compute {a}+{b}. {a}+{b}={a + b}. \\boxed{{{a + b}}}" for a in range(0, 40, 3) for b in range(0, 30, 7)]


def tiny_tokenizer(texts=CORPUS, vocab_size: int = 120) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIALS,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        truncation_side="left",
        model_max_length=256,
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def tiny_model(tokenizer, hidden: int = 32, layers: int = 2, seed: int = 0, vocab_size: int | None = None,
               tied: bool = True):
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_anchor(path):
    """A small AAPA discriminator (expert `i+1=...` answers vs `zzzz qqqq`), fitted and saved to `path`; returns it."""
    from trl_opd.anchor import AnchorDiscriminator

    discriminator = AnchorDiscriminator(num_buckets=1024, ngram_range=(1, 2))
    discriminator.fit([f"{i}+1={i + 1}. \\boxed{{{i + 1}}}" for i in range(20)], ["zzzz qqqq"] * 20, steps=30)
    discriminator.save(path)
    return discriminator


def save_tiny(directory, tokenizer, **model_kwargs) -> str:
    tiny_model(tokenizer, **model_kwargs).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def prompt_dataset(n: int = 16, with_completion: bool = True) -> Dataset:
    rows = {"prompt": [f"Compute {i}+{i + 1}." for i in range(n)]}
    if with_completion:
        rows["completion"] = [f" {i}+{i + 1}={2 * i + 1}. \\boxed{{{2 * i + 1}}}" for i in range(n)]
    return Dataset.from_dict(rows)


def cpu_args(**overrides) -> dict:
    """Settings every CPU test needs (trl.md §11)."""
    settings = dict(
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        gradient_checkpointing=False,
        max_steps=2,
        per_device_train_batch_size=4,
        max_completion_length=6,
        learning_rate=1e-3,
        seed=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return settings


def length_reward(prompts, completions, **kwargs):
    """A reward that tells a group's completions apart by their length (the 2-process RLAD scripts)."""
    return [float(len(text)) for text in completions]


def end_distributed_run() -> None:
    """Call last in a launched script: wait for every rank, destroy the gloo process group and exit at once.

    About one launch in 15-30 on a loaded 2-core machine aborted after all its work was done: "terminate called
    without an active exception" (SIGABRT) with no Python frame, i.e. in the interpreter's finalization, where a C++
    thread object of torch's distributed runtime is destroyed while still joinable; destroying the process group
    first did not prevent it. A test script has written its results by now, so it skips finalization with
    `os._exit(0)` after flushing its streams: the launch's exit status then reports the test's work only.
    """
    import os
    import sys

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch_two_cpu_processes(script, *arguments, timeout: int = 300, cwd=None, expect_success: bool = True,
                             engine: tuple[str, ...] = ("--multi_gpu",), **env_overrides):
    """Run `script arguments...` on 2 CPU processes with accelerate and return the finished process, after asserting
    it exited 0 (the message carries the end of its output) unless `expect_success=False`.

    `accelerate launch --cpu --num_processes 2` starts a single process unless MPI is set up; torchrun
    (`--multi_gpu`) with use_cpu gives DistributedType.MULTI_CPU over gloo, a real 2-process run. Each launch gets a
    free rendezvous port, so a launch never meets the previous one's socket (torchrun's default is always 29500).
    `engine`: the launcher's engine flags instead of `--multi_gpu` (DeepSpeed: `--use_deepspeed ...`).
    """
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "ACCELERATE_DISABLE_RICH": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "ACCELERATE_USE_CPU": "true",
           **env_overrides}
    command = [sys.executable, "-m", "accelerate.commands.launch", *engine, "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
               "--dynamo_backend", "no", str(script), *map(str, arguments)]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if expect_success:
        assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return finished
