"""synth.py: IFEval constraints stated and verifiable, self-consistent math answers, decontaminated prompts,
rejection sampling, the judge's strict replies and binarization, endpoints that fail and are retried, and output
that a kill and a rerun leave exactly as an uninterrupted run writes it."""
import http.server
import json
import os
import random
import re
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, free_port, run_in_process

import benchmarks
import data_mix
import rlvr
import synth
import verifiers

# ---------------------------------------------------------------------------------------------
# A loopback OpenAI-compatible server: answer(model, messages, seed) -> reply text, or (status, None), or
# ("sleep", seconds, text)


class StubServer:
    def __init__(self, answer):
        self.answer, self.requests = answer, []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(body)
                reply = stub.answer(body["model"], body["messages"], body.get("seed"))
                if isinstance(reply, tuple) and reply[0] == "sleep":
                    time.sleep(reply[1])
                    reply = reply[2]
                if isinstance(reply, tuple):  # (status, None): an error the client may retry
                    self.send_response(reply[0])
                    self.send_header("Content-Type", "application/json")
                    self.send_header("retry-after-ms", "5")  # the client waits this long, not seconds
                    self.end_headers()
                    self.wfile.write(json.dumps({"error": {"message": "stub error"}}).encode())
                    return
                data = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": reply}}],
                                   "usage": {"prompt_tokens": 1, "completion_tokens": len(reply.split()),
                                             "total_tokens": 1 + len(reply.split())}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # a client that timed out closed its socket
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def model(self, name: str) -> str:
        return f"{self.url}#{name}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    servers = []

    def start(answer):
        servers.append(StubServer(answer))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def run(argv) -> dict:
    """synth.main(argv) in this process, with one retry and a 5 s timeout unless argv says otherwise; its summary."""
    run_in_process(synth.main, argv[:1] + ["--max_retries", "1", "--request_timeout", "5"] + argv[1:])
    return read_summary(argv)


def read_summary(argv) -> dict:
    output = argv[argv.index("--output") + 1]
    with open(output.removesuffix(".jsonl") + ".summary.json") as f:
        return json.load(f)


def user_text(body) -> str:
    return body[-1]["content"]


# ---------------------------------------------------------------------------------------------
# IFEval constraints


def test_every_constraint_type_draws_arguments_the_verifier_accepts_and_states_each_value():
    table = synth.load_constraint_table()
    assert len(table["instructions"]) == 25
    request = "Write a short letter to my landlord about the broken heater."
    for instruction_id, spec in table["instructions"].items():
        for seed in range(20):
            arguments = synth.draw_arguments(random.Random(seed), spec["args"])
            prompt, ground_truth = synth.constrained_prompt(request, [(instruction_id, arguments)], table)
            verifiers.check_ground_truth(ground_truth, "ifeval")  # (constrained_prompt checks it too)
            kwargs = json.loads(ground_truth)["kwargs"][0]
            assert json.loads(ground_truth)["instruction_id_list"] == [instruction_id]
            assert prompt.startswith(request + "\n\n")
            stated = prompt[len(request):]
            for name, value in kwargs.items():
                if name == "prompt_to_repeat":
                    assert value == request
                elif name == "language":
                    assert table["language_names"][value] in stated
                else:
                    for part in value if isinstance(value, list) else [value]:
                        assert re.search(rf"(?<!\d){re.escape(str(part))}(?!\d)", stated), (instruction_id, name, part)


def test_a_response_that_obeys_the_stated_constraints_passes_their_verifier():
    table = synth.load_constraint_table()
    constraints = [("punctuation:no_comma", {}), ("detectable_format:title", {}),
                   ("keywords:existence", {"keywords": ["garden", "river"]})]
    _, ground_truth = synth.constrained_prompt("Describe a walk.", constraints, table)
    assert verifiers.verify("<<A walk>>\nThe garden ends at the river.", ground_truth, "ifeval") == 1.0
    assert verifiers.verify("<<A walk>>\nThe garden, then the river.", ground_truth, "ifeval") == pytest.approx(2 / 3)


def test_drawn_constraints_are_one_to_three_distinct_types_and_never_a_conflicting_pair():
    table = synth.load_constraint_table()
    sizes = set()
    for seed in range(2000):
        ids = [instruction_id for instruction_id, _ in synth.draw_constraints(random.Random(seed), table)]
        sizes.add(len(ids))
        assert len(set(ids)) == len(ids)
        assert not any(b in table["conflicts"][a] for a in ids for b in ids)
    assert sizes == {1, 2, 3}
    assert synth.draw_constraints(random.Random(7), table) == synth.draw_constraints(random.Random(7), table)


