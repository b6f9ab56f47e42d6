"""RLVR: reinforcement learning with verifiable rewards, the third stage of the Tülu 3 recipe.

    python rlvr.py --model_name_or_path output/dpo --dataset_mixer_list data/demo/rlvr_train.jsonl 1.0 \
        --output_dir output/rlvr --num_unique_prompts_rollout 8 --num_samples_per_prompt_rollout 4 \
        --response_length 64 --max_seq_length 512 --total_episodes 160
    python rlvr.py --algo ppo --model_name_or_path output/dpo --dataset_mixer_list data/demo/rlvr_train.jsonl 1.0 \
        --output_dir output/rlvr-ppo --num_unique_prompts_rollout 8 --response_length 64 --max_seq_length 512 \
        --total_episodes 40
    torchrun --nproc_per_node 8 rlvr.py --model_name_or_path allenai/Llama-3.1-Tulu-3-8B-DPO \
        --dataset_mixer_list allenai/RLVR-GSM-MATH-IF-Mixed-Constraints 1.0 --chat_template_name tulu \
        --algo grpo --output_dir output/rlvr-8b

One step: sample responses to this step's prompts (decoding.complete, eval's loop too: the parameters
gathered once); reward them with a verifier, not a learned reward model (--verification_reward if correct;
IFEval: times the fraction of constraints met); one no-grad forward for the log-probs (always of logits /
temperature, the distribution sampled) of the policy before the update and of the frozen reference
(and PPO's values); advantages; mini-batch updates.
- --algo grpo (Tülu 3.1, default): G samples per prompt, advantages normalized within each group (unbiased
  std), the clipped ratio loss averaged over every response token, k3 KL to the reference inside the loss
  (--kl_estimator); each
  rollout in 2 mini-batches (so the second step's ratio differs from 1 and the clip can act); a response cut
  at --response_length scores 0 (--penalty_reward_value). These defaults are Tülu 3.1's flags (open-instruct's
  command for Llama-3.1-Tulu-3.1-8B); its run length and seed are not defaults: docs/stages.md#full-scale-tülu-3-8b.
- --algo ppo (the Tülu 3 paper): a value model with its own gradient clipping, per-token k1 KL penalty in the
  reward (--kl_estimator), the score one token past EOS (the value of the state after it is trained too), GAE,
  whitened advantages, clipped policy and value losses, several epochs over each rollout batch, a cut response
  scores -10.
- Later options, off by default (open-instruct's names): --clip_lower/--clip_higher, --advantage_normalization_type
  centered, --mask_truncated_completions, --filter_zero_std_samples, --loss_denominator D, --beta 0 (no
  reference model is loaded or run).

Relative to open-instruct's released scripts (Tülu 3: ppo_vllm_thread_ray_gtrl.py; 3.1: grpo_vllm_thread_ray_gtrl.py):
1. No vLLM: the training processes sample with plain PyTorch, so the rollout's KV cache (a rank's rows x
   --max_seq_length) must fit beside the gathered policy.
2. Synchronous: a step samples with the policy it then updates. The original generated one step ahead (its
   async_mode, on by default): it trained on responses of the policy before the last update, taking the ratio's
   old log-probs from the current one.
3. As in the original, the ratio's old log-probs come from a training forward before the first update (the
   sampler's feed only `sampling_logprob_diff`) and every dropout is off (disable_dropout()).
4. The loss is an exact token mean over each mini-batch however it is split into micro-batches and ranks; the
   original took a token mean per micro-batch and averaged those.
5. GRPO's KL term: the original clamps log pi - log pi_ref to [-40, 40] before the estimator; this does not.
6. The learning rate moves once per rollout step, the original's once per optimizer step (the same for GRPO's
   constant rate).
7. PPO whitens advantages per rank, as the original does; its value model starts from the policy unless
   --value_model_name_or_path (the original's: the reward model).
8. Sampling seeds are per rank, so a run resumed on another number of ranks continues with other (equally valid)
   samples, not the uninterrupted curve.
"""
import argparse
import functools
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from tqdm import tqdm
from transformers.utils import cached_file

import checkpoint
import data_mix
import decoding
import flags
import infra
import verifiers

# Flags that may change when a run is resumed; every other flag must match the run in --output_dir.
# --per_device_train_batch_size may change, on any number of ranks: it only splits the mini-batches (fixed by the
# rollout flags) into micro-batches.
RESUMABLE_FLAGS = {"resume", "checkpointing_steps", "preprocessing_num_workers", "per_device_train_batch_size",
                   "report_to"}
# Defaults that differ between the two algorithms (Tülu 3.1 GRPO: 2 mini-batches per rollout, a response cut at
# the length limit scores 0; Tülu 3 8B PPO: one, and -10).
ALGO_DEFAULTS = {"grpo": dict(learning_rate=5e-7, lr_scheduler_type="constant", beta=0.01, kl_estimator="kl3",
                               num_samples_per_prompt_rollout=16, ppo_epochs=1, num_mini_batches=2,
                               penalty_reward_value=0.0),
                 "ppo": dict(learning_rate=3e-7, lr_scheduler_type="linear", beta=0.05, kl_estimator="kl1",
                              num_samples_per_prompt_rollout=1, ppo_epochs=4, num_mini_batches=1,
                              penalty_reward_value=-10.0)}


# ---------------------------------------------------------------------------------------------
# Arguments

