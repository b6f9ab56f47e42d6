"""TEMPORARY stand-in for the project's one decoder (the real decoding.py is being written on branch `decoder`):
the same signature, implemented with transformers' generate so synth.py can run until it lands."""
from dataclasses import dataclass

import torch


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finished: bool  # ended by EOS or a stop string (not by max_new_tokens)


@torch.no_grad()
def complete(model, tokenizer, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, generator=None,
             stop_strings=(), batch_size=16, shared_prefix=False) -> list[Completion]:
    device = next(model.parameters()).device
    configured = getattr(model.generation_config, "eos_token_id", None)
    eos_ids = {tokenizer.eos_token_id} | set(configured if isinstance(configured, list) else [configured]) - {None}
    if generator is not None and temperature > 0:
        torch.manual_seed(int(torch.randint(0, 2**62, (), generator=generator)))
    completions = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        width = max(len(p) for p in batch)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in batch], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else \
            dict(do_sample=False)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                eos_token_id=sorted(eos_ids), pad_token_id=tokenizer.pad_token_id, **sampling)
        for tokens in output[:, width:].tolist():
            ended = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
            ids = tokens if ended is None else tokens[:ended]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            stop = min((text.index(s) for s in stop_strings if s in text), default=None)
            completions.append(Completion(text if stop is None else text[:stop], ids, ended is not None or
                                          stop is not None))
    return completions
