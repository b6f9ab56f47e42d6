"""The architecture matrix: every stage trains exactly the model it loaded, on tiny random-weight models of
the families users bring, built from transformers' own config classes.

The initializer range is large (0.2) so a skipped soft-cap or logit scale shows far above fp32 noise. The
reference values come from Hugging Face's own forward, with labels built here, not by data_mix."""
import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer

import decoding
import dpo
import eval as evaluation
import infra
import modeling
import rlvr
import sft
from conftest import build_tiny_tokenizer, plain_python_environment, read_metrics, run_in_process

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512, initializer_range=0.2, tie_word_embeddings=False)
MOE = dict(num_experts_per_tok=2)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
            "original_max_position_embeddings": 128}  # the stages' --max_seq_length: see the refusal test below
FAMILIES = {  # name: (config class, settings over SIZES); sliding windows of 8 tokens are shorter than the prompts
    "llama": ("LlamaConfig", {}),
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "llama3_rope": ("LlamaConfig", dict(rope_parameters=LLAMA3_ROPE)),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", dict(head_dim=16)),
    "mistral": ("MistralConfig", dict(sliding_window=8)),
    "phi3_longrope": ("Phi3Config", dict(num_key_value_heads=4, original_max_position_embeddings=128,
                                         rope_parameters=LONGROPE)),
    "olmo2": ("Olmo2Config", {}),
    "olmo3": ("Olmo3Config", dict(num_hidden_layers=4, sliding_window=8)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=8, final_logit_softcapping=3.0,
                                    attn_logit_softcapping=5.0, tie_word_embeddings=True)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=8, num_hidden_layers=3, sliding_window_pattern=2,
                                        tie_word_embeddings=True)),
    "gemma3_multimodal": ("Gemma3Config", None),  # Gemma3ForConditionalGeneration around the gemma3 text model
    "granite": ("GraniteConfig", dict(logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5,
                                      attention_multiplier=0.3)),
    "cohere": ("CohereConfig", dict(logit_scale=0.25, tie_word_embeddings=True)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, **MOE)),
    "olmoe": ("OlmoeConfig", dict(num_experts=4, **MOE)),
}
CONVERTED_ON_LOAD = {"gemma3_multimodal", "mixtral", "olmoe"}  # their checkpoint keys: renamed, experts fused
CONVERSATION = [{"role": "user", "content": "What is 12 plus 30? Write a poem about the sea."},
                {"role": "assistant", "content": "The answer is 42. hello world, again and again."}]
REJECTED = {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."}


def build_config(name, tokenizer):
    class_name, settings = FAMILIES[name]
    ids = dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
               bos_token_id=tokenizer.bos_token_id)
    if settings is None:  # the multimodal wrapper: a tiny SigLIP tower in front of the gemma3 text model
        text = transformers.Gemma3TextConfig(**{**SIZES, **FAMILIES["gemma3"][1], **ids})
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                      patch_size=14)
        return transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision, mm_tokens_per_image=4,
                                         image_token_index=3, boi_token_index=1, eoi_token_index=2, **ids)
    return getattr(transformers, class_name)(**{**SIZES, **settings, **ids})


