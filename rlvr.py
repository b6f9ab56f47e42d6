"""RLVR: reinforcement learning with verifiable rewards, the third stage of the Tülu 3 recipe.

    python rlvr.py --model_name_or_path output/dpo --dataset_mixer_list data/demo/rlvr_train.jsonl 1.0 \
        --output_dir output/rlvr --num_unique_prompts_rollout 8 --num_samples_per_prompt 4 --response_length 64
    torchrun --nproc_per_node 8 rlvr.py --model_name_or_path allenai/Llama-3.1-Tulu-3-8B-DPO \
        --dataset_mixer_list allenai/RLVR-GSM-MATH-IF-Mixed-Constraints 1.0 --chat_template_name tulu \
        --algo grpo --output_dir output/rlvr-8b

One step: sample responses to this step's prompts (parameters gathered, a static KV cache, ranks in
lock-step); reward them with a verifier, not a learned reward model (--verification_reward if correct;
IFEval: times the fraction of constraints met); one no-grad forward for the log-probs (always of logits /
temperature, the distribution sampled) of the policy before the update and of the frozen reference
(and PPO's values); advantages; mini-batch updates.
- --algo grpo (Tülu 3.1, default): G samples per prompt, advantages normalized within each group,
  the clipped ratio loss averaged over every response token, k3 KL to the reference inside the loss.
- --algo ppo (the Tülu 3 paper): a value model, per-token k1 KL penalty in the reward, GAE, whitened
  advantages, clipped policy and value losses, several epochs over each rollout batch.

Simplified relative to open-instruct: no vLLM (plain PyTorch sampling); the ratio's old log-probs come
from a training forward before the first update (the sampler's feed only `sampling_logprob_diff`); the
learning rate moves once per step; PPO whitens advantages per rank; the rollout's KV cache (a rank's
rows x --max_seq_length) must fit beside the gathered policy; a resumed run needs the same ranks.
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import shutil
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, StaticCache

import data_mix
import verifiers

# Flags that may change when a run is resumed; every other flag must match the run in --output_dir.
RESUMABLE_FLAGS = {"resume", "checkpointing_steps", "preprocessing_num_workers"}
# Defaults that differ between the two algorithms (Tülu 3.1 GRPO; Tülu 3 8B PPO).
ALGO_DEFAULTS = {"grpo": dict(learning_rate=5e-7, lr_scheduler_type="constant", beta=0.01, num_samples_per_prompt=16,
                               ppo_epochs=1),
                 "ppo": dict(learning_rate=3e-7, lr_scheduler_type="linear", beta=0.05, num_samples_per_prompt=1,
                              ppo_epochs=4)}


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
    parser.add_argument("--num_samples_per_prompt", type=data_mix.POSITIVE_INT, default=None,
                        help="G; default 16 (grpo), 1 (ppo)")
    parser.add_argument("--response_length", type=data_mix.POSITIVE_INT, default=2048,
                        help="max new tokens; prompts longer than max_seq_length - response_length are dropped")
    parser.add_argument("--temperature", type=data_mix.POSITIVE, default=1.0)
    parser.add_argument("--top_p", type=data_mix.bounded(float, 0.0, 1.0, low_open=True), default=1.0)
    parser.add_argument("--stop_strings", nargs="*", default=[], help="end a response at any of these strings")
    parser.add_argument("--verification_reward", type=data_mix.bounded(float), default=10.0,
                        help="reward of a correct answer")
    parser.add_argument("--non_stop_penalty", action="store_true",
                        help="give --penalty_reward_value to responses cut at --response_length")
    parser.add_argument("--penalty_reward_value", type=data_mix.bounded(float), default=-10.0)
    parser.add_argument("--beta", type=data_mix.NON_NEGATIVE, default=None,
                        help="KL coefficient; default 0.01 (grpo), 0.05 (ppo)")
    parser.add_argument("--cliprange", type=data_mix.POSITIVE, default=0.2)
    parser.add_argument("--num_mini_batches", type=data_mix.POSITIVE_INT, default=1,
                        help="optimizer steps per pass over a rollout")
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
    parser.add_argument("--weight_decay", type=data_mix.NON_NEGATIVE, default=0.0)
    parser.add_argument("--max_grad_norm", type=data_mix.bounded(float), default=1.0,
                        help="clip the gradient norm; <= 0 disables")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    parser.add_argument("--compile_sampling", action=argparse.BooleanOptionalAction, default=None,
                        help="CUDA-graph the decode step (default: on with one CUDA rank)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                        help="compute dtype; auto = bf16 on GPU, fp32 on CPU (master weights stay fp32)")
    parser.add_argument("--attn_implementation", default="sdpa")
    parser.add_argument("--checkpointing_steps", type=data_mix.POSITIVE_INT, default=500,
                        help="write a resumable checkpoint every N steps")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output_dir")
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args(argv)
    for name, value in ALGO_DEFAULTS[args.algo].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.response_length >= args.max_seq_length:
        parser.error("--response_length must leave room for a prompt in --max_seq_length")
    return args


# ---------------------------------------------------------------------------------------------
# Advantages, KL estimators and losses: pure functions of tensors.
# B = sequences (prompts x samples), N = response tokens; `mask` is 1 on response tokens.

def group_advantages(scores, group_size):
    """GRPO (Tülu 3.1): A_i = (r_i - mean_g) / (std_g + 1e-8) over the G samples of each prompt (contiguous in
    `scores`). std has ddof 0 (as open-instruct): a group whose answers all score the same gets A = 0."""
    grouped = scores.view(-1, group_size)  # [B / G, G]
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, unbiased=False, keepdim=True)
    return ((grouped - mean) / (std + 1e-8)).view(-1)  # [B]


def kl_k1(logps, ref_logps):
    """k1 estimator of KL(pi || pi_ref) per token: log pi - log pi_ref (PPO puts -beta * k1 in the reward)."""
    return logps - ref_logps  # [B, N]


def kl_k3(logps, ref_logps):
    """k3 estimator (Schulman): exp(ref - log pi) - (ref - log pi) - 1 >= 0, unbiased, low variance (GRPO loss)."""
    log_ratio = ref_logps - logps  # [B, N]
    return torch.exp(log_ratio) - log_ratio - 1


def clipped_policy_loss(logps, old_logps, advantages, cliprange):
    """PPO's clipped surrogate per token: max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)), rho = pi / pi_old.
    advantages: [B, N] (PPO) or [B, 1] (GRPO). Also returns where the clipped term won (for the clip fraction)."""
    ratio = torch.exp(logps - old_logps)  # [B, N]
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    return torch.maximum(unclipped, clipped), clipped > unclipped  # [B, N], [B, N]


def clipped_value_loss(values, old_values, returns, cliprange_value):
    """PPO value loss per token: 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)  # [B, N]


