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
    config.addinivalue_line("markers", "full: a slow matrix (every family, every kill point, 2 ranks) or a test over "
                                       "~7 s on 2 cores: `make test-full` runs it (CI runs make test-full); "
                                       "`make test` leaves it out")


# The tests over ~7 s on 2 idle cores (pytest --durations, 2026-12-07), in `make test-full` only: runs of the
# bundled model, several processes (torchrun, two nodes, ranks), or kills. `make test` keeps a fast test of each
# behaviour where one exists (e.g. the kill test's SFT case, the per-stage bitwise resume).
SLOW = {
    "test_rlvr_bundled.py::test_a_short_grpo_run_raises_the_training_reward_on_arithmetic",
    "test_sft.py::test_compiled_decoder_layers_give_the_eager_loss_and_gradients",
    "test_checkpoints.py::test_two_node_launch_trains_like_one_launch_and_dies_with_either_node",
    "test_dpo_bundled.py::test_short_run_raises_heldout_preference_accuracy_and_margin",
    "test_demo.py::test_demo_runs_every_stage_and_writes_the_report",
    "test_eval_run.py::test_bundled_model_on_20_gsm8k_and_20_ifeval",
    "test_checkpoints.py::test_the_bundled_tied_model_checkpoints_and_resumes_bitwise",
    "test_dpo_run.py::test_gradient_is_the_same_for_every_micro_batch_split_and_rank_count",
    "test_sft.py::test_a_few_steps_lower_the_bundled_models_loss",
    "test_rlvr_train.py::test_two_gloo_ranks_split_the_prompts_and_finish_grpo_and_ppo",
    "test_packed_batches.py::test_weights_after_one_step_are_the_same_with_and_without_a_token_budget",
    "test_checkpoints.py::test_a_run_resumed_on_another_number_of_ranks_loads_its_state_bitwise_and_continues_the_"
    "same_curve",
    "test_eval_run.py::test_ranks_split_the_examples_and_rank_0_gathers_them_all",
    "test_checkpoints.py::test_two_ranks_each_read_their_own_shard_and_stop_together_where_their_files_differ",
    "test_decoding.py::test_sampled_completions_equal_model_generate_on_the_bundled_model",
    "test_invalid_input.py::test_a_user_error_under_torchrun_is_said_once",
    "test_invalid_input.py::test_a_user_error_on_the_command_line_is_one_line_and_a_failed_exit",
    "test_synth.py::test_a_kill_mid_file_then_a_rerun_writes_exactly_the_uninterrupted_output",
    "test_checkpoints.py::test_killing_the_torchrun_launcher_also_ends_its_workers",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.split("[")[0].removeprefix("tests/") in SLOW:
            item.add_marker(pytest.mark.full)


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