def make_family(name, path):
    """A saved tiny model of one family and its SFT, preference and RLVR data files."""
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    model_dir = str(path / "model")
    AutoModelForCausalLM.from_config(build_config(name, tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    files = {"sft": path / "sft.jsonl", "dpo": path / "dpo.jsonl", "rlvr": path / "rlvr.jsonl"}
    with open(files["sft"], "w") as f:
        f.writelines(json.dumps({"messages": CONVERSATION}) + "\n" for _ in range(2))
    with open(files["dpo"], "w") as f:
        f.writelines(json.dumps({"chosen": CONVERSATION, "rejected": [CONVERSATION[0], REJECTED]}) + "\n"
                     for _ in range(2))
    with open(files["rlvr"], "w") as f:
        f.writelines(json.dumps({"messages": CONVERSATION[:1], "ground_truth": "42", "dataset": "gsm8k"}) + "\n"
                     for _ in range(2))
    return {"name": name, "model_dir": model_dir, "path": path, "files": files}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """One family's model and data; its stage runs are made once and checked by several tests."""
    return make_family(request.param, tmp_path_factory.mktemp(request.param))


def stage_run(family, stage, *flags):
    """One optimizer step of a stage on the family's model; returns its output directory."""
    out = family["path"] / "-".join([stage, *flags]).replace("--", "")
    if not out.exists():
        run_in_process(*stage_command(family, stage, out, *flags))
    return out


def stage_command(family, stage, out, *flags):
    """(main, argv) of one optimizer step of a stage on the family's model (flags may ask for more)."""
    common = ["--model_name_or_path", family["model_dir"], "--output_dir", str(out), "--learning_rate", "1e-3"]
    if stage == "rlvr":
        return rlvr.main, common + [
            "--dataset_mixer_list", str(family["files"]["rlvr"]), "1.0", "--num_unique_prompts_rollout", "2",
            "--num_samples_per_prompt_rollout", "2", "--total_episodes", "4", "--response_length", "4",
            "--max_seq_length", "64", "--per_device_train_batch_size", "2", "--num_mini_batches", "1", *flags]
    return (sft if stage == "sft" else dpo).main, common + [
        "--dataset_mixer_list", str(family["files"][stage]), "1.0", "--max_seq_length", "128",
        "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1", "--max_train_steps", "1", *flags]


def hf_label_logprobs(family, messages):
    """log p of each trained token (the last assistant turn and its EOS) under Hugging Face's own forward."""
    tokenizer = AutoTokenizer.from_pretrained(family["model_dir"])
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=True, return_dict=True,
                                           add_generation_prompt=True)["input_ids"]
    assert full[:len(prompt)] == prompt
    end = len(full) - full[::-1].index(tokenizer.eos_token_id)  # the response and its EOS; not what follows
    model = AutoModelForCausalLM.from_pretrained(family["model_dir"], dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full])).logits[0, :-1].float()
    logprobs = logits.log_softmax(-1).gather(-1, torch.tensor(full[1:])[:, None])[:, 0]
    return logprobs[len(prompt) - 1:end - 1]


def test_every_tensor_holds_what_from_pretrained_gives(family, capsys):
    """Weights and buffers, tied ones under each name; each rank reads its shard of the safetensors files,
    but where transformers converts keys as it loads them (fused experts, a renamed multimodal tree)."""
    with plain_python_environment():
        infra.init_distributed()
        try:
            loaded = infra.load_model(family["model_dir"], modeling.CausalLMLogProbs, device=torch.device("cpu"),
                                      rank=0, max_seq_length=128).model
            tensors = {name: tensor.full_tensor() if isinstance(tensor, DTensor) else tensor for name, tensor in
                       [*loaded.named_parameters(remove_duplicate=False), *loaded.named_buffers()]}
        finally:
            torch.distributed.destroy_process_group()
    from_rank0 = "rank 0 loads the whole model with from_pretrained" in capsys.readouterr().out
    assert from_rank0 == (family["name"] in CONVERTED_ON_LOAD)
    model = AutoModelForCausalLM.from_pretrained(family["model_dir"])
    expected = dict([*model.named_parameters(remove_duplicate=False), *model.named_buffers()])
    assert tensors.keys() == expected.keys() and any(name.endswith("inv_freq") for name in tensors)
    assert [name for name in tensors if not torch.equal(tensors[name], expected[name])] == []
    if model.config.get_text_config().tie_word_embeddings:
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight


def test_sft_step_one_loss_is_hugging_faces_loss(family):
    metrics = read_metrics(stage_run(family, "sft", "--reduce_loss", "mean"))
    expected = -hf_label_logprobs(family, CONVERSATION).mean().item()
    assert metrics[0]["loss"] == pytest.approx(expected, abs=1e-4)


def test_dpo_step_one_logprobs_are_hugging_faces(family):
    metrics = read_metrics(stage_run(family, "dpo", "--dpo_loss_type", "dpo"))  # summed log-probs
    chosen = hf_label_logprobs(family, CONVERSATION).sum().item()
    rejected = hf_label_logprobs(family, [CONVERSATION[0], REJECTED]).sum().item()
    assert metrics[0]["logps/chosen"] == pytest.approx(chosen, abs=1e-4)
    assert metrics[0]["logps/rejected"] == pytest.approx(rejected, abs=1e-4)


def test_grpo_kl_is_zero_before_the_first_update(family):
    metrics = read_metrics(stage_run(family, "rlvr", "--algo", "grpo"))
    assert abs(metrics[0]["kl1"]) < 1e-6  # (thread scheduling may reorder sums: 6e-8 seen; garbage buffers: 0.15+)
    assert metrics[0]["sampling_logprob_diff"] < 1e-4  # the sampler's log-probs are the training forward's


