"""Makes a tiny Llama for the real SGLang engine on CPU: seeded random weights, a byte-level BPE tokenizer
trained here on a few paragraphs, and a chat template. Nothing is downloaded and no weights are committed.

Run with the SGLang CPU venv's python (it needs torch, transformers and tokenizers):
    <sglang-cpu python> tests/sglang/tiny_model.py OUT_DIR
Prints OUT_DIR. Same seed, same files: a greedy answer is the same on every run and every TP size.

Sizes (../shared/SGLANG-CPU.md): hidden 64, intermediate 128, 2 layers, 4 attention heads and 2 KV heads
of 16 dims (divisible by TP 1 and 2), bf16 safetensors, ~150k parameters.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

SEED = 1234
VOCAB = 512
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TEXT = [
    "SGLang is a fast serving framework for large language models and vision language models.",
    "A group of nodes forms one server: every node runs one rank, and rank zero serves HTTP.",
    "The router sends each request to a healthy group; when a member dies the group restarts together.",
    "Consul keeps the keys, the sessions and the services; the supervisor watches its engine.",
    "Hello! How are you today? I am fine, thank you. What is the capital of France? Paris.",
    "The quick brown fox jumps over the lazy dog. One two three four five six seven eight nine ten.",
]


def make(out: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    special = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TEXT * 8, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", pad_token="</s>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False, torch_dtype="bfloat16")
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    (out / "sglang-fleet-test-model.json").write_text(json.dumps({"seed": SEED, "made_by": __file__}) + "\n")
    return out


if __name__ == "__main__":
    print(make(Path(sys.argv[1])))
