"""OPDTrainer's loss chunk size: capped so one chunk never holds more logits than TRL's vocabulary tile."""

import types

import torch

from trl_opd.trainers.opd_trainer import _OPDTrainerCore


def chunk_tokens(num_tokens, vocab, loss_chunk_size=1024, loss_vocab_size=None):
    trainer = types.SimpleNamespace(args=types.SimpleNamespace(loss_chunk_size=loss_chunk_size),
                                    _loss_vocab_size=loss_vocab_size)
    head = types.SimpleNamespace(weight=torch.empty(vocab, 1))
    return _OPDTrainerCore._loss_chunk_tokens(trainer, num_tokens, head)


def test_small_vocabulary_keeps_loss_chunk_size():
    assert chunk_tokens(128, 120) == 128  # one chunk, as before
    assert chunk_tokens(5000, 32768) == 1024
    assert chunk_tokens(100, 120, loss_chunk_size=5) == 5


def test_large_vocabulary_chunk_holds_no_more_logits_than_trl_tile():
    for num_tokens in (1, 7, 128, 1024, 4096, 20000):
        for vocab in (32769, 128256, 151936, 262144):
            tokens = chunk_tokens(num_tokens, vocab)
            assert 1 <= tokens <= 1024
            assert tokens == 1 or tokens * vocab <= min(num_tokens, 4096) * 32768
    assert chunk_tokens(128, 151936) == 27
    assert chunk_tokens(4096, 151936) == 883


def test_loss_vocab_size_is_used_when_known():
    # a padded LM head (more rows than the tokenizer) is sliced to the tokenizer's size in the loss
    assert chunk_tokens(128, 151936, loss_vocab_size=151669) == 128 * 32768 // 151669