# ---------------------------------------------------------------------------------------------
# prompts


def test_ifeval_prompts_are_rlvr_rows_whose_prompt_states_their_ground_truth(tmp_path, stub, benchmarks_dir):
    server = stub(lambda model, messages, seed: "Write a letter to my neighbour about the garden party.")
    out = str(tmp_path / "if.jsonl")
    summary = run(["prompts", "--skill", "ifeval", "--num_prompts", "6", "--generator", server.model("gen"),
                   "--decontaminate_against", "ifeval", "--benchmark_dir", benchmarks_dir, "--output", out,
                   "--batch_size", "4"])
    table = synth.load_constraint_table()
    rows = read_jsonl(out)
    assert [row["id"] for row in rows] == [f"ifeval-{i:07d}" for i in range(6)]
    assert summary["attempted"] == summary["kept"] == 6 and summary["dropped"] == {}
    for row in rows:
        record = rlvr.validate_rlvr_record(row, "test")
        truth = json.loads(record["ground_truth"])
        prompt = row["messages"][0]["content"]
        assert prompt.startswith("Write a letter to my neighbour about the garden party.\n\n")
        for instruction_id, kwargs in zip(truth["instruction_id_list"], truth["kwargs"]):
            assert synth.render_constraint(instruction_id, kwargs, table) in prompt
        assert row["persona"] in {json.loads(line)["persona"] for line in open(os.path.join(ROOT, "data",
                                                                                          "personas.jsonl"))}


def test_math_problems_are_kept_only_when_the_samples_agree_and_carry_the_agreed_answer(tmp_path, stub):
    def answer(model, messages, seed):
        text = user_text(messages)
        if "Solve this step by step" not in text:  # the problem writer: one problem per persona
            return "Ann has 40 apples and buys 2 more. How many?" if "farmer" in text else "Pick any number."
        return "40 + 2 = 42, so \\boxed{42}" if "apples" in text else f"I pick \\boxed{{{seed % 1000}}}"
    server = stub(answer)
    personas = write_jsonl(tmp_path / "personas.jsonl", [{"persona": "A farmer."}, {"persona": "A poet."}])
    out = str(tmp_path / "math.jsonl")
    summary = run(["prompts", "--skill", "math", "--num_prompts", "8", "--personas", personas, "--generator",
                   server.model("gen"), "--num_samples", "4", "--min_agreement", "0.75", "--output", out])
    rows = read_jsonl(out)
    assert rows and all("apples" in row["messages"][0]["content"] for row in rows)
    assert all(row["ground_truth"] == "42" and row["dataset"] == "MATH" for row in rows)
    assert all(verifiers.verify("so \\boxed{42}", row["ground_truth"], row["dataset"]) == 1.0 for row in rows)
    assert summary["dropped"] == {"no_agreement": 8 - len(rows)} and 0 < len(rows) < 8


def test_generated_prompts_that_copy_a_benchmark_are_dropped_and_counted(tmp_path, stub, benchmarks_dir):
    question = benchmarks.load_benchmark("gsm8k", benchmarks_dir)[0]["question"]
    server = stub(lambda model, messages, seed: question if seed % 2 else "Write a function that reverses a list.")
    out = str(tmp_path / "code.jsonl")
    summary = run(["prompts", "--skill", "code", "--num_prompts", "10", "--generator", server.model("gen"),
                   "--decontaminate_against", "gsm8k", "--benchmark_dir", benchmarks_dir, "--output", out])
    rows = read_jsonl(out)
    assert all(row["messages"][0]["content"] == "Write a function that reverses a list." for row in rows)
    contaminated = 10 - len(rows)
    assert 0 < contaminated < 10
    assert summary["dropped"] == {"contaminated": contaminated}
    assert summary["counts"]["contaminated/gsm8k"] == contaminated


# ---------------------------------------------------------------------------------------------
# responses


