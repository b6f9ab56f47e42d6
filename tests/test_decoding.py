"""decoding.complete: the one decode loop agrees with model.generate under the same draws; one EOS rule, one
token-accurate stop-string rule; the shared prefix and the compaction change no output; and its helpers (the top-p
draw, the KV cache keyword, the growing cache layer)."""
import inspect
import math

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import decoding
from conftest import build_tiny_model

TEXTS = ["What is 12 plus", "hello", "The quick brown fox jumps over the lazy dog"]


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    return tiny_tokenizer, build_tiny_model(tiny_tokenizer).eval()


def prompts_of(tokenizer, texts=TEXTS):
    return [tokenizer(text)["input_ids"] for text in texts]


class SameDraws(LogitsProcessor):
    """Makes model.generate's greedy search take the token decoding.sample draws from the same random stream (the
    scores become 0 there, -inf elsewhere), so model.generate is a reference for the decode loop."""

    def __init__(self, temperature, top_p, seed):
        self.temperature, self.top_p, self.generator = temperature, top_p, torch.Generator().manual_seed(seed)

    def __call__(self, input_ids, scores):
        uniform = torch.rand((scores.shape[0], 1), generator=self.generator)
        token = decoding.sample(scores, self.temperature, self.top_p, uniform)
        return torch.full_like(scores, -math.inf).scatter(-1, token[:, None], 0.0)


def hf_generate(model, tokenizer, prompts, max_new_tokens, seed=None, temperature=1.0, top_p=1.0):
    """model.generate's new tokens per row, up to and including its EOS (greedy if seed is None)."""
    ids, mask = decoding.left_pad(prompts, tokenizer.pad_token_id)
    processors = [] if seed is None else [SameDraws(temperature, top_p, seed)]
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         logits_processor=LogitsProcessorList(processors), pad_token_id=tokenizer.pad_token_id)
    eos = decoding.eos_token_ids(model, tokenizer)
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        end = next((j + 1 for j, token in enumerate(row) if token in eos), len(row))
        rows.append(row[:end])
    return rows


def complete(model, tokenizer, prompts, max_new_tokens, seed=None, **kwargs):
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return decoding.complete(model, tokenizer, prompts, max_new_tokens=max_new_tokens, generator=generator, **kwargs)


def test_greedy_completions_equal_model_generate(tiny):
    tokenizer, model = tiny
    prompts = prompts_of(tokenizer)
    got = complete(model, tokenizer, prompts, 24)
    assert [c.token_ids for c in got] == hf_generate(model, tokenizer, prompts, 24)
    assert [c.text for c in got] == [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in got]
    assert not any(c.finished for c in got)  # the random model never says EOS


def test_sampled_completions_equal_model_generate_with_the_same_draws(tiny):
    tokenizer, model = tiny
    prompts = prompts_of(tokenizer)
    got = complete(model, tokenizer, prompts, 24, seed=0, temperature=0.7, top_p=0.9)
    assert [c.token_ids for c in got] == hf_generate(model, tokenizer, prompts, 24, seed=0, temperature=0.7, top_p=0.9)


def test_sampled_completions_equal_model_generate_on_the_bundled_model(bundled_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir)
    model = AutoModelForCausalLM.from_pretrained(bundled_model_dir, dtype=torch.float32).eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
               for content in ["What is 7 times 8?", "Name a colour of the sky.", "Say hi."]]
    got = complete(model, tokenizer, prompts, 20, seed=0, temperature=0.7)
    assert [c.token_ids for c in got] == hf_generate(model, tokenizer, prompts, 20, seed=0, temperature=0.7)
    assert any(c.finished for c in got)  # (the premise: some row ends at <|im_end|> within 20 tokens)


def test_an_eos_listed_only_in_the_generation_config_ends_a_row(tiny_tokenizer):
    tokenizer, model = tiny_tokenizer, build_tiny_model(tiny_tokenizer).eval()
    prompts = prompts_of(tokenizer)
    free_run = complete(model, tokenizer, prompts, 24)
    eos = free_run[0].token_ids[3]  # pretend a token the first row says early is an EOS of the generation config
    model.generation_config.eos_token_id = [eos]
    got = complete(model, tokenizer, prompts, 24)
    first = free_run[0].token_ids.index(eos)
    assert got[0].finished and got[0].token_ids == free_run[0].token_ids[:first + 1]  # the EOS is kept
    assert got[0].text == tokenizer.decode(free_run[0].token_ids[:first], skip_special_tokens=True)  # not in the text
    assert [c.token_ids for c in got] == hf_generate(model, tokenizer, prompts, 24)


def test_a_stop_string_split_across_tokens_ends_the_row_at_the_token_completing_it(tiny):
    tokenizer, model = tiny
    prompts = prompts_of(tokenizer)
    free_run = complete(model, tokenizer, prompts, 24)[1]
    before, ending = (tokenizer.decode(free_run.token_ids[:n]) for n in (5, 6))
    stop = before[-1] + ending[len(before):][:1]  # the 5th token's last character and the 6th token's first
    assert stop not in before  # (the premise: the stop string is first complete at the 6th token)
    got = complete(model, tokenizer, prompts, 24, stop_strings=["never said", stop])[1]
    assert got.finished and got.token_ids == free_run.token_ids[:6]
    assert got.text == ending[:ending.index(stop)]  # cut just before the stop string


