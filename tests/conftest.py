"""Tiny random decoders of every supported family, built inside the tests (no download)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 97
FFN = 64  # intermediate width of every tiny model: divisible by 1, 2, 4, 8, 16, 32


def _common(**kw):
    return dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, **kw)


def tiny_model(family: str, seed: int = 0):
    """A randomly initialised tiny causal LM of `family`, fp32, in eval mode."""
    import transformers as tf

    configs = {
        "llama": lambda: tf.LlamaConfig(**_common(intermediate_size=FFN, num_key_value_heads=2)),
        "llama-bias": lambda: tf.LlamaConfig(**_common(intermediate_size=FFN, num_key_value_heads=2, mlp_bias=True)),
        "mistral": lambda: tf.MistralConfig(**_common(intermediate_size=FFN, num_key_value_heads=2)),
        "qwen2": lambda: tf.Qwen2Config(**_common(intermediate_size=FFN, num_key_value_heads=2)),
        "qwen3": lambda: tf.Qwen3Config(**_common(intermediate_size=FFN, num_key_value_heads=2, head_dim=8)),
        "gemma": lambda: tf.GemmaConfig(**_common(intermediate_size=FFN, num_key_value_heads=2, head_dim=8)),
        "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                      n_inner=FFN, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**_common(intermediate_size=FFN)),
    }
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(configs[family]())
    # NOTE: HF initialises with std 0.02, which makes every FFN nearly linear and every test too easy;
    # larger weights give the activations real structure and the equivalence checks real numbers.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                p.normal_(0, 0.15)
    return model.eval()


FAMILIES = ["llama", "llama-bias", "mistral", "qwen2", "qwen3", "gemma", "gpt2", "gpt_neox"]


@pytest.fixture
def llama():
    return tiny_model("llama")


def token_batch(batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def tiny_tokenizer():
    """A character-level fast tokenizer with VOCAB entries (unknown characters map to [UNK])."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 32 + VOCAB - 2)] + ["\n"]
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[UNK]", eos_token="\n")


@pytest.fixture
def tiny_folder(tmp_path):
    """A dense tiny Llama with its tokenizer, saved as a transformers folder."""
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