def test_responses_keep_the_first_verified_sample_and_report_the_pass_rate(tmp_path, stub):
    def answer(model, messages, seed):
        if "Never" in user_text(messages):
            return "The answer is 41."
        return "The answer is 42." if seed % 2 else "The answer is 41."
    server = stub(answer)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"id": "a", "messages": [{"role": "user", "content": "Sometimes: what is 40 + 2?"}], "ground_truth": "42",
         "dataset": "gsm8k"},
        {"id": "b", "messages": [{"role": "user", "content": "Never: what is 40 + 2?"}], "ground_truth": "42",
         "dataset": "gsm8k"},
        {"id": "c", "messages": [{"role": "user", "content": "Say hello."}]}])
    out = str(tmp_path / "sft.jsonl")
    summary = run(["responses", "--prompts", prompts, "--generator", server.model("gen"), "--samples", "4",
                   "--output", out])
    rows = {row["id"]: row for row in read_jsonl(out)}
    assert set(rows) == {"a", "c"}
    assert rows["a"]["messages"][-1] == {"role": "assistant", "content": "The answer is 42."}
    assert rows["a"]["ground_truth"] == "42" and data_mix.validate_sft_record(rows["c"], "test")
    assert summary["dropped"] == {"no_response_passed": 1}
    assert summary["counts"]["verified"] == 8 and summary["pass_rate"] == 0.25  # 2 of a's 4, none of b's
    assert len(server.requests) == 12


# ---------------------------------------------------------------------------------------------
# The judge and the binarization


@pytest.mark.parametrize("reply, ratings", [
    ('{"helpfulness": 4, "instruction_following": 5, "honesty": 3, "truthfulness": "N/A"}',
     {"helpfulness": 4, "instruction_following": 5, "honesty": 3, "truthfulness": "N/A"}),
    ('```json\n{"helpfulness": 1, "instruction_following": 1, "honesty": 1, "truthfulness": 1}\n```',
     {"helpfulness": 1, "instruction_following": 1, "honesty": 1, "truthfulness": 1}),
    ('{"helpfulness": 6, "instruction_following": 5, "honesty": 3, "truthfulness": 4}', None),  # out of range
    ('{"helpfulness": 0, "instruction_following": 5, "honesty": 3, "truthfulness": 4}', None),
    ('{"helpfulness": 4.5, "instruction_following": 5, "honesty": 3, "truthfulness": 4}', None),  # not an integer
    ('{"helpfulness": true, "instruction_following": 5, "honesty": 3, "truthfulness": 4}', None),
    ('{"helpfulness": "4", "instruction_following": 5, "honesty": 3, "truthfulness": 4}', None),
    ('{"helpfulness": 4, "instruction_following": 5, "honesty": 3}', None),  # a key missing
    ('{"helpfulness": 4, "instruction_following": 5, "honesty": 3, "truthfulness": 4, "overall": 4}', None),
    ('Ratings: {"helpfulness": 4, "instruction_following": 5, "honesty": 3, "truthfulness": 4}', None),
    ("[4, 5, 3, 4]", None), ("Great answer!", None), ("", None)])
def test_judge_reply_parses_only_a_json_object_with_exactly_the_four_ratings(reply, ratings):
    assert synth.parse_judge_reply(reply) == ratings


def test_mean_rating_leaves_na_out_and_is_none_when_all_are_na():
    assert synth.mean_rating({"a": 4, "b": "N/A", "c": 5, "d": "N/A"}) == 4.5
    assert synth.mean_rating(dict.fromkeys("abcd", "N/A")) is None


def test_binarize_takes_the_highest_and_a_strictly_lower_rejected_and_drops_ties_and_singles():
    a, b, c, d = ({"text": t, "model": t} for t in "abcd")
    assert synth.binarize([(a, 3.0)], random.Random(0)) == (None, "fewer_than_two_rated")
    assert synth.binarize([], random.Random(0)) == (None, "fewer_than_two_rated")
    assert synth.binarize([(a, 3.0), (b, 3.0)], random.Random(0)) == (None, "tie")
    same_text = {"text": "a", "model": "other"}
    assert synth.binarize([(a, 4.0), (same_text, 2.0)], random.Random(0)) == (None, "tie")
    rejected = set()
    for seed in range(50):
        (chosen, chosen_rating), (reject, reject_rating) = synth.binarize(
            [(a, 2.0), (b, 4.5), (c, 4.5), (d, 1.0)], random.Random(seed))[0]
        assert chosen in (b, c) and chosen_rating == 4.5 and reject in (a, d) and reject_rating < 4.5
        rejected.add(reject["text"])
    assert rejected == {"a", "d"}  # drawn among the strictly lower, not always the lowest