def token_mean(per_token, mask, num_tokens):
    """sum over response tokens / num_tokens, num_tokens counting the whole mini-batch (all micro-batches and
    ranks): summed over micro-batches, this is the exact token mean however the mini-batch is split."""
    return (per_token * mask).sum() / num_tokens


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, cliprange, beta, num_tokens):
    """Tülu 3.1 GRPO: token-mean of max(-A rho, -A clip(rho, 1-eps, 1+eps)) + beta * KL_k3(pi, pi_ref), the KL in
    the loss, not the reward. logps/old_logps/ref_logps/mask: [B, N]; advantages: [B]. -> (loss, clipped [B, N])"""
    pg_loss, clipped = clipped_policy_loss(logps, old_logps, advantages[:, None], cliprange)  # [B, N]
    return token_mean(pg_loss + beta * kl_k3(logps, ref_logps), mask, num_tokens), clipped


def ppo_token_rewards(scores, logps, ref_logps, mask, beta):
    """Tülu 3 PPO reward per token: r_t = -beta * KL_k1_t, plus the verifier's score on the last response token.
    scores: [B]; logps/ref_logps/mask: [B, N] with mask a prefix of ones (responses are right-padded)."""
    rewards = -beta * kl_k1(logps, ref_logps) * mask  # [B, N]
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)  # [B] index of each response's last token
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation over response tokens (values after a response's end count as 0):
    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};  returns R_t = A_t + V_t.  [B, N]"""
    rewards, values = rewards * mask, values * mask  # [B, N]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])  # [B]
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(next_advantage)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
    return advantages * mask, (advantages + values) * mask  # [B, N], [B, N]


def whiten(values, mask, eps=1e-8):
    """(x - mean) / sqrt(var + eps) over the masked entries (population variance); zeros elsewhere."""
    count = mask.sum()
    mean = (values * mask).sum() / count
    var = (((values - mean) * mask) ** 2).sum() / count
    return (values - mean) * torch.rsqrt(var + eps) * mask


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

    def forward(self, *args, **kwargs):
        output = self.model(*args, **kwargs)
        if output.logits.shape[-1] == 1:  # PPO's value head: a [B, T, 1] view of a matmul; FSDP2 warns of views
            output.logits = output.logits.clone()
        return output


def response_logprobs(policy, query_responses, attention_mask, response_length, temperature, with_entropy=False):
    """log pi(token) of each response token under logits / T ([B, N]), and the entropy (no grad) if asked.

    Positions count real tokens only (left padding shifts nothing), as while sampling; logits_to_keep
    skips the output layer over the prompt."""
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # [B, P + N]
    logits = policy(query_responses, attention_mask=attention_mask, position_ids=position_ids,
                    logits_to_keep=response_length + 1).logits[:, :-1]  # [B, N, V]: position t predicts t + 1
    logps = token_logprobs(logits, query_responses[:, -response_length:], temperature)
    return logps, entropy(logits.detach(), temperature) if with_entropy else None


def response_values(value_model, query_responses, attention_mask, response_length):
    """PPO's critic V(prefix) before each response token, from a one-label token-classification head. [B, N]"""
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    values = value_model(query_responses, attention_mask=attention_mask, position_ids=position_ids).logits
    return values[:, -response_length - 1:-1, 0].float()


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


