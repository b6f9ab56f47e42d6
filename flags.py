"""The stages' flags: one argparse parser for sft.py, dpo.py, rlvr.py, eval.py and synth.py. No prefix matching
(a mistyped or shortened flag is refused with a "did you mean"), `--flag True/False` for every switch, and
open-instruct's spellings: accepted where the meaning is the same here, answered with what to do where it is
not. Also the bounded number types the flags use, whose errors name the flag and its range, and the two errors a
user's data raises (InvalidRecord, DataError), which name the dataset, its line or row and the field.
"""
import argparse
import difflib
import math

# open-instruct's names for flags that mean the same here: accepted as they are
OPEN_INSTRUCT_ALIASES = {
    "--clip_grad_norm": "--max_grad_norm",  # finetune.py; its -1 (no clipping) is <= 0 here too
    "--checkpoint_state_freq": "--checkpointing_steps",  # grpo_fast.py: the resumable state
    "--num_epochs": "--ppo_epochs",  # grpo_fast.py, ppo: passes over each rollout
    "--number_samples_per_prompt": "--num_samples_per_prompt_rollout",
    "--non_stop_penalty_value": "--penalty_reward_value",
    "--beta": "--dpo_beta",  # dpo_tune_cache.py's newer names (rlvr's own --beta is the KL coefficient)
    "--loss_type": "--dpo_loss_type",
    "--label_smoothing": "--dpo_label_smoothing",
    "--gamma_beta_ratio": "--dpo_gamma_beta_ratio",
}
NO_LOGGING_SERVICE = ("every step's metrics go to OUTPUT_DIR/metrics.jsonl; sft.py, dpo.py and rlvr.py also send them "
                      "with --report_to tensorboard|wandb (W&B's project and entity from WANDB_PROJECT / WANDB_ENTITY)")
FROM_MODEL_DIR = ("the tokenizer is read from --model_name_or_path: put its tokenizer files (tokenizer.json, "
                  "tokenizer_config.json) in the model directory")
NO_HUB_UPLOAD = "no hub upload here: the model is saved in --output_dir; drop the flag"
NO_LORA = "no LoRA here: every weight is trained; drop the flag"
NO_DEEPSPEED = "no DeepSpeed here: FSDP2 shards weights, gradients and AdamW state over the ranks; drop the flag"
NO_VLLM = "no vLLM here: the policy samples its rollouts in-process (decoding.py); drop the flag"
NO_EVAL_DURING_TRAINING = "no evaluation during training: run eval.py on --output_dir afterwards"
# open-instruct's flags that have no counterpart of the same meaning: what to do instead
OPEN_INSTRUCT_HINTS = {
    "--use_flash_attn": "pass --attn_implementation flash_attention_2 (needs the flash-attn package), or for sft "
                        "and dpo --attn_implementation packed_varlen (torch's own varlen flash kernel)",
    "--with_tracking": NO_LOGGING_SERVICE, "--report_to": NO_LOGGING_SERVICE,  # (eval.py and synth.py)
    "--wandb_project_name": NO_LOGGING_SERVICE, "--wandb_entity": NO_LOGGING_SERVICE,
    "--logging_steps": "every step's metrics go to OUTPUT_DIR/metrics.jsonl; drop the flag",
    "--tokenizer_name": FROM_MODEL_DIR, "--tokenizer_name_or_path": FROM_MODEL_DIR,
    "--tokenizer_revision": FROM_MODEL_DIR, "--use_slow_tokenizer": "a fast tokenizer is needed (its offsets locate "
                                                                      "the assistant turns); drop the flag",
    "--num_epochs": "passes over the data: --num_train_epochs",  # (rlvr takes it: --ppo_epochs)
    "--save_freq": "--checkpointing_steps N writes a resumable checkpoint every N steps; the model is saved at the end",
    "--max_prompt_token_length": "prompts longer than --max_seq_length minus --response_length tokens are dropped: "
                                 "pass --max_seq_length as max_prompt_token_length + response_length",
    "--max_token_length": "pass --max_seq_length (prompt and response together)",
    "--resume_from_checkpoint": "pass --resume: it continues from the newest checkpoint in --output_dir",
    "--keep_last_n_checkpoints": "only the newest checkpoint is kept; drop the flag",
    "--push_to_hub": NO_HUB_UPLOAD, "--hf_entity": NO_HUB_UPLOAD, "--hf_repo_id": NO_HUB_UPLOAD,
    "--hf_repo_revision": NO_HUB_UPLOAD, "--save_to_hub": NO_HUB_UPLOAD,
    "--exp_name": "a run is named by its --output_dir; drop the flag",
    "--use_lora": NO_LORA, "--use_qlora": NO_LORA, "--lora_rank": NO_LORA, "--lora_alpha": NO_LORA,
    "--lora_dropout": NO_LORA,
    "--deepspeed_stage": NO_DEEPSPEED, "--zero_stage": NO_DEEPSPEED, "--offload_optimizer": NO_DEEPSPEED,
    "--offload_param": NO_DEEPSPEED,
    "--dataset_name": "pass --dataset_mixer_list NAME 1.0",
    "--dataset_mixer": "pass --dataset_mixer_list NAME AMOUNT ...",
    "--dataset_mixer_list_splits": "a hub dataset's train split is read: save another split as .jsonl or .parquet",
    "--max_train_samples": "give a row count as the amount in --dataset_mixer_list (NAME 1000)",
    "--dataset_mixer_eval_list": NO_EVAL_DURING_TRAINING, "--local_eval_every": NO_EVAL_DURING_TRAINING,
    "--apply_verifiable_reward": "the reward is always the verifier's (--verification_reward); drop the flag",
    "--async_steps": "rollouts are sampled by the current policy (no asynchronous steps); drop the flag",
    "--trust_remote_code": "models run on transformers' own code only; drop the flag",
    "--add_bos": "the chat template decides the first token (--chat_template_name tulu adds no BOS); drop the flag",
    "--use_liger_kernel": "the loss never holds the full [tokens, vocab] logits already; drop the flag",
    "--concatenated_forward": "chosen and rejected are always scored in one forward; drop the flag",
    "--model_revision": "download that revision and pass its directory as --model_name_or_path",
    "--low_cpu_mem_usage": "each rank reads only its own shard of the weights already; drop the flag",
    "--use_8bit_optimizer": "AdamW keeps fp32 moments here; drop the flag",
}


