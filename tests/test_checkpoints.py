"""Checkpoints of all three stages: a kill at any file operation, one run per output directory, the
inputs a resume checks, and resuming on another number of ranks."""
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import dpo
import rlvr
import sft
import test_dpo_run
import test_rlvr_train
import test_sft
from conftest import ROOT, build_tiny_model, free_port, read_metrics, run_in_process

KILLED = 77  # a child's exit status when the fault hook killed it
WRITE_EVENTS = ("open", "os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree")


def changes_disk(event, args) -> str | None:
    """The path an audited operation changes, or None (reads, file descriptors)."""
    if event not in WRITE_EVENTS or isinstance(args[0], int):
        return None
    path, dir_fd = args[0], (args[-1] if event not in ("open", "os.rename") else None)
    if event == "open":
        mode, flags = args[1], args[2]
        if not (set(mode) & set("wax+") if mode is not None else flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
            return None
    path = os.fsdecode(path)
    if dir_fd is not None and not os.path.isabs(path):  # shutil.rmtree unlinks names relative to a directory fd
        path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    return os.path.realpath(path)


def run_killed_at(main, argv, output_dir, kill_at: int | None) -> list[str]:
    """Run a stage in a forked child that dies (os._exit, like kill -9: no cleanup, no flush) just before its
    kill_at-th operation that changes output_dir (1-based). Returns the operations done before, as
    "event relative/path" lines, plus "killed" if the kill happened."""
    log = str(output_dir) + ".ops"

    def child():
        torch.set_num_threads(1)
        sys.stdout = sys.stderr = open(os.devnull, "w")
        root, ops, busy = os.path.realpath(output_dir), [], [False]

        def hook(event, args):
            if busy[0]:
                return
            busy[0] = True  # the hook's own file operations are not audited
            try:
                path = changes_disk(event, args)
                if path is not None and (path + "/").startswith(root + "/"):
                    if len(ops) + 1 == kill_at:
                        with open(log, "w") as f:
                            f.write("\n".join(ops + ["killed"]))
                        os._exit(KILLED)
                    ops.append(f"{event} {os.path.relpath(path, root)}")
            finally:
                busy[0] = False
        sys.addaudithook(hook)
        try:
            run_in_process(main, argv)
        except BaseException as error:  # noqa: BLE001 (reported to the parent through the log)
            with open(log, "w") as f:
                f.write(f"error {error!r}")
            os._exit(1)
        with open(log, "w") as f:
            f.write("\n".join(ops))
        os._exit(0)

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join()
    with open(log) as f:
        ops = f.read().split("\n")
    assert process.exitcode in (0, KILLED), ops
    return ops


def newest_complete_checkpoint(output_dir) -> int:
    steps = [int(name.removeprefix("checkpoint-")) for name in os.listdir(output_dir)
             if name.startswith("checkpoint-") and os.path.exists(os.path.join(output_dir, name, "trainer_state.json"))]
    return max(steps, default=0)


def assert_same_run(output_dir, reference_dir):
    """Same per-step losses and final weights as the uninterrupted run, and nothing left half-done."""
    ran, expected = read_metrics(output_dir), read_metrics(reference_dir)
    assert [m["step"] for m in ran] == [m["step"] for m in expected]
    for a, b in zip(ran, expected):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7) and a["lr"] == b["lr"], (a, b)
    weights, reference = (load_file(os.path.join(d, "model.safetensors")) for d in (output_dir, reference_dir))
    for name in reference:
        torch.testing.assert_close(weights[name], reference[name], rtol=1e-6, atol=1e-7)
    assert sorted(os.listdir(output_dir)) == sorted(os.listdir(reference_dir))


STAGES = {  # the stage's main and its arguments for a 3-step run with a checkpoint after steps 1 and 2
    "sft": lambda model, tmp, out: (sft.main, test_sft.base_args(
        model, test_sft.write_dataset(tmp / "data.jsonl"), out, "--per_device_train_batch_size", "4",
        "--gradient_accumulation_steps", "1", "--max_train_steps", "3", "--checkpointing_steps", "1", "--resume")),
    "dpo": lambda model, tmp, out: (dpo.main, [
        "--model_name_or_path", model, "--dataset_mixer_list", test_dpo_run.write_pairs(tmp / "pairs.jsonl"), "1.0",
        "--output_dir", str(out), "--max_seq_length", "128", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3", "--dpo_beta", "0.5",
        "--max_train_steps", "3", "--checkpointing_steps", "1", "--resume"]),
    "rlvr": lambda model, tmp, out: (rlvr.main, test_rlvr_train.base_args(
        model, test_rlvr_train.write_rlvr_data(tmp / "rlvr.jsonl"), out, "--total_episodes", "24",
        "--checkpointing_steps", "1", "--resume")),
}


def kind(op: str) -> str:
    """An operation with step numbers and the file names inside model.tmp/ left out."""
    return re.sub(r"model\.tmp/.*", "model.tmp/*", re.sub(r"checkpoint-\d+", "checkpoint-N", op))


# Where DPO and RLVR are killed: the checkpoint they replace is still complete, then half deleted (the
# instants of the old two-rename window), the final model is all in but its config.json, and DPO's
# reference cache is written but not yet moved in.
STAGE_KILLS = ("os.remove checkpoint-1/trainer_state.json", "os.remove checkpoint-1/shard-00001-model-00001-of-00001"
               ".safetensors", "os.rename model.tmp/config.json", "os.rename reference_logps/")


@pytest.mark.parametrize("stage", STAGES)
def test_a_kill_at_any_file_operation_resumes_onto_the_uninterrupted_run(stage, tiny_model_dir, tmp_path):
    """SFT is killed before the first operation of each kind (and the final save's last rename), DPO and RLVR
    at the instants of STAGE_KILLS; each killed run is resumed by the same command and must reach the
    uninterrupted run's losses and weights, never resuming from an older checkpoint than the newest committed."""
    main, argv = STAGES[stage](tiny_model_dir, tmp_path, tmp_path / "straight")
    ops = run_killed_at(main, argv, tmp_path / "straight", None)  # --resume on a new directory starts the run
    assert "os.rename checkpoint-2/trainer_state.json.tmp" in ops and "shutil.rmtree checkpoint-1" in ops
    if stage == "sft":
        first = {}
        for index, op in enumerate(ops, start=1):
            first.setdefault(kind(op), index)
        kill_points = sorted(set(first.values()) | {ops.index("os.rename model.tmp/config.json") + 1})
    else:
        kill_points = [index for index, op in enumerate(ops, start=1) if op.startswith(STAGE_KILLS)]
        assert len(kill_points) == 3 + (stage == "dpo"), ops
    for kill_at in kill_points:
        out = tmp_path / f"killed-{kill_at}"
        main, argv = STAGES[stage](tiny_model_dir, tmp_path, out)
        done = run_killed_at(main, argv, out, kill_at)
        assert done[-1] == "killed" and done[:-1] == ops[:kill_at - 1]
        # No committed work is lost: the newest complete checkpoint is the last one whose marker was renamed in.
        committed = [int(op.split("/")[0].removeprefix("os.rename checkpoint-")) for op in done
                     if op.startswith("os.rename checkpoint-")]
        if os.path.isdir(out):
            assert newest_complete_checkpoint(out) == max(committed, default=0), (kill_at, done[-3:])
        run_killed_at(main, argv, out, None)
        assert_same_run(out, tmp_path / "straight")
