"""The machinery the scripts share to run a model; a reader learning the recipe can skip it. sft.py, dpo.py and
rlvr.py use all of it but the resumable JSON Lines output; eval.py the distributed setup, the entry point and
durable files; synth.py those and the resumable output. What changes what the model computes is elsewhere: the
log-prob wrapper and packed attention in modeling.py, generation (the top-p draw, the KV cache, EOS and stop
strings) in decoding.py; what makes a training run survive a kill (its output directory, fingerprints and
checkpoints) is in checkpoint.py. The modules each stage needs, to copy it into another project: README.md,
"Layout".

The file's sections, top to bottom: distributed setup (torchrun or plain python, NCCL on GPU, gloo on CPU) and the
stages' entry point, which prints a user's mistake as one line, once across ranks; model loading (built on the
meta device, sharded with FSDP2 per decoder layer, each rank reading only its own shard of the safetensors files)
and the guard that checks the loaded model against plain from_pretrained before the first update; the Hugging
Face save; durable files, the per-step seeds, metrics (metrics.jsonl; TensorBoard or W&B when asked) and the
learning-rate schedule, which a resumed run continues; synth.py's resumable JSON Lines output.
"""
import contextlib
import ctypes
import datetime
import fcntl
import itertools
import json
import math
import os
import shutil
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers.utils import cached_file


# ---------------------------------------------------------------------------------------------
# Distributed setup

def init_distributed():
    """One process group for torchrun and for plain `python`: NCCL on GPU, gloo on CPU."""
    if "RANK" not in os.environ:  # plain python: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 10000))
    elif sys.platform == "linux":  # torchrun starts workers in their own session: a killed launcher would leave
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # them running; PR_SET_PDEATHSIG kills them with it instead
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(minutes=30))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
    return dist.get_rank(), dist.get_world_size(), device


@contextlib.contextmanager
def process_group():
    """init_distributed() for a stage's main(), and the group's end however the stage ends. A user's mistake
    (SystemExit with a message) is reported here, before the group ends, once across ranks (report_user_error); a rank
    whose collective then fails because that rank left stops quietly with status 1: its error is the consequence."""
    rank, world_size, device = init_distributed()
    try:
        yield rank, world_size, device
    except SystemExit as stop:
        if isinstance(stop.code, str):
            report_user_error(stop)
        raise
    except Exception:
        if world_size > 1 and user_errors_reported() > 0:
            time.sleep(3)  # the reporting rank exits first, so torchrun's summary names it as the root cause
            raise SystemExit(1) from None
        raise
    finally:
        dist.destroy_process_group()


def run(main) -> None:
    """A stage's command line: main(), where a user's mistake, raised as SystemExit("what, where, what to do"), ends
    the process with that one line on stderr and exit status 1, said once however many ranks stop for it; anything
    else is a bug and keeps its traceback."""
    try:
        main()
    except SystemExit as stop:
        if not isinstance(stop.code, str):  # --help, or an exit status: as it is
            raise
        report_user_error(stop)
        sys.exit(1)


def report_user_error(stop: SystemExit) -> None:
    """Print a user's mistake to stderr if no rank has yet (an error before the process group: every rank parsed the
    same flags; after: a rank that alone found a fault, a file missing on its node, says it)."""
    if not getattr(stop, "reported", False) and user_errors_reported(add=1) == 1:
        print(stop.code, file=sys.stderr, flush=True)
    stop.reported = True