def parse_args(argv=None):
    parser = flags.StageParser(__doc__)
    parser.add_argument("--model_name_or_path", required=True, help="Hugging Face model directory or hub name")
    data_mix.add_data_args(parser, max_seq_length=4096)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--algo", default="grpo", choices=["grpo", "ppo"])
    parser.add_argument("--total_episodes", type=flags.POSITIVE_INT, default=100000,
                        help="sampled responses over the whole run")
    parser.add_argument("--num_unique_prompts_rollout", type=flags.POSITIVE_INT, default=48,
                        help="prompts per step (all ranks)")
    parser.add_argument("--num_samples_per_prompt_rollout", type=flags.POSITIVE_INT, default=None,
                        help="G; default 16 (grpo), 1 (ppo)")
    parser.add_argument("--response_length", type=flags.POSITIVE_INT, default=2048,
                        help="max new tokens; prompts longer than max_seq_length - response_length are dropped")
    parser.add_argument("--temperature", type=flags.POSITIVE, default=1.0)
    parser.add_argument("--top_p", type=flags.bounded(float, 0.0, 1.0, low_open=True), default=1.0)
    parser.add_argument("--stop_strings", nargs="*", default=[], help="end a response at any of these strings")
    parser.add_argument("--verification_reward", type=flags.bounded(float), default=10.0,
                        help="reward of a correct answer")
    parser.add_argument("--non_stop_penalty", action=argparse.BooleanOptionalAction, default=True,
                        help="give --penalty_reward_value to responses cut at --response_length (Tülu 3 and 3.1)")
    parser.add_argument("--penalty_reward_value", type=flags.bounded(float), default=None,
                        help="default 0 (grpo), -10 (ppo)")
    parser.add_argument("--beta", type=flags.NON_NEGATIVE, default=None,
                        help="KL coefficient; default 0.01 (grpo), 0.05 (ppo); 0: no reference model at all")
    parser.add_argument("--kl_estimator", default=None, choices=["kl1", "kl3"],
                        help="KL(pi || pi_ref) per token in GRPO's loss / PPO's reward; default kl3 (grpo), kl1 (ppo)")
    parser.add_argument("--cliprange", type=flags.POSITIVE, default=0.2)
    parser.add_argument("--clip_lower", type=flags.POSITIVE, default=None,
                        help="ratio clip 1 - eps below; default --cliprange")
    parser.add_argument("--clip_higher", type=flags.POSITIVE, default=None,
                        help="ratio clip 1 + eps above; default --cliprange")
    parser.add_argument("--advantage_normalization_type", default="standard", choices=["standard", "centered"],
                        help="grpo: (r - mean) / std in each group, or r - mean (Dr. GRPO)")
    parser.add_argument("--mask_truncated_completions", action="store_true",
                        help="leave responses cut at --response_length out of the loss")
    parser.add_argument("--filter_zero_std_samples", action="store_true",
                        help="grpo: leave groups whose rewards are all equal out of the loss")
    parser.add_argument("--loss_denominator", type=lambda s: s if s == "token" else float(s), default="token",
                        help="token: a token mean (Tülu 3.1); a number D: per response, token sum / D (Dr. GRPO)")
    parser.add_argument("--num_mini_batches", type=flags.POSITIVE_INT, default=None,
                        help="optimizer steps per pass over a rollout; default 2 (grpo), 1 (ppo)")
    parser.add_argument("--ppo_epochs", type=flags.POSITIVE_INT, default=None,
                        help="passes over a rollout; default 1 (grpo), 4 (ppo)")
    parser.add_argument("--value_model_name_or_path", default=None, help="ppo: value model init (default: the policy)")
    parser.add_argument("--vf_coef", type=flags.NON_NEGATIVE, default=0.1)
    parser.add_argument("--cliprange_value", type=flags.POSITIVE, default=0.2)
    parser.add_argument("--gamma", type=flags.FRACTION, default=1.0)
    parser.add_argument("--lam", type=flags.FRACTION, default=0.95)
    parser.add_argument("--per_device_train_batch_size", type=flags.POSITIVE_INT, default=1,
                        help="sequences per micro-batch")
    parser.add_argument("--learning_rate", type=flags.NON_NEGATIVE, default=None,
                        help="default 5e-7 (grpo), 3e-7 (ppo)")
    parser.add_argument("--lr_scheduler_type", default=None, choices=infra.LR_SCHEDULES,
                        help="default constant (grpo), linear (ppo)")
    parser.add_argument("--warmup_ratio", type=flags.FRACTION, default=0.0)
    parser.add_argument("--weight_decay", type=flags.NON_NEGATIVE, default=0.01,
                        help="AdamW's, on every parameter of the policy and the value model; default 0.01: torch's "
                             "default, which Tülu 3's PPO and 3.1's GRPO ran with")
    parser.add_argument("--max_grad_norm", type=flags.bounded(float), default=1.0,
                        help="clip the gradient norm; <= 0 disables")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                        help="compute dtype; auto = bf16 on GPU, fp32 on CPU (master weights stay fp32)")
    parser.add_argument("--attn_implementation", default=None,
                        help="e.g. sdpa, eager; default: the model's own choice (sdpa where it supports it)")
    parser.add_argument("--report_to", default="none", choices=["none", "tensorboard", "wandb"],
                        help="each step's metrics also to TensorBoard (OUTPUT_DIR/runs) or Weights & Biases (their "
                             "packages are optional); metrics.jsonl gets them always")
    parser.add_argument("--checkpointing_steps", type=flags.POSITIVE_INT, default=500,
                        help="write a resumable checkpoint every N steps")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output_dir from its newest checkpoint (or start it, if none)")
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args(argv)
    for name, value in ALGO_DEFAULTS[args.algo].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.clip_lower = args.cliprange if args.clip_lower is None else args.clip_lower
    args.clip_higher = args.cliprange if args.clip_higher is None else args.clip_higher
    if args.response_length >= args.max_seq_length:
        parser.error("--response_length must leave room for a prompt in --max_seq_length")
    if args.algo == "grpo" and args.num_samples_per_prompt_rollout < 2:
        parser.error("--algo grpo compares samples within a group: --num_samples_per_prompt_rollout must be >= 2")
    if args.algo == "ppo" and (args.filter_zero_std_samples or args.advantage_normalization_type != "standard"):
        parser.error("--filter_zero_std_samples and --advantage_normalization_type act on GRPO's groups only")
    if args.loss_denominator != "token" and not args.loss_denominator > 0:
        parser.error("--loss_denominator must be token or a number > 0")
    return args


