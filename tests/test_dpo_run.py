"""dpo.py end to end on a tiny model: the reference cache (same losses as a live reference, reused on
restart, missed when data or model change) and a gradient that does not depend on how the optimizer
batch is split into micro-batches and ranks."""
import json
import os

import pytest
import torch
import torch.multiprocessing as mp

import data_mix
import dpo
import checkpoint
import infra
import modeling
from conftest import build_tiny_model, free_port, read_metrics, run_in_process

PROBLEMS = [(3, 4), (12, 30), (7, 8), (21, 2), (5, 5), (40, 1), (9, 6), (13, 13)]


def write_pairs(path, wrong_by=1):
    # Different lengths on purpose: a per-micro-batch average would weigh pairs unequally.
    with open(path, "w") as f:
        for i, (a, b) in enumerate(PROBLEMS):
            prompt = [{"role": "user", "content": f"What is {a} plus {b}?"}]
            chosen = f"{a} plus {b} is {a + b}. " * (1 + i % 3) + f"The answer is {a + b}."
            f.write(json.dumps({"prompt": prompt, "chosen": chosen,
                                "rejected": f"The answer is {a + b + wrong_by}."}) + "\n")
    return str(path)


def run_dpo(model_dir, data, output_dir, *flags):
    """dpo.main in this process, as `python dpo.py ...` runs it; its metrics."""
    run_in_process(dpo.main, [
        "--model_name_or_path", model_dir, "--dataset_mixer_list", data, "1.0", "--output_dir", str(output_dir),
        "--max_seq_length", "128", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
        "--learning_rate", "1e-3", "--dpo_beta", "0.5", "--num_train_epochs", "2", *flags])
    return read_metrics(output_dir)


@pytest.fixture
def pairs(tmp_path):
    return write_pairs(tmp_path / "pairs.jsonl")


def test_cached_reference_gives_the_same_per_step_losses_as_a_live_reference_model(tiny_model_dir, pairs, tmp_path):
    cached = run_dpo(tiny_model_dir, pairs, tmp_path / "cached", "--reference", "cached")
    live = run_dpo(tiny_model_dir, pairs, tmp_path / "live", "--reference", "live")
    assert len(cached) == len(live) == 4
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "logps/chosen"):
        assert [m[key] for m in cached] == pytest.approx([m[key] for m in live], abs=1e-5), key
    # step 1: the policy is the reference, so rewards are 0 and the dpo_norm loss is log 2
    assert cached[0]["loss"] == pytest.approx(0.6931472, abs=1e-5) and cached[0]["rewards/accuracy"] == 0
    assert cached[0]["rewards/chosen"] == pytest.approx(0, abs=1e-5)
    assert cached[0]["logps/chosen"] < 0 and cached[0]["logps/rejected"] < 0
    last = cached[-1]  # and training moves the policy toward the chosen responses
    assert last["rewards/margin"] == pytest.approx(last["rewards/chosen"] - last["rewards/rejected"])
    assert last["rewards/margin"] > 0 and last["rewards/accuracy"] > 0.5


def test_reference_cache_is_reused_across_runs_and_missed_when_data_or_model_change(tiny_model_dir, tiny_tokenizer,
                                                                                    tmp_path, capsys):
    cache = str(tmp_path / "cache")
    flags = ("--reference_cache_dir", cache, "--max_train_steps", "1")
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    run_dpo(tiny_model_dir, pairs, tmp_path / "a", *flags)
    assert "reference log-probs: computed" in capsys.readouterr().out
    run_dpo(tiny_model_dir, pairs, tmp_path / "b", *flags)
    assert "reference log-probs: read from" in capsys.readouterr().out
    assert len(os.listdir(cache)) == 1

    other_pairs = write_pairs(tmp_path / "other_pairs.jsonl", wrong_by=2)
    run_dpo(tiny_model_dir, other_pairs, tmp_path / "c", *flags)
    assert "reference log-probs: computed" in capsys.readouterr().out

    other_model = tmp_path / "other_model"
    build_tiny_model(tiny_tokenizer, seed=1).save_pretrained(other_model)
    tiny_tokenizer.save_pretrained(other_model)
    run_dpo(str(other_model), pairs, tmp_path / "d", *flags)
    assert "reference log-probs: computed" in capsys.readouterr().out
    assert len(os.listdir(cache)) == 3


def test_simpo_trains_without_any_reference(tiny_model_dir, pairs, tmp_path, capsys):
    metrics = run_dpo(tiny_model_dir, pairs, tmp_path / "simpo", "--dpo_loss_type", "simpo", "--dpo_beta", "2")
    assert "reference log-probs" not in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "simpo" / "reference_logps")
    # simpo's rewards are beta * mean log-probs (no reference); its margin gamma makes step 1's loss exceed log 2
    for step in metrics:
        assert step["rewards/chosen"] == pytest.approx(2 * step["logps/chosen"])
    assert metrics[0]["loss"] > 0.6931472
    first, last = metrics[0], metrics[-1]  # and training widens the chosen-over-rejected margin
    assert len(metrics) == 4 and last["loss"] < first["loss"]
    assert last["rewards/margin"] > first["rewards/margin"] and last["rewards/accuracy"] > 0.5


