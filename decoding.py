"""Decoding: the one batched generation loop that rlvr's rollouts, eval's tasks, demo's answers and synth's data
share, so that a model ends a response at the same token and the same string in every stage.

    completions = decoding.complete(model, tokenizer, prompts, max_new_tokens=256, temperature=0.7,
                                    stop_strings=["</answer>"])

The loop, gpt-fast's shape: `prefill` runs a batch of left-padded prompts through the model once, filling the KV
cache; `decode_one_token` feeds each row its last token; `decode_n_tokens` repeats that, drawing each row's next
token on the device (greedy, or temperature and top-p by the inverse CDF: no host sync per token), and every
`check_every` steps reads the new tokens on the host to end rows. One rule ends a row, in every stage:
- EOS: any of the tokenizer's eos_token_id and the model's generation_config.eos_token_id (instruct models
  often list two, e.g. <|eot_id|> and <|end_of_text|>). The EOS token is kept in token_ids (RL trains on it).
- a stop string: the row's decoded text (special tokens kept: a stop string may be one) contains it. The row
  ends at the first token whose text completes it (token-accurate: a stop string split across tokens is found);
  the completion's text (special tokens skipped) is cut just before the stop string.
A row that ends leaves the batch and its KV cache at the next check (compaction): the others no longer pay for it.
With `shared_prefix`, the prefix that all prompts of a batch share (eval's few-shot exemplars) is prefilled
once and its KV cache copied to every row.

Under FSDP2 (rlvr's policy) the parameters are gathered once for the whole call (full_parameters), not at every
step. Ranks decode independently: with the parameters held, a forward makes no collective call.
"""
import contextlib
import inspect
from dataclasses import dataclass, field

import torch
from torch.distributed.fsdp import FSDPModule
from transformers.cache_utils import Cache, DynamicLayer

MIN_SHARED_PREFIX = 32  # tokens; below this, prefilling the prefix separately saves too little


@dataclass
class Completion:
    text: str  # the response decoded (special tokens skipped), cut before the stop string that ended it
    token_ids: list[int]  # the sampled tokens, up to and including the EOS or the token that completed a stop string
    finished: bool  # ended by EOS or a stop string, not cut at max_new_tokens
    logprobs: list[float] = field(default_factory=list)  # each token's log-prob under logits / T (T = 1 if greedy)


def complete(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, generator=None, stop_strings=(), batch_size: int = 16,
             shared_prefix: bool = False) -> list[Completion]:
    """Each prompt's completion (prompts are token-id lists), in the prompts' order. Greedy at temperature 0.

    Batches hold prompts of similar length, longest first (an out-of-memory error shows up at once); within a
    batch the rows keep the prompts' order, so a single batch, given the same draws, draws what model.generate draws."""
    eos_ids = eos_token_ids(model, tokenizer)
    by_length = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    completions = [None] * len(prompts)
    was_training = model.training
    model.eval()  # (gradient checkpointing turns the KV cache off in train mode)
    try:
        with torch.no_grad(), full_parameters(model):
            for start in range(0, len(prompts), batch_size):
                batch = sorted(by_length[start:start + batch_size])
                done = decode_batch(model, tokenizer, [prompts[i] for i in batch], max_new_tokens, temperature,
                                    top_p, generator, eos_ids, stop_strings, shared_prefix)
                for i, completion in zip(batch, done):
                    completions[i] = completion
    finally:
        model.train(was_training)
    return completions


# ---------------------------------------------------------------------------------------------
# The loop: prefill, decode one token, decode n tokens

def forward(model, input_ids, attention_mask, position_ids, cache):
    """The last position's logits [B, V]; the forward writes its keys and values into `cache`."""
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                 logits_to_keep=1, **{cache_keyword(model): cache}).logits[:, -1]


def prefill(model, input_ids, attention_mask, position_ids, cache):
    """The prompts [B, P] (left-padded) into the cache; returns the logits of each row's next token [B, V]."""
    return forward(model, input_ids, attention_mask, position_ids, cache)


