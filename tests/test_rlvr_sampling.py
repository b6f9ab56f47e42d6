"""rlvr.Sampler: the batched static-cache decode loop agrees with model.generate and with the training forward."""
import inspect
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch._dynamo.utils import counters

import data_mix
import rlvr
from conftest import build_tiny_model, build_tiny_tokenizer

TEXTS = ["What is 12 plus", "hello", "The quick brown fox jumps over the lazy dog"]


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    return tiny_tokenizer, build_tiny_model(tiny_tokenizer).eval()


def prompts_of(tokenizer, texts=TEXTS):
    return [tokenizer(text)["input_ids"] for text in texts]


def hf_greedy(model, tokenizer, prompts, max_new_tokens, eos_token_id):
    ids, mask = data_mix.collate_prompts(prompts, tokenizer.pad_token_id)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return out[:, ids.shape[1]:]


def test_greedy_output_equals_model_generate(tiny):
    tokenizer, model = tiny
    prompts = prompts_of(tokenizer)
    rollout = rlvr.Sampler(model, max_prompt_length=32, max_new_tokens=24).generate(
        prompts, temperature=0, top_p=1.0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(rollout.responses, hf_greedy(model, tokenizer, prompts, 24, tokenizer.eos_token_id))
    assert not rollout.stopped.any() and rollout.response_mask.all()  # the random model never says EOS


def test_a_large_cache_attends_only_to_its_filled_part_and_gives_the_same_output(tiny):
    tokenizer, model = tiny
    prompts = prompts_of(tokenizer)  # at most 10 tokens: 140 new ones fill 150 of 2140 slots
    sampler = rlvr.Sampler(model, max_prompt_length=2000, max_new_tokens=140)
    expected = hf_greedy(model, tokenizer, prompts, 140, tokenizer.eos_token_id)
    for _ in range(2):  # the second rollout reuses the views, and its prefill attends to 128 slots too
        rollout = sampler.generate(prompts, 0, 1.0, tokenizer.eos_token_id, tokenizer.pad_token_id)
        assert torch.equal(rollout.responses, expected)
        assert set(sampler.views) == {2140, 128, 256}  # powers of two covering the filled slots, and the whole
        assert sampler.cache.layers[0].keys.shape[2] == 256


def test_the_cache_keyword_is_found_in_the_models_forward(tiny):
    _, model = tiny
    assert rlvr.cache_keyword(model) in inspect.signature(model.forward).parameters
    assert rlvr.cache_keyword(rlvr.HFModel(model)) == rlvr.cache_keyword(model)  # the FSDP root wraps the model


def test_compiled_decode_step_gives_the_same_greedy_output(tiny):
    """The default on one GPU (torch.compile, CUDA graphs there); on CPU this checks the compiled graph."""
    tokenizer, model = tiny
    prompts = prompts_of(tokenizer)
    kwargs = dict(temperature=0, top_p=1.0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    eager = rlvr.Sampler(model, max_prompt_length=32, max_new_tokens=12).generate(prompts, **kwargs)
    compiled = rlvr.Sampler(model, max_prompt_length=32, max_new_tokens=12, compile_decode=True)
    torch._dynamo.reset()
    counters.clear()
    for _ in range(2):  # the second call reuses the compiled step and the cache
        rollout = compiled.generate(prompts, **kwargs)
        assert torch.equal(rollout.responses, eager.responses)
        torch.testing.assert_close(rollout.logprobs, eager.logprobs, atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1  # one graph for every step: no recompiling per position


def test_rows_stop_at_eos_and_are_padded_after_it(tiny):
    tokenizer, model = tiny
    prompts = prompts_of(tokenizer)
    free_run = rlvr.Sampler(model, 32, 24).generate(prompts, 0, 1.0, tokenizer.eos_token_id, tokenizer.pad_token_id)
    eos = free_run.responses[0, 3].item()  # pretend a token the first row emits early is EOS
    rollout = rlvr.Sampler(model, 32, 24).generate(prompts, 0, 1.0, eos, tokenizer.pad_token_id)
    expected = hf_greedy(model, tokenizer, prompts, 24, eos)
    assert torch.equal(rollout.responses, expected[:, :rollout.responses.shape[1]])
    first_eos = (rollout.responses[0] == eos).nonzero()[0].item()
    assert rollout.stopped[0] and rollout.response_mask[0].tolist() == [1] * (first_eos + 1) + [0] * (
        rollout.responses.shape[1] - first_eos - 1)
    assert (rollout.responses[0, first_eos + 1:] == tokenizer.pad_token_id).all()
    assert (rollout.logprobs[0, first_eos + 1:] == 0).all()


def test_sampled_logprobs_equal_the_training_forward(tiny):
    tokenizer, model = tiny
    generator = torch.Generator().manual_seed(0)
    rollout = rlvr.Sampler(model, 32, 24).generate(prompts_of(tokenizer), temperature=0.7, top_p=0.9,
                                                   eos_token_id=tokenizer.eos_token_id,
                                                   pad_token_id=tokenizer.pad_token_id, generator=generator)
    logps, _ = rlvr.response_logprobs(model, rollout.query_responses, rollout.attention_mask,
                                      rollout.response_mask.shape[1], temperature=0.7)
    logps = logps * rollout.response_mask
    torch.testing.assert_close(logps, rollout.logprobs, atol=1e-4, rtol=0)


def test_sampling_follows_the_temperature_scaled_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).repeat(20000, 1)
    generator = torch.Generator().manual_seed(0)
    tokens = rlvr.next_token(logits, temperature=2.0, top_p=1.0, generator=generator)
    frequencies = torch.bincount(tokens, minlength=3) / len(tokens)
    torch.testing.assert_close(frequencies, torch.softmax(logits[0] / 2.0, -1), atol=0.015, rtol=0)


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    # probabilities 0.1, 0.2, 0.7: top_p 0.8 keeps {0.7, 0.2}; top_p 0.5 keeps only the 0.7 token
    logits = torch.tensor([[0.1, 0.2, 0.7]]).log().repeat(5000, 1)
    generator = torch.Generator().manual_seed(0)
    assert set(rlvr.next_token(logits, 1.0, 0.8, generator).tolist()) == {1, 2}
    assert set(rlvr.next_token(logits, 1.0, 0.5, generator).tolist()) == {2}


def test_stop_strings_end_a_row(tiny):
    tokenizer, model = tiny
    prompts = prompts_of(tokenizer)
    free_run = rlvr.Sampler(model, 32, 24).generate(prompts, 0, 1.0, tokenizer.eos_token_id, tokenizer.pad_token_id)
    stop = tokenizer.decode(free_run.responses[1, 4:6])  # a string row 1 produces at its 6th token
    rollout = rlvr.Sampler(model, 32, 24).generate(prompts, 0, 1.0, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                                   stop_strings=[stop], tokenizer=tokenizer)
    row = rollout.responses[1][rollout.response_mask[1].bool()]
    assert rollout.stopped[1] and tokenizer.decode(row).endswith(stop)
    assert stop not in tokenizer.decode(row[:-1])


def test_greedy_output_equals_model_generate_on_the_bundled_model(bundled_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir)
    model = AutoModelForCausalLM.from_pretrained(bundled_model_dir, dtype=torch.float32).eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
               for content in ["What is 7 times 8?", "Name a colour of the sky."]]
    rollout = rlvr.Sampler(model, 64, 20).generate(prompts, 0, 1.0, tokenizer.eos_token_id, tokenizer.pad_token_id)
    expected = hf_greedy(model, tokenizer, prompts, 20, tokenizer.eos_token_id)
    assert torch.equal(rollout.responses, expected[:, :rollout.responses.shape[1]])


def _lock_step_worker(rank, port, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer).eval()
    prompts = [tokenizer(TEXTS[rank])["input_ids"]]
    free_run = rlvr.Sampler(model, 32, 16).generate(prompts, 0, 1.0, -1, tokenizer.pad_token_id)
    # rank 0 meets its "EOS" within 2 steps, rank 1 never: both must run all 16 steps, and neither may hang
    eos = free_run.responses[0, 1].item() if rank == 0 else -1
    rollout = rlvr.Sampler(model, 32, 16).generate(prompts, 0, 1.0, eos, tokenizer.pad_token_id)
    expected_length = (free_run.responses[0] == eos).nonzero()[0].item() + 1 if rank == 0 else 16
    results[rank] = (rollout.responses.shape[1], rollout.response_mask.sum().item(), expected_length)
    dist.destroy_process_group()


def test_ranks_decode_in_lock_step_until_every_rank_is_done():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_lock_step_worker, args=(port, results), nprocs=2, join=True)
    assert results[0][0] == results[1][0] == 16
    assert results[0][1] == results[0][2] <= 2 and results[1][1] == 16