def test_preferences_rate_each_completion_once_and_count_malformed_na_slow_and_failed_replies(tmp_path, stub):
    attempts = {}

    def judge(model, messages, seed):
        response = user_text(messages).split("[Response]\n")[-1]
        attempts[response] = attempts.get(response, 0) + 1
        scores = {"good": '{"helpfulness": 5, "instruction_following": 5, "honesty": 5, "truthfulness": 5}',
                  "fair": '{"helpfulness": 3, "instruction_following": "N/A", "honesty": 3, "truthfulness": 3}',
                  "unsure": '{"helpfulness": "N/A", "instruction_following": "N/A", "honesty": "N/A", '
                            '"truthfulness": "N/A"}',
                  "rambling": "This one is quite good, I would say 4.",
                  "wild": '{"helpfulness": 9, "instruction_following": 5, "honesty": 5, "truthfulness": 5}'}
        if response == "flaky":  # 429, then 500, then an answer: the client's retries get it
            return [(429, None), (500, None)][attempts[response] - 1] if attempts[response] <= 2 else \
                '{"helpfulness": 2, "instruction_following": 2, "honesty": 2, "truthfulness": 2}'
        if response == "slow":  # past --request_timeout on every try: no rating
            return ("sleep", 1.5, scores["good"])
        return scores[response]
    judge_server = stub(judge)
    pool_server = stub(lambda model, messages, seed: model)  # each pool model answers with its own name
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [{"role": "user", "content": "Help me."}]}])
    out = str(tmp_path / "prefs.jsonl")
    names = ["good", "fair", "unsure", "rambling", "wild", "flaky", "slow"]
    argv = ["preferences", "--prompts", prompts, "--policy", pool_server.model("fair"),
            "--pool"] + [pool_server.model(name) for name in names[2:]] + ["--models_per_prompt", "5",
            "--judge", judge_server.model("judge"), "--request_timeout", "0.5", "--max_retries", "2", "--output", out]
    summary = run(argv)  # policy "fair" (3.0); pool: unsure (all N/A), rambling, wild (unparseable), flaky (2.0), slow
    assert summary["dropped"] == {} and summary["kept"] == 1
    assert summary["judge_requests"] == 6 and summary["counts"]["judge_unparseable"] == 2
    assert summary["counts"]["judge_all_na"] == 1 and summary["counts"]["judge_failed"] == 1
    assert attempts["flaky"] == attempts["slow"] == 3  # (--max_retries 2: three tries)
    row = read_jsonl(out)[0]
    assert (row["chosen_model"], row["chosen_rating"]) == (pool_server.model("fair"), 3.0)
    assert (row["rejected_model"], row["rejected_rating"]) == (pool_server.model("flaky"), 2.0)
    assert row["chosen"][-1]["content"] == "fair" and row["prompt"] == "Help me."
    import dpo
    dpo.validate_preference_record(row, "test")


def test_verifier_judge_prefers_correct_completions_and_drops_prompts_all_judged_alike(tmp_path, stub):
    server = stub(lambda model, messages, seed: {"right": "The answer is 42.", "wrong": "It is 7."}[model])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"id": "p", "messages": [{"role": "user", "content": "40 + 2?"}], "ground_truth": "42", "dataset": "gsm8k"},
        {"id": "q", "messages": [{"role": "user", "content": "6 * 7?"}], "ground_truth": "41", "dataset": "gsm8k"}])
    out = str(tmp_path / "prefs.jsonl")
    summary = run(["preferences", "--prompts", prompts, "--policy", server.model("right"), "--pool",
                   server.model("wrong"), "--judge", "verifier", "--output", out])
    [row] = read_jsonl(out)
    assert (row["id"], row["chosen_rating"], row["rejected_rating"]) == ("p", 1.0, 0.0)
    assert row["chosen_model"].endswith("#right") and row["rejected"][-1]["content"] == "It is 7."
    assert summary["dropped"] == {"tie": 1} and summary["judge_requests"] == 0


def test_local_policy_and_endpoint_pool_together(tmp_path, stub, tiny_model_dir):
    judge = stub(lambda model, messages, seed: '{"helpfulness": 5, "instruction_following": 5, "honesty": 5, '
                 '"truthfulness": 5}' if "[Response]\npool answer" in user_text(messages) else
                 '{"helpfulness": 1, "instruction_following": 1, "honesty": 1, "truthfulness": 1}')
    pool = stub(lambda model, messages, seed: "pool answer")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [{"role": "user", "content": f"hello {i}"}]}
                                                       for i in range(3)])
    out = str(tmp_path / "prefs.jsonl")
    summary = run(["preferences", "--prompts", prompts, "--policy", tiny_model_dir, "--pool", pool.model("p"),
                   "--judge", judge.model("j"), "--max_new_tokens", "6", "--output", out])
    rows = read_jsonl(out)
    assert len(rows) == 3 and all(row["rejected_model"] == tiny_model_dir for row in rows)
    assert summary["tokens_generated"] >= 3 * 1 and summary["this_run"]["prompts"] == 3


