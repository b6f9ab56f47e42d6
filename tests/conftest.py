"""Shared fixtures: a tiny tokenizer and Llama model built locally, and the bundled real model."""
import contextlib
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BUNDLED_MODEL = os.path.join(ROOT, ".cache", "models", "SmolLM2-135M-Instruct")
BENCHMARKS = os.path.join(ROOT, ".cache", "benchmarks")

# A ChatML template like SmolLM2's, so the "model's own template" path is exercised too.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ?",
    "What is 12 plus 30? The answer is 42. Write a poem about the sea, in lowercase letters.",
    "system user assistant <|user|> <|assistant|> <|system|> hello world, again and again.",
]


def pytest_configure(config):
    config.addinivalue_line("markers", "full: a slow matrix (every family, every kill point, 2 ranks): "
                                       "`make test-full` runs it (CI runs make test-full); `make test` leaves it out")


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab ~300) trained in milliseconds on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
                                        bos_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def build_tiny_model(tokenizer, seed=0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False)
    config = LlamaConfig(**{**settings, **overrides})
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny Llama + tokenizer directory, loadable with --model_name_or_path."""
    path = tmp_path_factory.mktemp("tiny_model")
    model = build_tiny_model(tiny_tokenizer)
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny Llama with its output embeddings tied to its input embeddings, as SmolLM2's and Llama-3.2's are."""
    path = tmp_path_factory.mktemp("tiny_tied_model")
    build_tiny_model(tiny_tokenizer, tie_word_embeddings=True).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def bundled_model_dir():
    if not os.path.exists(os.path.join(BUNDLED_MODEL, "model.safetensors")):
        pytest.fail(f"bundled model missing at {BUNDLED_MODEL}: run `python data/fetch_offline.py` (make test does)")
    return BUNDLED_MODEL


@pytest.fixture(scope="session")
def benchmarks_dir():
    if not os.path.exists(os.path.join(BENCHMARKS, "gsm8k.jsonl")):
        pytest.fail(f"benchmarks missing at {BENCHMARKS}: run `python data/fetch_offline.py` (make test does)")
    return BENCHMARKS


def free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_in_process(main, argv) -> None:
    """A stage's main() in this process, as `python stage.py ...` runs it (a process group of one)."""
    with plain_python_environment():
        main(argv)


@contextlib.contextmanager
def plain_python_environment():
    """The environment of `python stage.py`: no torchrun variables, a free MASTER_PORT; afterwards the
    variables are as they were, so that init_distributed's RANK and port are not inherited by a later
    test's subprocess (a demo stage then failed with EADDRINUSE, or found RANK but no MASTER_PORT)."""
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    previous = {name: os.environ.pop(name, None) for name in names}
    os.environ["MASTER_PORT"] = free_port()
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def read_metrics(output_dir) -> list[dict]:
    import json

    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
