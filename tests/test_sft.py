"""sft.py: the loss, split-invariant gradients under FSDP2, resume, save/load, and its errors."""
import hashlib
import json
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch._dynamo.utils import counters

import data_mix
import checkpoint
import infra
import modeling
import sft
from conftest import free_port, read_metrics, run_in_process

PROBLEMS = [(3, 4), (12, 30), (7, 8), (21, 2), (5, 5), (40, 1), (9, 6), (13, 13)]


def conversations():
    # Different lengths on purpose: per-micro-batch averaging would weigh them unequally.
    return [[{"role": "user", "content": f"What is {a} plus {b}?"},
             {"role": "assistant", "content": f"{a} plus {b} is {a + b}. " * (1 + i % 3) + f"The answer is {a + b}."}]
            for i, (a, b) in enumerate(PROBLEMS)]


def write_dataset(path, rows=None):
    rows = rows or [{"messages": m} for m in conversations()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_sft(argv):
    run_in_process(sft.main, argv)


def base_args(model_dir, data, output_dir, *extra):
    return ["--model_name_or_path", model_dir, "--dataset_mixer_list", data, "1.0", "--output_dir", str(output_dir),
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--max_seq_length", "128",
            "--learning_rate", "1e-3", "--warmup_ratio", "0", "--num_train_epochs", "2", *extra]


# ---------------------------------------------------------------------------------------------
# The loss

def test_chunked_logprobs_give_the_plain_cross_entropy_loss_and_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :4] = data_mix.IGNORE_INDEX
    logprobs = modeling.chunked_label_logprobs(hidden, lambda states: states @ weight.T, labels,
                                               chunk_tokens=3)  # several chunks
    chunked = sft.sft_loss(logprobs, labels, denominator=2.0)
    chunked_grads = torch.autograd.grad(chunked, (hidden, weight))

    logits = hidden[:, :-1] @ weight.T
    plain = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), labels[:, 1:].reshape(-1),
                                              ignore_index=data_mix.IGNORE_INDEX, reduction="sum") / 2.0
    plain_grads = torch.autograd.grad(plain, (hidden, weight))
    torch.testing.assert_close(chunked, plain)
    for a, b in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(a, b)


def test_label_logprobs_are_zero_where_nothing_is_trained():
    labels = torch.full((1, 5), data_mix.IGNORE_INDEX)
    head = lambda states: states @ torch.randn(7, 4).T  # noqa: E731
    logprobs = modeling.chunked_label_logprobs(torch.randn(1, 5, 4), head, labels)
    assert logprobs.shape == (1, 4) and (logprobs == 0).all()


# ---------------------------------------------------------------------------------------------
# Gradients do not depend on how an optimizer batch is split (micro-batches, ranks)

SPLITS = {1: [(1, 8), (2, 4), (8, 1)], 2: [(1, 4), (4, 1)]}  # world size -> (per device, accumulation)