def user_errors_reported(add: int = 0) -> int:
    """How many ranks have reported a user error, after adding `add`. Under torchrun the count is kept in the
    launcher's key-value store, which outlives every rank's process group. Elsewhere rank 0 speaks for all."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return add if os.environ.get("RANK", "0") == "0" else 0
    try:
        # a short timeout: where the launcher's store is gone (another node died) the answer is "no one reported",
        # and a surviving node must not wait for it
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=5))
        return store.add(f"user_errors_reported/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", add)
    except (RuntimeError, OSError):  # the launcher is gone: rank 0 speaks for all
        return add if os.environ.get("RANK", "0") == "0" else 0


# ---------------------------------------------------------------------------------------------
# Model loading and the load guard

# one of these is in every tokenizer transformers loads: fast, SentencePiece, BPE, WordPiece, tiktoken
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "tiktoken.model")


def check_model_path(path: str, flag: str = "--model_name_or_path", tokenizer: bool = True) -> None:
    """Stop early on a path that is neither a model directory (config.json and, with `tokenizer`, a tokenizer's
    files) nor an org/name hub id."""
    looks_local = os.path.isabs(path) or path.startswith(".") or path.count("/") != 1
    if not os.path.isdir(path) and looks_local:
        raise SystemExit(f"{flag} {path}: no such directory (and not an org/name hub id)")
    if not os.path.isdir(path):
        try:  # (downloads the hub model's config.json, as loading it would)
            cached_file(path, "config.json")
        except OSError as error:
            raise SystemExit(f"{flag} {path}: no such directory, and no hub model of that name could be had "
                             f"({str(error).strip().splitlines()[0]})") from None
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise SystemExit(f"{flag} {path}: not a model directory (it has no config.json)")
    if os.path.isdir(path):
        try:
            with open(os.path.join(path, "config.json"), "rb") as f:
                json.load(f)
        except ValueError as error:
            raise SystemExit(f"{flag} {path}: its config.json is not JSON ({error})") from None
    if os.path.isdir(path) and tokenizer and not any(os.path.exists(os.path.join(path, name))
                                                      for name in TOKENIZER_FILES):
        raise SystemExit(f"{flag} {path}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); copy in the "
                         "tokenizer of the model these weights come from")


def load_model(path: str, wrapper, *, device, rank: int, max_seq_length: int, dtype: str = "auto",
               attn_implementation: str | None = None, gradient_checkpointing: bool = False, compile: bool = False):
    """wrapper(the model), sharded with FSDP2: each decoder layer is its own unit (gathered just before use,
    freed after), the root unit holds the embeddings, final norm and head. The wrapper is the stage's module
    around the Hugging Face model (sft and dpo: modeling.CausalLMLogProbs; rlvr: HFModel, or ValueModel with its
    head). The keywords are the stage's flags of those names (max_seq_length: the longest sequence a forward will
    see); compile: torch.compile each decoder layer.

    Built empty on the meta device; then each rank reads just the slices of its own shards from the model's
    safetensors files (DCP), cast to fp32, so no rank holds a full copy. Where the files do not hold exactly
    the model's tensors under its names (transformers converts some keys as it loads them), rank 0 loads the
    model with from_pretrained instead, holding one full fp32 copy in CPU RAM, and sends each rank its shard.
    A tensor of the wrapper's own that the files lack (a new value head) is made on rank 0 either way.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:  # not JSON, a model type this transformers does not know, ...
        raise SystemExit(f"{path}: its config.json cannot be read ({str(error).strip().splitlines()[0]})") from None
    config.use_cache = False
    quantization = getattr(config, "quantization_config", None)
    if quantization:  # from_pretrained would build quantized modules that this full-precision training never sees
        method = quantization.get("quant_method") if isinstance(quantization, dict) else type(quantization).__name__
        raise SystemExit(f"{path}: a quantized checkpoint ({method}); this script trains full-precision weights: "
                         "start from the unquantized model")
    text = config.get_text_config()
    rope = getattr(text, "rope_parameters", None) or {}
    original_length = rope.get("original_max_position_embeddings") or text.max_position_embeddings
    if rope.get("rope_type") in ("longrope", "dynamic") and max_seq_length > original_length:
        raise SystemExit(f"--max_seq_length {max_seq_length}: {rope['rope_type']} RoPE picks its frequencies "
                         f"from the longest sequence in a forward once it passes {original_length} tokens, so a "
                         f"sequence would be scored differently packed or batched than alone; use at most "
                         f"{original_length}")
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn_implementation)
        model = wrapper(plain)
    try:  # the EOS ids decoding stops at (instruct models often list two), as from_pretrained reads them
        plain.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: the defaults from_config derived from config.json
        pass
    aliases = {}  # each tensor's names in the Hugging Face model: two for tied weights, none for the wrapper's own
    for name, tensor in plain.state_dict(keep_vars=True).items():
        aliases.setdefault(id(tensor), []).append(name)
    names = {key: aliases.get(id(tensor), []) for key, tensor in model.state_dict(keep_vars=True).items()}
    try:
        directory, plan = sharded_load_plan(path, plain, model, names)
        verdict = ("sharded" if directory else "from rank 0", "")
    except SystemExit as error:
        verdict = ("refused", str(error))
    verdicts = [None] * dist.get_world_size()
    dist.all_gather_object(verdicts, verdict)  # one path for all ranks, or the collectives below would hang
    if {kind for kind, _ in verdicts} != {verdict[0]} or verdict[0] == "refused":
        refusal = next((why for kind, why in verdicts if kind == "refused"), "")
        raise SystemExit(refusal or f"{path}: the ranks see different model files (per rank: "
                         f"{', '.join(kind for kind, _ in verdicts)}); give every node the same copy")
    if gradient_checkpointing:
        model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compute_dtype = torch.bfloat16 if resolve_dtype(dtype, device) == "bf16" else torch.float32
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in model.model.get_decoder().layers:
        if compile:  # fuses each layer's elementwise ops; compiled once, reused by every layer
            layer.compile()
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    model.to_empty(device=device)
    if directory:
        shards = get_model_state_dict(model)
        stored = {plan[key]: tensor for key, tensor in shards.items() if key in plan}  # tied weights: one entry
        dcp.load(stored, storage_reader=HuggingFaceStorageReader(directory))
        set_model_state_dict(model, {key: stored[plan[key]] for key in plan}, options=StateDictOptions(strict=False))
        fresh = [key for key in shards if key not in plan]  # the wrapper's own, not in the files: a new value head
        if fresh:  # made on rank 0, as a full load makes it
            made = wrapper(plain).state_dict() if rank == 0 else {}
            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
            set_model_state_dict(model, {key: made[key] for key in fresh} if rank == 0 else {}, options=options)
    else:
        full_state, verdict = {}, [""]
        if rank == 0:
            print(f"{path}: rank 0 loads the whole model with from_pretrained and sends each rank its shard ({plan})")
            loaded, info = AutoModelForCausalLM.from_pretrained(
                path, config=config, dtype=torch.float32, attn_implementation=attn_implementation,
                use_safetensors=True, output_loading_info=True)
            full_state = wrapper(loaded).state_dict()
            missing = [names[key][0] for key in full_state  # (the wrapper's own tensors are made, not loaded)
                       if names[key] and set(names[key]) <= set(info["missing_keys"])]
            held = loaded.state_dict(keep_vars=True)
            untied = next((tied for tied in names.values() if len({id(held[name]) for name in tied}) > 1), None)
            if missing:  # from_pretrained starts them at random: a different model than the checkpoint
                verdict = [f"{path}: the checkpoint has no {', '.join(missing)}"]
            elif untied:  # from_pretrained unties them; loaded into one tensor here, one copy would be lost
                verdict = [f"{path}: config.json ties {' and '.join(untied)}, but the checkpoint holds them with "
                           f"different values; set tie_word_embeddings to false in config.json to train both, or "
                           f"remove {untied[-1]} from the checkpoint"]
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0]:
            raise SystemExit(verdict[0])
        set_model_state_dict(model, full_state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    init_non_persistent_buffers(model.model)
    return model


def sharded_load_plan(path: str, plain, model, names: dict):
    """(the model's directory, {key in `model`: key in the files}) if the safetensors files hold each tensor of
    `model` once, under one of its `names` in `plain` (the Hugging Face model inside; a tensor of the wrapper's
    own under its key, or not at all if new), in its shape, in a dtype that casts to it, and nothing that
    transformers converts or the model lacks; else (None, why not)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import _getdtype
    from transformers.conversion_mapping import get_model_conversion_mapping

    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index:
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif cached_file(path, "model.safetensors", _raise_exceptions_for_missing_entries=False):
        files = ["model.safetensors"]
    else:  # from_pretrained would read pytorch_model.bin with pickle
        raise SystemExit(f"{path}: no model.safetensors (nor its index); the weights must be safetensors")
    stored, holder = {}, {}
    for file in files:
        try:  # a refusal, so every rank stops with it (a rank that raised alone would leave the others waiting)
            with safe_open(cached_file(path, file), "pt") as f:  # cached_file: a hub id's files are downloaded
                for key in f.keys():
                    if key in stored:  # DCP's reader and from_pretrained need not take the same copy
                        return None, f"{key} is in both {holder[key]} and {file}"
                    shape, dtype = f.get_slice(key).get_shape(), _getdtype(f.get_slice(key).get_dtype())
                    stored[key], holder[key] = (shape, dtype), file
        except (OSError, SafetensorError) as error:  # a file the index lists is missing, or cut short
            raise SystemExit(f"{os.path.join(path, file)}: {error}")
    directory = os.path.dirname(cached_file(path, files[0]))
    if sorted(name for name in os.listdir(directory) if name.endswith(".safetensors")) != files:
        return None, f"{directory} holds other .safetensors files too"  # DCP's reader would read them all
    transforms = get_model_conversion_mapping(plain)
    converted = [key for key in stored if any(t.rename_source_key(key)[1] is not None for t in transforms)]
    if converted:
        return None, f"transformers converts {converted[0]}"
    plan = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        found = [name for name in names[key] or [key] if name in stored]  # the wrapper's own: under its own key
        if not found and not names[key]:  # the wrapper's own, new (a value head): made on rank 0
            continue
        if len(found) != 1:
            return None, f"the checkpoint has {len(found)} of {names[key]}"
        shape, dtype = stored[found[0]]
        castable = dtype == tensor.dtype or tensor.is_floating_point() and dtype in (torch.bfloat16, torch.float16)
        if shape != list(tensor.shape) or not castable:  # (float8 and int weights are quantized: not castable)
            return None, f"{found[0]} is stored as {dtype} {shape}, the model's is {tensor.dtype} {list(tensor.shape)}"
        plan[key] = found[0]
    unknown = sorted(stored.keys() - plain.state_dict().keys() - set(plan.values()))
    return (None, f"transformers drops {unknown[0]}") if unknown else (directory, plan)


def init_non_persistent_buffers(model) -> None:
    """Fill the buffers that no state dict carries (rotary frequencies, Gemma's embedding scale, ...) exactly
    as from_pretrained does: transformers' own weight init, told that every loaded tensor is initialized.

    to_empty left them garbage; they are set to a sentinel first (NaN, or the lowest integer for integer
    buffers such as a vision tower's position ids), so a buffer that this init does not fill stops the run
    here instead of training a different model than the checkpoint."""
    unfilled = []
    for module in model.modules():
        module.__dict__.pop("_is_hf_initialized", None)  # from_config marked every module as done
        for param in module.parameters(recurse=False):
            param._is_hf_initialized = True
        for name, buffer in module.named_buffers(recurse=False):
            if name in module._non_persistent_buffers_set and buffer.dtype != torch.bool:
                sentinel = float("nan") if buffer.is_floating_point() else torch.iinfo(buffer.dtype).min
                unfilled.append((module, name, sentinel))
                buffer.fill_(sentinel)
            else:
                buffer._is_hf_initialized = True
    model.initialize_weights()
    for module, name, sentinel in unfilled:
        buffer = getattr(module, name)
        if (buffer.isnan() if buffer.is_floating_point() else buffer == sentinel).any():
            raise SystemExit(f"{type(model).__name__}: transformers' init does not fill the buffer {name} of "
                             f"{type(module).__name__}; this architecture cannot be loaded correctly here")


def check_loaded_model(model, path: str, input_ids, stage_logprobs, compute_dtype: str, rank: int) -> None:
    """Guard for architectures nobody tested: before the first update, the log-probs the stage trains on
    (`stage_logprobs(input_ids, position_ids)` -> [1, T-1]) must equal those of the model as plain
    from_pretrained gives it, for `input_ids` [1, T], the start of the run's first example. It catches a wrong
    loss path (a head transform the loss ignores) and a wrongly loaded model (a buffer left unfilled).

    Cheap at any size: both sides run only the first layers, up to one layer of each kind (attention type,
    dense or MoE), so rank 0 reads just those layers, the embeddings and the head with from_pretrained on
    the CPU (Llama-70B: about 12 GB in fp32, computed), and the sharded model runs the same layers."""
    model.eval()  # no dropout on either side
    with torch.random.fork_rng(devices=[]):  # whatever loading draws leaves the run's random stream as it was
        gap, num_layers = logprob_gap(model, path, input_ids, stage_logprobs, rank)
    tolerance = 2e-2 if compute_dtype == "bf16" else 1e-4  # SmolLM2-135M on CPU: bf16 6e-3, fp32 5e-7
    if gap > tolerance:
        raise SystemExit(f"{type(model.model).__name__} ({model.model.config.model_type}): the log-probs this stage "
                         f"trains on differ from the model's as from_pretrained loads it by {gap:.3g} (relative; "
                         f"tolerance {tolerance}; first {num_layers} layers, first {input_ids.shape[1]} tokens of the "
                         f"first example; the stage's attention: {model.model.config._attn_implementation}, the "
                         "reference's: eager). This architecture is not loaded or scored correctly here; nothing was "
                         "trained. If the attention implementation does not support the model, pass "
                         "--attn_implementation eager.")


def logprob_gap(model, path: str, input_ids, stage_logprobs, rank: int) -> tuple[float, int]:
    """(max over the tokens' log-probs of |stage - from_pretrained| / (1 + |from_pretrained|), layers run)."""
    import copy

    import transformers
    from transformers import AutoModelForCausalLM

    config = model.model.config.get_text_config()
    layers = model.model.get_decoder().layers
    layer_types = getattr(config, "layer_types", None) or [None] * len(layers)
    kinds = [(kind, str(layer)) for kind, layer in zip(layer_types, layers)]  # str(): the layer's module tree
    num_layers = max(kinds.index(kind) for kind in set(kinds)) + 1
    position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    reference = None
    if rank == 0:
        reference_config = copy.deepcopy(model.model.config)
        reference_config.get_text_config().num_hidden_layers = num_layers
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # not a word on the layers it leaves out
        try:
            plain = AutoModelForCausalLM.from_pretrained(path, config=reference_config, dtype=torch.float32,
                                                         attn_implementation="eager")  # the plainest kernel
        finally:
            transformers.logging.set_verbosity(verbosity)
        with torch.no_grad():
            logits = plain(input_ids=input_ids.cpu(), position_ids=position_ids.cpu()).logits[0, :-1].float()
        reference = logits.log_softmax(-1).gather(-1, input_ids[0, 1:, None].cpu())[:, 0].to(input_ids.device)
        del plain
    every_layer, config.num_hidden_layers = config.num_hidden_layers, num_layers  # the decoder runs only these
    try:
        with torch.no_grad():
            trained = stage_logprobs(input_ids, position_ids)[0].float()
    finally:
        config.num_hidden_layers = every_layer
        model.reshard()  # FSDP keeps the root's weights gathered after a forward without backward
    # |stage - reference| relative to 1 + |reference|: bf16 keeps ~3 significant digits of a log-prob of -50
    gap = ((trained - reference).abs() / (1 + reference.abs())).max() if rank == 0 else trained.new_zeros(())
    dist.all_reduce(gap, op=dist.ReduceOp.MAX)  # rank 0's gap, so every rank stops together
    return gap.item(), num_layers


def resolve_dtype(dtype: str, device) -> str:
    return ("bf16" if device.type == "cuda" else "fp32") if dtype == "auto" else dtype


# ---------------------------------------------------------------------------------------------
# The Hugging Face save

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


def final_model_saved(output_dir: str, rank: int) -> bool:
    """Whether output_dir holds this run's final model: save_hf_model moves config.json in last. A kill may have
    left its emptied temporary directory; rank 0 removes it."""
    if not os.path.exists(os.path.join(output_dir, "config.json")):
        return False
    if rank == 0:
        shutil.rmtree(os.path.join(output_dir, "model.tmp"), ignore_errors=True)
        print(f"{output_dir} holds this run's final model already: nothing to do")
    return True


# ---------------------------------------------------------------------------------------------
# Durable files, metrics and the learning-rate schedule: what a resumed run continues besides its checkpoint
# (checkpoint.py). Per-step seeds, so that a resumed run draws at each step what the uninterrupted run drew
# there: seed + STEP_SEED_STRIDE * step + rank, a stride above any rank count, gives every (step, rank) its own
# seed (dropout, rlvr's mini-batch order). rlvr's sampler strides by another prime, so its draws are not the
# dropout stream's.
STEP_SEED_STRIDE, SAMPLING_SEED_STRIDE = 7919, 104729


def write_durably(path: str, text: str) -> None:
    """Replace a file's content in one step: a kill leaves the old content or the new, never a mix."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    fsync_directory(os.path.dirname(path))  # the rename itself survives a power loss too


def fsync_directory(path: str) -> None:
    directory = os.open(path, os.O_RDONLY)
    os.fsync(directory)
    os.close(directory)


def append_metrics(path: str, metrics: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(metrics) + "\n")


class MetricsReport:
    """Each step's metrics also to TensorBoard or Weights & Biases (--report_to; metrics.jsonl gets them always).
    Both are optional dependencies, imported only when asked. TensorBoard writes OUTPUT_DIR/runs, and a resumed
    run hides the steps after its checkpoint there as metrics.jsonl forgets them; a resumed run is a new W&B run
    (project WANDB_PROJECT, or wandb's default) that continues the step count."""

    def __init__(self, report_to: str, output_dir: str, start_step: int, run_config: dict):
        self.writer = self.run = None
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise SystemExit("--report_to tensorboard: the tensorboard package is not installed "
                                 "(pip install tensorboard), or pass --report_to none") from None
            self.writer = SummaryWriter(os.path.join(output_dir, "runs"), purge_step=start_step + 1)
        elif report_to == "wandb":
            try:
                import wandb
            except ImportError:
                raise SystemExit("--report_to wandb: the wandb package is not installed (pip install wandb), "
                                 "or pass --report_to none") from None
            self.run = wandb.init(name=os.path.basename(os.path.abspath(output_dir)), config=run_config)

    def __call__(self, metrics: dict) -> None:
        scalars = {key: value for key, value in metrics.items() if key != "step"}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, metrics["step"])
            self.writer.flush()  # a killed run keeps what it reported
        if self.run is not None:
            self.run.log(scalars, step=metrics["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.run is not None:
            self.run.finish()


def truncate_metrics(path: str, step: int) -> None:
    """On resume, keep the steps the checkpoint covers: a killed run's later steps are repeated, and its
    last line may be half-written. Rewritten durably, so a kill here loses nothing."""
    if os.path.exists(path):
        with open(path) as f:
            kept = itertools.takewhile(lambda line: line.endswith("\n") and json.loads(line)["step"] <= step, f)
            write_durably(path, "".join(kept))


LR_SCHEDULES = ("linear", "cosine", "constant_with_warmup", "constant")


def make_scheduler(optimizer, kind: str, warmup_steps: int, total_steps: int):
    """The learning rate's factor at each step as transformers' get_scheduler gives it (open-instruct's schedule):
    linear warmup from 0 over warmup_steps (factor step / W, so the first update's rate is 0), then linear or
    cosine decay to 0 at total_steps, or constant; `constant` has no warmup at all (transformers ignores it). The stages
    pass int(warmup_ratio x total_steps), rounded down as open-instruct rounds it."""
    def factor(step):
        if kind == "constant":
            return 1.0
        if step < warmup_steps:
            return step / warmup_steps
        if kind == "constant_with_warmup":
            return 1.0
        decay_steps = max(1, total_steps - warmup_steps)
        if kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / decay_steps)))
        return max(0.0, (total_steps - step) / decay_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------
# Resumable JSON Lines output (synth.py): rows are appended as they finish; the same command continues a
# killed run, losing only the rows in flight and never writing one twice.

class ResumableJsonl:
    """OUTPUT.jsonl (the kept rows, each with its "id") and its companions beside it:
    OUTPUT.done.jsonl, one line per finished id (kept or dropped, why, and its counters), written after the id's
    row, so that line is the mark that the id is done; OUTPUT.command.json, the command that writes them (another
    command is refused: it would mix two kinds of rows in one file); OUTPUT.lock, an flock held while a run
    writes (the kernel drops it however the process ends). Opening cuts what a kill left unfinished: a torn last
    line, and rows whose done line was never written (their ids are redone). Lines are flushed to the OS as they
    are written (a killed process loses nothing written; a power loss may lose the last lines, which a rerun
    then redoes)."""

    def __init__(self, path: str, command: dict):
        if not path.endswith(".jsonl"):
            raise SystemExit(f"--output {path}: the output must be a .jsonl file")
        stem = path.removesuffix(".jsonl")
        self.path, self.done_path, self.command_path = path, f"{stem}.done.jsonl", f"{stem}.command.json"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.lock = open(f"{stem}.lock", "a+")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"--output {path} is being written by another run (it holds {stem}.lock); wait for it "
                             "to end or choose another --output") from None
        if os.path.exists(self.command_path):
            with open(self.command_path) as f:
                previous = json.load(f)
            changed = sorted(k for k in command.keys() | previous.keys() if command.get(k) != previous.get(k))
            if changed:
                raise SystemExit(f"--output {path} holds the rows of another command (flags differ: "
                                 f"{', '.join(f'--{name}' for name in changed)}); rerun that command to finish it, "
                                 "or choose another --output")
        elif os.path.exists(path) or os.path.exists(self.done_path):
            raise SystemExit(f"--output {path} exists but was not written by this script (no {self.command_path}); "
                             "choose another --output")
        else:
            write_durably(self.command_path, json.dumps(command, indent=2))
        self.done = {record["id"]: record for record in self._complete_lines(self.done_path)}
        rows = self._complete_lines(path)
        finished = [row for row in rows if row["id"] in self.done]
        if len(finished) != len(rows):  # rows without their done line are redone
            write_durably(path, "".join(json.dumps(row) + "\n" for row in finished))
        self.rows, self.records = open(path, "a"), open(self.done_path, "a")

    def _complete_lines(self, path: str) -> list[dict]:
        """The records of the whole lines of `path`; a torn last line (a kill mid-write) is cut off the file."""
        if not os.path.exists(path):
            return []
        with open(path, "rb") as f:
            data = f.read()
        whole = data[:data.rfind(b"\n") + 1]
        if len(whole) != len(data):
            write_durably(path, whole.decode())
        return [json.loads(line) for line in whole.decode().splitlines() if line.strip()]

    def write(self, record: dict, row: dict | None) -> None:
        """Finish one id: its row (if kept), then its done record {"id", "outcome", "counts"}."""
        if row is not None:
            self.rows.write(json.dumps(row) + "\n")
            self.rows.flush()
        self.records.write(json.dumps(record) + "\n")
        self.records.flush()
        self.done[record["id"]] = record

    def close(self) -> None:
        for f in (self.rows, self.records, self.lock):
            f.close()
