"""rlvr.py end to end on a tiny model: GRPO and PPO on one process and on 2 gloo ranks, resume, saves, errors."""
import json
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import infra
import rlvr
from conftest import build_tiny_model, free_port, read_metrics, run_in_process

# An IFEval constraint a random tiny model meets about half the time, so rewards (and advantages) vary.
AT_LEAST_TWO_E = json.dumps({"instruction_id_list": ["keywords:letter_frequency"],
                             "kwargs": [{"letter": "e", "let_frequency": 2, "let_relation": "at least"}]})


def write_rlvr_data(path):
    rows = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}], "ground_truth": str(a + b),
             "dataset": "gsm8k"} for a, b in [(3, 4), (12, 30), (7, 8), (2, 1)]]
    rows += [{"messages": [{"role": "user", "content": f"Write about the sea {i}."}], "ground_truth": AT_LEAST_TWO_E,
              "dataset": "IFEval"} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_rlvr(argv):
    run_in_process(rlvr.main, argv)


def base_args(model_dir, data, output_dir, *extra):
    # 4 prompts x 2 samples per step, 2 steps; responses of at most 6 tokens, which the random model never ends
    # with EOS: without --no-non_stop_penalty, every reward would be the penalty
    return ["--model_name_or_path", model_dir, "--dataset_mixer_list", data, "1.0", "--output_dir", str(output_dir),
            "--num_unique_prompts_rollout", "4", "--num_samples_per_prompt_rollout", "2", "--total_episodes", "16",
            "--response_length", "6", "--max_seq_length", "64", "--per_device_train_batch_size", "2",
            "--num_mini_batches", "2", "--learning_rate", "1e-3", "--no-non_stop_penalty", *extra]


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_a_run_logs_every_metric_and_saves_a_trained_model(algo, tiny_model_dir, tmp_path):
    data = write_rlvr_data(tmp_path / "rlvr.jsonl")
    run_rlvr(base_args(tiny_model_dir, data, tmp_path / "out", "--algo", algo, "--ppo_epochs", "2"))
    metrics = read_metrics(tmp_path / "out")
    assert [m["step"] for m in metrics] == [1, 2] and metrics[-1]["episodes"] == 16
    for name in ["reward_mean", "reward_std", "kl1", "kl3", "entropy", "response_length", "length_limit_fraction",
                 "clip_fraction", "loss", "grad_norm", "sampling_tokens_per_s", "training_tokens_per_s",
                 "time/sampling", "time/scoring", "time/training"]:
        assert all(name in m and m[name] == m[name] for m in metrics), name  # present and not NaN
    # accuracy per dataset, for the datasets a step sampled
    assert {k for m in metrics for k in m if k.startswith("accuracy/")} == {"accuracy/gsm8k", "accuracy/ifeval"}
    assert any(m["reward_std"] > 0 for m in metrics)  # the constraint splits the samples, so there is signal
    assert all(m["sampling_logprob_diff"] < 1e-4 for m in metrics)  # sampler and training forward agree
    assert metrics[0]["kl1"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert all(m["kl3"] >= 0 for m in metrics)  # k3, GRPO's loss term, is never negative (k1 can be)
    assert all(0 < m["response_length"] <= 6 for m in metrics)
    if algo == "ppo":
        assert all(m["value_loss"] > 0 for m in metrics)
    trained, initial = (load_file(os.path.join(d, "model.safetensors")) for d in (tmp_path / "out", tiny_model_dir))
    assert set(trained) == set(initial)
    assert any(not torch.equal(trained[name], initial[name]) for name in initial)


class Interrupt(Exception):
    pass


def test_interrupted_then_resumed_run_repeats_the_same_steps(tiny_model_dir, tmp_path, monkeypatch):
    data = write_rlvr_data(tmp_path / "rlvr.jsonl")
    extra = ["--total_episodes", "24", "--checkpointing_steps", "1"]
    run_rlvr(base_args(tiny_model_dir, data, tmp_path / "straight", *extra))
    real_update, calls = rlvr.update, {"n": 0}

    def update(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # killed during step 3's updates
            raise Interrupt
        return real_update(*args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(rlvr, "update", update)
        with pytest.raises(Interrupt):
            run_rlvr(base_args(tiny_model_dir, data, tmp_path / "resumed", *extra))
    assert [m["step"] for m in read_metrics(tmp_path / "resumed")] == [1, 2]
    run_rlvr(base_args(tiny_model_dir, data, tmp_path / "resumed", *extra, "--resume"))
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [m["step"] for m in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed):
        for name in ("reward_mean", "loss", "grad_norm", "kl1", "kl3", "response_length"):
            assert a[name] == pytest.approx(b[name], rel=1e-5, abs=1e-7), (a["step"], name)
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("straight", "resumed"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)


def _two_rank_worker(rank, runs):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    real_score_responses = rlvr.score_responses
    for port, argv in runs:
        # A fresh rendezvous port per run: a rank that finishes first must not join the last run's store.
        os.environ["MASTER_PORT"] = port
        prompts = []  # per step, the prompt of each response this rank sampled

        def score_responses(responses, rows, stopped, args):
            prompts.append([row["input_ids"] for row in rows])
            return real_score_responses(responses, rows, stopped, args)
        rlvr.score_responses = score_responses
        rlvr.main(argv)
        output_dir = argv[argv.index("--output_dir") + 1]
        with open(os.path.join(output_dir, f"prompts_rank{rank}.json"), "w") as f:
            json.dump(prompts, f)


def test_two_gloo_ranks_split_the_prompts_and_finish_grpo_and_ppo(tiny_model_dir, tmp_path):
    data = write_rlvr_data(tmp_path / "rlvr.jsonl")
    # stop strings end rows at different steps on each rank: ranks decoding independently must not hang
    ports = [free_port()]
    while len(ports) < 2:
        ports += [port for port in [free_port()] if port not in ports]
    runs = [(port, base_args(tiny_model_dir, data, tmp_path / algo, "--algo", algo, "--stop_strings", "e"))
            for port, algo in zip(ports, ("grpo", "ppo"))]
    mp.spawn(_two_rank_worker, args=(runs,), nprocs=2, join=True)
    for algo in ("grpo", "ppo"):
        metrics = read_metrics(tmp_path / algo)
        assert [m["step"] for m in metrics] == [1, 2] and metrics[-1]["episodes"] == 16
        assert all(m["response_tokens"] <= 8 * 6 and m["sampling_logprob_diff"] < 1e-4 for m in metrics)
        assert os.path.exists(tmp_path / algo / "model.safetensors")
        ranks = [json.loads((tmp_path / algo / f"prompts_rank{rank}.json").read_text()) for rank in (0, 1)]
        for step_prompts in zip(*ranks):  # each step's 4 prompts: 2 on each rank, each sampled twice in a row
            groups = [[tuple(ids) for ids in prompts[::2]] for prompts in step_prompts]
            assert all(prompts[::2] == prompts[1::2] for prompts in step_prompts)
            assert len(set(groups[0])) == len(set(groups[1])) == 2 and not set(groups[0]) & set(groups[1])


def test_prompts_that_do_not_fill_one_step_are_a_clear_error(tiny_model_dir, tmp_path):
    data = write_rlvr_data(tmp_path / "rlvr.jsonl")
    with pytest.raises(SystemExit, match="not one step"):
        run_rlvr(base_args(tiny_model_dir, data, tmp_path / "out", "--num_unique_prompts_rollout", "16"))


def refusal(argv, capsys) -> str:
    """parse_args's one-line error for argv (raised as SystemExit's message; infra.run prints it)."""
    with pytest.raises(SystemExit) as stop:
        rlvr.parse_args(argv)
    assert isinstance(stop.value.code, str)
    return stop.value.code


@pytest.mark.parametrize("bad, message", [(["--response_length", "64"], "--response_length must leave room"),
                                          (["--temperature", "0"], "--temperature: 0 must be > 0.0")])
def test_response_length_must_leave_room_for_a_prompt_and_sampling_must_be_random(bad, message, tiny_model_dir,
                                                                                 tmp_path, capsys):
    assert message in refusal(base_args(tiny_model_dir, "x.jsonl", tmp_path, *bad), capsys)


def test_algorithm_defaults_follow_tulu():
    grpo = rlvr.parse_args(["--model_name_or_path", "m", "--dataset_mixer_list", "d", "1", "--output_dir", "o"])
    ppo = rlvr.parse_args(["--model_name_or_path", "m", "--dataset_mixer_list", "d", "1", "--output_dir", "o",
                           "--algo", "ppo"])
    assert (grpo.beta, grpo.learning_rate, grpo.num_samples_per_prompt_rollout, grpo.lr_scheduler_type) == \
        (0.01, 5e-7, 16, "constant")
    # open-instruct's estimators: k3 in Tülu 3.1's GRPO loss, k1 in Tülu 3's PPO reward
    assert (grpo.kl_estimator, ppo.kl_estimator) == ("kl3", "kl1")
    # Tülu 3.1: 2 mini-batches per rollout, a response cut at the length limit scores 0
    assert (grpo.num_mini_batches, grpo.non_stop_penalty, grpo.penalty_reward_value) == (2, True, 0.0)
    assert (ppo.beta, ppo.learning_rate, ppo.ppo_epochs, ppo.lr_scheduler_type, ppo.gamma, ppo.lam, ppo.vf_coef) == \
        (0.05, 3e-7, 4, "linear", 1.0, 0.95, 0.1)
    assert (ppo.num_mini_batches, ppo.non_stop_penalty, ppo.penalty_reward_value) == (1, True, -10.0)
    assert grpo.verification_reward == 10.0 and grpo.temperature == 1.0
    # the options added since Tülu 3.1 are off: symmetric clip, standard normalization, every token in a token mean
    assert (grpo.clip_lower, grpo.clip_higher, grpo.advantage_normalization_type, grpo.loss_denominator) == \
        (0.2, 0.2, "standard", "token")
    assert not grpo.mask_truncated_completions and not grpo.filter_zero_std_samples


@pytest.mark.parametrize("bad, message", [
    (["--num_samples_per_prompt_rollout", "1"], "--num_samples_per_prompt_rollout must be >= 2"),
    (["--loss_denominator", "0"], "--loss_denominator must be token or a number > 0"),
    (["--loss_denominator", "tokens"], "--loss_denominator: invalid"),
    (["--algo", "ppo", "--filter_zero_std_samples"], "act on GRPO's groups only")])
def test_options_that_cannot_work_are_refused(bad, message, capsys):
    argv = ["--model_name_or_path", "m", "--dataset_mixer_list", "d", "1", "--output_dir", "o", *bad]
    assert message in refusal(argv, capsys)


def test_beta_0_loads_no_reference_model_and_trains(tiny_model_dir, tmp_path, monkeypatch):
    data = write_rlvr_data(tmp_path / "rlvr.jsonl")
    loads = []
    real_load_model = infra.load_model
    monkeypatch.setattr(infra, "load_model", lambda *a, **k: loads.append(a[0]) or real_load_model(*a, **k))
    run_rlvr(base_args(tiny_model_dir, data, tmp_path / "out", "--beta", "0", "--loss_denominator", "6",
                       "--advantage_normalization_type", "centered", "--clip_higher", "0.28"))
    assert loads == [tiny_model_dir]  # the policy only
    metrics = read_metrics(tmp_path / "out")
    assert all(math.isnan(m["kl1"]) and math.isnan(m["kl3"]) for m in metrics)  # no reference: no KL, not a false 0
    trained, initial = (load_file(os.path.join(d, "model.safetensors")) for d in (tmp_path / "out", tiny_model_dir))
    assert any(not torch.equal(trained[name], initial[name]) for name in initial)


def test_masked_truncated_completions_give_no_gradient(tiny_model_dir, tmp_path):
    # the random tiny model never says EOS in 6 tokens: every response is cut, so nothing is trained
    data = write_rlvr_data(tmp_path / "rlvr.jsonl")
    run_rlvr(base_args(tiny_model_dir, data, tmp_path / "out", "--total_episodes", "8",
                       "--mask_truncated_completions", "--filter_zero_std_samples"))
    metrics = read_metrics(tmp_path / "out")
    assert metrics[0]["length_limit_fraction"] == 1.0
    assert metrics[0]["loss"] == 0.0 and metrics[0]["grad_norm"] == 0.0


def test_ppo_clips_the_policy_and_the_value_gradients_each_by_its_own_norm(tiny_model_dir, tmp_path, monkeypatch):
    data = write_rlvr_data(tmp_path / "rlvr.jsonl")
    clipped = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def clip(parameters, max_norm):
        parameters = list(parameters)
        clipped.append({id(p) for p in parameters})
        return real_clip(parameters, max_norm)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    run_rlvr(base_args(tiny_model_dir, data, tmp_path / "out", "--algo", "ppo", "--total_episodes", "8",
                       "--ppo_epochs", "1", "--num_mini_batches", "1"))
    assert len(clipped) == 2 and not clipped[0] & clipped[1]  # one optimizer step: two disjoint clips
    metrics = read_metrics(tmp_path / "out")
    assert metrics[0]["grad_norm"] > 0 and metrics[0]["value_grad_norm"] > 0


def test_the_first_update_sees_the_rollouts_log_probs_even_for_a_model_configured_with_dropout(tiny_tokenizer,
                                                                                               tmp_path, monkeypatch):
    # rollouts and old log-probs run in eval mode, the update in train mode: with dropout left on, rho != 1 before
    # any update. open-instruct turns every dropout off; so does rlvr.py.
    model_dir = tmp_path / "dropout_model"
    build_tiny_model(tiny_tokenizer, attention_dropout=0.5).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    data = write_rlvr_data(tmp_path / "rlvr.jsonl")
    first_calls, real_grpo_loss = [], rlvr.grpo_loss

    def grpo_loss(logps, old_logps, *args, **kwargs):
        first_calls.append((logps.detach().clone(), old_logps.clone()))
        return real_grpo_loss(logps, old_logps, *args, **kwargs)
    monkeypatch.setattr(rlvr, "grpo_loss", grpo_loss)
    run_rlvr(base_args(str(model_dir), data, tmp_path / "out", "--total_episodes", "8"))
    logps, old_logps = first_calls[0]  # the first micro-batch, before any optimizer step
    torch.testing.assert_close(logps, old_logps, rtol=0, atol=1e-5)


def test_every_resumable_flag_is_a_flag_of_rlvr():
    args = rlvr.parse_args(["--model_name_or_path", "m", "--dataset_mixer_list", "d", "1", "--output_dir", "o"])
    assert rlvr.RESUMABLE_FLAGS <= set(vars(args))
