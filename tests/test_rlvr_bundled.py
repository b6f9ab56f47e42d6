"""rlvr.py on the real bundled model: a short GRPO run on bundled arithmetic problems raises the training reward."""
import json
import os

from conftest import read_metrics
from test_rlvr_train import run_rlvr

DEMO_RLVR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "demo",
                         "rlvr_train.jsonl")


def test_a_short_grpo_run_raises_the_training_reward_on_arithmetic(bundled_model_dir, tmp_path):
    # Four word problems from the bundled demo data (verified by GSM8K's last-number rule), the same four
    # every step, each sampled 4 times: SmolLM2-135M-Instruct answers about one in five at temperature 0.6.
    with open(DEMO_RLVR) as f:
        problems = [line for line in f if json.loads(line)["dataset"] == "gsm8k"][:4]
    data = tmp_path / "arithmetic.jsonl"
    data.write_text("".join(problems))
    run_rlvr(["--model_name_or_path", bundled_model_dir, "--dataset_mixer_list", str(data), "1.0",
              "--output_dir", str(tmp_path / "out"), "--num_unique_prompts_rollout", "4",
              "--num_samples_per_prompt_rollout", "4", "--total_episodes", "128", "--response_length", "32", "--max_seq_length", "128",
              "--temperature", "0.6", "--learning_rate", "2e-5", "--per_device_train_batch_size", "16"])
    rewards = [m["reward_mean"] for m in read_metrics(tmp_path / "out")]
    assert len(rewards) == 8
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    print(f"mean training reward: first 3 steps {first:.2f}, last 3 steps {last:.2f}; all {rewards}")
    assert last > first + 1.0  # out of 10: at least one more correct answer in ten