# ---------------------------------------------------------------------------------------------
# Advantages, KL estimators and losses: pure functions of tensors.
# B = sequences (prompts x samples), N = response tokens; `mask` is 1 on response tokens.

def group_advantages(scores, group_size, normalization="standard"):
    """GRPO: "standard" (Tülu 3.1): A_i = (r_i - mean_g) / (std_g + 1e-8) over the G samples of each prompt
    (contiguous in `scores`), std torch's unbiased one (ddof 1, as Tülu 3.1's run); "centered" (Dr. GRPO):
    A_i = r_i - mean_g. A group whose answers all score the same gets A = 0 either way."""
    grouped = scores.view(-1, group_size)  # [B / G, G]
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if normalization == "standard":
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + 1e-8)
    return advantages.view(-1)  # [B]


def trained_rows(scores, stopped, group_size, mask_truncated, filter_zero_std):
    """[B] bool: the responses the loss sees (the others count as never sampled, after the advantages).
    mask_truncated drops those cut at the length limit (their reward judges no answer); filter_zero_std drops
    groups with all rewards equal (A = 0: they would add only KL and tokens to the mean)."""
    keep = stopped.clone() if mask_truncated else torch.ones_like(stopped)
    if filter_zero_std:
        grouped = scores.view(-1, group_size)  # [B / G, G]
        keep &= (grouped != grouped[:, :1]).any(dim=1).repeat_interleave(group_size)
    return keep


def kl_k1(logps, ref_logps):
    """k1 estimator of KL(pi || pi_ref) per token: log pi - log pi_ref (PPO puts -beta * k1 in the reward)."""
    return logps - ref_logps  # [B, N]


def kl_k3(logps, ref_logps):
    """k3 estimator (Schulman): exp(ref - log pi) - (ref - log pi) - 1 >= 0, unbiased, low variance (GRPO loss)."""
    log_ratio = ref_logps - logps  # [B, N]
    return torch.exp(log_ratio) - log_ratio - 1


KL_ESTIMATORS = {"kl1": kl_k1, "kl3": kl_k3}  # --kl_estimator: open-instruct's names


def clipped_policy_loss(logps, old_logps, advantages, clip_lower, clip_higher):
    """PPO's clipped surrogate per token: max(-A * rho, -A * clip(rho, 1 - eps_low, 1 + eps_high)), rho = pi / pi_old
    (eps_low = eps_high = --cliprange unless --clip_lower / --clip_higher: DAPO's clip-higher lets unlikely tokens
    grow more). advantages: [B, N] (PPO) or [B, 1] (GRPO). Also returns where the clipped term won."""
    ratio = torch.exp(logps - old_logps)  # [B, N]
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_lower, 1 + clip_higher)
    return torch.maximum(unclipped, clipped), clipped > unclipped  # [B, N], [B, N]


def clipped_value_loss(values, old_values, returns, cliprange_value):
    """PPO value loss per token: 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)  # [B, N]


def loss_divisor(mask, loss_denominator):
    """The divisor of a mini-batch's loss sum, from its [B, N] mask of trained tokens (summed over ranks later):
    "token" (Tülu 3.1): the number of tokens, a token mean; a float D (Dr. GRPO): D per trained response, so each
    response's token sum is divided by the same constant and long responses' tokens are not down-weighted."""
    if loss_denominator == "token":
        return mask.sum().float()
    return loss_denominator * (mask.sum(dim=1) > 0).sum().float()


def masked_sum(per_token, mask, divisor):
    """sum over trained tokens / divisor, the divisor counting the whole mini-batch (all micro-batches and
    ranks): summed over micro-batches, this is the exact mean however the mini-batch is split."""
    return (per_token * mask).sum() / divisor


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, clip_lower, clip_higher, beta, divisor, kl=kl_k3):
    """Tülu 3.1 GRPO: mean of max(-A rho, -A clip(rho, 1-eps_low, 1+eps_high)) + beta * KL(pi, pi_ref), the KL in the
    loss, not the reward (beta 0: no reference, ref_logps None), `kl` its estimator (Tülu 3.1: k3).
    logps/old_logps/ref_logps/mask: [B, N]; advantages: [B]. -> (loss, clipped [B, N])"""
    per_token, clipped = clipped_policy_loss(logps, old_logps, advantages[:, None], clip_lower, clip_higher)
    if beta:
        per_token = per_token + beta * kl(logps, ref_logps)  # [B, N]
    return masked_sum(per_token, mask, divisor), clipped


def score_positions(mask, response_length):
    """[B] where PPO puts each response's score, as Tülu 3's PPO code does: one past its last token (the state after
    EOS, whose value the critic learns to be the score) while that is within --response_length, else on its last
    token (a response cut at the limit). mask: [B, N], N <= response_length, a prefix of ones (right padding)."""
    lengths = mask.sum(dim=1).long()  # [B]
    return torch.where(lengths < response_length, lengths, lengths - 1)


def ppo_token_rewards(scores, logps, ref_logps, mask, beta, score_index, kl=kl_k1):
    """Tülu 3 PPO reward per token: r_t = -beta * KL_t (`kl` its estimator; Tülu 3: k1) on response tokens, plus the
    verifier's score at score_positions(). scores/score_index: [B]; logps/ref_logps/mask: [B, N].
    -> [B, N + 1]: a column for the state after the last token, where a score may land."""
    rewards = torch.nn.functional.pad(-beta * kl(logps, ref_logps) * mask, (0, 1))  # [B, N + 1]
    return rewards.scatter_add(1, score_index[:, None], scores[:, None].to(rewards.dtype))


def gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation over a response's states (`mask`'s ones; values after them count as 0):
    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};  returns R_t = A_t + V_t.  [B, T]"""
    rewards, values = rewards * mask, values * mask  # [B, T]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])  # [B]
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(next_advantage)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
    return advantages * mask, (advantages + values) * mask  # [B, T], [B, T]