def test_ppo_runs(family):
    metrics = read_metrics(stage_run(family, "rlvr", "--algo", "ppo"))
    assert len(metrics) == 1 and all(torch.isfinite(torch.tensor(v)) for v in metrics[0].values())


def test_saved_model_reloads_with_every_weight_changed_and_ties_kept(family):
    out = stage_run(family, "sft", "--reduce_loss", "mean")
    source, saved = load_file(os.path.join(family["model_dir"], "model.safetensors")), load_file(out / "model.safetensors")
    assert saved.keys() == source.keys()
    text = [name for name in source if "vision" not in name and "multi_modal" not in name]  # text-only data
    assert [name for name in text if torch.equal(source[name], saved[name])] == []
    reloaded, original = (AutoModelForCausalLM.from_pretrained(d) for d in (out, family["model_dir"]))
    tied = original.get_output_embeddings().weight is original.get_input_embeddings().weight
    assert (reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight) == tied


TWO_STEPS = {"sft": ("sft", "--max_train_steps", "2"), "dpo": ("dpo", "--max_train_steps", "2"),
             "grpo": ("rlvr", "--algo", "grpo", "--total_episodes", "8"),
             "ppo": ("rlvr", "--algo", "ppo", "--total_episodes", "8")}


@pytest.mark.full
@pytest.mark.parametrize("stage", TWO_STEPS)
def test_a_run_resumed_from_its_checkpoint_saves_bitwise_the_same_model(family, stage):
    """Two steps with a checkpoint after the first; with the final model removed, the same command resumes
    from the checkpoint (its weights, tied ones too, and AdamW state) and saves the same bytes."""
    script, *flags = TWO_STEPS[stage]
    out = family["path"] / f"resumed-{stage}"
    main, argv = stage_command(family, script, out, *flags, "--checkpointing_steps", "1", "--resume")
    run_in_process(main, argv)
    weights, first_step = (out / "model.safetensors").read_bytes(), read_metrics(out)[0]
    assert json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["step"] == 1
    os.remove(out / "config.json")
    run_in_process(main, argv)
    assert [m["step"] for m in read_metrics(out)] == [1, 2] and read_metrics(out)[0] == first_step  # (its timings)
    assert (out / "model.safetensors").read_bytes() == weights


def test_eval_batched_greedy_equals_each_prompt_alone(family):
    """Prompts sharing a long few-shot prefix, of different lengths: the batch uses the shared-prefix cache
    and padding unless a sliding window is shorter than the cache."""
    model, tokenizer = evaluation.load_model_and_tokenizer(family["model_dir"], evaluation.parse_args(
        ["--model_name_or_path", family["model_dir"], "--tasks", "gsm8k", "--output_dir", str(family["path"])]),
        torch.device("cpu"))
    prefix = tokenizer("system user assistant hello world, again and again. " * 3)["input_ids"]
    prompts = [prefix + tokenizer(text)["input_ids"] for text in
               ("What is 12?", "The quick brown fox jumps over the lazy dog.", "Write a poem", "0123456789 + - * /")]
    assert decoding.shared_prefix_length(prompts) >= decoding.MIN_SHARED_PREFIX

    def responses(batch_size):
        args = evaluation.parse_args(["--model_name_or_path", family["model_dir"], "--tasks", "gsm8k", "--output_dir", "x",
                                      "--temperature", "0", "--top_p", "1",
                                      "--per_device_eval_batch_size", str(batch_size)])
        settings = {"max_new_tokens": 12, "stop": [], "temperature": 0.0, "top_p": 1.0}
        return evaluation.complete_prompts(model, tokenizer, prompts, settings, args, torch.Generator().manual_seed(0))
    assert responses(4) == responses(1)


# ---------------------------------------------------------------------------------------------
# The guard: a stage stops before its first update when it would train a different model

