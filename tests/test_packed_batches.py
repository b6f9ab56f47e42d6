"""Token-budget micro-batches (--max_tokens_per_micro_batch) and packed attention without a dense mask
(--attn_implementation packed_varlen, the default for packed rows where it is exact), for sft.py and dpo.py."""
import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import data_mix
import dpo
import infra
import modeling
import sft
from conftest import build_tiny_model, free_port
from test_dpo_run import write_pairs
from test_sft import conversations

# None: --per_device_train_batch_size 1 (the Tülu 3 recipe's flags). The tiny examples have 40 to 68 tokens
# (pairs 70 to 99): 170 and 200 pack two ranks' shares into different numbers of micro-batches.
BUDGETS = (None, 170, 200)


# ---------------------------------------------------------------------------------------------
# Grouping a rank's share of the optimizer batch by tokens

def test_token_budget_groups_cover_the_share_once_and_stay_within_the_budget():
    lengths = {10: 70, 11: 30, 12: 50, 13: 120, 14: 20, 15: 45, 16: 5}
    groups = data_mix.micro_batch_indices(list(lengths), 1, 100, lengths.get)
    assert sorted(i for group in groups for i in group) == sorted(lengths)
    assert [13] in groups  # longer than the budget: a row of its own
    assert all(sum(map(lengths.get, group)) <= 100 for group in groups if group != [13])
    assert len(groups) == 4  # 340 tokens: 120 alone, then 220 in ceil(220 / 100) = 3 rows
    assert data_mix.micro_batch_indices(list(lengths), 3, None, lengths.get) == [[10, 11, 12], [13, 14, 15], [16]]


def test_micro_batches_per_step_fall_as_the_budget_grows(tiny_tokenizer):
    examples = [data_mix.tokenize_sft(tiny_tokenizer, m, 128) for m in conversations()]
    counts = []
    for budget in (None, 100, 170, 4096):
        args = sft.parse_args(["--model_name_or_path", "x", "--dataset_mixer_list", "x", "1", "--output_dir", "x",
                               "--per_device_train_batch_size", "1"]
                              + ["--max_tokens_per_micro_batch", str(budget)] * (budget is not None))
        micros = list(sft.micro_batches(examples, list(range(8)), args, 0, 1, tiny_tokenizer.pad_token_id))
        several = [m for m in micros if (m["position_ids"] == 0).sum() > 1]  # a lone example may exceed it
        assert all(m["input_ids"].shape[1] <= budget for m in several) and (budget or not several)
        counts.append(len(micros))
    assert counts[0] == 8 and counts == sorted(counts, reverse=True) and counts[-1] == 1, counts
    assert len(set(counts)) == len(counts), counts  # every larger budget saved micro-batches


def test_budget_needs_packing():
    with pytest.raises(SystemExit):
        dpo.parse_args(["--model_name_or_path", "x", "--dataset_mixer_list", "x", "1", "--output_dir", "x",
                        "--no-packing", "--max_tokens_per_micro_batch", "512"])


# ---------------------------------------------------------------------------------------------
# The weights after one optimizer step do not depend on the budget (1 and 2 gloo ranks)

