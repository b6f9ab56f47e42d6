"""The demo: its bundled data is what the seeded generator writes and is sound, and the whole
recipe (base eval -> SFT -> eval -> DPO -> eval -> GRPO -> eval -> report) runs end to end."""
import json
import os
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DATA = os.path.join(ROOT, "data", "demo")
SPLITS = ["sft_train", "sft_heldout", "pref_train", "pref_heldout", "rlvr_train", "rlvr_heldout"]

import demo  # noqa: E402  (conftest puts the repository root on sys.path)


def read(split: str) -> list[dict]:
    return demo.load_jsonl(os.path.join(DEMO_DATA, f"{split}.jsonl"))


def user_prompt(record: dict) -> str:
    return record["prompt"] if "prompt" in record else record["messages"][0]["content"]


def test_bundled_data_is_exactly_what_the_seeded_generator_writes(tmp_path):
    # the generator also refuses to write a pair whose chosen answer fails its verifier or whose
    # rejected answer passes, so this covers that every pair teaches what the reward measures
    subprocess.run([sys.executable, os.path.join(ROOT, "data", "make_demo_data.py"), "--output_dir", str(tmp_path)],
                   check=True, capture_output=True)
    for split in SPLITS:
        with open(tmp_path / f"{split}.jsonl") as fresh, open(os.path.join(DEMO_DATA, f"{split}.jsonl")) as bundled:
            assert fresh.read() == bundled.read(), f"data/demo/{split}.jsonl is stale: rerun data/make_demo_data.py"


def test_no_heldout_prompt_appears_in_any_training_file():
    train = {user_prompt(r) for split in SPLITS if split.endswith("train") for r in read(split)}
    heldout = {user_prompt(r) for split in SPLITS if split.endswith("heldout") for r in read(split)}
    assert heldout and not heldout & train


def test_preference_pairs_share_the_prompt_and_differ_in_the_final_assistant_turn():
    for record in read("pref_train") + read("pref_heldout"):
        chosen, rejected = record["chosen"], record["rejected"]
        assert chosen[:-1] == rejected[:-1] == [{"role": "user", "content": record["prompt"]}]
        assert chosen[-1]["role"] == rejected[-1]["role"] == "assistant"
        assert chosen[-1]["content"] != rejected[-1]["content"]


def test_rlvr_rows_use_the_tulu_fields_with_verifiable_ground_truth():
    from verifiers import verify

    for record in read("rlvr_train") + read("rlvr_heldout"):
        assert set(record) == {"messages", "ground_truth", "dataset"}
        if record["dataset"] == "ifeval":
            truth = json.loads(record["ground_truth"])
            assert len(truth["instruction_id_list"]) == len(truth["kwargs"]) == 1
        else:
            assert record["dataset"] == "gsm8k" and record["ground_truth"].lstrip("-").isdigit()
        assert verify("", record["ground_truth"], record["dataset"]) == 0.0  # an empty answer never scores


def test_first_last_averages_the_first_and_last_fifth_of_the_logged_steps():
    records = [{"step": i + 1, "loss": float(i)} for i in range(10)] + [{"step": 11}]
    assert demo.first_last(records, "loss") == (0.5, 8.5)
    assert demo.first_last(records, "reward_mean") is None


def test_demo_runs_every_stage_and_writes_the_report(tiny_model_dir, tmp_path, monkeypatch):
    # Tiny tensors gain nothing from threads, and on a shared CPU threads only wait on each other.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MASTER_PORT", raising=False)  # each stage's process picks its own port
    output_dir = tmp_path / "demo"
    demo.main(["--model_name_or_path", tiny_model_dir, "--output_dir", str(output_dir), "--scale", "0.05",
               "--max_new_tokens", "8"])
    for stage in ("sft", "dpo", "rlvr"):
        assert (output_dir / stage / "model.safetensors").exists(), f"{stage} wrote no model"
        assert demo.read_metrics(str(output_dir / stage)), f"{stage} logged no metrics"
        assert (output_dir / f"{stage}_curves.png").stat().st_size > 0
    report = (output_dir / "report.md").read_text()
    for row in ("| base |", "| after SFT |", "| after DPO |", "| after RLVR |",
                "| sft | loss |", "| dpo | rewards/accuracy |", "| rlvr | reward_mean |"):
        assert row in report, f"report.md lacks {row!r}"
    pairs = demo.load_jsonl(str(output_dir / "onpolicy" / "preferences.jsonl"))  # the on-policy branch ran
    assert f"On-policy branch: {len(pairs)} pairs from 4 held-out RLVR prompts" in report
    predictions = demo.load_jsonl(str(output_dir / "predictions_rlvr.jsonl"))
    assert predictions and all(0.0 <= p["score"] <= 1.0 for p in predictions)