def start_worker(rank, world_size, port, model_dir):
    """A spawned rank's process group, tokenizer and the eight tokenized conversations."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port)
    torch.set_num_threads(1)
    rank, world_size, device = infra.init_distributed()
    tokenizer = data_mix.load_tokenizer(model_dir)
    return rank, world_size, device, tokenizer, [data_mix.tokenize_sft(tokenizer, m, 128) for m in conversations()]


def gradient_worker(rank, world_size, port, model_dir, out_path):
    rank, world_size, device, tokenizer, examples = start_worker(rank, world_size, port, model_dir)
    results = {}
    for packing in (True, False):
        args = sft.parse_args(["--model_name_or_path", model_dir, "--dataset_mixer_list", "x", "1", "--output_dir", "x",
                               "--packing" if packing else "--no-packing"])
        model = infra.load_model(model_dir, modeling.CausalLMLogProbs, device=device, rank=rank,
                                 max_seq_length=128)
        for reduction in ("sum", "mean"):
            for per_device, accumulation in SPLITS[world_size]:
                args.per_device_train_batch_size, args.reduce_loss = per_device, reduction
                sft.accumulate_gradients(model, examples, list(range(8)), args, rank, world_size, device,
                                         tokenizer.pad_token_id)
                grads = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}
                results[(packing, reduction, per_device, accumulation)] = grads
                model.zero_grad(set_to_none=True)
    if rank == 0:
        torch.save(results, out_path)
    torch.distributed.destroy_process_group()


def gradients(world_size, model_dir, tmp_path):
    out = str(tmp_path / f"grads{world_size}.pt")
    mp.spawn(gradient_worker, args=(world_size, free_port(), model_dir, out), nprocs=world_size)
    return torch.load(out, weights_only=True)


def test_gradient_is_the_same_for_every_micro_batch_split_and_rank_count(tiny_model_dir, tmp_path):
    results = {**{(1,) + k: v for k, v in gradients(1, tiny_model_dir, tmp_path).items()},
               **{(2,) + k: v for k, v in gradients(2, tiny_model_dir, tmp_path).items()}}
    for reduction in ("sum", "mean"):
        reference = results[(1, False, reduction, 8, 1)]  # one padded micro-batch of 8 on one rank
        for key, grads in results.items():
            if key[2] == reduction:
                for name in reference:
                    torch.testing.assert_close(grads[name], reference[name], rtol=1e-4, atol=1e-6,
                                               msg=lambda m: f"{key} {name}: {m}")
    sum_grad, mean_grad = (results[(1, False, r, 8, 1)]["model.lm_head.weight"] for r in ("sum", "mean"))
    assert not torch.allclose(sum_grad, mean_grad)  # the two reductions really differ


def compile_worker(rank, world_size, port, model_dir, out_path):
    rank, world_size, device, tokenizer, examples = start_worker(rank, world_size, port, model_dir)
    results, graphs = {}, {}
    for compiled in (False, True):
        args = sft.parse_args(["--model_name_or_path", model_dir, "--dataset_mixer_list", "x", "1", "--output_dir", "x",
                               "--packing", "--per_device_train_batch_size", "4"] + ["--compile"] * compiled)
        counters.clear()
        model = infra.load_model(model_dir, modeling.CausalLMLogProbs, device=device, rank=rank, max_seq_length=128,
                                 compile=args.compile)
        nll = sft.accumulate_gradients(model, examples, list(range(8)), args, rank, world_size, device,
                                       tokenizer.pad_token_id)[0]
        graphs[compiled] = counters["stats"]["unique_graphs"]  # graphs dynamo compiled in this forward
        results[compiled] = {"nll": nll, **{n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}}
    torch.save({"results": results, "graphs": graphs}, out_path)
    torch.distributed.destroy_process_group()


def test_compiled_decoder_layers_give_the_eager_loss_and_gradients(tiny_model_dir, tmp_path):
    out = str(tmp_path / "compiled.pt")
    mp.spawn(compile_worker, args=(1, free_port(), tiny_model_dir, out), nprocs=1)
    saved = torch.load(out, weights_only=True)
    # eager compiles nothing; compiled, the layers share a graph, recompiled once with a dynamic length when the
    # second micro-batch's length differs from the first's
    assert saved["graphs"] == {False: 0, True: 2}
    results = saved["results"]
    for name, eager in results[False].items():
        torch.testing.assert_close(results[True][name], eager, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# Resume, save and load

class Interrupt(Exception):
    pass


def interrupt_at_step(monkeypatch, step, accumulation=2):
    """Make the loss raise on the first micro-batch of `step`, as a killed job would stop there."""
    calls = {"n": 0}
    real_loss = sft.sft_loss

    def loss(*args):
        calls["n"] += 1
        if calls["n"] == (step - 1) * accumulation + 1:
            raise Interrupt
        return real_loss(*args)
    monkeypatch.setattr(sft, "sft_loss", loss)


def test_interrupted_then_resumed_run_has_the_same_loss_curve(tiny_model_dir, tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "data.jsonl")
    run_sft(base_args(tiny_model_dir, data, tmp_path / "straight", "--checkpointing_steps", "2"))
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 3)
        with pytest.raises(Interrupt):
            run_sft(base_args(tiny_model_dir, data, tmp_path / "resumed", "--checkpointing_steps", "2"))
    assert [m["step"] for m in read_metrics(tmp_path / "resumed")] == [1, 2]
    run_sft(base_args(tiny_model_dir, data, tmp_path / "resumed", "--checkpointing_steps", "2", "--resume"))

    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["lr"] == b["lr"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    from safetensors.torch import load_file
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("straight", "resumed"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)


def test_saved_model_and_tokenizer_load_with_transformers(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_dataset(tmp_path / "data.jsonl")
    run_sft(base_args(tiny_model_dir, data, tmp_path / "out", "--learning_rate", "0", "--max_train_steps", "1"))
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    source = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for (name, a), b in zip(saved.state_dict().items(), source.state_dict().values()):
        assert torch.equal(a, b), name  # learning rate 0: the round trip must be exact
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    assert json.load(open(tmp_path / "out" / "config.json"))["architectures"] == ["LlamaForCausalLM"]
    assert json.load(open(tmp_path / "out" / "mixture.json"))["datasets"][data]["rows"] == len(PROBLEMS)


def test_trained_model_differs_and_tulu_template_is_saved(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    data = write_dataset(tmp_path / "data.jsonl")
    run_sft(base_args(tiny_model_dir, data, tmp_path / "out", "--chat_template_name", "tulu", "--max_train_steps", "2"))
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == data_mix.TULU_CHAT_TEMPLATE
    losses = [m["loss"] for m in read_metrics(tmp_path / "out")]
    assert len(losses) == 2 and all(m["tokens_per_s"] > 0 for m in read_metrics(tmp_path / "out"))
    from safetensors.torch import load_file
    trained = load_file(str(tmp_path / "out" / "model.safetensors"))
    source = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert any(not torch.equal(trained[name], source[name]) for name in source)


# ---------------------------------------------------------------------------------------------
# Metrics reported to TensorBoard or Weights & Biases (--report_to)

def tensorboard_scalars(directory) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_report_to_tensorboard_gets_every_metric_that_metrics_jsonl_gets(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    data = write_dataset(tmp_path / "data.jsonl")
    run_sft(base_args(tiny_model_dir, data, tmp_path / "out", "--max_train_steps", "2", "--report_to", "tensorboard"))
    metrics = read_metrics(tmp_path / "out")
    expected = {key: [(m["step"], pytest.approx(m[key], rel=1e-6)) for m in metrics]  # (stored as float32)
                for key in metrics[0] if key != "step"}
    assert tensorboard_scalars(tmp_path / "out" / "runs") == expected


def test_a_resumed_tensorboard_report_hides_the_steps_after_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    killed = infra.MetricsReport("tensorboard", str(tmp_path), 0, {})
    killed({"step": 1, "loss": 1.0})
    killed({"step": 2, "loss": 2.0})  # after the checkpoint of step 1: repeated by the resumed run
    killed.close()
    resumed = infra.MetricsReport("tensorboard", str(tmp_path), 1, {})
    resumed({"step": 2, "loss": 5.0})
    resumed.close()
    assert tensorboard_scalars(tmp_path / "runs") == {"loss": [(1, 1.0), (2, 5.0)]}


@pytest.mark.parametrize("service, module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_report_to_a_service_whose_package_is_missing_is_a_one_line_error(service, module, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # `import` raises ImportError
    with pytest.raises(SystemExit, match=f"^--report_to {service}: the {service} package is not installed"):
        infra.MetricsReport(service, str(tmp_path), 0, {})


# ---------------------------------------------------------------------------------------------
# Errors

def test_missing_model_path_is_a_clear_error(tmp_path):
    data = write_dataset(tmp_path / "data.jsonl")
    with pytest.raises(SystemExit, match="no such directory"):
        run_sft(base_args(str(tmp_path / "no-model"), data, tmp_path / "out"))


def test_output_dir_holding_a_different_run_is_refused(tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "data.jsonl")
    run_sft(base_args(tiny_model_dir, data, tmp_path / "out", "--max_train_steps", "1"))
    with pytest.raises(SystemExit, match="holds a different run.*learning_rate"):
        run_sft(base_args(tiny_model_dir, data, tmp_path / "out", "--max_train_steps", "1", "--learning_rate", "2e-3"))
    with pytest.raises(SystemExit, match="already holds this run"):
        run_sft(base_args(tiny_model_dir, data, tmp_path / "out", "--max_train_steps", "1"))


def test_no_trainable_tokens_is_a_clear_error(tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "data.jsonl")
    with pytest.raises(SystemExit, match="no trainable tokens"):
        run_sft(base_args(tiny_model_dir, data, tmp_path / "out", "--max_seq_length", "5"))


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "data.jsonl")
    real_loss, calls = sft.sft_loss, {"n": 0}

    def loss(*args):
        calls["n"] += 1
        return real_loss(*args) * (float("nan") if calls["n"] > 4 else 1.0)  # step 3 goes NaN
    monkeypatch.setattr(sft, "sft_loss", loss)
    step_2, saved = tmp_path / "out" / "checkpoint-2", {}
    digest = lambda: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in step_2.iterdir()}  # noqa: E731
    real_save = checkpoint.save

    def save_and_digest(*args):  # the checkpoint as step 2 first wrote it, before the NaN step runs
        real_save(*args)
        saved.update({} if saved else digest())
    monkeypatch.setattr(checkpoint, "save", save_and_digest)
    with pytest.raises(FloatingPointError, match="step 3.*checkpoint .* is intact"):
        run_sft(base_args(tiny_model_dir, data, tmp_path / "out", "--checkpointing_steps", "2"))
    assert json.loads((step_2 / "trainer_state.json").read_text())["step"] == 2
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert saved and digest() == saved


# ---------------------------------------------------------------------------------------------
# The real bundled model

def test_a_few_steps_lower_the_bundled_models_loss(bundled_model_dir, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                          {"role": "assistant", "content": f"The answer is {a + b}."}]} for a, b in PROBLEMS[:4]]
    data = write_dataset(tmp_path / "data.jsonl", rows)
    run_sft(["--model_name_or_path", bundled_model_dir, "--dataset_mixer_list", data, "1.0",
             "--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "4",
             "--gradient_accumulation_steps", "1", "--max_seq_length", "64", "--learning_rate", "1e-4",
             "--warmup_ratio", "0", "--num_train_epochs", "3"])
    losses = [m["loss"] for m in read_metrics(tmp_path / "out")]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