def decode_one_token(model, token, attention_mask, position, cache):
    """token, position [B, 1]; attention_mask [B, cached + 1]. Returns the next token's logits [B, V]."""
    return forward(model, token, attention_mask, position, cache)


def decode_batch(model, tokenizer, prompts, max_new_tokens, temperature, top_p, generator, eos_ids, stop_strings,
                 shared_prefix, compact=True) -> list[Completion]:
    """One batch: [shared prefix | left padding | each prompt's own tokens], prefilled, then decoded."""
    device = next(model.parameters()).device
    shared = shared_prefix_length(prompts) if shared_prefix else 0
    width = max(len(p) for p in prompts) - shared  # the prompts' own part, left-padded to this
    capacity = shared + width + max_new_tokens
    # A sliding window counts cache slots: padding after the shared prefix would take the place of real context
    # in a window shorter than the cache. Left padding alone shifts every row uniformly, which is exact.
    window = attention_window(model.config)
    if shared < MIN_SHARED_PREFIX or window is not None and capacity > window:
        shared, width = 0, max(len(p) for p in prompts)
    cache = Cache(layer_class_to_replicate=lambda: GrowingLayer(capacity))
    if shared:  # few-shot exemplars: prefill them once, then copy their keys and values to every row
        prefix = torch.tensor([prompts[0][:shared]], device=device)
        prefill(model, prefix, torch.ones_like(prefix), torch.arange(shared, device=device)[None], cache)
        cache.batch_repeat_interleave(len(prompts))
    input_ids, own_mask = (t.to(device) for t in left_pad([p[shared:] for p in prompts], tokenizer.pad_token_id))
    attention_mask = torch.ones((len(prompts), capacity), dtype=torch.long, device=device)  # [B, capacity]
    attention_mask[:, shared:shared + width] = own_mask  # the padding is masked, every later slot is real
    position_ids = (attention_mask[:, :shared + width].cumsum(-1) - 1)[:, shared:]  # padding shifts no position
    logits = prefill(model, input_ids, attention_mask[:, :shared + width], position_ids.clamp(min=0), cache)
    return decode_n_tokens(model, tokenizer, cache, logits, attention_mask, position_ids[:, -1:] + 1,
                           shared + width, max_new_tokens, temperature, top_p, generator, eos_ids, stop_strings,
                           compact)


def decode_n_tokens(model, tokenizer, cache, logits, attention_mask, next_position, cached, max_new_tokens,
                    temperature, top_p, generator, eos_ids, stop_strings, compact=True) -> list[Completion]:
    """Up to max_new_tokens per row after the prefill's `logits` [B, V]. Every `check_every` steps the new tokens
    come to the host (one sync), rows that ended are recorded and, with `compact`, leave the batch; without it
    they keep stepping (as model.generate does) until all are done. Each step draws one uniform number per row
    of the whole batch, so leaving rows changes no other row's draws."""
    batch_size, device = logits.shape[0], logits.device
    check_every = 8 if device.type == "cuda" else 1  # a CPU waits for every step anyway: a check costs nothing
    rows = list(range(batch_size))  # the original row of each row still in the batch
    alive = torch.arange(batch_size, device=device)  # the same, on the device: picks each row's draw
    ids, logps, ends = [[] for _ in rows], [[] for _ in rows], [None] * batch_size
    recent_tokens, recent_logps = [], []
    for step in range(max_new_tokens):
        uniform = None if temperature == 0 else torch.rand((batch_size, 1), device=device, generator=generator)
        token = sample(logits, temperature, top_p, None if uniform is None else uniform[alive])  # [B]
        recent_tokens.append(token)
        recent_logps.append(token_logprobs(logits[:, None], token[:, None], temperature or 1.0)[:, 0])
        last = step + 1 == max_new_tokens
        if last or (step + 1) % check_every == 0:
            new_ids = torch.stack(recent_tokens, 1).tolist()  # [B, k] (the host sync)
            new_logps = torch.stack(recent_logps, 1).tolist()
            recent_tokens, recent_logps = [], []
            for i, row in enumerate(rows):
                if ends[row] is None:
                    checked = len(ids[row])
                    ids[row] += new_ids[i]
                    logps[row] += new_logps[i]
                    ends[row] = end_of(ids[row], checked, eos_ids, stop_strings, tokenizer)
            keep = [i for i, row in enumerate(rows) if ends[row] is None]
            if last or not keep:
                break
            if compact and len(keep) < len(rows):
                rows = [rows[i] for i in keep]
                keep = torch.tensor(keep, device=device)
                cache.batch_select_indices(keep)
                token, alive, attention_mask, next_position = (t[keep] for t in
                                                               (token, alive, attention_mask, next_position))
        logits = decode_one_token(model, token[:, None], attention_mask[:, :cached + step + 1], next_position + step,
                                  cache)
    return [completion_of(ids[row], logps[row], ends[row], eos_ids, stop_strings, tokenizer)
            for row in range(batch_size)]


