"""rlvr.Sampler: the batched static-cache decode loop agrees with model.generate and with the training forward;
and the infra sampling helpers it uses (left-padded prompts, the KV cache keyword, the top-p draw)."""
import inspect
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch._dynamo.utils import counters
from transformers import LogitsProcessor, LogitsProcessorList

import infra
import rlvr
from conftest import build_tiny_model, build_tiny_tokenizer

TEXTS = ["What is 12 plus", "hello", "The quick brown fox jumps over the lazy dog"]


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    return tiny_tokenizer, build_tiny_model(tiny_tokenizer).eval()


def prompts_of(tokenizer, texts=TEXTS):
    return [tokenizer(text)["input_ids"] for text in texts]


class SameDraws(LogitsProcessor):
    """Makes model.generate's greedy search take the token infra.sample_top_p draws from the same random stream (the
    scores become 0 there, -inf elsewhere), so model.generate is a reference for the sampler's decode loop."""

    def __init__(self, temperature, top_p, seed):
        self.temperature, self.top_p, self.generator = temperature, top_p, torch.Generator().manual_seed(seed)

    def __call__(self, input_ids, scores):
        token = infra.sample_top_p(scores, self.temperature, self.top_p, self.generator)
        return torch.full_like(scores, -math.inf).scatter(-1, token[:, None], 0.0)


def hf_sampled(model, tokenizer, prompts, max_new_tokens, eos_token_id, seed, temperature=1.0, top_p=1.0):
    ids, mask = infra.collate_prompts(prompts, tokenizer.pad_token_id)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         logits_processor=LogitsProcessorList([SameDraws(temperature, top_p, seed)]),
                         eos_token_id=eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return out[:, ids.shape[1]:]


def sample(sampler, tokenizer, prompts, seed, eos_token_id=None, temperature=1.0, top_p=1.0, **kwargs):
    eos_token_id = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    return sampler.generate(prompts, temperature, top_p, eos_token_id, tokenizer.pad_token_id,
                            tokenizer=tokenizer, generator=torch.Generator().manual_seed(seed), **kwargs)


def assert_same_responses(rollout, expected, pad_token_id):
    """model.generate stops at the step every row is done, the sampler at most CHECK_DONE_EVERY - 1 steps later."""
    length = expected.shape[1]
    assert length <= rollout.responses.shape[1] < length + rlvr.Sampler.CHECK_DONE_EVERY
    assert torch.equal(rollout.responses[:, :length], expected)
    assert (rollout.responses[:, length:] == pad_token_id).all()


def test_sampled_output_equals_model_generate_with_the_same_draws(tiny):
    tokenizer, model = tiny
    prompts = prompts_of(tokenizer)
    rollout = sample(rlvr.Sampler(model, max_prompt_length=32, max_new_tokens=24), tokenizer, prompts, seed=0,
                     temperature=0.7, top_p=0.9)
    expected = hf_sampled(model, tokenizer, prompts, 24, tokenizer.eos_token_id, seed=0, temperature=0.7, top_p=0.9)
    assert_same_responses(rollout, expected, tokenizer.pad_token_id)
    assert not rollout.stopped.any() and rollout.response_mask.all()  # the random model never says EOS


def test_a_large_cache_attends_only_to_its_filled_part_and_gives_the_same_output(tiny):
    tokenizer, model = tiny
    prompts = prompts_of(tokenizer)  # at most 10 tokens: 140 new ones fill 150 of 2140 slots
    sampler = rlvr.Sampler(model, max_prompt_length=2000, max_new_tokens=140)
    expected = hf_sampled(model, tokenizer, prompts, 140, tokenizer.eos_token_id, seed=0)
    for _ in range(2):  # the second rollout reuses the views, and its prefill attends to 128 slots too
        assert_same_responses(sample(sampler, tokenizer, prompts, seed=0), expected, tokenizer.pad_token_id)
        assert set(sampler.views) == {2140, 128, 256}  # powers of two covering the filled slots, and the whole
        assert sampler.cache.layers[0].keys.shape[2] == 256


def test_a_reused_cache_gives_what_a_fresh_one_gives_and_is_cleared_like_reset(tiny):
    tokenizer, model = tiny
    long_prompts, short_prompts = prompts_of(tokenizer), prompts_of(tokenizer, ["a", "What is", "hello"])
    sampler = rlvr.Sampler(model, max_prompt_length=32, max_new_tokens=12)
    sample(sampler, tokenizer, long_prompts, seed=1)  # fills more slots than the next rollout
    reused = sample(sampler, tokenizer, short_prompts, seed=2)
    fresh = sample(rlvr.Sampler(model, max_prompt_length=32, max_new_tokens=12), tokenizer, short_prompts, seed=2)
    assert torch.equal(reused.responses, fresh.responses) and torch.equal(reused.logprobs, fresh.logprobs)
    sampler._clear_cache()  # what the next rollout starts from: StaticCache.reset()'s state, all zeros
    for layer in sampler.cache.layers:
        assert layer.keys.count_nonzero() == layer.values.count_nonzero() == layer.cumulative_length == 0


