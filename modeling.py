"""What changes what the model computes in sft.py and dpo.py (read it to learn the recipe; infra.py runs the
model and checkpoint.py saves it). Its sections: the log-prob wrapper, the model as the training stages see it
(token ids in, each label's log-prob out, the [tokens, vocab] logits never whole); the packed attention (each
example of a packed row attends only to itself, without a [T, T] mask), the stages' default for packed rows
wherever it computes exactly what the model's own attention does.
"""
import functools
import inspect

import torch
from torch.utils.checkpoint import checkpoint

import data_mix


# ---------------------------------------------------------------------------------------------
# The log-prob wrapper

def chunked_label_logprobs(hidden, head, labels, chunk_tokens: int = 4096):
    """log p(labels[:, t+1] | tokens <= t), shape [B, T-1], fp32, 0 where the label is -100.

    `head` maps decoder states [n, H] to the model's logits [n, V]. Only the trained positions go through
    it, a chunk of tokens at a time under activation checkpointing, so the [tokens, vocab] logits never
    exist in full, in forward or in backward (backward recomputes one chunk's logits at a time).
    log p = logit[label] - logsumexp, in fp32.
    """
    batch, length, width = hidden.shape
    targets = labels[:, 1:].reshape(-1)                      # [N] next-token labels
    scored = (targets != data_mix.IGNORE_INDEX).nonzero().squeeze(-1)  # [n] indices into [N]: the labels trained
    states = hidden[:, :-1].reshape(-1, width)[scored]       # [n, H] only the positions that carry loss
    pieces = [checkpoint(target_logprobs, states[i:i + chunk_tokens], head, targets[scored[i:i + chunk_tokens]],
                         use_reentrant=False) for i in range(0, len(scored), chunk_tokens)]
    logprobs = torch.zeros(batch, length - 1, dtype=torch.float32, device=hidden.device)
    if pieces:  # scatter back to [B, T-1] (a new tensor, not a view: FSDP hooks the forward's output)
        logprobs = logprobs.index_put((scored // (length - 1), scored % (length - 1)), torch.cat(pieces))
    return logprobs


def target_logprobs(states, head, targets):
    """log p(targets[i] | states[i]) [n] for one chunk of decoder states [n, H] and their next tokens [n]."""
    logits = head(states).float()                            # [n, V] fp32 for the softmax
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


class GivenStates:
    """A base model's output that holds only the decoder states; any other field (router logits, image
    features, ...) reads as None."""

    def __init__(self, states):
        self.last_hidden_state = states

    def __getattr__(self, name):
        return None

    def __getitem__(self, index):
        return (self.last_hidden_state,)[index]


class CausalLMLogProbs(torch.nn.Module):
    """The model as FSDP sees it: token ids in, the log-prob of each label out.

    Wrapping the Hugging Face model puts its base model (the decoder) and the chunked head in one forward,
    so FSDP gathers the output-embedding weight for the loss like any other parameter.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, position_ids=None, attention_mask=None, load_balancing=False):
        """[B, T-1] label log-probs; with `load_balancing` also the model's router (load-balancing) loss."""
        base = getattr(self.model, self.model.base_model_prefix)  # what the model's own forward calls first
        output = base(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                      use_cache=False, **({"output_router_logits": True} if load_balancing else {}))
        label_logprobs = chunked_label_logprobs(output.last_hidden_state, self.head_logits, labels)
        if not load_balancing:
            return label_logprobs
        # the model's own forward computes its auxiliary loss from the router logits (the head sees one token)
        return label_logprobs, self.after_base(output, logits_to_keep=1, output_router_logits=True,
                                               attention_mask=attention_mask).aux_loss

    def head_logits(self, states):
        """The model's own logits for decoder states [n, H] -> [n, V], so whatever the architecture does after
        the output projection (Gemma 2's soft-cap, Granite's and Cohere's logit scaling, ...) applies."""
        return self.after_base(GivenStates(states[None]), logits_to_keep=0).logits[0]

    def after_base(self, base_output, **kwargs):
        """The model's own forward from its base model's output on: the base model stands in by returning
        `base_output`, so no architecture's head or loss needs a case of its own here."""
        base = getattr(self.model, self.model.base_model_prefix)
        base.forward = lambda *args, **ignored: base_output
        try:
            return self.model(input_ids=None, **kwargs)
        finally:
            del base.forward  # back to the class's forward


# ---------------------------------------------------------------------------------------------
# Packed attention
# Attention inside each packed document, without a [T, T] mask: an attention implementation registered with
# transformers (--attn_implementation packed_varlen, or choose_attention's default), so the model stays Hugging
# Face's code. Its mask function builds nothing; the attention finds the documents in position_ids (they restart
# at every example).
PACKED_ATTENTION = "packed_varlen"


def register_packed_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, packed_attention_mask)


def choose_attention(model_name_or_path: str, requested: str | None, packing: bool, max_seq_length: int,
                     rank: int) -> str | None:
    """The attention implementation to load the model with: the one requested, else the packed attention for
    packed rows where it computes exactly what the model's own attention computes, else the model's own (None),
    with one line on rank 0 saying why."""
    from transformers import AutoConfig

    register_packed_attention()
    if requested is not None or not packing:
        return requested
    why_not = packed_attention_mismatch(AutoConfig.from_pretrained(model_name_or_path), max_seq_length)
    if why_not and rank == 0:
        print(f"attention: the model's own, with a [T, T] mask per packed row, not {PACKED_ATTENTION}: {why_not}")
    return None if why_not else PACKED_ATTENTION


def packed_attention_mismatch(config, max_seq_length: int) -> str:
    """Why the packed attention would not compute what the model's own attention computes on packed rows of
    documents up to max_seq_length tokens ('' if it would): what packed_attention refuses, found before a forward.
    The model is built on the meta device (no memory, no weights) to see its decoder's attention modules."""
    from transformers import AutoModelForCausalLM

    text = config.get_text_config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    decoder = model.get_decoder()
    attention = [module for module in decoder.modules() if hasattr(module, "is_causal")]  # the attention layers
    window = getattr(text, "sliding_window", None) if getattr(text, "use_sliding_window", True) else None
    layer_types = getattr(text, "layer_types", None) or []
    if not type(model).is_backend_compatible():
        return f"{type(model).__name__} does not call its attention through transformers' AttentionInterface"
    if getattr(text, "attn_logit_softcapping", None) is not None:
        return "the model soft-caps its attention logits"
    if any(name.endswith("sinks") for name, _ in decoder.named_parameters()):
        return "the model's attention has sinks"
    if not attention or not all(module.is_causal for module in attention):
        return "not every attention layer of the model says it is causal"
    if getattr(text, "attention_dropout", 0.0):
        return f"the model has attention dropout ({text.attention_dropout})"
    if window is not None and window < max_seq_length and (not layer_types or "sliding_attention" in layer_types):
        return (f"it has no sliding window, and a document may be longer than the model's window of {window} "
                f"tokens (--max_seq_length {max_seq_length})")
    return ""


def packed_attention_mask(batch_size: int, q_length: int, kv_length: int, attention_mask=None, **kwargs):
    """No mask (transformers calls this once per forward); a padded batch is refused: it would need one."""
    if attention_mask is not None and not attention_mask.all():
        raise ValueError(f"{PACKED_ATTENTION} attention takes packed rows, not padded ones: use --packing, "
                         "or another --attn_implementation")
    return None


@functools.lru_cache(maxsize=1)  # keyed by the tensor's identity and version: every layer gets the same
def document_bounds(position_ids, rows: int, version: int):  # position_ids, so one host sync per forward
    """cu_seqlens [D+1] (int32) and the longest length of the D documents of position_ids [rows or 1, T]
    flattened: a document starts where a row starts or its position does not follow the previous one."""
    flat = position_ids.expand(rows, -1).flatten()
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1] + 1
    starts[::position_ids.shape[-1]] = True
    bounds = torch.cat([starts.nonzero().flatten(), torch.tensor([flat.numel()], device=flat.device)])
    return bounds.to(torch.int32), int(bounds.diff().max())


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     position_ids=None, **kwargs):
    """Causal attention within each document of packed rows: query, key, value [B, H or Hkv, T, E] -> [B, T, H, E].
    CUDA (bf16/fp16): one variable-length flash kernel (torch.nn.attention.varlen) over all documents;
    elsewhere one SDPA call per document (each sees only its own keys)."""
    batch, heads, length = query.shape[:3]
    if position_ids is None or attention_mask is not None or key.shape[2] != length \
            or not getattr(module, "is_causal", False):
        raise ValueError(f"{PACKED_ATTENTION} attention takes packed causal rows (position_ids, no attention_mask): "
                         "use --packing, or another --attn_implementation")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None or dropout:
        raise ValueError(f"{PACKED_ATTENTION} attention has no logit soft-capping, attention sinks or dropout: "
                         "this model needs --attn_implementation eager or flex_attention")
    bounds, longest = document_bounds(position_ids, batch, position_ids._version)
    if kwargs.get("sliding_window") is not None and longest > kwargs["sliding_window"]:
        raise ValueError(f"{PACKED_ATTENTION} attention has no sliding window, and a {longest}-token document is "
                         f"longer than this layer's window of {kwargs['sliding_window']}: use a shorter "
                         "--max_seq_length or --attn_implementation flex_attention")
    # [B, H, T, E] -> [B*T, H, E]: the documents end to end
    q, k, v = (x.transpose(1, 2).reshape(batch * length, x.shape[1], x.shape[-1]) for x in (query, key, value))
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16):
        from torch.nn.attention.varlen import varlen_attn

        options = inspect.signature(varlen_attn).parameters
        if "window_size" not in options:
            raise RuntimeError(f"{PACKED_ATTENTION} attention on CUDA needs torch >= 2.10 (varlen_attn's window_size)")
        grouped = {"enable_gqa": True} if heads != key.shape[1] and "enable_gqa" in options else {}
        if heads != key.shape[1] and not grouped:  # torch 2.10 / 2.11: repeat each key/value head for its group
            k, v = (x.repeat_interleave(heads // key.shape[1], dim=1) for x in (k, v))
        out = varlen_attn(q, k, v, bounds, bounds, longest, longest, scale=scaling, window_size=(-1, 0), **grouped)
    else:
        spans = bounds.tolist()
        out = torch.cat([torch.nn.functional.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), is_causal=True, scale=scaling,
            enable_gqa=heads != key.shape[1]).transpose(0, 1) for s, e in zip(spans, spans[1:])])
    return out.reshape(batch, length, heads, value.shape[-1]), None