def end_of(ids: list[int], checked: int, eos_ids: set[int], stop_strings, tokenizer) -> int | None:
    """How many of a row's tokens its completion keeps if one of ids[checked:] ended it, else None: up to the
    first EOS, or up to the first token whose text completes a stop string (the text before `checked` had none)."""
    end = next((j + 1 for j in range(checked, len(ids)) if ids[j] in eos_ids), None)
    if stop_strings and contains_stop(tokenizer.decode(ids[:end]), stop_strings):  # special tokens kept: a stop
        end = next(j for j in range(checked + 1, len(ids) + 1)                     # string may be one
                   if contains_stop(tokenizer.decode(ids[:j]), stop_strings))
    return end


def contains_stop(text: str, stop_strings) -> bool:
    return any(stop in text for stop in stop_strings)


def completion_of(ids, logps, end, eos_ids, stop_strings, tokenizer) -> Completion:
    """A row's Completion: its tokens up to `end` (all if it never ended), the text cut at the first stop string."""
    ids, logps = ids[:end], logps[:end]
    text = tokenizer.decode(ids[:-1] if end and ids[-1] in eos_ids else ids, skip_special_tokens=True)
    cut = min((text.find(stop) for stop in stop_strings if stop in text), default=len(text))
    return Completion(text=text[:cut], token_ids=ids, finished=end is not None, logprobs=logps)


# ---------------------------------------------------------------------------------------------
# Drawing a token