# ---------------------------------------------------------------------------------------------
# Lossless and resumable

KILL_AFTER_WRITES = """
import os, signal, sys
sys.path.insert(0, {root!r})
import infra, synth
calls, write = [0], infra.ResumableJsonl.write
def dying_write(self, record, row):
    calls[0] += 1
    if calls[0] == {kill_at}:  # half of a row on disk, then SIGKILL: a kill mid-write
        self.rows.write(json_line(row)[:25])
        self.rows.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    write(self, record, row)
def json_line(row):
    import json
    return json.dumps(row) + "\\n"
infra.ResumableJsonl.write = dying_write
synth.main(sys.argv[1:])
"""


def sampled_responses(tmp_path, stub, prompt_count: int, batch_size: int):
    """argv(output) of `synth.py responses` on `prompt_count` prompts, sampled (T 1) from a stub whose reply
    depends on the draw's seed; and the environment of a child process that starts its own process group."""
    server = stub(lambda model, messages, seed: f"reply {seed % 97} to {user_text(messages)}")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"}]}
                                                       for i in range(prompt_count)])

    def argv(out):
        return ["responses", "--prompts", prompts, "--generator", server.model("g"), "--batch_size", str(batch_size),
                "--temperature", "1.0", "--output", str(out)]
    env = dict(os.environ, PYTHONPATH=ROOT)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return server, argv, env


def test_a_kill_mid_file_then_a_rerun_writes_exactly_the_uninterrupted_output(tmp_path, stub):
    server, argv, env = sampled_responses(tmp_path, stub, prompt_count=10, batch_size=3)
    run(argv(tmp_path / "whole.jsonl"))
    env["MASTER_PORT"] = free_port()
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_WRITES.format(root=ROOT, kill_at=5)]
                            + argv(tmp_path / "resumed.jsonl"), env=env, cwd=ROOT, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    with open(tmp_path / "resumed.jsonl") as f:
        torn = f.read()
    assert torn.count("\n") == 4 and not torn.endswith("\n")  # 4 rows and half of the 5th
    requests_before = len(server.requests)
    summary = run(argv(tmp_path / "resumed.jsonl"))
    assert (tmp_path / "resumed.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    assert [r["id"] for r in read_jsonl(tmp_path / "resumed.done.jsonl")] == \
        [r["id"] for r in read_jsonl(tmp_path / "whole.done.jsonl")]
    assert summary["attempted"] == summary["kept"] == 10
    assert len(server.requests) - requests_before == 7  # chunks 1-3 (3 + 3 + 1 prompts): chunk 1 held row 4
    run(argv(tmp_path / "resumed.jsonl"))  # a finished output: nothing is asked again
    assert len(server.requests) - requests_before == 7


def test_a_shortened_or_unknown_flag_is_one_line_not_a_prefix_match():
    """synth.py parses with the stages' parser: argparse would take --sample 2 as --samples 2."""
    given = ["responses", "--prompts", "p.jsonl", "--generator", "g", "--output", "o.jsonl"]
    with pytest.raises(SystemExit, match=r"unknown flag --sample \(--help lists the flags\)$"):
        synth.parse_args(given + ["--sample", "2"])
    with pytest.raises(SystemExit, match=r"argument --samples: 0 must be >= 1$"):
        synth.parse_args(given + ["--samples", "0"])


def test_a_changed_command_on_the_same_output_is_refused_but_a_changed_concurrency_is_not(tmp_path, stub):
    server = stub(lambda model, messages, seed: "ok")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    argv = ["responses", "--prompts", prompts, "--generator", server.model("g"), "--output", str(tmp_path / "o.jsonl")]
    run(argv)
    run(argv + ["--max_concurrency", "2"])
    with pytest.raises(SystemExit, match="flags differ: --seed"):
        run(argv + ["--seed", "5"])
    write_jsonl(tmp_path / "foreign.jsonl", [{"a": 1}])
    with pytest.raises(SystemExit, match="not written by this script"):
        run(argv[:-1] + [str(tmp_path / "foreign.jsonl")])


@pytest.mark.full
def test_two_ranks_under_torchrun_split_the_chunks_and_write_what_one_rank_writes(tmp_path, stub):
    _, argv, env = sampled_responses(tmp_path, stub, prompt_count=11, batch_size=2)
    run(argv(tmp_path / "one.jsonl"))
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", free_port(), "synth.py"] + argv(tmp_path / "two.jsonl"),
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