def whiten(values, mask, eps=1e-8):
    """(x - mean) / sqrt(var + eps) over the masked entries (population variance); zeros elsewhere."""
    count = mask.sum()
    mean = (values * mask).sum() / count
    var = (((values - mean) * mask) ** 2).sum() / count
    return (values - mean) * torch.rsqrt(var + eps) * mask


def disable_dropout(model):
    """Every dropout off, as open-instruct's RL scripts do (disable_dropout_in_model): the update's forward runs in
    train mode (for gradient checkpointing) yet must give the log-probs the rollout's eval-mode forward gave, so that
    rho is 1 before the first update. Dropout modules, and attention's own (Hugging Face's attention_dropout)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model


def entropy(logits, temperature):
    """H = logsumexp(z) - sum softmax(z) z with z = logits / T, per token. [B, N, V] -> [B, N]."""
    logits = logits.float() / temperature
    return logits.logsumexp(-1) - (torch.softmax(logits, -1) * logits).sum(-1)


# ---------------------------------------------------------------------------------------------
# The models' forward over rollouts

class HFModel(torch.nn.Module):
    """The FSDP root unit around a Hugging Face model: sampling and training calls enter through its hooks."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, **kwargs):  # keywords only: a multimodal model takes pixel_values second
        return self.model(**kwargs)


class ValueModel(torch.nn.Module):
    """PPO's critic for any causal LM: its base model (the decoder, no LM head) and a scalar head. The head
    starts from `head` (a reward model's `score.weight`, [1, H]) or, as in open-instruct, N(0, 1/sqrt(H+1))."""

    def __init__(self, causal_lm, head=None):
        super().__init__()
        self.model, self.config = getattr(causal_lm, causal_lm.base_model_prefix), causal_lm.config
        width = causal_lm.config.get_text_config().hidden_size
        self.score = torch.nn.Linear(width, 1, bias=False)
        if not self.score.weight.is_meta:  # rank 0's copy is the one every rank loads
            with torch.no_grad():
                self.score.weight.copy_(head if head is not None else torch.randn(1, width) / math.sqrt(width + 1))

    def forward(self, input_ids, attention_mask, position_ids):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).last_hidden_state  # [B, T, H]
        return self.score(hidden)[..., 0].clone()  # [B, T]; a copy: FSDP2 warns of a forward that returns a view


def saved_value_head(path: str):
    """The scalar head of a sequence-classification checkpoint (a reward model), or None for a plain LM."""
    from safetensors import safe_open

    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index:
        with open(index) as f:
            name = json.load(f)["weight_map"].get("score.weight")
        if name is None:
            return None
        weights = os.path.join(os.path.dirname(index), name)
    else:
        weights = cached_file(path, "model.safetensors", _raise_exceptions_for_missing_entries=False)
        if weights is None:  # (a .bin checkpoint: from_pretrained reads it; its head, if any, is not looked for)
            return None
    with safe_open(weights, "pt") as f:
        return f.get_tensor("score.weight").float() if "score.weight" in f.keys() else None


def response_logprobs(policy, query_responses, attention_mask, response_length, temperature, with_entropy=False):
    """log pi(token) of each response token under logits / T ([B, N]), and the entropy (no grad) if asked.

    Positions count real tokens only (left padding shifts nothing), as while sampling; logits_to_keep
    skips the output layer over the prompt."""
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # [B, P + N]
    logits = policy(input_ids=query_responses, attention_mask=attention_mask, position_ids=position_ids,
                    logits_to_keep=response_length + 1).logits[:, :-1]  # [B, N, V]: position t predicts t + 1
    logps = decoding.token_logprobs(logits, query_responses[:, -response_length:], temperature)
    return logps, entropy(logits.detach(), temperature) if with_entropy else None


def response_values(value_model, query_responses, attention_mask, response_length):
    """PPO's critic V(prefix) before each response token and after the last one, from ValueModel's scalar head.
    [B, N + 1]: column t is the state after t response tokens (a response's score may sit one past its end)."""
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    values = value_model(input_ids=query_responses, attention_mask=attention_mask, position_ids=position_ids)
    return values[:, -response_length - 1:].float()


# ---------------------------------------------------------------------------------------------
# Rollouts: decoding.complete's responses as the tensors the updates read

@dataclass
class Rollout:
    query_responses: torch.Tensor  # [B, P + N] left-padded prompts followed by right-padded responses
    attention_mask: torch.Tensor  # [B, P + N] 1 on prompt and response tokens
    response_mask: torch.Tensor  # [B, N] 1 on generated tokens (up to and including EOS / the stop string)
    logprobs: torch.Tensor  # [B, N] log-probs of the sampled tokens under logits / T (0 on padding)
    stopped: torch.Tensor  # [B] bool: the response ended with EOS or a stop string (not cut at max_new_tokens)
    responses: torch.Tensor  # [B, N] the responses alone (the end of query_responses)


