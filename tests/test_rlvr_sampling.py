"""rlvr's rollouts: decoding.complete's completions as the tensors the updates read, with the sampled log-probs
the training forward gives."""
import torch

import decoding
import rlvr
from conftest import build_tiny_model

TEXTS = ["What is 12 plus", "hello", "The quick brown fox jumps over the lazy dog"]


def test_a_rollout_holds_left_padded_prompts_and_right_padded_responses(tiny_tokenizer):
    tokenizer, model = tiny_tokenizer, build_tiny_model(tiny_tokenizer).eval()
    prompts = [tokenizer(text)["input_ids"] for text in TEXTS]
    free_run = decoding.complete(model, tokenizer, prompts, max_new_tokens=12)
    model.generation_config.eos_token_id = [free_run[1].token_ids[3]]  # row 1 ends at its 4th token
    completions = decoding.complete(model, tokenizer, prompts, max_new_tokens=12)
    rollout = rlvr.rollout_of(prompts, completions, tokenizer.pad_token_id, torch.device("cpu"))
    width = max(map(len, prompts))
    assert rollout.query_responses.shape == (3, width + 12) and rollout.responses.shape == (3, 12)
    assert rollout.stopped.tolist() == [c.finished for c in completions] and rollout.stopped[1]
    assert rollout.response_mask[1].tolist() == [1] * len(completions[1].token_ids) + [0] * (
        12 - len(completions[1].token_ids))
    assert (rollout.responses[1, len(completions[1].token_ids):] == tokenizer.pad_token_id).all()
    assert rollout.query_responses[0, width - len(prompts[0]):width].tolist() == prompts[0]


def test_sampled_logprobs_equal_the_training_forward(tiny_tokenizer):
    tokenizer, model = tiny_tokenizer, build_tiny_model(tiny_tokenizer).eval()
    prompts = [tokenizer(text)["input_ids"] for text in TEXTS]
    completions = decoding.complete(model, tokenizer, prompts, max_new_tokens=24, temperature=0.7, top_p=0.9,
                                    generator=torch.Generator().manual_seed(0))
    rollout = rlvr.rollout_of(prompts, completions, tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        logps, _ = rlvr.response_logprobs(model, rollout.query_responses, rollout.attention_mask,
                                          rollout.response_mask.shape[1], temperature=0.7)
    torch.testing.assert_close(logps * rollout.response_mask, rollout.logprobs, atol=1e-4, rtol=0)
