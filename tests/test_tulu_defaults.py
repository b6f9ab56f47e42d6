"""Each stage's defaults are the released Tülu 3 runs' settings (open-instruct's commands and the scripts'
own defaults where a command left a flag out)."""
import rlvr

REQUIRED = ["--model_name_or_path", "m", "--dataset_mixer_list", "d", "1", "--output_dir", "o"]


def test_rlvr_defaults_to_torch_adamw_weight_decay_for_grpo_and_ppo():
    # the released GRPO and PPO scripts build torch.optim.AdamW(params, lr=...): weight decay 0.01, every parameter
    for algo in ("grpo", "ppo"):
        assert rlvr.parse_args(REQUIRED + ["--algo", algo]).weight_decay == 0.01