def zero_buffers(model):  # a planted loading fault: the buffers no state dict carries left as to_empty may leave them
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name in module._non_persistent_buffers_set:
                buffer.zero_()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_packed_attention_is_the_default_exactly_where_a_packed_row_gives_each_document_alone(name):
    """modeling's verdict from the config agrees with a forward: where it picks the packed attention, a packed
    row's logits are each document's computed alone; where it does not, the packed attention refuses the model."""
    modeling.register_packed_attention()
    config = build_config(name, build_tiny_tokenizer())
    chosen = modeling.packed_attention_mismatch(config, max_seq_length=12) == ""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    input_ids = torch.randint(4, config.get_text_config().vocab_size, (1, 20))
    position_ids = torch.cat([torch.arange(12), torch.arange(8)])[None]  # documents of 12 and 8 tokens
    with torch.no_grad():
        alone = torch.cat([model(input_ids=input_ids[:, :12]).logits, model(input_ids=input_ids[:, 12:]).logits], 1)
        model.set_attn_implementation(modeling.PACKED_ATTENTION)
        if chosen:
            torch.testing.assert_close(model(input_ids=input_ids, position_ids=position_ids).logits, alone)
        else:
            with pytest.raises(ValueError, match=modeling.PACKED_ATTENTION):
                model(input_ids=input_ids, position_ids=position_ids)
    assert chosen == (name not in {"mistral", "olmo3", "gemma2", "gemma3", "gemma3_multimodal"})  # windows, soft-cap


@pytest.mark.parametrize("stage", [sft, dpo, rlvr])
def test_a_buffer_left_unfilled_is_caught_before_training(stage, tmp_path, monkeypatch):
    family = make_family("gemma3", tmp_path)
    monkeypatch.setattr(infra, "init_non_persistent_buffers", zero_buffers)
    name = stage.__name__
    with pytest.raises(SystemExit, match=r"Gemma3ForCausalLM \(gemma3_text\): the log-probs this stage trains on differ"):
        stage_run(family, name, *(["--algo", "grpo"] if name == "rlvr" else []))
    assert not list(tmp_path.rglob("metrics.jsonl"))  # not one step was trained


@pytest.mark.parametrize("stage", [sft, dpo])
def test_a_head_transform_the_loss_ignores_is_caught_before_training(stage, tmp_path, monkeypatch):
    family = make_family("granite", tmp_path)  # logits / logits_scaling after the projection
    monkeypatch.setattr(modeling.CausalLMLogProbs, "head_logits",
                        lambda self, states: states @ self.model.get_output_embeddings().weight.T)
    with pytest.raises(SystemExit, match=r"GraniteForCausalLM \(granite\): .* differ .* by \d"):
        stage_run(family, stage.__name__)


def test_a_buffer_that_transformers_init_does_not_fill_stops_the_load(tmp_path, monkeypatch):
    family = make_family("llama", tmp_path)
    monkeypatch.setattr(transformers.PreTrainedModel, "initialize_weights", lambda self: None)
    with pytest.raises(SystemExit, match="does not fill the buffer inv_freq of LlamaRotaryEmbedding"):
        stage_run(family, "sft")


def test_length_dependent_rope_longer_than_its_original_length_is_refused(tmp_path):
    family = make_family("phi3_longrope", tmp_path)
    with pytest.raises(SystemExit, match="--max_seq_length 256: longrope RoPE .* use at most 128"):
        stage_run(family, "sft", "--max_seq_length", "256")


# ---------------------------------------------------------------------------------------------
# MoE: the router's load-balancing loss, as the model's own forward computes it

@pytest.mark.parametrize("name", ["mixtral", "olmoe"])
def test_load_balancing_loss_is_the_models_own_and_changes_the_routers_update(name, tmp_path):
    family = make_family(name, tmp_path)
    plain = stage_run(family, "sft", "--reduce_loss", "mean")
    balanced = stage_run(family, "sft", "--reduce_loss", "mean", "--load_balancing_loss",
                         "--load_balancing_weight", "10")
    tokenizer = AutoTokenizer.from_pretrained(family["model_dir"])
    ids = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(family["model_dir"]).eval()
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids]), output_router_logits=True).aux_loss.item()
    metrics = read_metrics(balanced)[0]
    assert metrics["router_loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["loss"] == pytest.approx(read_metrics(plain)[0]["loss"], rel=1e-6)  # the NLL alone
    before, without, with_router = (load_file(os.path.join(d, "model.safetensors"))
                                    for d in (family["model_dir"], plain, balanced))
    routers = [key for key in before if "gate.weight" in key and "proj" not in key]
    assert routers and all(not torch.equal(without[key], with_router[key]) for key in routers)


def test_load_balancing_loss_on_a_dense_model_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--load_balancing_loss: llama has no router"):
        stage_run(make_family("llama", tmp_path), "sft", "--load_balancing_loss")