def rollout_of(prompts: list[list[int]], completions: list, pad_token_id: int, device) -> Rollout:
    """The prompts left-padded and their completions' tokens right-padded to the longest response (N)."""
    prompt_ids, prompt_mask = decoding.left_pad(prompts, pad_token_id)  # [B, P]
    length = max(len(completion.token_ids) for completion in completions)
    responses = torch.full((len(completions), length), pad_token_id, dtype=torch.long)  # [B, N]
    response_mask, logprobs = torch.zeros_like(responses), torch.zeros(responses.shape)
    for row, completion in enumerate(completions):
        responses[row, :len(completion.token_ids)] = torch.tensor(completion.token_ids)
        response_mask[row, :len(completion.token_ids)] = 1
        logprobs[row, :len(completion.token_ids)] = torch.tensor(completion.logprobs)
    stopped = torch.tensor([completion.finished for completion in completions])
    return Rollout(query_responses=torch.cat([prompt_ids, responses], 1).to(device),
                   attention_mask=torch.cat([prompt_mask, response_mask], 1).to(device),
                   response_mask=response_mask.to(device), logprobs=logprobs.to(device), stopped=stopped.to(device),
                   responses=responses.to(device))


# ---------------------------------------------------------------------------------------------
# RLVR records
# RLVR trains on prompts whose answers a verifier can check (Tülu 3's RLVR-GSM-MATH-IF-Mixed-Constraints):
#   {"messages": [prompt turns], "ground_truth": str, "dataset": "gsm8k" | "MATH" | "ifeval"}
# ground_truth is the answer (GSM8K, MATH) or the IFEval constraints as JSON. A final assistant turn in
# messages, if present, is a reference answer and is left out of the prompt.

RLVR_DATASETS = ("gsm8k", "math", "ifeval")


def rlvr_prompt_messages(row: dict, where: str) -> list[dict]:
    """The prompt turns of an RLVR record (validated); InvalidRecord names dataset, row and field."""
    messages = row.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
            and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    if not isinstance(messages, list) or not messages:
        raise flags.InvalidRecord(f"{where}, field messages: expected a non-empty list of prompt turns, "
                                  f"got {messages!r}")
    return data_mix.validate_messages(messages, where, needs_assistant=False)  # the response is about to be sampled


def validate_rlvr_record(row: dict, where: str) -> dict:
    """The record, checked down to what its verifier needs, so that no reward raises mid-run."""
    messages = rlvr_prompt_messages(row, where)
    dataset = row.get("dataset")
    if not isinstance(dataset, str) or dataset.lower() not in RLVR_DATASETS:
        raise flags.InvalidRecord(f"{where}, field dataset: {dataset!r} has no verifier (expected one of "
                                  f"{RLVR_DATASETS}, any case)")
    ground_truth = row.get("ground_truth")
    if not isinstance(ground_truth, str) or not ground_truth.strip():
        raise flags.InvalidRecord(f"{where}, field ground_truth: expected a non-empty string, "
                                  f"got {ground_truth!r:.100}")
    try:
        verifiers.check_ground_truth(ground_truth, dataset)
    except ValueError as error:
        raise flags.InvalidRecord(f"{where}, field ground_truth: {error}") from None
    return {"messages": messages, "ground_truth": ground_truth, "dataset": dataset}


def tokenize_rlvr_dataset(dataset, tokenizer, max_prompt_token_length: int, num_proc: int = 1):
    """Prompt token ids (rendered up to the assistant header) with ground_truth and lower-cased dataset.

    Prompts longer than max_prompt_token_length are dropped and counted, not truncated: a cut prompt
    would lose the question the verifier checks. Returns (dataset, number dropped).
    """
    def prompt_ids(row):
        return data_mix.tokenize_prompt(tokenizer, rlvr_prompt_messages(row, f"dataset {row.get('source')}"))
    tokenized = dataset.map(
        lambda row: {"input_ids": prompt_ids(row), "ground_truth": row["ground_truth"],
                     "dataset": row["dataset"].lower()},
        remove_columns=[c for c in dataset.column_names if c not in ("source", "ground_truth", "dataset")],
        num_proc=num_proc if num_proc > 1 else None, desc="tokenizing prompts")
    kept = tokenized.filter(lambda row: len(row["input_ids"]) <= max_prompt_token_length,
                            num_proc=num_proc if num_proc > 1 else None, desc="dropping long prompts")
    return kept, len(tokenized) - len(kept)


# ---------------------------------------------------------------------------------------------
# Data and rewards

def load_rlvr_data(args, tokenizer, rank: int):
    """Mixed, validated, tokenized prompts; rank 0 prepares first so the others reuse its cache."""
    if rank != 0:
        dist.barrier()
    rows, report = data_mix.load_mixture(args, validate_rlvr_record)
    prompts, too_long = tokenize_rlvr_dataset(rows, tokenizer, args.max_seq_length - args.response_length,
                                              args.preprocessing_num_workers)
    if rank == 0:
        dist.barrier()
    if len(prompts) == 0:
        raise SystemExit(f"no prompts left: all {too_long} are longer than --max_seq_length - --response_length")
    report.update(too_long_dropped=too_long, prompts=len(prompts))
    return prompts, report


def score_responses(responses: list[str], rows: list[dict], stopped, args):
    """Verifier rewards [B] and the verifier's scores [B] (1 = correct; IFEval: fraction of constraints met)."""
    verified = torch.tensor([verifiers.verify(text, row["ground_truth"], row["dataset"])
                             for text, row in zip(responses, rows)], device=stopped.device)
    rewards = args.verification_reward * verified
    if args.non_stop_penalty:  # a response cut at --response_length gets the penalty whatever it says
        rewards = torch.where(stopped, rewards, torch.full_like(rewards, args.penalty_reward_value))
    return rewards, verified