class Interrupt(Exception):
    pass


def test_resumed_run_reads_the_initial_model_reference_and_continues_the_same_curve(tiny_model_dir, pairs, tmp_path,
                                                                                    monkeypatch, capsys):
    uninterrupted = run_dpo(tiny_model_dir, pairs, tmp_path / "whole")
    append_metrics = infra.append_metrics

    def crash_at_step_3(path, metrics):
        if metrics["step"] == 3:
            raise Interrupt
        append_metrics(path, metrics)

    monkeypatch.setattr(infra, "append_metrics", crash_at_step_3)
    with pytest.raises(Interrupt):
        run_dpo(tiny_model_dir, pairs, tmp_path / "resumed", "--checkpointing_steps", "2")
    monkeypatch.setattr(infra, "append_metrics", append_metrics)
    capsys.readouterr()
    resumed = run_dpo(tiny_model_dir, pairs, tmp_path / "resumed", "--checkpointing_steps", "2", "--resume")
    assert "reference log-probs: read from" in capsys.readouterr().out
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in uninterrupted], abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Gradient of one optimizer batch of 8 pairs, however it is split

SPLITS = {1: [(1, 8), (3, 3), (8, 1)], 2: [(1, 4), (3, 2)]}  # world size -> (pairs per micro-batch, micro-batches)


def gradient_worker(rank, world_size, port, model_dir, data, cache_dir, out_path):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port)
    torch.set_num_threads(1)
    rank, world_size, device = infra.init_distributed()
    tokenizer = data_mix.load_tokenizer(model_dir)
    rows, _ = data_mix.mix_datasets([data, "1.0"], seed=0, validate=dpo.validate_preference_record)
    examples, _ = dpo.tokenize_preference_dataset(rows, tokenizer, 128)
    fingerprints = checkpoint.run_fingerprints(examples, model_dir, rank)
    results = {}
    for packing in (True, False):
        for loss_type in ("dpo_norm", "dpo"):
            args = dpo.parse_args(["--model_name_or_path", model_dir, "--dataset_mixer_list", data, "1",
                                   "--output_dir", "x", "--reference_cache_dir", f"{cache_dir}/{world_size}",
                                   "--dpo_loss_type", loss_type, "--dpo_beta", "0.5",
                                   "--packing" if packing else "--no-packing"])
            model = infra.load_model(model_dir, modeling.CausalLMLogProbs, device=device, rank=rank,
                                     max_seq_length=args.max_seq_length)
            # scored with 3 pairs per micro-batch: on 2 ranks the last group leaves a rank a stand-in pair
            args.per_device_train_batch_size = 3
            reference = dpo.cached_reference_logps(model, examples, args, rank, world_size, device,
                                                   tokenizer.pad_token_id, fingerprints)
            results[(packing, loss_type, "reference")] = [table.clone() for table in reference]
            for per_device, accumulation in SPLITS[world_size]:
                args.per_device_train_batch_size = per_device
                dpo.accumulate_gradients(model, reference, examples, list(range(8)), args, rank, world_size,
                                         device, tokenizer.pad_token_id)
                grads = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}
                results[(packing, loss_type, per_device, accumulation)] = grads
                model.zero_grad(set_to_none=True)
    if rank == 0:
        torch.save(results, out_path)
    torch.distributed.destroy_process_group()


def gradients(world_size, model_dir, data, tmp_path):
    out = str(tmp_path / f"grads{world_size}.pt")
    mp.spawn(gradient_worker, args=(world_size, free_port(), model_dir, data, str(tmp_path / "cache"), out),
             nprocs=world_size)
    return torch.load(out, weights_only=True)


def test_gradient_is_the_same_for_every_micro_batch_split_and_rank_count(tiny_model_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    results = {**{(1,) + k: v for k, v in gradients(1, tiny_model_dir, data, tmp_path).items()},
               **{(2,) + k: v for k, v in gradients(2, tiny_model_dir, data, tmp_path).items()}}
    for loss_type in ("dpo_norm", "dpo"):
        reference = results[(1, False, loss_type, 8, 1)]  # one padded micro-batch of 8 pairs on one rank
        for key, value in results.items():
            if key[2] == loss_type and key[3] == "reference":  # sharded scoring assembles the same table
                for table, expected in zip(value, results[(1, False, loss_type, "reference")]):
                    torch.testing.assert_close(table, expected, rtol=1e-5, atol=1e-5)
            elif key[2] == loss_type:
                for name in reference:
                    torch.testing.assert_close(value[name], reference[name], rtol=1e-4, atol=1e-6,
                                               msg=lambda m: f"{key} {name}: {m}")
    sum_grad, mean_grad = (results[(1, False, t, 8, 1)]["model.lm_head.weight"] for t in ("dpo", "dpo_norm"))
    assert sum_grad.abs().sum() > 0 and not torch.allclose(sum_grad, mean_grad)
