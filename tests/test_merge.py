"""trl_opd.merge (MonoSoup, methods.md §12) against an independent numpy implementation, and its CLI."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from trl_opd.merge import main, monosoup, monosoup_tensor

EPS = 1e-12


def reference_monosoup_matrix(w0, w1, mode, energy):
    """§12.1 written out with numpy in float64 (loops over the spectrum instead of vectorised sums)."""
    w0, w1 = np.asarray(w0, dtype=np.float64), np.asarray(w1, dtype=np.float64)
    delta = w1 - w0
    if np.linalg.norm(delta) / (np.linalg.norm(w0) + EPS) < 1e-6:
        return w1
    matrix = delta.reshape(delta.shape[0], -1)
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    r = len(s)
    total = sum(x * x for x in s)
    if mode == "erank":
        p = [x / sum(s) for x in s]
        h = -sum(pi * math.log(pi + EPS) for pi in p)
        k = min(max(math.ceil(math.exp(h)), 1), r)
    else:
        k, running = r, 0.0
        for i, x in enumerate(s):
            running += x * x
            if running / total >= energy:
                k = i + 1
                break
    captured = sum(x * x for x in s[:k]) / total
    rho = (s[k] / (s[0] + EPS)) ** 2 if k < r else 0.0
    lam_low = min(max(rho + (1 - rho) * math.sqrt(max(1 - captured, 0.0)), 0.0), 1.0)
    high = sum(s[i] * np.outer(u[:, i], vt[i]) for i in range(k))
    low = matrix - high
    edited = (1 - lam_low) * high + lam_low * low
    return w0 + edited.reshape(delta.shape)


def random_pair(shape, update_rank, seed, scale=0.1):
    """A base weight and a tuned weight whose update has the given rank (plus decaying spectrum)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator, dtype=torch.float64)
    rows, cols = shape[0], int(np.prod(shape[1:]))
    left = torch.randn(rows, update_rank, generator=generator, dtype=torch.float64)
    right = torch.randn(update_rank, cols, generator=generator, dtype=torch.float64)
    decay = torch.tensor([0.6**i for i in range(update_rank)], dtype=torch.float64)
    return base, base + scale * ((left * decay) @ right).reshape(shape)


@pytest.mark.parametrize(
    "mode, energy", [("erank", 0.8), ("energy", 0.8), ("energy", 0.5), ("variance", 0.95)]
)
@pytest.mark.parametrize("shape, update_rank", [((12, 8), 8), ((8, 12), 3), ((6, 2, 3, 3), 6), ((10, 10), 1)])
def test_monosoup_tensor_matches_numpy(mode, energy, shape, update_rank):
    base, tuned = random_pair(shape, update_rank, seed=update_rank + len(shape))
    reference_mode = "energy" if mode == "variance" else mode
    expected = reference_monosoup_matrix(base.numpy(), tuned.numpy(), reference_mode, energy)
    got = monosoup_tensor(base, tuned, mode=mode, energy=energy)
    assert got.shape == tuned.shape and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-10)


def test_monosoup_actually_edits_and_moves_toward_base():
    base, tuned = random_pair((16, 16), 16, seed=3)
    soup = monosoup_tensor(base, tuned, mode="energy", energy=0.5)
    # The edit shrinks the low-energy part: the soup lies strictly between base and tuned in norm.
    assert 0 < torch.linalg.norm(soup - tuned) < torch.linalg.norm(tuned - base)
    assert torch.linalg.norm(soup - base) < torch.linalg.norm(tuned - base)


def test_monosoup_keeps_tuned_where_section_12_says_so():
    base, tuned = random_pair((6, 5), 5, seed=0)
    # energy = 1 keeps the full rank: lambda_low = 0 and the soup is the tuned weight.
    assert torch.allclose(monosoup_tensor(base, tuned, mode="energy", energy=1.0), tuned, atol=1e-12)
    tiny = base + 1e-9 * torch.randn_like(base)  # relative update < 1e-6
    assert monosoup_tensor(base, tiny) is tiny
    bias = torch.randn(5)
    assert monosoup_tensor(torch.zeros(5), bias) is bias
    counts = torch.arange(6).reshape(2, 3)
    assert monosoup_tensor(counts + 1, counts) is counts