def step_worker(rank, world_size, port, model_dir, data, out_path):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port)
    torch.set_num_threads(1)
    rank, world_size, device = infra.init_distributed()
    modeling.register_packed_attention()
    tokenizer = data_mix.load_tokenizer(model_dir)
    sft_examples = [data_mix.tokenize_sft(tokenizer, m, 128) for m in conversations()]
    rows = data_mix.load_valid_rows(str(data), dpo.validate_preference_record)[0]
    pairs = dpo.tokenize_preference_dataset(rows, tokenizer, 128)[0]
    reference = (torch.full((len(pairs),), -3.0), torch.full((len(pairs),), -2.0))
    runs = [("sft", reduction, budget, "sdpa") for reduction in ("sum", "mean") for budget in BUDGETS]
    runs += [("dpo", "pairs", budget, "sdpa") for budget in BUDGETS]
    runs += [(stage, "sum" if stage == "sft" else "pairs", 96, modeling.PACKED_ATTENTION) for stage in ("sft", "dpo")]
    results, counts = {}, {}
    for stage, reduction, budget, attention in runs:
        module = sft if stage == "sft" else dpo
        args = module.parse_args(["--model_name_or_path", model_dir, "--dataset_mixer_list", "x", "1",
                                  "--output_dir", "x", "--per_device_train_batch_size", "1", "--learning_rate", "1e-3",
                                  "--attn_implementation", attention]
                                 + ["--max_tokens_per_micro_batch", str(budget)] * (budget is not None)
                                 + ["--reduce_loss", reduction] * (stage == "sft"))
        model = infra.load_model(model_dir, modeling.CausalLMLogProbs, device=device, rank=rank,
                                 max_seq_length=args.max_seq_length, attn_implementation=attention)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
        batch = list(range(8 if stage == "sft" else 4 * world_size))
        if stage == "sft":
            sft.accumulate_gradients(model, sft_examples, batch, args, rank, world_size, device, tokenizer.pad_token_id)
        else:
            dpo.accumulate_gradients(model, reference, pairs, batch, args, rank, world_size, device,
                                     tokenizer.pad_token_id)
        gradients = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        results[(stage, reduction, budget, attention)] = (
            gradients, {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()})
        examples = sft_examples if stage == "sft" else pairs
        counts[(stage, budget, rank)] = len(list(module.micro_batches(examples, batch, args, rank, world_size, 0)))
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, counts)
    if rank == 0:
        torch.save({"weights": results, "counts": {k: v for c in gathered for k, v in c.items()}}, out_path)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("world_size", [1, 2])
def test_weights_after_one_step_are_the_same_with_and_without_a_token_budget(tiny_model_dir, tmp_path, world_size):
    out = str(tmp_path / "steps.pt")
    data = write_pairs(tmp_path / "pairs.jsonl")
    mp.spawn(step_worker, args=(world_size, free_port(), tiny_model_dir, data, out), nprocs=world_size)
    saved = torch.load(out, weights_only=True)
    results, counts = saved["weights"], saved["counts"]
    initial = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    for (stage, reduction, budget, attention), (gradients, weights) in results.items():
        reference_gradients, reference_weights = results[(stage, reduction, None, "sdpa")]
        for name, value in weights.items():
            where = f"{stage} {reduction} budget {budget} {attention} {name}"
            torch.testing.assert_close(gradients[name], reference_gradients[name], rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"gradient of {where}: {m}")
            assert not torch.equal(value, initial[name.removeprefix("model.")]), name  # the step moved it
            # AdamW's first step moves a weight by ~lr (1e-3) times g / (|g| + eps): where the gradient is at
            # rounding level (|g| < 1e-6, within the gradient tolerance above) that step is rounding noise, so the
            # weights are compared where the gradient is not; 1% of lr is the tolerance there
            settled = reference_gradients[name].abs() > 1e-6
            torch.testing.assert_close(value[settled], reference_weights[name][settled], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"weight of {where}: {m}")
    if world_size == 2:  # the budget packed the ranks unevenly, so the stand-in micro-batch was exercised
        assert any(counts[("sft", b, 0)] != counts[("sft", b, 1)] for b in BUDGETS[1:]), counts
        assert any(counts[("dpo", b, 0)] != counts[("dpo", b, 1)] for b in BUDGETS[1:]), counts


# ---------------------------------------------------------------------------------------------
# Packed attention: the dense-mask results, without the dense mask

