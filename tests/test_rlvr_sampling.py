"""rlvr's rollouts: decoding.complete's completions as the tensors the updates read, with the sampled log-probs
the training forward gives."""
import torch

import decoding
import infra
import rlvr
from conftest import build_tiny_model, plain_python_environment

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


def test_the_fsdp_policy_decodes_as_the_plain_model_and_stops_at_its_generation_configs_eos(tiny_tokenizer,
                                                                                           tmp_path):
    """infra.load_model reads generation_config.json (as from_pretrained does), and decoding.complete gathers the
    FSDP-sharded parameters once for the call."""
    from transformers import AutoModelForCausalLM

    tokenizer, prompts = tiny_tokenizer, [tiny_tokenizer(text)["input_ids"] for text in TEXTS]
    model = build_tiny_model(tokenizer).eval()
    free_run = decoding.complete(model, tokenizer, prompts, max_new_tokens=12)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, free_run[0].token_ids[3]]
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    expected = decoding.complete(AutoModelForCausalLM.from_pretrained(tmp_path), tokenizer, prompts, max_new_tokens=12)
    assert expected[0].finished  # (the premise: the generation config's second EOS ends row 0)
    with plain_python_environment():
        infra.init_distributed()
        try:
            policy = infra.load_model(str(tmp_path), rlvr.HFModel, device=torch.device("cpu"), rank=0,
                                      max_seq_length=128)
            got = decoding.complete(policy, tokenizer, prompts, max_new_tokens=12)
        finally:
            torch.distributed.destroy_process_group()
    assert [(c.token_ids, c.finished) for c in got] == [(c.token_ids, c.finished) for c in expected]