def test_monosoup_state_dict_dtypes_ties_and_exclude():
    base_w, tuned_w = random_pair((10, 6), 6, seed=1)
    base_e, tuned_e = random_pair((20, 6), 6, seed=2)
    base = {"embed.weight": base_e.float(), "layer.weight": base_w.bfloat16(), "norm.weight": torch.ones(6)}
    base["lm_head.weight"] = base["embed.weight"]  # tied, as in a tied model's state_dict()
    tuned = {"embed.weight": tuned_e.float(), "layer.weight": tuned_w.bfloat16()}
    tuned["norm.weight"] = torch.rand(6)
    tuned["lm_head.weight"] = tuned["embed.weight"]
    merged = monosoup(base, tuned, mode="energy", energy=0.6)
    assert list(merged) == list(tuned)
    assert merged["layer.weight"].dtype == torch.bfloat16 and merged["embed.weight"].dtype == torch.float32
    assert merged["lm_head.weight"] is merged["embed.weight"]
    assert merged["norm.weight"] is tuned["norm.weight"]
    embeddings = base["embed.weight"].numpy(), tuned["embed.weight"].numpy()
    expected = reference_monosoup_matrix(*embeddings, "energy", 0.6)
    np.testing.assert_allclose(merged["embed.weight"].numpy(), expected, rtol=1e-4, atol=1e-5)
    assert not torch.equal(merged["layer.weight"], tuned["layer.weight"])
    excluded = monosoup(base, tuned, mode="energy", energy=0.6, exclude=["layer.*"])
    assert excluded["layer.weight"] is tuned["layer.weight"]


def test_monosoup_bad_input():
    base = {"a": torch.zeros(3, 3), "b": torch.zeros(3)}
    with pytest.raises(ValueError, match="different parameter names.*only in tuned: \\['c'\\]"):
        monosoup(base, {"a": torch.zeros(3, 3), "c": torch.zeros(3)})
    with pytest.raises(ValueError, match="differ in shape.*a: base \\(3, 3\\) vs tuned \\(3, 4\\)"):
        monosoup(base, {"a": torch.zeros(3, 4), "b": torch.zeros(3)})
    with pytest.raises(ValueError, match="mode='svd' is not supported"):
        monosoup(base, base, mode="svd")
    with pytest.raises(ValueError, match="energy must be in"):
        monosoup(base, base, mode="energy", energy=1.5)


# ---------------------------------------------------------------------------------------------------------
# Command line round trip on tiny models built in code
# ---------------------------------------------------------------------------------------------------------


def save_tiny_pair(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    texts = ["one plus two is three", "four minus one is three", "the answer is \\boxed{3}"] * 5
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config)
    base_dir, tuned_dir = tmp_path / "base", tmp_path / "tuned"
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(tuned_dir)  # no tokenizer here: the CLI falls back to the base's
    return base_dir, tuned_dir, len(tokenizer)


@pytest.mark.parametrize("mode_args", [[], ["--mode", "energy", "--energy", "0.5"]])
def test_cli_round_trip(tmp_path, mode_args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, tuned_dir, vocab = save_tiny_pair(tmp_path)
    out_dir = tmp_path / "soup"
    assert main([str(base_dir), str(tuned_dir), str(out_dir), *mode_args]) == 0
    assert (out_dir / "model.safetensors").exists()
    assert len(AutoTokenizer.from_pretrained(out_dir)) == vocab
    base = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(tuned_dir).state_dict()
    soup = AutoModelForCausalLM.from_pretrained(out_dir).state_dict()
    mode = "energy" if mode_args else "erank"
    energy = 0.5 if mode_args else 0.8
    edited = 0
    for name, weight in soup.items():
        if weight.dim() < 2:
            assert torch.equal(weight, tuned[name]), name
            continue
        expected = reference_monosoup_matrix(base[name].numpy(), tuned[name].numpy(), mode, energy)
        np.testing.assert_allclose(weight.numpy(), expected, rtol=1e-4, atol=1e-5, err_msg=name)
        edited += not torch.equal(weight, tuned[name])
    assert edited > 0
    assert torch.equal(soup["lm_head.weight"], soup["model.embed_tokens.weight"])


def test_cli_module_entry_point_and_bad_arguments(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "trl_opd.merge", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "BASE" in result.stdout.upper() and "--energy" in result.stdout
    with pytest.raises(SystemExit, match="energy must be in"):
        main(["a", "b", str(tmp_path / "out"), "--mode", "energy", "--energy", "2"])
    with pytest.raises(SystemExit):
        main(["a", "b", "c", "--mode", "svd"])


def test_cli_refuses_a_tuned_model_with_other_shapes(tmp_path):
    """A tuned model that is not a fine-tune of the base (another width) ends with a message, not a traceback."""
    from tiny import save_tiny, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    base_dir = save_tiny(tmp_path / "base", tokenizer, hidden=32)
    other_dir = save_tiny(tmp_path / "other", tokenizer, hidden=48)
    with pytest.raises(SystemExit, match=r"trl-opd-merge: base and tuned parameters differ in shape.*base \(32, 32\) "
                                         r"vs tuned \(48, 48\)"):
        main([base_dir, other_dir, str(tmp_path / "out")])
    assert not (tmp_path / "out" / "model.safetensors").exists()
