"""RLVR: reinforcement learning with verifiable rewards (Tülu 3 stage 3), GRPO or PPO.

The reward is a verifier (verifiers.verify), not a learned reward model.
"""
import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from transformers import StaticCache


# ----------------------------------------------------------------------------------------------
# Advantages, KL estimators and losses: pure functions of tensors.
# B = sequences (prompts x samples), N = response tokens; `mask` is 1 on response tokens.

def group_advantages(scores, group_size):
    """GRPO (Tülu 3.1): A_i = (r_i - mean_g) / (std_g + 1e-8) over the G samples of each prompt.

    The samples of one prompt are contiguous in `scores`. std is the population std (ddof 0), as in
    open-instruct, so a group whose answers all score the same gets A = 0 and teaches nothing.
    """
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

    advantages is [B, N] (PPO) or [B, 1] (GRPO: one advantage per sequence). Also returns where the
    clipped term was the larger one (the clip fraction's numerator).
    """
    ratio = torch.exp(logps - old_logps)  # [B, N]
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    return torch.maximum(unclipped, clipped), clipped > unclipped  # [B, N], [B, N]


def clipped_value_loss(values, old_values, returns, cliprange_value):
    """PPO value loss per token: 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)  # [B, N]


def token_mean(per_token, mask, num_tokens):
    """sum over response tokens / num_tokens, where num_tokens counts the response tokens of the whole
    mini-batch (all micro-batches, all ranks): summing this over micro-batches gives the exact token mean,
    however the mini-batch is split, so every token weighs the same."""
    return (per_token * mask).sum() / num_tokens


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, cliprange, beta, num_tokens):
    """Tülu 3.1 GRPO: token-mean of max(-A rho, -A clip(rho, 1-eps, 1+eps)) + beta * KL_k3(pi, pi_ref).

    logps/old_logps/ref_logps/mask: [B, N]; advantages: [B] (one per sequence). The KL sits in the loss,
    not in the reward. Returns (loss, per-token clipped mask).
    """
    pg_loss, clipped = clipped_policy_loss(logps, old_logps, advantages[:, None], cliprange)  # [B, N]
    return token_mean(pg_loss + beta * kl_k3(logps, ref_logps), mask, num_tokens), clipped


