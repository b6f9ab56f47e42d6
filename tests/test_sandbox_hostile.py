"""Hostile HumanEval programs against sandbox.run_program: a fake pass fails, samples cannot reach
each other or the eval process, the disk quota holds, threads work. Most run without the Python
audit guard (python_guard=False), so the OS layers are what contains them."""
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from eval import humaneval_program
import sandbox
from sandbox import REQUIRED_ISOLATION, SANDBOX_DISK_MB, run_program


@pytest.fixture(scope="module", autouse=True)
def isolated():
    layers = run_program("pass\n", allow_unisolated=True)["layers"].split(",")
    if not set(REQUIRED_ISOLATION) <= set(layers):
        pytest.skip(f"the sandbox's OS isolation is unavailable here: {layers}")


@pytest.fixture(scope="module")
def example(benchmarks_dir):
    with open(os.path.join(benchmarks_dir, "humaneval.jsonl")) as f:
        return json.loads(f.readline())


@pytest.mark.parametrize("exit_call", ["import sys\nsys.exit(0)", "exit()", "quit()", "import os\nos._exit(0)",
                                       "raise SystemExit", "raise SystemExit(0)", "print('passed')\nexit(0)",
                                       "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"])
def test_a_wrong_body_that_exits_early_fails(example, exit_call):
    body = f"    return None\n\n{exit_call}\n"  # a wrong function, then an exit before the tests run
    assert run_program(humaneval_program(example, body), python_guard=False)["status"] != "passed"
    inside = "    " + exit_call.replace("\n", "\n    ") + "\n"  # the exit inside the function the tests call
    assert run_program(humaneval_program(example, inside), python_guard=False)["status"] != "passed"


def test_the_canonical_solution_passes_and_threaded_code_works(example):
    threaded = ("    from concurrent.futures import ThreadPoolExecutor\n    with ThreadPoolExecutor(16) as pool:\n"
                "        list(pool.map(abs, range(100)))\n" + example["canonical_solution"])
    for body in (example["canonical_solution"], threaded):
        result = run_program(humaneval_program(example, body), python_guard=False)
        assert result["status"] == "passed", result["output"]


def test_a_sample_cannot_kill_another(example):
    correct = "import time\ntime.sleep(1.5)\n" + humaneval_program(example, example["canonical_solution"])
    killer = "import os, time\nfor _ in range(300):\n    os.kill(-1, 9)\n    time.sleep(0.01)\n"
    with ThreadPoolExecutor(2) as pool:
        victim = pool.submit(run_program, correct, python_guard=False)
        pool.submit(run_program, killer, python_guard=False)
        assert victim.result()["status"] == "passed", victim.result()["output"]


def test_a_sample_cannot_read_another_samples_files(example):
    victim = "import time\nopen('secret.txt', 'w').write('x')\ntime.sleep(2)\n"
    thief = (f"import glob, time\ntime.sleep(0.5)\nseen = glob.glob({tempfile.gettempdir()!r} + '/humaneval-*/*')\n"
             "assert not seen, seen\n")
    with ThreadPoolExecutor(2) as pool:
        pool.submit(run_program, victim, python_guard=False)
        result = pool.submit(run_program, thief, python_guard=False).result()
    assert result["status"] == "passed", result["output"]


def test_the_disk_quota_holds_inside_the_scratch_directory():
    program = ("import errno\ntotal, chunk = 0, b'x' * (4 << 20)\ntry:\n    for i in range(1000):\n"
               "        with open(f'f{i}', 'wb') as f:\n            f.write(chunk)\n        total += len(chunk)\n"
               "except OSError as error:\n    assert error.errno == errno.ENOSPC, error\n"
               f"assert total <= {SANDBOX_DISK_MB} << 20, total\nprint('stopped at', total >> 20, 'MB')\n")
    result = run_program(program, python_guard=False)
    assert result["status"] == "passed", result["output"]
    big_file = run_program("open('big', 'wb').write(b'x' * (32 << 20))\n", python_guard=False)
    assert big_file["status"] == "failed" and "File too large" in big_file["output"]


def test_a_write_through_dir_fd_stays_inside_even_where_the_audit_guard_is_fooled(tmp_path):
    program = (f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\n"
               "os.close(os.open('escaped', os.O_WRONLY | os.O_CREAT, dir_fd=fd))\n")
    assert run_program(program)["status"] == "failed"  # the guard sees a relative path, the OS refuses
    assert not (tmp_path / "escaped").exists()


def sandbox_processes() -> list[str]:
    """Processes of this checkout's sandbox (its supervisor, the program and anything they started)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read()
        except OSError:
            continue
        if b"31.4159" in command or (b"--sandbox" in command and os.path.abspath(sandbox.__file__).encode() in command):
            found.append(pid)
    return found


def test_no_process_outlives_its_sample():
    daemon = ("import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
              "        os.execv('/bin/sleep', ['sleep', '31.4159'])\n")
    assert run_program(daemon, python_guard=False)["status"] == "passed"
    assert sandbox_processes() == []


def test_a_fork_bomb_ends_with_its_sample():
    result = run_program("import os\nwhile True:\n    os.fork()\n", timeout_s=2.0, python_guard=False)
    assert result["status"] != "passed" and sandbox_processes() == []


def test_the_eval_process_cannot_be_signalled():
    result = run_program(f"import os\nos.kill({os.getpid()}, 9)\n", python_guard=False)
    assert result["status"] == "failed" and "ProcessLookupError" in result["output"]


def test_without_isolation_the_program_is_refused_unless_allowed(monkeypatch):
    monkeypatch.setattr(sandbox, "REQUIRED_ISOLATION", REQUIRED_ISOLATION + ("a-layer-no-machine-has",))
    refused = sandbox.run_program("pass\n")
    assert refused["status"] == "refused" and "a-layer-no-machine-has" in refused["output"]
    assert sandbox.run_program("pass\n", allow_unisolated=True)["status"] == "passed"


def test_eval_refuses_humaneval_without_isolation_before_loading_a_model(monkeypatch, tiny_model_dir, tmp_path):
    import eval

    monkeypatch.setattr(sandbox, "missing_isolation", lambda: ["pid-namespace"])
    monkeypatch.setattr(eval, "load_model_and_tokenizer", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match="missing: pid-namespace.*--allow_unsandboxed_code"):
        eval.main(["--model_name_or_path", tiny_model_dir, "--tasks", "humaneval", "--output_dir", str(tmp_path)])


def test_forked_copies_trying_other_answers_do_not_pass():
    program = "import os\nanswer = 1 if os.fork() == 0 else 2\nassert answer == 1\n"  # only the child is right
    assert run_program(program, python_guard=False)["status"] == "failed"
