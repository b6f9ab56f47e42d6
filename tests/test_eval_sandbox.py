"""The HumanEval sandbox: right programs pass, wrong ones fail, and escapes are contained."""
import json
import os
import socket
import threading

import pytest

from eval import humaneval_program
from sandbox import REQUIRED_ISOLATION, run_program


@pytest.fixture(scope="module")
def humaneval(benchmarks_dir):
    with open(os.path.join(benchmarks_dir, "humaneval.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_canonical_solutions_pass(humaneval):
    for example in humaneval[:6]:
        result = run_program(humaneval_program(example, example["canonical_solution"]))
        assert result["status"] == "passed", (example["task_id"], result["output"])


def test_broken_solutions_fail(humaneval):
    for example in humaneval[:3]:
        result = run_program(humaneval_program(example, "    return None\n"))
        assert result["status"] == "failed" and "AssertionError" in result["output"]


def test_infinite_loop_times_out():
    result = run_program("while True:\n    pass\n", timeout_s=1.0)
    assert result["status"] == "timed out"


def test_memory_limit_stops_a_huge_allocation():
    result = run_program("x = bytearray(4 << 30)\n", memory_mb=512)
    assert result["status"] == "failed" and "MemoryError" in result["output"]


def test_writes_outside_scratch_are_refused_and_inside_allowed(tmp_path):
    target = tmp_path / "escaped.txt"
    result = run_program(f"open({str(target)!r}, 'w').write('x')\n")
    assert result["status"] == "failed" and not target.exists()
    victim = tmp_path / "keep.txt"  # a file the program may see but must not delete (a plain python would)
    victim.write_text("kept")
    victim.chmod(0o666)
    tmp_path.chmod(0o777)  # so only the sandbox, not file permissions, stands between the program and the file
    result = run_program(f"import os\nos.remove({str(victim)!r})\n")
    assert result["status"] == "failed" and victim.read_text() == "kept"
    result = run_program("open('notes.txt', 'w').write('ok')\nassert open('notes.txt').read() == 'ok'\n")
    assert result["status"] == "passed", result["output"]


@pytest.fixture
def listener():
    """A local TCP server that records whether anything connected to it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(3)
    connections = []

    def accept():
        try:
            connections.append(server.accept())
        except OSError:
            pass
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], connections
    server.close()
    thread.join()


def test_network_connections_are_refused(listener):
    port, connections = listener
    result = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n")
    assert result["status"] == "failed" and connections == []


def test_fork_bomb_is_contained():
    result = run_program("import os\nwhile True:\n    os.fork()\n", timeout_s=3.0)
    assert result["status"] == "failed"
    result = run_program("import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])\n", timeout_s=3.0)
    assert result["status"] == "failed"


def test_os_layers_alone_contain_writes_network_and_forks(tmp_path, listener):
    """Without the Python guard, where the kernel grants namespaces and a uid change (root, as in CI)."""
    probe = run_program("pass\n", python_guard=False)
    if not set(REQUIRED_ISOLATION) <= set(probe["layers"].split(",")):
        pytest.skip(f"namespaces or a uid change unavailable here: {probe['layers']}")
    port, connections = listener
    target = tmp_path / "escaped.txt"
    assert run_program(f"open({str(target)!r}, 'w')\n", python_guard=False)["status"] == "failed"
    assert not target.exists()
    script = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
    assert run_program(script, python_guard=False)["status"] == "failed" and connections == []


def test_a_chat_models_code_after_olmes_opened_fence_reaches_the_sandbox_as_code(humaneval, tiny_tokenizer):
    """OLMES's assistant prefix opens the fence (```python), so a chat model's answer starts with code and ends
    by closing the fence, where a stop sequence cuts it: what runs is the function, never the fence."""
    import eval as evaluation

    example = humaneval[2]  # truncate_number
    prompt = evaluation.prompt_text("humaneval", example, [], tiny_tokenizer)
    assert prompt.endswith("<|im_start|>assistant\nHere is the completed function:\n\n```python\n")
    answer = (example["prompt"] + example["canonical_solution"] + "```\n\nThis keeps the decimal part.")
    for stop in evaluation.TASKS["humaneval"]["stop"]:  # as the decoding loop cuts a response
        answer = answer.split(stop)[0]
    assert run_program(humaneval_program(example, answer))["status"] == "passed"
