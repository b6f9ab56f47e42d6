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

One step: sample responses to this step's prompts (parameters gathered, a static KV cache, ranks in
lock-step); reward them with a verifier, not a learned reward model (--verification_reward if correct;
IFEval: times the fraction of constraints met); one no-grad forward for the log-probs (always of logits /
temperature, the distribution sampled) of the policy before the update and of the frozen reference
(and PPO's values); advantages; mini-batch updates.
- --algo grpo (Tülu 3.1, default): G samples per prompt, advantages normalized within each group (unbiased
  std), the clipped ratio loss averaged over every response token, k3 KL to the reference inside the loss
  (--kl_estimator); each
  rollout in 2 mini-batches (so the second step's ratio differs from 1 and the clip can act); a response cut
  at --response_length scores 0 (--penalty_reward_value). These defaults are Tülu 3.1's flags (open-instruct's
  command for Llama-3.1-Tulu-3.1-8B); its run length and seed are not defaults: README.md's full-scale command.
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
import contextlib
import functools
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from tqdm import tqdm
from transformers import StaticCache
from transformers.cache_utils import StaticLayer
from transformers.utils import cached_file

import data_mix
import infra
import verifiers

# Flags that may change when a run is resumed; every other flag must match the run in --output_dir.
# --per_device_train_batch_size may change, on any number of ranks: it only splits the mini-batches (fixed by the
# rollout flags) into micro-batches.
RESUMABLE_FLAGS = {"resume", "checkpointing_steps", "preprocessing_num_workers", "per_device_train_batch_size"}
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="Hugging Face model directory or hub name")
    data_mix.add_data_args(parser, max_seq_length=4096)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--algo", default="grpo", choices=["grpo", "ppo"])
    parser.add_argument("--total_episodes", type=data_mix.POSITIVE_INT, default=100000,
                        help="sampled responses over the whole run")
    parser.add_argument("--num_unique_prompts_rollout", type=data_mix.POSITIVE_INT, default=48,
                        help="prompts per step (all ranks)")
    parser.add_argument("--num_samples_per_prompt_rollout", type=data_mix.POSITIVE_INT, default=None,
                        help="G; default 16 (grpo), 1 (ppo)")
    parser.add_argument("--response_length", type=data_mix.POSITIVE_INT, default=2048,
                        help="max new tokens; prompts longer than max_seq_length - response_length are dropped")
    parser.add_argument("--temperature", type=data_mix.POSITIVE, default=1.0)
    parser.add_argument("--top_p", type=data_mix.bounded(float, 0.0, 1.0, low_open=True), default=1.0)
    parser.add_argument("--stop_strings", nargs="*", default=[], help="end a response at any of these strings")
    parser.add_argument("--verification_reward", type=data_mix.bounded(float), default=10.0,
                        help="reward of a correct answer")
    parser.add_argument("--non_stop_penalty", action=argparse.BooleanOptionalAction, default=True,
                        help="give --penalty_reward_value to responses cut at --response_length (Tülu 3 and 3.1)")
    parser.add_argument("--penalty_reward_value", type=data_mix.bounded(float), default=None,
                        help="default 0 (grpo), -10 (ppo)")
    parser.add_argument("--beta", type=data_mix.NON_NEGATIVE, default=None,
                        help="KL coefficient; default 0.01 (grpo), 0.05 (ppo); 0: no reference model at all")
    parser.add_argument("--kl_estimator", default=None, choices=["kl1", "kl3"],
                        help="KL(pi || pi_ref) per token in GRPO's loss / PPO's reward; default kl3 (grpo), kl1 (ppo)")
    parser.add_argument("--cliprange", type=data_mix.POSITIVE, default=0.2)
    parser.add_argument("--clip_lower", type=data_mix.POSITIVE, default=None,
                        help="ratio clip 1 - eps below; default --cliprange")
    parser.add_argument("--clip_higher", type=data_mix.POSITIVE, default=None,
                        help="ratio clip 1 + eps above; default --cliprange")
    parser.add_argument("--advantage_normalization_type", default="standard", choices=["standard", "centered"],
                        help="grpo: (r - mean) / std in each group, or r - mean (Dr. GRPO)")
    parser.add_argument("--mask_truncated_completions", action="store_true",
                        help="leave responses cut at --response_length out of the loss")
    parser.add_argument("--filter_zero_std_samples", action="store_true",
                        help="grpo: leave groups whose rewards are all equal out of the loss")
    parser.add_argument("--loss_denominator", type=lambda s: s if s == "token" else float(s), default="token",
                        help="token: a token mean (Tülu 3.1); a number D: per response, token sum / D (Dr. GRPO)")
    parser.add_argument("--num_mini_batches", type=data_mix.POSITIVE_INT, default=None,
                        help="optimizer steps per pass over a rollout; default 2 (grpo), 1 (ppo)")
    parser.add_argument("--ppo_epochs", type=data_mix.POSITIVE_INT, default=None,
                        help="passes over a rollout; default 1 (grpo), 4 (ppo)")
    parser.add_argument("--value_model_name_or_path", default=None, help="ppo: value model init (default: the policy)")
    parser.add_argument("--vf_coef", type=data_mix.NON_NEGATIVE, default=0.1)
    parser.add_argument("--cliprange_value", type=data_mix.POSITIVE, default=0.2)
    parser.add_argument("--gamma", type=data_mix.FRACTION, default=1.0)
    parser.add_argument("--lam", type=data_mix.FRACTION, default=0.95)
    parser.add_argument("--per_device_train_batch_size", type=data_mix.POSITIVE_INT, default=1,
                        help="sequences per micro-batch")
    parser.add_argument("--learning_rate", type=data_mix.NON_NEGATIVE, default=None, help="default 5e-7 (grpo), 3e-7 (ppo)")
    parser.add_argument("--lr_scheduler_type", default=None, choices=["linear", "constant"],
                        help="default constant (grpo), linear (ppo)")
    parser.add_argument("--warmup_ratio", type=data_mix.FRACTION, default=0.0)
    parser.add_argument("--weight_decay", type=data_mix.NON_NEGATIVE, default=0.01,
                        help="AdamW's, on every parameter of the policy and the value model; default 0.01: torch's "
                             "default, which Tülu 3's PPO and 3.1's GRPO ran with")
    parser.add_argument("--max_grad_norm", type=data_mix.bounded(float), default=1.0,
                        help="clip the gradient norm; <= 0 disables")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    parser.add_argument("--compile_sampling", action=argparse.BooleanOptionalAction, default=None,
                        help="CUDA-graph the decode step (default: on with one CUDA rank)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                        help="compute dtype; auto = bf16 on GPU, fp32 on CPU (master weights stay fp32)")
    parser.add_argument("--attn_implementation", default=None,
                        help="e.g. sdpa, eager; default: the model's own choice (sdpa where it supports it)")
    parser.add_argument("--checkpointing_steps", type=data_mix.POSITIVE_INT, default=500,
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


def token_logprobs(logits, tokens, temperature):
    """log softmax(logits / T)[token]: the distribution the tokens were sampled from. [B, N, V] -> [B, N]."""
    logits = logits.float() / temperature
    return logits.gather(-1, tokens[..., None]).squeeze(-1) - logits.logsumexp(-1)


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
    logps = token_logprobs(logits, query_responses[:, -response_length:], temperature)
    return logps, entropy(logits.detach(), temperature) if with_entropy else None


def response_values(value_model, query_responses, attention_mask, response_length):
    """PPO's critic V(prefix) before each response token and after the last one, from ValueModel's scalar head.
    [B, N + 1]: column t is the state after t response tokens (a response's score may sit one past its end)."""
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    values = value_model(input_ids=query_responses, attention_mask=attention_mask, position_ids=position_ids)
    return values[:, -response_length - 1:].float()


# ---------------------------------------------------------------------------------------------
# Sampling: a batched decode loop over a preallocated (static) KV cache.

@dataclass
class Rollout:
    query_responses: torch.Tensor  # [B, P + N] left-padded prompts followed by right-padded responses
    attention_mask: torch.Tensor  # [B, P + N] 1 on prompt and response tokens
    response_mask: torch.Tensor  # [B, N] 1 on generated tokens (up to and including EOS / the stop string)
    logprobs: torch.Tensor  # [B, N] log-probs of the sampled tokens under logits / T (0 on padding)
    stopped: torch.Tensor  # [B] bool: the response ended with EOS or a stop string (not cut at max_new_tokens)
    responses: torch.Tensor  # [B, N] the responses alone (the end of query_responses)


@contextlib.contextmanager
def full_parameters(model):
    """Hold FSDP2's unsharded parameters for the whole rollout: a decode step is one token per sequence, so
    all-gathering every layer at each of hundreds of steps would cost far more than the steps. Then reshard
    and restore fully_shard's defaults (layers reshard after forward, the root does not)."""
    fsdp_modules = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for module in fsdp_modules:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        yield
    finally:
        for module in fsdp_modules:
            module.reshard()
            module.set_reshard_after_forward(module is not model, recurse=False)


class Sampler:
    """Batched sampling with temperature, top-p, EOS / stop strings and a per-row done mask.

    The KV cache is preallocated for max_prompt_length + max_new_tokens and reused across rollouts; a step
    attends only to its filled slots rounded up to a power of two (>= 128), so its cost follows the longest
    response so far, not the allocation, and the shapes stay a handful. With `compile_decode` (for CUDA) the
    one-token forward is captured in CUDA graphs ("reduce-overhead"), one per length, removing the per-kernel
    launch cost that dominates decoding; the prompt (prefill) runs eagerly.

    Rows that finish early keep stepping, masked, until all are done: a rollout costs its longest response for
    every row. Where decoding is memory-bound (a GPU), a step reads the weights once for all rows, so a finished
    row adds only its share of the compute and its KV reads; on a CPU, compute-bound, it costs a live row's share.
    Chosen over refilling finished rows with new prompts (responses of one step from several policy versions, as
    asynchronous RL does) and over dropping them from the batch (a new shape per drop: no fixed CUDA graphs).
    Ranks run in lock-step: the all-reduced "all done" flag is read every CHECK_DONE_EVERY steps (a host sync
    spared on the others, at most 7 steps past the end), at the same steps everywhere, so collectives inside the
    forward never wait on a rank that left the loop. `model` takes Hugging Face's forward arguments (under FSDP:
    the root unit, inside full_parameters()).
    """
    CHECK_DONE_EVERY = 8

    def __init__(self, model, max_prompt_length, max_new_tokens, compile_decode=False):
        self.model, self.max_new_tokens = model, max_new_tokens
        self.max_cache_length = max_prompt_length + max_new_tokens
        self.cache, self.cache_batch_size, self.views = None, None, {}
        self.cache_keyword = infra.cache_keyword(model)
        self.decode = torch.compile(model, mode="reduce-overhead") if compile_decode else model

    def forward(self, model, input_ids, position_ids, attention_mask, filled, **kwargs):
        """One forward over the cache once `filled` slots hold tokens, attention (and mask) cut to a power of 2."""
        length = min(self.max_cache_length, max(128, 1 << (filled - 1).bit_length()))
        self._attend_to(length)
        return model(input_ids=input_ids, attention_mask=attention_mask[:, :length], position_ids=position_ids,
                     use_cache=True, **{self.cache_keyword: self.cache}, **kwargs).logits[:, -1]

    @torch.no_grad()
    def generate(self, prompts, temperature, top_p, eos_token_id, pad_token_id, stop_strings=(), tokenizer=None,
                 generator=None):
        """prompts: list of token-id lists. Returns a Rollout whose N is the number of steps taken."""
        device = next(self.model.parameters()).device
        prompt_ids, prompt_mask = (t.to(device) for t in infra.collate_prompts(prompts, pad_token_id))  # [B, P]
        batch_size, prompt_length = prompt_ids.shape
        if prompt_length + self.max_new_tokens > self.max_cache_length:
            raise ValueError(f"a {prompt_length}-token prompt leaves no room for {self.max_new_tokens} new tokens")
        if self.cache_batch_size != batch_size:  # a cache keeps its addresses (and CUDA graphs stay valid)
            self.cache = StaticCache(config=self.model.config, max_cache_len=self.max_cache_length)
            self.cache_batch_size, self.views = batch_size, {}
        self._clear_cache()
        # One fixed-size mask for every step: prompt padding is 0, every later slot 1 (causality hides the future).
        attention_mask = torch.ones((batch_size, self.max_cache_length), dtype=torch.long, device=device)
        attention_mask[:, :prompt_length] = prompt_mask
        next_position = prompt_mask.sum(dim=1, keepdim=True)  # [B, 1] position of each row's first new token

        tokens, logprobs, alive = [], [], []
        done, stopped = (torch.zeros(batch_size, dtype=torch.bool, device=device) for _ in range(2))
        positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding shifts no position
        logits = self.forward(self.model, prompt_ids, positions, attention_mask, prompt_length, logits_to_keep=1)
        for step in range(self.max_new_tokens):
            token = infra.sample_top_p(logits, temperature, top_p, generator)  # [B]
            logprob = token_logprobs(logits[:, None], token[:, None], temperature)[:, 0]
            tokens.append(token.masked_fill(done, pad_token_id))
            logprobs.append(logprob.masked_fill(done, 0.0))
            alive.append(~done)
            ended = ~done & (token == eos_token_id)
            if stop_strings:
                ended |= ~done & self._hit_stop_string(tokens, stop_strings, tokenizer, done)
            stopped |= ended
            done |= ended
            if step + 1 == self.max_new_tokens or (step + 1) % self.CHECK_DONE_EVERY == 0 and self._all_done(done):
                break
            torch.compiler.cudagraph_mark_step_begin()  # (CUDA graphs) a new step: the last one's outputs are consumed
            logits = self.forward(self.decode, token[:, None], next_position + step, attention_mask,
                                  prompt_length + step + 1).clone()  # clone: the next replay reuses the buffer

        responses = torch.stack(tokens, dim=1)  # [B, N]
        response_mask = torch.stack(alive, dim=1).long()  # [B, N]
        return Rollout(query_responses=torch.cat([prompt_ids, responses], dim=1),
                       attention_mask=torch.cat([prompt_mask, response_mask], dim=1), response_mask=response_mask,
                       logprobs=torch.stack(logprobs, dim=1), stopped=stopped, responses=responses)

    def _attend_to(self, length):
        """Make each layer's keys/values views of its buffers' first `length` slots (writes land in the buffers), the
        same views every rollout (for the CUDA graphs). Full-attention layers only; the first prefill allocates."""
        layers = self.cache.layers
        if any(type(layer) is not StaticLayer for layer in layers) or not layers[0].is_initialized:
            return
        full = self.views.setdefault(self.max_cache_length, [(layer.keys, layer.values) for layer in layers])
        if length not in self.views:
            self.views[length] = [(keys[:, :, :length], values[:, :, :length]) for keys, values in full]
            for view in (t for pair in self.views[length] for t in pair):
                torch._dynamo.mark_static_address(view)  # (CUDA graphs) a fixed address, like the full buffers
        for layer, (keys, values) in zip(layers, self.views[length]):
            layer.keys, layer.values, layer.max_cache_len = keys, values, length

    def _clear_cache(self):
        """Leave the cache as StaticCache.reset() would (all zeros, nothing filled) at the cost of the slots the last
        rollout filled: reset() zeroes the whole allocation (1.5 GB for 8 rows x 4096 slots of SmolLM2-135M, measured
        0.05 s on a quiet 2-core CPU and 2.5 s on a loaded one). Other kinds of cache: reset()."""
        self._attend_to(self.max_cache_length)
        full = self.views.get(self.max_cache_length)
        if full is None:  # not all full-attention layers, or never filled
            return self.cache.reset()
        for layer, (keys, values) in zip(self.cache.layers, full):
            filled = int(layer.cumulative_length)  # (a host sync per layer, once per rollout)
            keys[:, :, :filled].zero_()
            values[:, :, :filled].zero_()
            layer.cumulative_length.zero_()

    @staticmethod
    def _all_done(done):
        all_done = done.all().to(torch.int)
        if dist.is_initialized():
            dist.all_reduce(all_done, op=dist.ReduceOp.MIN)
        return bool(all_done)

    @staticmethod
    def _hit_stop_string(tokens, stop_strings, tokenizer, done):
        """[B] bool: the row's text now ends in a stop string (checks only the last few tokens' text)."""
        window = max(len(s) for s in stop_strings)  # a stop string spans at most this many tokens
        texts = tokenizer.batch_decode(torch.stack(tokens[-window:], dim=1).tolist())
        return torch.tensor([not finished and any(s in text for s in stop_strings)
                             for text, finished in zip(texts, done.tolist())], device=done.device)


# ---------------------------------------------------------------------------------------------
# Data and rewards

def load_rlvr_data(args, tokenizer, rank: int):
    """Mixed, validated, tokenized prompts; rank 0 prepares first so the others reuse its cache."""
    if rank != 0:
        dist.barrier()
    rows, report = data_mix.load_mixture(args, data_mix.validate_rlvr_record)
    prompts, too_long = data_mix.tokenize_rlvr_dataset(rows, tokenizer, args.max_seq_length - args.response_length,
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
    generator = torch.Generator().manual_seed(args.seed + 7919 * step + rank)  # mini-batch order, resumable
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
    for kind in data_mix.RLVR_DATASETS:
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
                    for kind in data_mix.RLVR_DATASETS if total[f"count/{kind}"]})
    return metrics


# ---------------------------------------------------------------------------------------------
# Training

def main(argv=None):
    args = parse_args(argv)
    rank, world_size, device = infra.init_distributed()
    try:
        with infra.claimed_output_dir(args, rank, RESUMABLE_FLAGS):
            train(args, rank, world_size, device)
    finally:
        dist.destroy_process_group()


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
                 **infra.run_fingerprints(prompts, args.model_name_or_path, rank)}
    checkpoint = infra.resume_checkpoint(args.output_dir, run_facts, world_size)
    prompts = prompts.to_list()  # rows are read one at a time below
    if rank == 0:
        data_mix.save_json(os.path.join(args.output_dir, "mixture.json"), data_report)

    policy = infra.load_model(args.model_name_or_path, args, device, rank, HFModel)
    first_prompt = prompts[torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed))[0].item()]
    first_ids = torch.tensor([first_prompt["input_ids"][:64]], device=device)
    infra.check_loaded_model(policy, args.model_name_or_path, first_ids,
                             lambda ids, positions: token_logprobs(
                                 policy(input_ids=ids, position_ids=positions).logits[:, :-1], ids[:, 1:], 1.0),
                             infra.resolve_dtype(args.dtype, device), rank)
    reference = None if args.beta == 0 else infra.load_model(args.model_name_or_path, args, device, rank, HFModel
                                                             ).requires_grad_(False).eval()
    trained = torch.nn.ModuleDict({"policy": disable_dropout(policy)})
    if args.algo == "ppo":
        value_path = args.value_model_name_or_path or args.model_name_or_path
        infra.check_model_path(value_path)
        trained["value"] = disable_dropout(infra.load_model(value_path, args, device, rank, functools.partial(
            ValueModel, head=saved_value_head(value_path))))
    optimizer = torch.optim.AdamW([{"params": model.parameters()} for model in trained.values()],  # a group per model
                                  lr=args.learning_rate, weight_decay=args.weight_decay, fused=device.type == "cuda")
    scheduler = infra.make_scheduler(optimizer, args.lr_scheduler_type, math.ceil(args.warmup_ratio * total_steps),
                                     total_steps)
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    start_step = infra.load_checkpoint(trained, optimizer, scheduler, checkpoint) if checkpoint else 0
    if rank == 0:  # forget what the checkpoint does not cover: later steps' metrics, incomplete checkpoints
        infra.truncate_metrics(metrics_path, start_step)
        infra.remove_checkpoints(args.output_dir, keep=checkpoint and checkpoint[0])

    compile_decode = device.type == "cuda" and world_size == 1 if args.compile_sampling is None else args.compile_sampling
    sampler = Sampler(policy, args.max_seq_length - args.response_length, args.response_length, compile_decode)
    progress = tqdm(total=total_steps, initial=start_step, desc=f"rlvr {args.algo}", disable=rank != 0)
    for step in range(start_step, total_steps):
        torch.manual_seed(args.seed + 7919 * step + rank)  # the global RNG (dropout) is a function of the step
        epoch, index = divmod(step, steps_per_epoch)
        # The prompt order is a function of (seed, epoch): a resumed run sees the same prompts.
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
        batch_indices = order[index * batch_prompts:(index + 1) * batch_prompts]
        rows = [prompts[i] for i in batch_indices[rank::world_size] for _ in range(group)]  # a group is contiguous
        started = time.perf_counter()
        policy.eval()  # (gradient checkpointing would turn the KV cache off in train mode)
        generator = torch.Generator(device).manual_seed(args.seed + 104729 * (step + 1) + rank)
        with full_parameters(policy):
            rollout = sampler.generate([row["input_ids"] for row in rows], args.temperature, args.top_p,
                                       tokenizer.eos_token_id, tokenizer.pad_token_id, args.stop_strings, tokenizer,
                                       generator)
        sampled = time.perf_counter()
        scores, verified = score_responses(tokenizer.batch_decode(rollout.responses, skip_special_tokens=True), rows,
                                           rollout.stopped, args)
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
            progress.set_postfix({"reward": f"{metrics['reward_mean']:.2f}",  # and the KL estimator the loss uses
                                  args.kl_estimator: f"{metrics[args.kl_estimator]:.4f}"})
            progress.update()
        if (step + 1) % args.checkpointing_steps == 0 and step + 1 < total_steps:
            infra.save_checkpoint(trained, optimizer, scheduler, step + 1, args.output_dir, rank, run_facts)
    progress.close()
    infra.save_hf_model(policy, tokenizer, args.model_name_or_path, args.output_dir, rank)


if __name__ == "__main__":
    main()
