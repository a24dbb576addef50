"""The objective's loss chunk size: capped so one chunk never holds more logits than TRL's vocabulary tile."""

import torch

from trl_opd.losses import OutputHead
from trl_opd.objective import ChunkPolicy


def chunk_tokens(num_tokens, vocab, loss_chunk_size=1024, loss_vocab_size=None):
    head = OutputHead(torch.empty(vocab, 1), vocab_size=loss_vocab_size)  # the width the loss compares
    return ChunkPolicy(loss_chunk_size=loss_chunk_size).loss_tokens(num_tokens, head.width)


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