def next_token(logits, temperature, top_p, generator):
    """Sample from softmax(logits / T) restricted to the top-p nucleus; T = 0 means greedy. [B, V] -> [B]."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, V]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    # argmax(p / q) with q ~ Exp(1) is an exact draw from p (the exponential race), with no host sync,
    # unlike torch.multinomial, so the GPU never waits for the CPU here.
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(-1)


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

    The KV cache is preallocated for max_prompt_length + max_new_tokens and reused across rollouts, so every
    decode step has the same shapes: with `compile_decode` (for CUDA) the one-token forward is captured in
    CUDA graphs ("reduce-overhead"), removing the per-kernel launch cost that dominates decoding. The
    prompt (prefill) runs eagerly. Every rank runs the same number of decode steps (lock-step: a rank
    whose rows are done keeps stepping until the all-reduced "all done" flag is set everywhere), so
    collectives inside the forward never wait on a rank that left the loop. `model` takes Hugging Face's
    forward arguments (under FSDP: the root unit, inside full_parameters()).
    """

    def __init__(self, model, max_prompt_length, max_new_tokens, compile_decode=False):
        self.model, self.max_new_tokens = model, max_new_tokens
        self.max_cache_length = max_prompt_length + max_new_tokens
        self.cache, self.cache_batch_size = None, None
        # The cache is passed positionally: its keyword is `past_key_values` before transformers 5.2x, `cache` after.
        self.decode = torch.compile(model, mode="reduce-overhead") if compile_decode else model

    @torch.no_grad()
    def generate(self, prompts, temperature, top_p, eos_token_id, pad_token_id, stop_strings=(), tokenizer=None,
                 generator=None):
        """prompts: list of token-id lists. Returns a Rollout whose N is the number of steps taken."""
        device = next(self.model.parameters()).device
        prompt_ids, prompt_mask = (t.to(device) for t in data_mix.collate_prompts(prompts, pad_token_id))  # [B, P]
        batch_size, prompt_length = prompt_ids.shape
        if prompt_length + self.max_new_tokens > self.max_cache_length:
            raise ValueError(f"a {prompt_length}-token prompt leaves no room for {self.max_new_tokens} new tokens")
        if self.cache_batch_size != batch_size:  # a cache keeps its addresses (and CUDA graphs stay valid)
            self.cache = StaticCache(config=self.model.config, max_cache_len=self.max_cache_length)
            self.cache_batch_size = batch_size
        self.cache.reset()
        # One fixed-size mask for every step: prompt padding is 0, every later slot 1 (causality hides the future).
        attention_mask = torch.ones((batch_size, self.max_cache_length), dtype=torch.long, device=device)
        attention_mask[:, :prompt_length] = prompt_mask
        next_position = prompt_mask.sum(dim=1, keepdim=True)  # [B, 1] position of each row's first new token
        logprob_temperature = temperature if temperature > 0 else 1.0

        tokens, logprobs, alive = [], [], []
        done, stopped = (torch.zeros(batch_size, dtype=torch.bool, device=device) for _ in range(2))
        positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding shifts no position
        logits = self.model(prompt_ids, attention_mask[:, :prompt_length], positions, self.cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1]  # [B, V]
        for step in range(self.max_new_tokens):
            token = next_token(logits, temperature, top_p, generator)  # [B]
            logprob = token_logprobs(logits[:, None], token[:, None], logprob_temperature)[:, 0]
            tokens.append(token.masked_fill(done, pad_token_id))
            logprobs.append(logprob.masked_fill(done, 0.0))
            alive.append(~done)
            ended = ~done & (token == eos_token_id)
            if stop_strings:
                ended |= ~done & self._hit_stop_string(tokens, stop_strings, tokenizer, done)
            stopped |= ended
            done |= ended
            if step + 1 == self.max_new_tokens or self._all_done(done):
                break
            torch.compiler.cudagraph_mark_step_begin()  # (CUDA graphs) a new step: the last one's outputs are consumed
            logits = self.decode(token[:, None], attention_mask, next_position + step, self.cache,
                                 use_cache=True).logits[:, -1].clone()  # clone: the next replay reuses the buffer

        responses = torch.stack(tokens, dim=1)  # [B, N]
        response_mask = torch.stack(alive, dim=1).long()  # [B, N]
        return Rollout(query_responses=torch.cat([prompt_ids, responses], dim=1),
                       attention_mask=torch.cat([prompt_mask, response_mask], dim=1), response_mask=response_mask,
                       logprobs=torch.stack(logprobs, dim=1), stopped=stopped, responses=responses)

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
# Distributed setup, model loading and saving (kept identical in dpo.py and rlvr.py)

