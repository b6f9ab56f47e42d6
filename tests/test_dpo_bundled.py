"""On the real bundled model (SmolLM2-135M-Instruct), a short dpo.py run moves the model's preferences
toward the chosen responses on held-out pairs it never trained on."""
import json
import os

import torch

import data_mix
import dpo
import modeling
from conftest import run_in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "data", "demo")


def instruction_pairs(name, count, path):
    """The first `count` instruction-following pairs of a demo preference file (chosen follows a format
    constraint, rejected breaks it), written to `path`. They are shorter than the arithmetic pairs, and
    a format generalizes to held-out prompts within a few steps."""
    with open(os.path.join(DEMO, name)) as f:
        rows = [row for row in map(json.loads, f) if "The answer is" not in row["chosen"][-1]["content"]]
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows[:count])
    return str(path)


def mean_logps(model_dir, examples):
    """Mean per-token log-probs of the chosen [N] and rejected [N] responses under the model in model_dir."""
    from transformers import AutoModelForCausalLM

    model = modeling.CausalLMLogProbs(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)).eval()
    batch = dpo.collate_preference_pairs(examples, list(range(len(examples))), pad_token_id=0, packing=True)
    with torch.no_grad():
        return dpo.concatenated_logps(model, batch, mean=True)


def test_short_run_raises_heldout_preference_accuracy_and_margin(bundled_model_dir, tmp_path):
    train = instruction_pairs("pref_train.jsonl", 12, tmp_path / "train.jsonl")
    heldout = instruction_pairs("pref_heldout.jsonl", 10, tmp_path / "heldout.jsonl")
    output_dir = str(tmp_path / "dpo")
    # as `python dpo.py` runs it (a process group of one), leaving no torchrun variable to a later test's subprocess
    run_in_process(dpo.main, ["--model_name_or_path", bundled_model_dir, "--dataset_mixer_list", train, "1.0",
                              "--chat_template_name", "tulu", "--max_seq_length", "256", "--output_dir", output_dir,
                              "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
                              "--learning_rate", "2e-5", "--warmup_ratio", "0"])  # Tülu's dpo_norm, beta 5; lr: 3 steps

    tokenizer = data_mix.load_tokenizer(bundled_model_dir, "tulu")
    rows, _ = data_mix.mix_datasets([heldout, "1.0"], seed=0, validate=dpo.validate_preference_record)
    examples, _ = dpo.tokenize_preference_dataset(rows, tokenizer, max_seq_length=256)
    chosen_before, rejected_before = mean_logps(bundled_model_dir, examples)
    chosen_after, rejected_after = mean_logps(output_dir, examples)
    # DPO's held-out preference: implicit reward margin beta ((L_c - R_c) - (L_r - R_r)), the initial
    # model as reference R. Before training it is 0 for every pair (accuracy 0: no pair is preferred).
    reward_margin = 5.0 * ((chosen_after - chosen_before) - (rejected_after - rejected_before))
    report = {"heldout_pairs": len(examples), "reward_accuracy": (reward_margin > 0).float().mean().item(),
              "reward_margin": reward_margin.mean().item(),
              "logp_accuracy_before": (chosen_before > rejected_before).float().mean().item(),
              "logp_accuracy_after": (chosen_after > rejected_after).float().mean().item(),
              "logp_margin_before": (chosen_before - rejected_before).mean().item(),
              "logp_margin_after": (chosen_after - rejected_after).mean().item()}
    print(json.dumps(report))
    assert report["reward_accuracy"] >= 0.7
    assert report["reward_margin"] > 0
    assert report["logp_margin_after"] > report["logp_margin_before"]