class OutputShapes(TorchDispatchMode):
    """Records the shape of every tensor an operator returns, in forward and backward."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


DOCUMENTS = [5, 9, 3, 14, 6]  # a packed row of 37 tokens: no other dimension of the tiny model is 37


def packed_forward_backward(model, attention: str):
    """Logits and parameter gradients of one packed row; the output shapes of every operator on the way."""
    torch.manual_seed(1)
    input_ids = torch.randint(0, model.config.vocab_size, (1, sum(DOCUMENTS)))
    position_ids = torch.cat([torch.arange(n) for n in DOCUMENTS]).unsqueeze(0)
    model.set_attn_implementation(attention)
    model.zero_grad(set_to_none=True)
    with OutputShapes() as recorder:
        logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        (logits.float().log_softmax(-1)[..., 0].sum()).backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}, recorder.shapes


def test_packed_attention_gives_the_dense_mask_outputs_and_gradients_without_a_dense_mask(tiny_tokenizer):
    modeling.register_packed_attention()
    model = build_tiny_model(tiny_tokenizer)
    dense_logits, dense_grads, dense_shapes = packed_forward_backward(model, "sdpa")
    modeling.document_bounds.cache_clear()
    logits, grads, shapes = packed_forward_backward(model, modeling.PACKED_ATTENTION)
    assert modeling.document_bounds.cache_info().misses == 1  # the documents are found once, not once per layer
    torch.testing.assert_close(logits, dense_logits, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dense_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    total = sum(DOCUMENTS)
    assert any(shape[-2:] == (total, total) for shape in dense_shapes)  # the detector sees sdpa's dense mask
    assert not [shape for shape in shapes if shape[-2:] == (total, total)]
    # each document is its own attention: nothing wider than the longest document besides the row itself
    assert not [s for s in shapes if len(s) >= 2 and max(DOCUMENTS) < s[-1] < total and s[-1] == s[-2]]


def test_packed_attention_refuses_models_it_would_compute_wrongly(tiny_tokenizer):
    from transformers import Gemma2Config, Gemma2ForCausalLM, MistralConfig, MistralForCausalLM

    modeling.register_packed_attention()
    small = dict(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    input_ids = torch.randint(0, len(tiny_tokenizer), (1, 20))
    row = torch.cat([torch.arange(12), torch.arange(8)]).unsqueeze(0)  # documents of 12 and 8 tokens
    windowed = MistralForCausalLM(MistralConfig(**small, sliding_window=10, attn_implementation="packed_varlen"))
    with pytest.raises(ValueError, match="12-token document is longer than this layer's window of 10"):
        windowed(input_ids=input_ids, position_ids=row, use_cache=False)
    windowed.config.sliding_window = 12  # a window no document exceeds changes nothing: allowed
    windowed(input_ids=input_ids, position_ids=row, use_cache=False)
    capped = Gemma2ForCausalLM(Gemma2Config(**small, attn_implementation="packed_varlen"))
    with pytest.raises(ValueError, match="soft-capping"):
        capped(input_ids=input_ids, position_ids=row, use_cache=False)
    padded = build_tiny_model(tiny_tokenizer, attn_implementation="packed_varlen")
    with pytest.raises(ValueError, match="not padded ones"):
        padded(input_ids=input_ids, attention_mask=(torch.arange(20) < 15).long().unsqueeze(0), use_cache=False)


# ---------------------------------------------------------------------------------------------
# The default attention for packed rows

def test_packed_rows_default_to_the_packed_attention_where_it_is_exact(tiny_model_dir, capsys):
    assert modeling.choose_attention(tiny_model_dir, None, True, 128, rank=0) == modeling.PACKED_ATTENTION
    assert modeling.choose_attention(tiny_model_dir, "sdpa", True, 128, rank=0) == "sdpa"  # asked for: kept
    assert modeling.choose_attention(tiny_model_dir, None, False, 128, rank=0) is None  # padded rows: the model's own
    assert capsys.readouterr().out == ""


def test_packed_rows_fall_back_to_the_models_own_attention_with_one_line_saying_why(tiny_tokenizer, tmp_path, capsys):
    from transformers import Gemma2Config

    Gemma2Config(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=16, attn_logit_softcapping=5.0,
                 sliding_window=4096).save_pretrained(tmp_path)
    assert modeling.choose_attention(str(tmp_path), None, True, 128, rank=0) is None
    assert capsys.readouterr().out.splitlines() == [
        f"attention: the model's own, with a [T, T] mask per packed row, not {modeling.PACKED_ATTENTION}: "
        "the model soft-caps its attention logits"]
    assert modeling.choose_attention(str(tmp_path), None, True, 128, rank=1) is None
    assert capsys.readouterr().out == ""  # rank 0 says it once