def test_the_cache_keyword_is_found_in_the_models_forward(tiny):
    _, model = tiny
    assert infra.cache_keyword(model) in inspect.signature(model.forward).parameters
    assert infra.cache_keyword(rlvr.HFModel(model)) == infra.cache_keyword(model)  # the FSDP root wraps the model


def test_a_forward_that_takes_no_known_cache_keyword_is_a_clear_error(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer)

    class RenamedCache(type(model)):
        def forward(self, input_ids=None, kv_cache=None, **kwargs):  # a cache keyword would land in **kwargs
            return super().forward(input_ids=input_ids, **kwargs)
    model.__class__ = RenamedCache
    with pytest.raises(TypeError, match="RenamedCache.forward takes neither"):
        infra.cache_keyword(model)


def test_compiled_decode_step_gives_the_same_output(tiny):
    """The default on one GPU (torch.compile, CUDA graphs there); on CPU this checks the compiled graph."""
    tokenizer, model = tiny
    prompts = prompts_of(tokenizer)
    eager = sample(rlvr.Sampler(model, max_prompt_length=32, max_new_tokens=12), tokenizer, prompts, seed=0)
    compiled = rlvr.Sampler(model, max_prompt_length=32, max_new_tokens=12, compile_decode=True)
    torch._dynamo.reset()
    counters.clear()
    for _ in range(2):  # the second call reuses the compiled step and the cache
        rollout = sample(compiled, tokenizer, prompts, seed=0)
        assert torch.equal(rollout.responses, eager.responses)
        torch.testing.assert_close(rollout.logprobs, eager.logprobs, atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1  # one graph for every step: no recompiling per position


def test_rows_stop_at_eos_and_are_padded_after_it(tiny):
    tokenizer, model = tiny
    prompts = prompts_of(tokenizer)
    free_run = sample(rlvr.Sampler(model, 32, 24), tokenizer, prompts, seed=0)
    eos = free_run.responses[0, 3].item()  # pretend a token the first row draws early is EOS
    rollout = sample(rlvr.Sampler(model, 32, 24), tokenizer, prompts, seed=0, eos_token_id=eos)
    expected = hf_sampled(model, tokenizer, prompts, 24, eos, seed=0)
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
    tokens = infra.sample_top_p(logits, temperature=2.0, top_p=1.0, generator=generator)
    frequencies = torch.bincount(tokens, minlength=3) / len(tokens)
    torch.testing.assert_close(frequencies, torch.softmax(logits[0] / 2.0, -1), atol=0.015, rtol=0)


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    # probabilities 0.1, 0.2, 0.7: top_p 0.8 keeps {0.7, 0.2}; top_p 0.5 keeps only the 0.7 token
    logits = torch.tensor([[0.1, 0.2, 0.7]]).log().repeat(5000, 1)
    generator = torch.Generator().manual_seed(0)
    assert set(infra.sample_top_p(logits, 1.0, 0.8, generator).tolist()) == {1, 2}
    assert set(infra.sample_top_p(logits, 1.0, 0.5, generator).tolist()) == {2}
    # the nucleus first in the vocabulary: the tokens after it (probability 0) fill the end of the cumulative sum
    assert set(infra.sample_top_p(logits.flip(-1), 1.0, 0.5, generator).tolist()) == {0}


def test_stop_strings_end_a_row(tiny):
    tokenizer, model = tiny
    prompts = prompts_of(tokenizer)
    free_run = sample(rlvr.Sampler(model, 32, 24), tokenizer, prompts, seed=0)
    stop = tokenizer.decode(free_run.responses[1, 4:6])  # a string row 1 produces at its 6th token
    rollout = sample(rlvr.Sampler(model, 32, 24), tokenizer, prompts, seed=0, stop_strings=[stop])
    row = rollout.responses[1][rollout.response_mask[1].bool()]
    assert rollout.stopped[1] and tokenizer.decode(row).endswith(stop)
    assert stop not in tokenizer.decode(row[:-1])


def test_sampled_output_equals_model_generate_on_the_bundled_model(bundled_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir)
    model = AutoModelForCausalLM.from_pretrained(bundled_model_dir, dtype=torch.float32).eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
               for content in ["What is 7 times 8?", "Name a colour of the sky."]]
    rollout = sample(rlvr.Sampler(model, 64, 20), tokenizer, prompts, seed=0, temperature=0.7)
    expected = hf_sampled(model, tokenizer, prompts, 20, tokenizer.eos_token_id, seed=0, temperature=0.7)
    assert_same_responses(rollout, expected, tokenizer.pad_token_id)


def _lock_step_worker(rank, port, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer).eval()
    prompts = [tokenizer(TEXTS[rank])["input_ids"]]
    free_run = sample(rlvr.Sampler(model, 32, 16), tokenizer, prompts, seed=rank, eos_token_id=-1)
    # rank 0 meets its "EOS" within 2 steps, rank 1 never: both must run all 16 steps, and neither may hang
    eos = free_run.responses[0, 1].item() if rank == 0 else -1
    rollout = sample(rlvr.Sampler(model, 32, 16), tokenizer, prompts, seed=rank, eos_token_id=eos)
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
