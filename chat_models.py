"""The models synth.py sends conversations to: a local model directory or hub id, decoded by decoding.complete
(the project's one sampler), or an OpenAI-compatible endpoint written `URL#MODEL_NAME` (vLLM, SGLang, a hosted
API), reached with the `openai` client, which times requests out and retries 429s, 5xx and timeouts with backoff.
`generate` answers a list of (model, conversation) requests over both kinds at once. Runtime only: a reader
learning the recipe may skip this file (docs/synth.md, "Models").
"""
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

import data_mix
import decoding
import infra


@dataclass
class Reply:
    text: str | None  # None: the request failed
    tokens: int  # generated tokens
    finished: bool  # ended by the model (EOS / stop), not by --max_new_tokens


@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float
    top_p: float


class LocalModel:
    """A model directory or hub id, whole on this rank's device, decoded by the project's one sampler."""

    def __init__(self, path: str, device, batch_size: int):
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.name, self.batch_size = path, batch_size
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self.tokenizer = data_mix.load_tokenizer(path)

    def chat(self, conversations: list[list[dict]], sampling: Sampling, seed: int) -> list[Reply]:
        prompts = [data_mix.tokenize_prompt(self.tokenizer, messages) for messages in conversations]
        generator = torch.Generator(self.model.device).manual_seed(seed)
        completions = decoding.complete(self.model, self.tokenizer, prompts, max_new_tokens=sampling.max_new_tokens,
                                        temperature=sampling.temperature, top_p=sampling.top_p, generator=generator,
                                        batch_size=self.batch_size)
        return [Reply(c.text, len(c.token_ids), c.finished) for c in completions]


class EndpointModel:
    """An OpenAI-compatible server (vLLM, SGLang, a hosted API), the key from OPENAI_API_KEY. The openai client
    times requests out and retries 429s, 5xx and timeouts with exponential backoff; requests run in `threads`
    (shared by every endpoint, so --max_concurrency bounds them all). A request still failing is a failed Reply."""

    def __init__(self, spec: str, threads: ThreadPoolExecutor, timeout: float, max_retries: int):
        import openai  # an optional dependency: only endpoints need it

        url, self.served_name = spec.split("#", 1)
        self.name, self.threads, self.errors = spec, threads, openai.OpenAIError
        self.client = openai.OpenAI(base_url=url, api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"), timeout=timeout,
                                    max_retries=max_retries)

    def submit(self, messages: list[dict], sampling: Sampling, seed: int):
        return self.threads.submit(self._request, messages, sampling, seed)

    def _request(self, messages: list[dict], sampling: Sampling, seed: int) -> Reply:
        try:
            response = self.client.chat.completions.create(
                model=self.served_name, messages=messages, max_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature, top_p=sampling.top_p, seed=seed)
            choice = response.choices[0]
        except (self.errors, IndexError):  # retries spent, or a reply without a choice
            return Reply(None, 0, False)
        tokens = response.usage.completion_tokens if response.usage else 0
        return Reply(choice.message.content or "", tokens, choice.finish_reason == "stop")


def is_endpoint(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def open_models(specs: dict, device, *, batch_size: int, max_concurrency: int, request_timeout: float,
                max_retries: int) -> dict:
    """{spec: model} for the MODEL flags in `specs` ({flag: [spec, ...]}), each distinct spec loaded once."""
    threads = ThreadPoolExecutor(max_workers=max_concurrency)
    models = {}
    for flag, values in specs.items():
        for spec in values:
            if spec in models:
                continue
            if is_endpoint(spec):
                if "#" not in spec:
                    raise SystemExit(f"--{flag} {spec}: write an endpoint as URL#MODEL_NAME (the name it serves)")
                models[spec] = EndpointModel(spec, threads, request_timeout, max_retries)
            elif not os.path.isdir(spec) and (os.path.isabs(spec) or spec.startswith(".") or spec.count("/") != 1):
                raise SystemExit(f"--{flag} {spec}: no such model directory (nor an org/name hub id, "
                                 "nor URL#MODEL_NAME)")
            else:
                if os.path.isdir(spec):  # config.json and the tokenizer files, named before anything loads
                    infra.check_model_path(spec, f"--{flag}")
                models[spec] = LocalModel(spec, device, batch_size)
    return models


def generate(requests: list[tuple], sampling: Sampling, seed: int) -> list[Reply]:
    """Replies to (model, conversation) requests, in order. Endpoint requests are all submitted first (they run in
    threads while the local models decode); each local model decodes its share in one call drawing from `seed`,
    and the i-th request to an endpoint asks for seed + i."""
    replies = [None] * len(requests)
    pending = {i: model.submit(messages, sampling, seed + i)
               for i, (model, messages) in enumerate(requests) if isinstance(model, EndpointModel)}
    local = {id(model): model for model, _ in requests if isinstance(model, LocalModel)}
    for model in local.values():
        indices = [i for i, (other, _) in enumerate(requests) if other is model]
        for i, reply in zip(indices, model.chat([requests[i][1] for i in indices], sampling, seed)):
            replies[i] = reply
    for i, future in pending.items():
        replies[i] = future.result()
    return replies
