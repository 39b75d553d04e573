"""Shared test helpers: tiny random models built locally (no hub), fixed seeds, fp32 on CPU."""

from __future__ import annotations

import pytest
import torch

from dha.families import config_from_hf, weights_from_hf
from dha.transforms import build

# Tiny test models are dominated by per-op overhead, which a second thread only adds to (and on a
# shared machine, thread contention slows them 10x). Subprocess tests set their own threads.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip, saying why, where torch sees no GPU (scripts/gpu_check.sh runs them on one)."""
    if torch.cuda.is_available():
        return
    why = "needs a CUDA GPU: torch.cuda.is_available() is False here (run scripts/gpu_check.sh on a machine with one)"
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(pytest.mark.skip(reason=why))


def tiny_llama_hf(num_heads=6, num_kv_heads=6, bias=False, tie=False, layers=2, seed=0, **overrides):
    """A random Hugging Face LlamaForCausalLM small enough for tests (hidden 48, head dim 8)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        **{
            "vocab_size": 97,
            "hidden_size": 48,
            "intermediate_size": 64,
            "num_hidden_layers": layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
            "head_dim": 8,
            "max_position_embeddings": 256,
            "attention_bias": bias,
            "tie_word_embeddings": tie,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            **overrides,
        }
    )
    model = LlamaForCausalLM(config).eval()
    # Random init leaves biases and norm weights at 0/1; perturb them so they are really tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def ours_from_hf(hf_model):
    """Our Transformer holding the HF model's weights (through the family table)."""
    cfg = config_from_hf(hf_model.config)
    return build(cfg, weights_from_hf(hf_model.state_dict(), cfg)).eval()


@pytest.fixture
def one_thread():
    """One torch thread (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny models gain
    nothing from intra-op threads, and on a busy 2-core machine OpenMP's spinning threads make
    each step 10-100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_pair():
    """(hf_model, our_model) for a 6-head MHA tiny LLaMA."""
    hf = tiny_llama_hf()
    return hf, ours_from_hf(hf)


def random_ids(batch=2, length=16, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


WORDS = (
    "the quick brown fox jumps over a lazy dog while seven small birds sing about rivers mountains "
    "and old towns under grey skies where people walk slowly to markets selling bread fish apples"
).split()


def save_tiny_source(path: str, model) -> str:
    """Save `model` as a native checkpoint with a word-level tokenizer over WORDS (built here, no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dha.checkpoint import Loaded, save

    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(dict.fromkeys(WORDS))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")
    save(path, Loaded(model, tokenizer, "tiny", "native"))
    return path


def text_file(path: str, documents: int = 40, words: int = 60, seed: int = 0) -> str:
    """Random documents of WORDS separated by blank lines."""
    g = torch.Generator().manual_seed(seed)
    docs = [
        " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (words,), generator=g).tolist())
        for _ in range(documents)
    ]
    with open(path, "w") as f:
        f.write("\n\n".join(docs) + "\n")
    return path


def byte_bpe_tokenizer(digits: bool = False, vocab_size: int = 300):
    """A GPT-2-style byte-level BPE tokenizer trained here on WORDS (no hub): the kind llama.cpp's
    `gpt2` tokenizer reads. digits=True splits every digit first, as SmolLM2's does (llama.cpp `smollm`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) if digits else byte_level
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator([" ".join(WORDS)] * 5 + ["0123456789 12 345 Hello, World!"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|endoftext|>")


def kill_when(p, path: str) -> None:
    """SIGKILL the child process `p` as soon as `path` exists (it must appear within 180 s)."""
    import os
    import signal
    import time

    deadline = time.time() + 180
    while not os.path.exists(path) and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert os.path.exists(path), p.stderr.read().decode() if p.poll() is not None else "timeout"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL


@pytest.fixture
def cli_setup(tmp_path, monkeypatch):
    """(tiny 6-head LLaMA source with a tokenizer, a text file, the test's directory), for the CLI:
    a private token cache, and no torchrun variables from the environment."""
    monkeypatch.setenv("DHA_CACHE", str(tmp_path / "cache"))
    for name in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    src = save_tiny_source(str(tmp_path / "tiny"), ours_from_hf(tiny_llama_hf()))
    return src, text_file(str(tmp_path / "data.txt")), tmp_path