class InvalidRecord(ValueError):
    """A training record that does not have the expected shape; the message names where it is."""


class DataError(ValueError):
    """Data that cannot be used as given (a dataset missing, empty, too small or in another shape than the rest of
    the mixture, a mixture list that does not parse); the message names it."""


def true_or_false(text: str) -> bool:
    """A boolean flag's value as open-instruct's parser (transformers' HfArgumentParser) reads it."""
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return value


class Switch(argparse.Action):
    """A boolean flag: `--flag` sets it, `--flag true|false` too (open-instruct's `--packing False`), and a negatable
    one (argparse.BooleanOptionalAction) is turned off by `--no-flag` or `--no_flag` as well."""

    def __init__(self, option_strings, dest, negatable=False, default=False, **kwargs):
        self.negations = [prefix + name[2:] for name in option_strings for prefix in ("--no-", "--no_")] * negatable
        super().__init__(option_strings + self.negations, dest, nargs="?", default=default, metavar="true|false",
                         **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        try:
            on = True if value is None else true_or_false(value)
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentError(self, str(error)) from None
        setattr(namespace, self.dest, on != (option_string in self.negations))


class StageParser(argparse.ArgumentParser):
    """The stages' flags: argparse, but
    - no prefix matching: argparse would read `--num_unique_prompts 48` as `--num_unique_prompts_rollout 48`;
    - open-instruct's spellings of our flags are accepted (OPEN_INSTRUCT_ALIASES), and its flags that have no
      counterpart here are refused with what to do instead (OPEN_INSTRUCT_HINTS);
    - boolean flags take open-instruct's `--flag True` / `--flag False` too (Switch);
    - an error is one line, raised as SystemExit(message): infra.run prints it once however many ranks parse."""

    def __init__(self, description: str | None = None, **kwargs):  # (kwargs: argparse's, for a subcommand's parser)
        super().__init__(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                         allow_abbrev=False, **kwargs)

    def add_argument(self, *names, **kwargs):
        if kwargs.get("action") in ("store_true", argparse.BooleanOptionalAction):
            kwargs.update(negatable=kwargs["action"] is argparse.BooleanOptionalAction, action=Switch)
        action = super().add_argument(*names, **kwargs)
        for alias in [alias for alias, name in OPEN_INSTRUCT_ALIASES.items() if name in names]:
            super().add_argument(alias, **{**kwargs, "dest": action.dest, "help": argparse.SUPPRESS})  # errors name it
        return action

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(self.unknown_flag(unknown))
        return parsed

    def unknown_flag(self, unknown: list[str]) -> str:
        flags = [token.split("=")[0] for token in unknown if token.startswith("--")]
        if not flags:
            return f"unexpected value(s) {' '.join(unknown)}: a flag given one value too many?"
        flag = flags[0]
        hint = OPEN_INSTRUCT_HINTS.get(flag) or (NO_VLLM if flag.startswith("--vllm_") else None)
        if hint:
            return f"argument {flag} is open-instruct's: {hint}"
        close = difflib.get_close_matches(flag, [name for name in self._option_string_actions if name[:2] == "--"], 1)
        return f"unknown flag {flag}" + (f"; did you mean {close[0]}?" if close else " (--help lists the flags)")

    def error(self, message: str):
        raise SystemExit(f"{self.prog}: {message}")


def bounded(kind, low=None, high=None, *, low_open=False, high_open=False):
    """An argparse `type=` that parses `kind` (int or float) and checks low <= value <= high (< with *_open),
    so a bad flag stops at parse time with argparse's "argument --flag: ..." instead of mid-run."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high or not math.isfinite(value):
            bounds = [f"{'>' if low_open else '>='} {low}" if low is not None else "",
                      f"{'<' if high_open else '<='} {high}" if high is not None else ""]
            raise argparse.ArgumentTypeError(f"{text} must be {' and '.join(b for b in bounds if b) or 'finite'}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE_INT = bounded(int, 1)
NON_NEGATIVE = bounded(float, 0.0)
POSITIVE = bounded(float, 0.0, low_open=True)
FRACTION = bounded(float, 0.0, 1.0)