# ---------------------------------------------------------------------------------------------
# One RL step after sampling: old/reference log-probs, advantages, updates

@torch.no_grad()
def old_and_reference_outputs(policy, reference, value_model, rollout, args) -> dict:
    """Per-token outputs of the models as they are before this step's updates, one micro-batch at a time:
    old_logps (the ratio's denominator), ref_logps (unless --beta 0), entropy ([B, N]) and, for PPO, old_values
    ([B, N + 1])."""
    length, outputs = rollout.response_mask.shape[1], []
    for rows in torch.arange(len(rollout.stopped)).split(args.per_device_train_batch_size):
        sequences, mask = rollout.query_responses[rows], rollout.attention_mask[rows]
        old_logps, entropies = response_logprobs(policy, sequences, mask, length, args.temperature, with_entropy=True)
        outputs.append({"old_logps": old_logps, "entropy": entropies})
        if reference is not None:
            outputs[-1]["ref_logps"] = response_logprobs(reference, sequences, mask, length, args.temperature)[0]
        if value_model is not None:
            outputs[-1]["old_values"] = response_values(value_model, sequences, mask, length)
    return {name: torch.cat([output[name] for output in outputs]) for name in outputs[0]}


def compute_advantages(old: dict, scores, rollout, args) -> None:
    """GRPO: one advantage per response, normalized within its prompt's group. PPO: GAE on per-token rewards
    (-beta KL each token, the score one past the end: score_positions()), whitened; plus the value targets
    (old["returns"]) and the states the critic trains on (old["value_mask"], [B, N + 1]). And the loss's token mask
    (old["loss_mask"], [B, N]): the response tokens of the rows trained_rows() keeps."""
    mask, group = rollout.response_mask, args.num_samples_per_prompt_rollout
    keep = trained_rows(scores, rollout.stopped, group, args.mask_truncated_completions, args.filter_zero_std_samples)
    old["loss_mask"] = mask * keep[:, None]
    if args.algo == "grpo":
        old["advantages"] = group_advantages(scores, group, args.advantage_normalization_type)  # [B]
        return
    ref_logps = old.get("ref_logps", old["old_logps"])  # --beta 0: no reference, and no KL term to weigh
    score_index = score_positions(mask, args.response_length)  # [B]
    rewards = ppo_token_rewards(scores, old["old_logps"], ref_logps, mask, args.beta, score_index,
                                KL_ESTIMATORS[args.kl_estimator])  # [B, N + 1]
    # the critic's states: each response's tokens and the one after (the score's), as Tülu 3's PPO trains it
    value_mask = (torch.arange(mask.shape[1] + 1, device=mask.device) <= score_index[:, None]).long()  # [B, N + 1]
    advantages, old["returns"] = gae(rewards, old["old_values"], value_mask, args.gamma, args.lam)
    old["advantages"] = whiten(advantages[:, :-1], mask)  # [B, N]: the policy's tokens only
    old["value_mask"] = value_mask * keep[:, None]