def init_distributed():
    """One process group for torchrun and for plain `python`: NCCL on GPU, gloo on CPU."""
    if "RANK" not in os.environ:  # plain python: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 10000))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(minutes=30))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
    return dist.get_rank(), dist.get_world_size(), device


def check_model_path(path: str) -> None:
    looks_local = os.path.isabs(path) or path.startswith(".") or path.count("/") != 1
    if not os.path.isdir(path) and looks_local:
        raise SystemExit(f"--model_name_or_path {path}: no such directory (and not an org/name hub id)")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise SystemExit(f"--model_name_or_path {path}: not a model directory (it has no config.json)")


def load_model(path: str, args, device, rank: int, auto_class=AutoModelForCausalLM, **config_overrides):
    """An FSDP2-sharded model: built empty on the meta device everywhere, weights read on rank 0 only.

    Memory: rank 0 holds one full fp32 copy of the weights in CPU RAM while loading; every rank
    holds only its 1/world shard on the device. Each decoder layer is its own FSDP unit (gathered
    just before use, freed after), the root unit holds the embeddings, final norm and head.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, **config_overrides)
    config.use_cache = False
    full_state = {}
    if rank == 0:
        loaded = auto_class.from_pretrained(path, config=config, dtype=torch.float32)
        full_state = {f"model.{k}": v for k, v in loaded.state_dict().items()}
    with torch.device("meta"):
        model = HFModel(auto_class.from_config(
            config, dtype=torch.float32, attn_implementation=args.attn_implementation))
    if args.gradient_checkpointing:
        model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compute_dtype = torch.bfloat16 if resolve_dtype(args.dtype, device) == "bf16" else torch.float32
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in model.model.get_decoder().layers:
        if args.compile:  # fuses each layer's elementwise ops; compiled once, reused by every layer
            layer.compile()
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    model.to_empty(device=device)
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    init_rotary_buffers(model.model, device)
    return model


def init_rotary_buffers(model, device) -> None:
    """Rotary inverse frequencies are buffers outside the state dict: to_empty left them garbage."""
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "config"):
            fresh = type(module)(module.config)
            module.inv_freq = fresh.inv_freq.to(device)
            if hasattr(module, "original_inv_freq"):
                module.original_inv_freq = fresh.original_inv_freq.to(device)


def resolve_dtype(dtype: str, device) -> str:
    return ("bf16" if device.type == "cuda" else "fp32") if dtype == "auto" else dtype


def save_hf_model(model, tokenizer, source: str, output_dir: str, rank: int) -> None:
    """Gather the full weights to rank 0 and write a plain Hugging Face directory (safetensors).

    Files are written to a temporary directory and moved in with config.json last, so a crash never
    leaves a loadable but incomplete model.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        state = {k.removeprefix("model."): v for k, v in full_state.items()}
        with torch.device("meta"):  # a plain (non-FSDP) model object to drive save_pretrained
            plain = AutoModelForCausalLM.from_config(model.model.config)
        plain.config.use_cache = True
        try:  # keep the source's sampling defaults (eos ids, temperature) when it has them
            plain.generation_config = GenerationConfig.from_pretrained(source)
        except OSError:
            pass
        tmp = os.path.join(output_dir, "model.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        plain.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        names = sorted(os.listdir(tmp), key=lambda name: name == "config.json")
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
        os.rmdir(tmp)
    dist.barrier()


# ---------------------------------------------------------------------------------------------
# Checkpoints: each rank saves its own shards as plain tensors (loaded with weights_only=True)

def save_checkpoint(model, optimizer, scheduler, step: int, output_dir: str, rank: int, world_size: int) -> None:
    """Write output_dir/checkpoint atomically: a new one fully replaces the old, or the old stays."""
    final, tmp = os.path.join(output_dir, "checkpoint"), os.path.join(output_dir, "checkpoint.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    shards, moments = {}, {}
    for name, param in model.named_parameters():
        shards[name] = param.detach().to_local().cpu()
        state = optimizer.state.get(param, {})
        if state:
            moments[name] = {k: (v.to_local() if isinstance(v, DTensor) else v).cpu() for k, v in state.items()}
    torch.save({"model": shards, "optimizer": moments, "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
               os.path.join(tmp, f"rank{rank}.pt"))
    dist.barrier()
    if rank == 0:
        torch.save({"step": step, "world_size": world_size, "scheduler": scheduler.state_dict()},
                   os.path.join(tmp, "trainer_state.pt"))
        shutil.rmtree(final + ".old", ignore_errors=True)
        if os.path.exists(final):
            os.replace(final, final + ".old")
        os.replace(tmp, final)
        shutil.rmtree(final + ".old", ignore_errors=True)
    dist.barrier()


def load_checkpoint(model, optimizer, scheduler, output_dir: str, rank: int, world_size: int) -> int:
    """Restore weights, optimizer moments, scheduler and RNG; return the step to continue from."""
    path = os.path.join(output_dir, "checkpoint")
    trainer_state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True)
    if trainer_state["world_size"] != world_size:
        raise SystemExit(f"{path} was written by {trainer_state['world_size']} ranks; resume with the same number")
    saved = torch.load(os.path.join(path, f"rank{rank}.pt"), weights_only=True)
    for name, param in model.named_parameters():
        param.detach().to_local().copy_(saved["model"][name])
        if name in saved["optimizer"]:
            optimizer.state[param] = {
                k: (DTensor.from_local(v.to(param.device), param.device_mesh, param.placements,
                                       shape=param.shape, stride=param.stride()) if v.dim()
                    else v.to(param.device) if optimizer.defaults.get("fused") else v)  # fused keeps `step` on device
                for k, v in saved["optimizer"][name].items()}
    scheduler.load_state_dict(trainer_state["scheduler"])
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):  # the scheduler state alone
        group["lr"] = lr                                                    # does not reach the optimizer
    torch.set_rng_state(saved["rng"])
    if saved["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["cuda_rng"])
    return trainer_state["step"]


def prepare_output_dir(args, rank: int) -> None:
    """Refuse to mix two runs in one directory; remember this run's flags for --resume.

    Every rank checks (so every rank stops on the same error); rank 0 writes after a barrier.
    """
    run_config = {k: v for k, v in vars(args).items() if k not in RESUMABLE_FLAGS}
    path = os.path.join(args.output_dir, "run_config.json")
    if os.path.abspath(args.output_dir) == os.path.abspath(args.model_name_or_path):
        raise SystemExit("--output_dir must differ from --model_name_or_path")
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        changed = sorted(k for k in run_config.keys() | previous.keys() if run_config.get(k) != previous.get(k))
        if changed:
            raise SystemExit(f"{args.output_dir} holds a different run (flags differ: {', '.join(changed)}); "
                             "choose another --output_dir")
        if not args.resume:
            raise SystemExit(f"{args.output_dir} already holds this run; pass --resume to continue it")
    elif args.resume:
        raise SystemExit(f"--resume: {args.output_dir} holds no run to resume")
    elif os.path.isdir(args.output_dir) and os.listdir(args.output_dir):
        raise SystemExit(f"{args.output_dir} is not empty and holds no run of this script; choose another --output_dir")
    dist.barrier()
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        data_mix.save_json(path, run_config)
    dist.barrier()


def append_metrics(path: str, metrics: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(metrics) + "\n")


def truncate_metrics(path: str, step: int) -> None:
    """On resume, forget steps logged after the checkpoint so the curve has no duplicates."""
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= step]
        with open(path, "w") as f:
            f.writelines(kept)


def make_scheduler(optimizer, kind: str, warmup_steps: int, total_steps: int):
    """Linear warmup, then linear decay to 0 (or constant)."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
    return prompts.to_list(), report


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
    old_logps (the ratio's denominator), ref_logps, entropy and, for PPO, old_values. Each [B, N]."""
    length, outputs = rollout.response_mask.shape[1], []
    for rows in torch.arange(len(rollout.stopped)).split(args.per_device_train_batch_size):
        sequences, mask = rollout.query_responses[rows], rollout.attention_mask[rows]
        old_logps, entropies = response_logprobs(policy, sequences, mask, length, args.temperature, with_entropy=True)
        outputs.append({"old_logps": old_logps, "entropy": entropies,
                        "ref_logps": response_logprobs(reference, sequences, mask, length, args.temperature)[0]})
        if value_model is not None:
            outputs[-1]["old_values"] = response_values(value_model, sequences, mask, length)
    return {name: torch.cat([output[name] for output in outputs]) for name in outputs[0]}


def compute_advantages(batch: dict, scores, mask, args) -> None:
    """GRPO: one advantage per response, normalized within its prompt's group. PPO: GAE on per-token
    rewards (-beta k1 each token, the score on the last), whitened; plus the value targets."""
    if args.algo == "grpo":
        batch["advantages"] = group_advantages(scores, args.num_samples_per_prompt)  # [B]
        return
    rewards = ppo_token_rewards(scores, batch["old_logps"], batch["ref_logps"], mask, args.beta)  # [B, N]
    advantages, batch["returns"] = gae(rewards, batch["old_values"], mask, args.gamma, args.lam)
    batch["advantages"] = whiten(advantages, mask)


def update(trained, optimizer, rollout, batch: dict, args, step: int, rank: int, world_size: int) -> dict:
    """--ppo_epochs passes over the rollout, each in --num_mini_batches optimizer steps. Returns mean losses."""
    mask, length = rollout.response_mask, rollout.response_mask.shape[1]
    generator = torch.Generator().manual_seed(args.seed + 7919 * step + rank)  # mini-batch order, resumable
    totals = torch.zeros(4, dtype=torch.float64, device=mask.device)  # loss, value loss, clipped tokens, tokens
    for _ in range(args.ppo_epochs):
        for mini_batch in torch.randperm(len(mask), generator=generator).chunk(args.num_mini_batches):
            # A token mean over the whole mini-batch (every rank's rows): count its tokens before any forward.
            num_tokens = mask[mini_batch].sum().float()
            dist.all_reduce(num_tokens)
            for rows in mini_batch.split(args.per_device_train_batch_size):
                old = {name: values[rows] for name, values in batch.items()}
                sequences, attention = rollout.query_responses[rows], rollout.attention_mask[rows]
                rows_mask = mask[rows]
                logps, _ = response_logprobs(trained["policy"], sequences, attention, length, args.temperature)
                value_loss = torch.zeros((), device=mask.device)
                if args.algo == "grpo":
                    loss, clipped = grpo_loss(logps, old["old_logps"], old["ref_logps"], old["advantages"], rows_mask,
                                              args.cliprange, args.beta, num_tokens)
                else:
                    policy_loss, clipped = clipped_policy_loss(logps, old["old_logps"], old["advantages"],
                                                               args.cliprange)
                    values = response_values(trained["value"], sequences, attention, length)
                    value_loss = token_mean(clipped_value_loss(values, old["old_values"], old["returns"],
                                                               args.cliprange_value), rows_mask, num_tokens)
                    loss = token_mean(policy_loss, rows_mask, num_tokens) + args.vf_coef * value_loss
                # FSDP averages gradients over ranks; multiplying by world_size turns that average into a sum.
                (loss * world_size).backward()
                totals += torch.stack([loss.detach(), value_loss.detach(), (clipped * rows_mask).sum(),
                                       rows_mask.sum()]).double()
            grad_norm = torch.nn.utils.clip_grad_norm_(trained.parameters(), args.max_grad_norm
                                                       if args.max_grad_norm > 0 else float("inf"))
            grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
            if not math.isfinite(grad_norm.item()):
                raise FloatingPointError(f"step {step + 1}: grad norm {grad_norm.item()}; stopped before the update, "
                                         "the last checkpoint in --output_dir is intact")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    dist.all_reduce(totals)  # each rank's share of a mini-batch loss is sum / all ranks' tokens: the sum is the loss
    optimizer_steps = args.ppo_epochs * args.num_mini_batches
    return {"loss": totals[0].item() / optimizer_steps, "value_loss": totals[1].item() / optimizer_steps,
            "clip_fraction": totals[2].item() / totals[3].item(), "grad_norm": grad_norm.item()}


def rollout_metrics(rollout, batch: dict, scores, verified, rows: list[dict]) -> dict:
    """Step metrics over every rank's responses: reward, accuracy per dataset, KL, entropy, lengths."""
    mask = rollout.response_mask
    sums = {"responses": len(rows), "reward": scores.sum(), "reward_squared": (scores ** 2).sum(),
            "kl": (kl_k1(batch["old_logps"], batch["ref_logps"]) * mask).sum(), "tokens": mask.sum(),
            "entropy": (batch["entropy"] * mask).sum(), "cut": (~rollout.stopped).sum(),
            "logprob_diff": ((rollout.logprobs - batch["old_logps"]).abs() * mask).sum(),
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
               "kl": total["kl"] / tokens, "entropy": total["entropy"] / tokens, "response_length": tokens / responses,
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
    rank, world_size, device = init_distributed()
    try:
        train(args, rank, world_size, device)
    finally:
        dist.destroy_process_group()


def train(args, rank: int, world_size: int, device) -> None:
    torch.manual_seed(args.seed)
    check_model_path(args.model_name_or_path)
    prepare_output_dir(args, rank)
    tokenizer = data_mix.load_tokenizer(args.model_name_or_path, args.chat_template_name)
    prompts, data_report = load_rlvr_data(args, tokenizer, rank)

    group, batch_prompts = args.num_samples_per_prompt, args.num_unique_prompts_rollout
    if batch_prompts % world_size or (batch_prompts // world_size * group) % args.num_mini_batches:
        raise SystemExit(f"--num_unique_prompts_rollout {batch_prompts} x {group} samples must split evenly over "
                         f"{world_size} ranks and then into --num_mini_batches {args.num_mini_batches}")
    steps_per_epoch, total_steps = len(prompts) // batch_prompts, args.total_episodes // (batch_prompts * group)
    if steps_per_epoch == 0 or total_steps == 0:
        raise SystemExit(f"{len(prompts)} prompts, --total_episodes {args.total_episodes}: not one step of "
                         f"{batch_prompts} prompts x {group} samples")
    if rank == 0:
        data_mix.save_json(os.path.join(args.output_dir, "mixture.json"), data_report)

    policy = load_model(args.model_name_or_path, args, device, rank)
    reference = load_model(args.model_name_or_path, args, device, rank).requires_grad_(False).eval()
    trained = torch.nn.ModuleDict({"policy": policy})
    if args.algo == "ppo":
        value_path = args.value_model_name_or_path or args.model_name_or_path
        check_model_path(value_path)
        trained["value"] = load_model(value_path, args, device, rank, AutoModelForTokenClassification,
                                      num_labels=1, classifier_dropout=0.0)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = make_scheduler(optimizer, args.lr_scheduler_type, math.ceil(args.warmup_ratio * total_steps),
                               total_steps)
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    start_step = 0
    if args.resume and os.path.exists(os.path.join(args.output_dir, "checkpoint")):
        start_step = load_checkpoint(trained, optimizer, scheduler, args.output_dir, rank, world_size)
        if rank == 0:
            truncate_metrics(metrics_path, start_step)
    elif args.resume and rank == 0:  # interrupted before its first checkpoint: start over cleanly
        truncate_metrics(metrics_path, 0)

    compile_decode = device.type == "cuda" and world_size == 1 if args.compile_sampling is None else args.compile_sampling
    sampler = Sampler(policy, args.max_seq_length - args.response_length, args.response_length, compile_decode)
    progress = tqdm(total=total_steps, initial=start_step, desc=f"rlvr {args.algo}", disable=rank != 0)
    for step in range(start_step, total_steps):
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
        batch = old_and_reference_outputs(policy, reference, trained["value"] if args.algo == "ppo" else None,
                                          rollout, args)
        compute_advantages(batch, scores, rollout.response_mask, args)
        referenced = time.perf_counter()
        trained.train()
        lr = optimizer.param_groups[0]["lr"]  # the rate this step's updates really use
        losses = update(trained, optimizer, rollout, batch, args, step, rank, world_size)
        scheduler.step()
        finished = time.perf_counter()

        metrics = {"step": step + 1, "episodes": (step + 1) * batch_prompts * group, "lr": lr, **losses,
                   **rollout_metrics(rollout, batch, scores, verified, rows)}
        metrics.update({"sampling_tokens_per_s": metrics["response_tokens"] / (sampled - started),
                        "training_tokens_per_s": metrics["sequence_tokens"] * args.ppo_epochs / (finished - referenced),
                        "time/sampling": sampled - started, "time/scoring": scored - sampled,
                        "time/reference": referenced - scored, "time/training": finished - referenced})
        if rank == 0:
            append_metrics(metrics_path, metrics)
            progress.set_postfix(reward=f"{metrics['reward_mean']:.2f}", kl=f"{metrics['kl']:.4f}")
            progress.update()
        if (step + 1) % args.checkpointing_steps == 0 and step + 1 < total_steps:
            save_checkpoint(trained, optimizer, scheduler, step + 1, args.output_dir, rank, world_size)
    progress.close()
    save_hf_model(policy, tokenizer, args.model_name_or_path, args.output_dir, rank)


if __name__ == "__main__":
    main()