def ppo_token_rewards(scores, logps, ref_logps, mask, beta):
    """Tülu 3 PPO reward per token: r_t = -beta * KL_k1_t, plus the verifier's score on the last response token.

    scores: [B]; logps/ref_logps/mask: [B, N] with mask a prefix of ones (responses are right-padded).
    """
    rewards = -beta * kl_k1(logps, ref_logps) * mask  # [B, N]
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)  # [B] index of each response's last token
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation over response tokens (values after a response's end count as 0).

    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};  returns R_t = A_t + V_t.
    rewards/values/mask: [B, N]. Tülu 3: gamma 1, lam 0.95.
    """
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


def forward_response(model, query_responses, attention_mask, response_length):
    """The training forward: outputs at the positions that predict each response token. -> [B, N, ...]

    Positions count real tokens only (left padding shifts nothing), exactly as while sampling, and
    logits_to_keep skips the output layer on the prompt.
    """
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # [B, P + N]
    output = model(query_responses, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=response_length + 1)
    return output.logits[:, :-1]  # [B, N, V] (or [B, N, 1] for a value model): position t predicts token t + 1


# ----------------------------------------------------------------------------------------------
# Sampling: a batched decode loop over a preallocated (static) KV cache.

@dataclass
class Rollout:
    query_responses: torch.Tensor  # [B, P + N] left-padded prompts followed by right-padded responses
    attention_mask: torch.Tensor  # [B, P + N] 1 on prompt and response tokens
    response_mask: torch.Tensor  # [B, N] 1 on generated tokens (up to and including EOS / the stop string)
    logprobs: torch.Tensor  # [B, N] log-probs of the sampled tokens under logits / T (0 on padding)
    stopped: torch.Tensor  # [B] bool: the response ended with EOS or a stop string (not cut at max_new_tokens)

    @property
    def responses(self):
        return self.query_responses[:, -self.response_mask.shape[1]:]  # [B, N]


def left_pad(prompts, pad_token_id, device):
    """list of token lists -> (ids [B, P], mask [B, P]), padded on the left so every row ends at column P."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


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
    """Hold FSDP2's unsharded parameters for the whole rollout.

    A decode step is one token per sequence: all-gathering every layer at each of hundreds of steps would
    cost far more than the step itself. So gather once (unshard() every FSDP module, and keep them
    gathered after each forward), sample, then reshard and restore fully_shard's defaults (layers reshard
    after forward, the root does not). A no-op for a model that is not FSDP-wrapped.
    """
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

    The KV cache is preallocated for max_prompt_length + max_new_tokens and reused across rollouts, so
    every decode step has the same shapes: with `compile_decode` (meant for CUDA) the one-token forward
    is compiled with CUDA graphs ("reduce-overhead"), which removes the per-kernel launch cost that
    dominates decoding at small batch. The prompt (prefill) always runs eagerly.

    Under torch.distributed, every rank runs the same number of decode steps: a rank whose rows are all
    done keeps stepping until the all-reduced "all done" flag says every rank is done (lock-step), so
    collective calls inside the forward never wait on a rank that left the loop.
    """

    def __init__(self, model, max_prompt_length, max_new_tokens, compile_decode=False):
        self.model = model
        self.max_cache_length = max_prompt_length + max_new_tokens
        self.max_new_tokens = max_new_tokens
        self.cache = None
        # The cache is passed positionally: its keyword is `past_key_values` before transformers 5.2x, `cache` after.
        self.decode = torch.compile(model, mode="reduce-overhead") if compile_decode else model

    def _reset_cache(self, batch_size):
        if self.cache is None or self.cache.layers[0].max_cache_len != self.max_cache_length or \
                getattr(self.cache.layers[0], "batch_size", batch_size) != batch_size:
            self.cache = StaticCache(config=self.model.config, max_cache_len=self.max_cache_length)
        self.cache.reset()

    @torch.no_grad()
    def generate(self, prompts, temperature, top_p, eos_token_id, pad_token_id, stop_strings=(), tokenizer=None,
                 generator=None):
        """prompts: list of token-id lists. Returns a Rollout whose N is the number of steps taken."""
        device = next(self.model.parameters()).device
        prompt_ids, prompt_mask = left_pad(prompts, pad_token_id, device)  # [B, P]
        batch_size, prompt_length = prompt_ids.shape
        if prompt_length + self.max_new_tokens > self.max_cache_length:
            raise ValueError(f"prompt of {prompt_length} tokens + {self.max_new_tokens} new tokens exceeds the "
                             f"sampler's cache of {self.max_cache_length} (raise --max_prompt_token_length)")
        self._reset_cache(batch_size)
        # One fixed-size mask for every step: prompt padding is 0, every later slot 1 (causality hides the future).
        attention_mask = torch.ones((batch_size, self.max_cache_length), dtype=torch.long, device=device)
        attention_mask[:, :prompt_length] = prompt_mask
        next_position = prompt_mask.sum(dim=1, keepdim=True)  # [B, 1] position of each row's first new token
        logprob_temperature = temperature if temperature > 0 else 1.0

        tokens, logprobs, alive = [], [], []
        done = torch.zeros(batch_size, dtype=torch.bool, device=device)
        stopped = torch.zeros(batch_size, dtype=torch.bool, device=device)
        with full_parameters(self.model):
            positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
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
                logits = self.decode(token[:, None], attention_mask, next_position + step, self.cache,
                                     use_cache=True).logits[:, -1]
                if self.decode is not self.model:
                    logits = logits.clone()  # the CUDA-graph output buffer is overwritten by the next replay

        responses = torch.stack(tokens, dim=1)  # [B, N]
        response_mask = torch.stack(alive, dim=1).long()  # [B, N]
        return Rollout(query_responses=torch.cat([prompt_ids, responses], dim=1),
                       attention_mask=torch.cat([prompt_mask, response_mask], dim=1),
                       response_mask=response_mask, logprobs=torch.stack(logprobs, dim=1), stopped=stopped)

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
        tails = torch.stack(tokens[-window:], dim=1).tolist()
        texts = tokenizer.batch_decode(tails)
        return torch.tensor([not finished and any(s in text for s in stop_strings)
                             for text, finished in zip(texts, done.tolist())], device=done.device)