def sample(logits, temperature: float, top_p: float, uniform):
    """One token per row [B, V] -> [B]: the argmax at temperature 0, else a draw from softmax(logits / T) restricted
    to the top-p nucleus, given one uniform number in [0, 1) per row (uniform [B, 1]).

    By the inverse CDF: the uniform number is found in the row's cumulative probabilities by binary search, all on
    the device (no host sync, unlike torch.multinomial), drawing B numbers where an exponential race or Gumbel-max
    draws B x V (on a CPU that draw cost half the sampling time)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, V]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    cdf = probs.cumsum(-1)  # [B, V]
    total = cdf[:, -1:]  # [B, 1] (< 1 after top-p: no renormalizing needed)
    u = torch.minimum(uniform * total, total.nextafter(torch.zeros_like(total)))  # u < total, even after rounding
    return torch.searchsorted(cdf, u, right=True)[:, 0]  # the first token with cdf > u: never one of probability 0


def token_logprobs(logits, tokens, temperature):
    """log softmax(logits / T)[token]: the distribution the tokens were sampled from. [B, N, V] -> [B, N]."""
    logits = logits.float() / temperature
    return logits.gather(-1, tokens[..., None]).squeeze(-1) - logits.logsumexp(-1)


# ---------------------------------------------------------------------------------------------
# The model's end-of-sequence tokens, its cache keyword, its window; the prompts' padding and shared prefix

def hf_model(model):
    """The Hugging Face model itself inside a wrapper (rlvr's HFModel, the FSDP root unit)."""
    from transformers import PreTrainedModel

    return next(module for module in model.modules() if isinstance(module, PreTrainedModel))


def eos_token_ids(model, tokenizer) -> set[int]:
    """The tokenizer's EOS and every EOS the model's generation config lists (instruct models often have two)."""
    configured = getattr(hf_model(model).generation_config, "eos_token_id", None)
    return {tokenizer.eos_token_id} | set(configured if isinstance(configured, list) else [configured]) - {None}


def cache_keyword(model) -> str:
    """The forward's keyword for the KV cache: `past_key_values` in transformers 5.17, `cache` in 5.24, read from the
    signature, since a forward takes an unknown keyword into **kwargs and would silently decode without the cache.
    (Every argument goes by keyword: a Gemma 3 takes pixel_values second.)"""
    inner = hf_model(model)
    parameters = inspect.signature(inner.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    raise TypeError(f"{type(inner).__name__}.forward takes neither `cache` nor `past_key_values`: this version of "
                    "transformers names the KV cache otherwise; add its name to decoding.cache_keyword")


def attention_window(config):
    """The sliding window of a model with sliding-window attention layers (Mistral, Gemma 2/3, OLMo 3), else None."""
    text = config.get_text_config()
    windowed = "sliding_attention" in (getattr(text, "layer_types", None) or ["sliding_attention"])
    return getattr(text, "sliding_window", None) if windowed and getattr(text, "use_sliding_window", True) else None


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple:
    """input_ids and attention_mask [B, P], every row ending at column P."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    return input_ids, attention_mask


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """How many leading tokens all prompts share, leaving each at least one token of its own."""
    length = min(len(p) for p in prompts) - 1
    for i in range(length):
        if any(p[i] != prompts[0][i] for p in prompts):
            return i
    return length


# ---------------------------------------------------------------------------------------------
# The KV cache and FSDP's parameters

class GrowingLayer(DynamicLayer):
    """One layer's KV cache, as transformers' DynamicLayer but written in place into buffers sized for the
    longest row (doubled if that is ever too small). DynamicLayer concatenates instead, copying the whole
    cache at every decode step: with a few-shot prefix of ~1k tokens that copy, not the model, was most of
    the time of a step on CPU. Rows leave it (batch_select_indices) or are copied (batch_repeat_interleave)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length, self.buffers = capacity, 0, None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if self.buffers is None or self.length + new > self.buffers[0].shape[-2]:
            old, capacity = self.buffers, max(self.capacity, 2 * (self.length + new))
            self.buffers = [x.new_empty(*x.shape[:-2], capacity, x.shape[-1]) for x in (key_states, value_states)]
            for buffer, kept in zip(self.buffers, old or ()):
                buffer[..., :self.length, :] = kept[..., :self.length, :]
        for buffer, states in zip(self.buffers, (key_states, value_states)):
            buffer[..., self.length:self.length + new, :] = states
        self.length += new
        return self._select(slice(None))

    def _select(self, rows):  # keep `rows` of the batch; keys/values are views of the filled part
        self.buffers = [buffer[rows] for buffer in self.buffers]
        self.keys, self.values = (buffer[..., :self.length, :] for buffer in self.buffers)
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(torch.arange(self.buffers[0].shape[0], device=self.buffers[0].device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)


@contextlib.contextmanager
def full_parameters(model):
    """Hold FSDP2's unsharded parameters for the whole call: a decode step is one token per row, so all-gathering
    every layer at each of hundreds of steps would cost far more than the steps. Then reshard and restore
    fully_shard's defaults (layers reshard after forward, the root does not). A plain model: nothing to do."""
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
