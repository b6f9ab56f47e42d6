"""Each stage's defaults are the released Tülu 3 runs' settings (open-instruct's commands and the scripts'
own defaults where a command left a flag out)."""
import dpo
import rlvr
import sft

REQUIRED = ["--model_name_or_path", "m", "--dataset_mixer_list", "d", "1", "--output_dir", "o"]


def test_sft_defaults_to_tulu_3_8b_seed_123_and_no_weight_decay():
    args = sft.parse_args(REQUIRED)
    assert (args.seed, args.weight_decay) == (123, 0.0)


def test_dpo_defaults_to_tulu_3_8b_seed_42_and_no_weight_decay():
    # the 8B DPO command sets no --seed: dpo_tune.py's default, 42
    args = dpo.parse_args(REQUIRED)
    assert (args.seed, args.weight_decay) == (42, 0.0)


def test_rlvr_defaults_to_torch_adamw_weight_decay_for_grpo_and_ppo():
    # the released GRPO and PPO scripts build torch.optim.AdamW(params, lr=...): weight decay 0.01, every parameter
    for algo in ("grpo", "ppo"):
        assert rlvr.parse_args(REQUIRED + ["--algo", algo]).weight_decay == 0.01