def update(trained, optimizer, rollout, old: dict, args, step: int, rank: int, world_size: int) -> dict:
    """--ppo_epochs passes over the rollout, each in --num_mini_batches optimizer steps. `old` holds the [B]/[B, N]
    tensors fixed before the first update (compute_advantages). Returns the means over the optimizer steps of the
    loss, the value loss and each model's grad norm (before clipping), and the clipped fraction of trained tokens.
    PPO's value model has its own gradient clipping and parameter group (AdamW acts per parameter: as its own
    optimizer, open-instruct's), so a large value gradient never shrinks the policy's step."""
    mask, length = old["loss_mask"], rollout.response_mask.shape[1]
    # the mini-batch order is a function of the step: resumable
    generator = torch.Generator().manual_seed(args.seed + infra.STEP_SEED_STRIDE * step + rank)
    totals = torch.zeros(4, dtype=torch.float64, device=mask.device)  # loss, value loss, clipped tokens, tokens
    grad_norm_sums = dict.fromkeys(trained.keys(), 0.0)
    for _ in range(args.ppo_epochs):
        for mini_batch in torch.randperm(len(mask), generator=generator).chunk(args.num_mini_batches):
            # One divisor for the whole mini-batch (every rank's rows), counted before any forward; PPO's value
            # loss has its own (the critic's states: one more per response, where the score sits).
            masks = [mask] + ([old["value_mask"]] if args.algo == "ppo" else [])
            divisors = torch.stack([loss_divisor(m[mini_batch], args.loss_denominator) for m in masks])
            dist.all_reduce(divisors)
            divisor, value_divisor = divisors.clamp(min=1e-8)[[0, -1]]  # nothing to train: loss 0, not 0 / 0
            for rows in mini_batch.split(args.per_device_train_batch_size):
                micro = {name: values[rows] for name, values in old.items()}
                sequences, attention = rollout.query_responses[rows], rollout.attention_mask[rows]
                logps, _ = response_logprobs(trained["policy"], sequences, attention, length, args.temperature)
                value_loss = torch.zeros((), device=mask.device)
                if args.algo == "grpo":
                    loss, clipped = grpo_loss(logps, micro["old_logps"], micro.get("ref_logps"), micro["advantages"],
                                              micro["loss_mask"], args.clip_lower, args.clip_higher, args.beta, divisor,
                                              KL_ESTIMATORS[args.kl_estimator])
                else:
                    policy_loss, clipped = clipped_policy_loss(logps, micro["old_logps"], micro["advantages"],
                                                               args.clip_lower, args.clip_higher)
                    values = response_values(trained["value"], sequences, attention, length)
                    value_loss = masked_sum(clipped_value_loss(values, micro["old_values"], micro["returns"],
                                                               args.cliprange_value),
                                            micro["value_mask"], value_divisor)  # [B, N + 1] -> scalar
                    loss = masked_sum(policy_loss, micro["loss_mask"], divisor) + args.vf_coef * value_loss
                # FSDP averages gradients over ranks; multiplying by world_size turns that average into a sum.
                (loss * world_size).backward()
                totals += torch.stack([loss.detach(), value_loss.detach(), (clipped * micro["loss_mask"]).sum(),
                                       micro["loss_mask"].sum()]).double()
            for name, model in trained.items():  # each model's gradient clipped by its own norm
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm
                                                      if args.max_grad_norm > 0 else float("inf"))
                norm = (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()
                if not math.isfinite(norm):
                    raise FloatingPointError(f"step {step + 1}: {name} grad norm {norm}; stopped before "
                                             "the update, the last checkpoint in --output_dir is intact")
                grad_norm_sums[name] += norm
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    dist.all_reduce(totals)  # each rank's share of a mini-batch loss is sum / all ranks' tokens: the sum is the loss
    optimizer_steps = args.ppo_epochs * args.num_mini_batches
    losses = {"loss": totals[0].item() / optimizer_steps, "value_loss": totals[1].item() / optimizer_steps,
              "clip_fraction": totals[2].item() / max(totals[3].item(), 1)}
    names = {"policy": "grad_norm", "value": "value_grad_norm"}
    return losses | {names[name]: total / optimizer_steps for name, total in grad_norm_sums.items()}


def rollout_metrics(rollout, old: dict, scores, verified, rows: list[dict]) -> dict:
    """Step metrics over every rank's responses: reward, accuracy per dataset, KL (kl1, kl3: per token, before the
    update), entropy, lengths."""
    mask = rollout.response_mask
    sums = {"responses": len(rows), "reward": scores.sum(), "reward_squared": (scores ** 2).sum(),
            # both estimators of KL(pi || pi_ref) per token (NaN: --beta 0): k1 can go negative, k3 cannot
            **{name: (kl(old["old_logps"], old.get("ref_logps", math.nan)) * mask).sum()
               for name, kl in KL_ESTIMATORS.items()},
            "tokens": mask.sum(),
            "entropy": (old["entropy"] * mask).sum(), "cut": (~rollout.stopped).sum(),
            "logprob_diff": ((rollout.logprobs - old["old_logps"]).abs() * mask).sum(),
            "sequence_tokens": rollout.attention_mask.sum()}
    for kind in RLVR_DATASETS:
        sums[f"correct/{kind}"] = sum(v for v, row in zip(verified.tolist(), rows) if row["dataset"] == kind)
        sums[f"count/{kind}"] = sum(row["dataset"] == kind for row in rows)
    totals = torch.tensor([float(v) for v in sums.values()], dtype=torch.float64, device=scores.device)
    dist.all_reduce(totals)
    total = dict(zip(sums, totals.tolist()))
    responses, tokens, reward_mean = total["responses"], total["tokens"], total["reward"] / total["responses"]
    metrics = {"reward_mean": reward_mean, "reward_std": math.sqrt(max(total["reward_squared"] / responses
                                                                      - reward_mean ** 2, 0.0)),
               **{name: total[name] / tokens for name in KL_ESTIMATORS}, "entropy": total["entropy"] / tokens,
               "response_length": tokens / responses,
               "length_limit_fraction": total["cut"] / responses, "response_tokens": int(tokens),
               "sequence_tokens": int(total["sequence_tokens"]),
               # |sampler log-prob - training forward log-prob| per token: ~0 unless the two paths disagree
               "sampling_logprob_diff": total["logprob_diff"] / tokens}
    metrics.update({f"accuracy/{kind}": total[f"correct/{kind}"] / total[f"count/{kind}"]
                    for kind in RLVR_DATASETS if total[f"count/{kind}"]})
    return metrics


# ---------------------------------------------------------------------------------------------
# Training

def main(argv=None):
    args = parse_args(argv)
    with infra.process_group() as (rank, world_size, device):
        run_config = {name: value for name, value in vars(args).items() if name not in RESUMABLE_FLAGS}
        with checkpoint.claimed_output_dir(args.output_dir, model_path=args.model_name_or_path, run_config=run_config,
                                           resume=args.resume, rank=rank):
            train(args, rank, world_size, device)


def train(args, rank: int, world_size: int, device) -> None:
    torch.manual_seed(args.seed)
    if infra.final_model_saved(args.output_dir, rank):
        return
    tokenizer = data_mix.load_tokenizer(args.model_name_or_path, args.chat_template_name)
    prompts, data_report = load_rlvr_data(args, tokenizer, rank)

    group, batch_prompts = args.num_samples_per_prompt_rollout, args.num_unique_prompts_rollout
    if batch_prompts % world_size or (batch_prompts // world_size * group) % args.num_mini_batches:
        raise SystemExit(f"--num_unique_prompts_rollout {batch_prompts} x {group} samples must split evenly over "
                         f"{world_size} ranks and then into --num_mini_batches {args.num_mini_batches}")
    steps_per_epoch, total_steps = len(prompts) // batch_prompts, args.total_episodes // (batch_prompts * group)
    if steps_per_epoch == 0 or total_steps == 0:
        raise SystemExit(f"{len(prompts)} prompts, --total_episodes {args.total_episodes}: not one step of "
                         f"{batch_prompts} prompts x {group} samples")
    run_facts = {"optimizer_batch": batch_prompts * group,  # fixed by flags a resume may not change
                 **checkpoint.run_fingerprints(prompts, args.model_name_or_path, rank)}
    resumed = checkpoint.newest(args.output_dir, run_facts, world_size)
    prompts = prompts.to_list()  # rows are read one at a time below
    if rank == 0:
        data_mix.save_json(os.path.join(args.output_dir, "mixture.json"), data_report)

    load_model = functools.partial(infra.load_model, device=device, rank=rank, dtype=args.dtype,
                                   attn_implementation=args.attn_implementation, max_seq_length=args.max_seq_length,
                                   gradient_checkpointing=args.gradient_checkpointing, compile=args.compile)
    policy = load_model(args.model_name_or_path, HFModel)
    first_prompt = prompts[torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed))[0].item()]
    first_ids = torch.tensor([first_prompt["input_ids"][:64]], device=device)
    infra.check_loaded_model(policy, args.model_name_or_path, first_ids,
                             lambda ids, positions: decoding.token_logprobs(
                                 policy(input_ids=ids, position_ids=positions).logits[:, :-1], ids[:, 1:], 1.0),
                             infra.resolve_dtype(args.dtype, device), rank)
    reference = None if args.beta == 0 else load_model(args.model_name_or_path, HFModel).requires_grad_(False).eval()
    trained = torch.nn.ModuleDict({"policy": disable_dropout(policy)})
    if args.algo == "ppo":
        value_path = args.value_model_name_or_path or args.model_name_or_path
        infra.check_model_path(value_path, "--value_model_name_or_path", tokenizer=False)
        value_model = functools.partial(ValueModel, head=saved_value_head(value_path))
        trained["value"] = disable_dropout(load_model(value_path, value_model))
    optimizer = torch.optim.AdamW([{"params": model.parameters()} for model in trained.values()],  # a group per model
                                  lr=args.learning_rate, weight_decay=args.weight_decay, fused=device.type == "cuda")
    scheduler = infra.make_scheduler(optimizer, args.lr_scheduler_type, int(args.warmup_ratio * total_steps),
                                     total_steps)
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    start_step = checkpoint.load(trained, optimizer, scheduler, resumed) if resumed else 0
    if rank == 0:  # forget what the checkpoint does not cover: later steps' metrics, incomplete checkpoints
        infra.truncate_metrics(metrics_path, start_step)
        checkpoint.remove_others(args.output_dir, keep=resumed.path if resumed else None)
    report = infra.MetricsReport(args.report_to if rank == 0 else "none", args.output_dir, start_step, vars(args))

    progress = tqdm(total=total_steps, initial=start_step, desc=f"rlvr {args.algo}", disable=rank != 0)
    for step in range(start_step, total_steps):
        # the global RNG (dropout) is a function of the step
        torch.manual_seed(args.seed + infra.STEP_SEED_STRIDE * step + rank)
        epoch, index = divmod(step, steps_per_epoch)
        # The prompt order is a function of (seed, epoch): a resumed run sees the same prompts.
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
        batch_indices = order[index * batch_prompts:(index + 1) * batch_prompts]
        rows = [prompts[i] for i in batch_indices[rank::world_size] for _ in range(group)]  # a group is contiguous
        started = time.perf_counter()
        policy.eval()  # (no dropout in the old-policy forward below either)
        generator = torch.Generator(device).manual_seed(args.seed + infra.SAMPLING_SEED_STRIDE * (step + 1) + rank)
        queries = [row["input_ids"] for row in rows]
        completions = decoding.complete(policy, tokenizer, queries, max_new_tokens=args.response_length,
                                        temperature=args.temperature, top_p=args.top_p, generator=generator,
                                        stop_strings=args.stop_strings, batch_size=len(queries))
        rollout = rollout_of(queries, completions, tokenizer.pad_token_id, device)
        sampled = time.perf_counter()
        scores, verified = score_responses([completion.text for completion in completions], rows, rollout.stopped,
                                           args)
        scored = time.perf_counter()
        old = old_and_reference_outputs(policy, reference, trained["value"] if args.algo == "ppo" else None,
                                        rollout, args)
        compute_advantages(old, scores, rollout, args)
        referenced = time.perf_counter()
        trained.train()  # (no dropout: disable_dropout())
        lr = optimizer.param_groups[0]["lr"]  # the rate this step's updates really use
        losses = update(trained, optimizer, rollout, old, args, step, rank, world_size)
        scheduler.step()
        finished = time.perf_counter()

        metrics = {"step": step + 1, "episodes": (step + 1) * batch_prompts * group, "lr": lr, **losses,
                   **rollout_metrics(rollout, old, scores, verified, rows)}
        metrics.update({"sampling_tokens_per_s": metrics["response_tokens"] / (sampled - started),
                        "training_tokens_per_s": metrics["sequence_tokens"] * args.ppo_epochs / (finished - referenced),
                        "time/sampling": sampled - started, "time/scoring": scored - sampled,
                        "time/reference": referenced - scored, "time/training": finished - referenced})
        if rank == 0:
            infra.append_metrics(metrics_path, metrics)
            report(metrics)
            progress.set_postfix({"reward": f"{metrics['reward_mean']:.2f}",  # and the KL estimator the loss uses
                                  args.kl_estimator: f"{metrics[args.kl_estimator]:.4f}"})
            progress.update()
        if (step + 1) % args.checkpointing_steps == 0 and step + 1 < total_steps:
            checkpoint.save(trained, optimizer, scheduler, step + 1, args.output_dir, rank, run_facts)
    progress.close()
    report.close()
    infra.save_hf_model(policy, tokenizer, args.model_name_or_path, args.output_dir, rank)


if __name__ == "__main__":
    infra.run(main)