def test_a_shared_prefix_gives_what_each_prompt_alone_gives(tiny):
    tokenizer, model = tiny
    exemplars = tokenizer("The quick brown fox jumps over the lazy dog. " * 4)["input_ids"]
    prompts = [exemplars + prompt for prompt in prompts_of(tokenizer)]
    assert decoding.shared_prefix_length(prompts) >= decoding.MIN_SHARED_PREFIX  # (the premise)
    shared = complete(model, tokenizer, prompts, 12, seed=0, temperature=0.7, shared_prefix=True)
    plain = complete(model, tokenizer, prompts, 12, seed=0, temperature=0.7)
    assert [c.token_ids for c in shared] == [c.token_ids for c in plain]
    torch.testing.assert_close([c.logprobs for c in shared], [c.logprobs for c in plain])


def test_rows_leaving_the_batch_change_no_other_row(tiny_tokenizer):
    tokenizer, model = tiny_tokenizer, build_tiny_model(tiny_tokenizer).eval()
    prompts = prompts_of(tokenizer, TEXTS + ["a", "one two", "x y z"])
    free_run = complete(model, tokenizer, prompts, 16, seed=0, temperature=0.8, top_p=0.95)
    model.generation_config.eos_token_id = [free_run[0].token_ids[2], free_run[3].token_ids[6]]  # end rows early
    eos = decoding.eos_token_ids(model, tokenizer)

    def decode(compact):
        return decoding.decode_batch(model, tokenizer, prompts, 16, 0.8, 0.95, torch.Generator().manual_seed(0), eos,
                                     (), False, compact=compact)
    with torch.no_grad():
        compacted, lock_step = decode(True), decode(False)
    assert sorted(len(c.token_ids) for c in compacted)[0] < 16  # (the premise: some rows end early)
    assert [c.token_ids for c in compacted] == [c.token_ids for c in lock_step]
    torch.testing.assert_close([c.logprobs for c in compacted], [c.logprobs for c in lock_step])


def test_batches_of_any_size_give_the_same_completions(tiny):
    tokenizer, model = tiny
    prompts = prompts_of(tokenizer, TEXTS + ["a", "one two"])
    in_twos, all_at_once = (complete(model, tokenizer, prompts, 8, batch_size=size) for size in (2, 16))
    assert [(c.text, c.token_ids) for c in in_twos] == [(c.text, c.token_ids) for c in all_at_once]


def test_sampled_logprobs_equal_a_plain_forward(tiny):
    tokenizer, model = tiny
    prompt = prompts_of(tokenizer)[0]
    got = complete(model, tokenizer, [prompt], 12, seed=0, temperature=0.7, top_p=0.9)[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + got.token_ids])).logits[:, len(prompt) - 1:-1]
    expected = decoding.token_logprobs(logits, torch.tensor([got.token_ids]), 0.7)[0]
    torch.testing.assert_close(torch.tensor(got.logprobs), expected, atol=1e-4, rtol=0)


def test_sampling_follows_the_temperature_scaled_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).repeat(20000, 1)
    uniform = torch.rand((20000, 1), generator=torch.Generator().manual_seed(0))
    tokens = decoding.sample(logits, temperature=2.0, top_p=1.0, uniform=uniform)
    frequencies = torch.bincount(tokens, minlength=3) / len(tokens)
    torch.testing.assert_close(frequencies, torch.softmax(logits[0] / 2.0, -1), atol=0.015, rtol=0)


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    # probabilities 0.1, 0.2, 0.7: top_p 0.8 keeps {0.7, 0.2}; top_p 0.5 keeps only the 0.7 token
    logits = torch.tensor([[0.1, 0.2, 0.7]]).log().repeat(5000, 1)
    uniform = torch.rand((5000, 1), generator=torch.Generator().manual_seed(0))
    assert set(decoding.sample(logits, 1.0, 0.8, uniform).tolist()) == {1, 2}
    assert set(decoding.sample(logits, 1.0, 0.5, uniform).tolist()) == {2}
    # the nucleus first in the vocabulary: the tokens after it (probability 0) fill the end of the cumulative sum
    assert set(decoding.sample(logits.flip(-1), 1.0, 0.5, uniform).tolist()) == {0}


def test_temperature_zero_takes_the_argmax():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    assert decoding.sample(logits, 0.0, 1.0, None).tolist() == [1]


def test_the_cache_keyword_is_found_in_the_models_forward(tiny):
    _, model = tiny

    class Wrapper(torch.nn.Module):  # as rlvr's FSDP root unit wraps the model
        def __init__(self):
            super().__init__()
            self.model = model
    assert decoding.cache_keyword(model) in inspect.signature(model.forward).parameters
    assert decoding.cache_keyword(Wrapper()) == decoding.cache_keyword(model)


def test_a_forward_that_takes_no_known_cache_keyword_is_a_clear_error(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer)

    class RenamedCache(type(model)):
        def forward(self, input_ids=None, kv_cache=None, **kwargs):  # a cache keyword would land in **kwargs
            return super().forward(input_ids=input_ids, **kwargs)
    model.__class__ = RenamedCache
    with pytest.raises(TypeError, match="RenamedCache.forward takes neither"):
        decoding.cache_keyword(model)


def test_growing_cache_layer_holds_what_concatenation_would():
    layer, keys, values = decoding.GrowingLayer(capacity=3), [], []
    for step, new in enumerate([2, 1, 3, 1]):  # outgrows its capacity twice
        k, v = torch.randn(2, 1, new, 4), torch.randn(2, 1, new, 4)
        keys, values = keys + [k], values + [v]
        got_k, got_v = layer.update(k, v, step)
        assert torch.equal(got_k, torch.cat(keys, dim=2)) and torch.equal(got_v, torch.cat(values, dim=2))
    assert layer.get_seq_length() == 7
    layer.batch_repeat_interleave(2)
    assert torch.equal(layer.keys, torch.cat(keys, dim=2).repeat_interleave(2, dim=0))
    layer.batch_select_indices(torch.tensor([3, 0]))
    assert torch.equal(layer.values, torch.cat(values, dim=2)[[1, 0]])
