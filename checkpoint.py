"""How a training run survives a kill: the output directory it holds, the fingerprints a resume checks, and its
checkpoints. A kill at any instant leaves a directory from which the same command (with --resume) continues at the
newest complete checkpoint, on any number of ranks, onto the same loss curve (with infra.py's per-step seeds, metrics
and schedule). sft.py, dpo.py and rlvr.py use it; docs/checkpoints.md describes the format.

A checkpoint is output_dir/checkpoint-N/: one safetensors file per rank, holding that rank's rows (FSDP2's shards)
of every weight and AdamW moment, streamed from the tensors' own memory, and trainer_state.json (the step, the
scheduler, the run's fingerprints), written last as the mark of a complete checkpoint. Resuming reads each rank's
rows from whichever files hold them, so the rank count may change. A parameter under several names (tied
embeddings) is stored once.
"""
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard
from transformers.utils import cached_file

import infra

LOCK_FILE, CHECKPOINT_DONE = "run.lock", "trainer_state.json"


class Resumed(NamedTuple):
    """The checkpoint a run continues from: its directory and its trainer state (step, scheduler, fingerprints)."""
    path: str
    state: dict


@contextlib.contextmanager
def claimed_output_dir(output_dir: str, *, model_path: str, run_config: dict, resume: bool, rank: int):
    """Hold output_dir for this run's life: one run per directory, and only this run's flags in it. run_config is
    the flags that define the run (all but those a resume may change), kept in output_dir/run_config.json.

    Rank 0 holds an flock on output_dir/run.lock. The kernel drops it when the process ends, however it
    ends, so a killed run leaves no stale lock, and a second launch (or a resume while a killed launcher's
    workers still run) stops here. A directory without run_config.json must be empty but for our own
    leftovers; the run then starts, with or without --resume. Every rank stops on rank 0's verdict.
    """
    infra.check_model_path(model_path)
    if os.path.abspath(output_dir) == os.path.abspath(model_path):
        raise SystemExit("--output_dir must differ from --model_name_or_path")
    verdict, lock = [""], None
    if rank == 0:
        try:
            os.makedirs(output_dir, exist_ok=True)
            lock = open(os.path.join(output_dir, LOCK_FILE), "a+")
        except OSError as error:  # a file of that name, no permission, a read-only disk: every rank stops with it
            verdict = [f"--output_dir {output_dir}: cannot write there ({error.strerror}: {error.filename}); "
                       "choose another"]
    if lock is not None:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            lock.truncate(0)
            lock.write(f"{socket.gethostname()} pid {os.getpid()}\n")
            lock.flush()
            verdict = [record_run_config(output_dir, run_config, resume)]
        except BlockingIOError:
            lock.seek(0)
            verdict = [f"{output_dir} is in use by another run ({lock.read().strip()}, holding {LOCK_FILE}); "
                       "wait for it to end or choose another --output_dir"]
    dist.broadcast_object_list(verdict, src=0)
    try:
        if verdict[0]:
            raise SystemExit(verdict[0])
        yield
    finally:
        if lock is not None:
            lock.close()


def record_run_config(output_dir: str, run_config: dict, resume: bool) -> str:
    """Why this run may not use output_dir ('' if it may); a new run's run_config goes to run_config.json."""
    path = os.path.join(output_dir, "run_config.json")
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        changed = sorted(k for k in run_config.keys() | previous.keys() if run_config.get(k) != previous.get(k))
        if changed:
            return (f"{output_dir} holds a different run (flags differ: {', '.join(changed)}); "
                    "choose another --output_dir")
        return "" if resume else f"{output_dir} already holds this run; pass --resume to continue it"
    foreign = sorted(set(os.listdir(output_dir)) - {LOCK_FILE, "run_config.json.tmp"})
    if foreign:
        return f"{output_dir} holds no run of this script but {foreign[:3]}; choose another --output_dir"
    infra.write_durably(path, json.dumps(run_config, indent=2))
    return ""


def run_fingerprints(examples, model_path: str, rank: int) -> dict:
    """sha256 of the training data as tokenized and mixed (in order), and of the base model's files.

    A resume checks both against its checkpoint. The model files are hashed whole rather than by size
    and mtime: the same model copied to a new node's cache must pass, a retrained one in place must not.
    Rank 0 hashes the data; the first rank of each node hashes its copy of the model files (in parallel
    threads), and a node whose copy differs from rank 0's stops every rank: each rank reads its shard of the
    weights from its own node's files, so it would train a mix of two models.
    """
    import pyarrow as pa  # (here, not above: only this function reads arrow data)
    import pyarrow.compute as pc

    fingerprints, model = [None], None
    if rank == 0:
        data = hashlib.sha256()
        table = examples.with_format("arrow")[:]
        for name in table.column_names:
            column = table.column(name).combine_chunks()
            data.update(name.encode())
            if pa.types.is_list(column.type) and pa.types.is_integer(column.type.value_type):  # token ids
                data.update(pc.list_value_length(column).to_numpy().tobytes())
                data.update(pc.list_flatten(column).to_numpy().tobytes())
            else:
                data.update(json.dumps(column.to_pylist()).encode())
    if int(os.environ["LOCAL_RANK"]) == 0:
        model_dir = model_path if os.path.isdir(model_path) else os.path.dirname(cached_file(model_path, "config.json"))
        files = sorted(os.path.join(model_dir, name) for name in os.listdir(model_dir)
                       if name == "config.json" or name.endswith((".safetensors", ".bin", ".index.json")))

        def file_sha256(path):
            with open(path, "rb") as f:
                return f"{os.path.basename(path)}:{hashlib.file_digest(f, 'sha256').hexdigest()}"
        with ThreadPoolExecutor() as pool:  # hashlib releases the GIL: one thread per file
            model = hashlib.sha256(" ".join(pool.map(file_sha256, files)).encode()).hexdigest()
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, model)
    unlike = [other for other, digest in enumerate(per_rank) if digest not in (None, per_rank[0])]
    if unlike:
        raise SystemExit(f"{model_path}: the model files differ between ranks: rank 0's and rank {unlike[0]}'s "
                         "copies hash differently; give every node the same copy")
    if rank == 0:
        fingerprints = [{"data": data.hexdigest(), "model": model}]
    dist.broadcast_object_list(fingerprints, src=0)
    return fingerprints[0]


def newest(output_dir: str, run_facts: dict, world_size: int) -> Resumed | None:
    """The newest complete checkpoint (None if there is none), if it continues this launch: same
    data and base model fingerprints, same sequences per optimizer step (however split)."""
    names = os.listdir(output_dir)
    if {"checkpoint", "checkpoint.old", "checkpoint.tmp"} & set(names):
        raise SystemExit(f"{output_dir}: a checkpoint in the format before checkpoint-<step>/ (torch.save files); "
                         "finish this run with the version of this script that wrote it")
    done = [name for name in names
            if name.startswith("checkpoint-") and os.path.exists(os.path.join(output_dir, name, CHECKPOINT_DONE))]
    if not done:
        return None
    path = os.path.join(output_dir, max(done, key=lambda name: int(name.removeprefix("checkpoint-"))))
    with open(os.path.join(path, CHECKPOINT_DONE)) as f:
        saved = json.load(f)
    if "world_size" not in saved:  # DCP's shard files, tied weights unsupported
        raise SystemExit(f"{path}: a checkpoint in the format before one file per rank; finish this run with the "
                         "version of this script that wrote it")
    changed = [name for name in ("data", "model") if saved[name] != run_facts[name]]
    if changed:
        raise SystemExit(f"--resume: the {' and the '.join(changed)} changed since {path} was written "
                         f"(sha256 {', '.join(f'{n} {saved[n][:12]} -> {run_facts[n][:12]}' for n in changed)}); "
                         "restore them or train into a new --output_dir")
    batch = saved["optimizer_batch"]
    if batch != run_facts["optimizer_batch"]:
        splits = [f"{p} x {batch // world_size // p}" for p in range(1, batch // world_size + 1)
                  if batch % world_size == 0 and batch // world_size % p == 0][:4]
        raise SystemExit(f"--resume: {path} trained on {batch} sequences per optimizer step, this launch would use "
                         f"{run_facts['optimizer_batch']}; on {world_size} ranks keep {batch} with "
                         "--per_device_train_batch_size x --gradient_accumulation_steps = "
                         + (" or ".join(splits) if splits else f"(none: {batch} is not a multiple of {world_size})"))
    return Resumed(path, saved)


def save(model, optimizer, scheduler, step: int, output_dir: str, rank: int, run_facts: dict) -> None:
    """output_dir/checkpoint-{step}: each rank streams its own rows of the weights and of the AdamW state into its
    own safetensors file, straight from the tensors' memory (no full tensor, no second copy of the state), and
    fsyncs it; then rank 0 writes the trainer state, the mark of a complete checkpoint, and only then removes the
    older ones. The data position and the global RNG are functions of the step."""
    path = os.path.join(output_dir, f"checkpoint-{step}")
    os.makedirs(path, exist_ok=True)
    world_size = dist.get_world_size()
    tensors, rows = {}, {}  # {name: this rank's tensor}, {name: [the first row this rank holds, the rows in all]}
    for name, tensor in stored_tensors(model, optimizer):
        if isinstance(tensor, DTensor):  # a weight or a moment: this rank's rows
            tensors[name], rows[name] = local_rows(tensor)
        elif rank == 0:  # AdamW's step count, the same on every rank: stored once
            tensors[name] = tensor
    write_safetensors(os.path.join(path, rank_file(rank, world_size)), tensors, {"rows": json.dumps(rows)})
    dist.barrier()  # every rank's file is written and fsynced
    if rank == 0:
        infra.write_durably(os.path.join(path, CHECKPOINT_DONE), json.dumps(
            {"step": step, "world_size": world_size, "scheduler": scheduler.state_dict(), **run_facts}))
        remove_others(output_dir, keep=path)
    dist.barrier()


def load(model, optimizer, scheduler, resumed: Resumed) -> int:
    """Restore weights, AdamW state and scheduler, resharded onto this launch's ranks; return the step. Each rank
    reads just its own rows of each tensor from whichever files hold them: into the weights in place (a tied
    weight into the one tensor its names share, so it stays tied) and into moments made for it."""
    path, saved = resumed
    stored = read_index([os.path.join(path, rank_file(r, saved["world_size"]))
                                    for r in range(saved["world_size"])])
    parameters = stored_parameters(model)
    moments = {name: {entry.removeprefix(name + "."): entry for entry in stored if entry.startswith(name + ".")}
               for name in parameters}  # (none for a parameter that never had a gradient, as in the run)
    known = set(parameters).union(*(entries.values() for entries in moments.values()))
    if stored.keys() != known:  # another model's names, or a tensor stored under another of its names
        raise RuntimeError(f"{path} holds {sorted(stored.keys() - known)[:3]}, which this model does not have, and "
                           f"lacks {sorted(known - stored.keys())[:3]}")
    index = {id(param): i for i, param in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    state = {}
    with torch.no_grad():
        for name, param in parameters.items():
            read_rows(stored[name], into=param)
            if moments[name]:
                state[index[id(param)]] = {key: read_rows(stored[entry], into=torch.empty_like(param) if
                                                          stored[entry][0].first_row is not None else None)
                                           for key, entry in moments[name].items()}
    # torch's own rule puts each value on its parameter's device (the step count too, for a fused AdamW)
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    scheduler.load_state_dict(saved["scheduler"])
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):  # the scheduler state alone
        group["lr"] = lr                                                    # does not reach the optimizer
    return saved["step"]


def stored_tensors(model, optimizer):
    """(name, tensor) of each weight a checkpoint stores, each followed by `name.key` of its AdamW state."""
    for name, param in stored_parameters(model).items():
        yield name, param
        for key, value in optimizer.state.get(param, {}).items():
            yield f"{name}.{key}", value


def stored_parameters(model) -> dict:
    """{name: parameter}, each parameter once. A parameter under several names (tied embeddings, or any other
    set) goes under the one name save_pretrained keeps for it: save_pretrained drops each name that matches a
    `_tied_weights_keys` pattern of a Hugging Face model inside (from_pretrained ties those back to their
    source). A set left with other than one name, or two parameters that share memory, is sharing that neither
    knows: it stops here rather than store a tensor twice or load it back untied."""
    tied_names = [f"{prefix}.{key}" if prefix else key for prefix, module in model.named_modules()
                  for key in getattr(module, "_tied_weights_keys", None) or {}]
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), (param, []))[1].append(name)
    parameters, memory = {}, {}  # {the address of a tensor's memory: its name}
    for param, names in aliases.values():
        kept = names if len(names) == 1 else [name for name in names if not any(re.search(t, name) for t in tied_names)]
        local = param.to_local() if isinstance(param, DTensor) else param
        address = local.untyped_storage().data_ptr() if local.numel() else None
        if len(kept) != 1 or address in memory:
            raise RuntimeError(f"{', '.join(names + [memory[address]] if address in memory else names)} share memory "
                               "in a way that no _tied_weights_keys of the model declares: a checkpoint would store "
                               "them twice and load them back untied")
        parameters[kept[0]] = param
        if address is not None:
            memory[address] = kept[0]
    return parameters


def local_rows(tensor) -> tuple:
    """(this rank's rows of a weight or moment, [the index of its first row, the rows in all]), as FSDP2 shards
    a tensor: dim 0 cut into torch.chunk's pieces over one mesh dimension (the last ranks may hold none)."""
    mesh, total = tensor.device_mesh, tensor.shape[0] if tensor.dim() else 0
    per_rank = -(-total // mesh.size())
    first = min(mesh.get_local_rank() * per_rank, total)
    local = tensor.to_local()
    if tensor.placements != (Shard(0),) or mesh.ndim != 1 or not tensor.dim() or not local.is_contiguous() \
            or local.shape[0] != min(per_rank, total - first):
        raise RuntimeError(f"a tensor {list(tensor.shape)} sharded as {tensor.placements} over {mesh}: checkpoints "
                           "store FSDP2's row shards over one mesh dimension only")
    return local, [first, total]


def rank_file(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32"}
COPY_CHUNK_BYTES = 64 * 2**20  # what crosses between a GPU and the host at a time


def write_safetensors(path: str, tensors: dict, metadata: dict) -> None:
    """A safetensors file of `tensors`, their bytes written in place from their own memory (from a GPU, a chunk at
    a time), fsynced with its directory entry."""
    header, offset = {"__metadata__": {"format": "pt", **metadata}}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded)
        for tensor in tensors.values():
            flat = tensor.detach().reshape(-1).view(torch.uint8)  # a view: the tensor is contiguous
            for start in range(0, flat.numel(), COPY_CHUNK_BYTES):
                f.write(flat[start:start + COPY_CHUNK_BYTES].cpu().numpy())  # (on the CPU, .cpu() copies nothing)
        f.flush()
        os.fsync(f.fileno())
    infra.fsync_directory(os.path.dirname(path))


class StoredPiece(NamedTuple):
    """Where one rank's rows of a tensor lie in a checkpoint: file, byte offset, dtype, shape, first row (or None:
    the whole tensor, stored once)."""
    file: str
    offset: int
    dtype: torch.dtype
    shape: list
    first_row: int | None


def read_index(files: list) -> dict:
    """{name: [StoredPiece per file holding some of it]} from the files' safetensors headers."""
    dtypes = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
    stored = {}
    for file in files:
        with open(file, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
        rows = json.loads(header.pop("__metadata__")["rows"])
        for name, entry in header.items():
            stored.setdefault(name, []).append(StoredPiece(file, 8 + length + entry["data_offsets"][0],
                                                           dtypes[entry["dtype"]], entry["shape"],
                                                           rows[name][0] if name in rows else None))
    return stored


def read_rows(pieces: list, into=None):
    """`into` (a DTensor) with this rank's rows read from the pieces that hold them; with into=None, the tensor
    that the one piece holds whole (a step count)."""
    if into is None:
        piece = pieces[0]
        return read_bytes(piece.file, piece.offset, torch.empty(piece.shape, dtype=piece.dtype))
    local, (first, total) = local_rows(into)
    filled = 0
    for piece in pieces:
        if piece.dtype != local.dtype or piece.shape[1:] != list(local.shape[1:]):
            raise RuntimeError(f"{piece.file} holds a {piece.dtype} {piece.shape} shard of a {local.dtype} "
                               f"{[total, *local.shape[1:]]} tensor")
        low, high = max(first, piece.first_row), min(first + local.shape[0], piece.first_row + piece.shape[0])
        if low < high:
            row_bytes = local[0].numel() * local.element_size()
            read_bytes(piece.file, piece.offset + (low - piece.first_row) * row_bytes, local[low - first:high - first])
            filled += high - low
    if filled != local.shape[0]:
        raise RuntimeError(f"the checkpoint's files hold {filled} of this rank's {local.shape[0]} rows")
    return into


def read_bytes(file: str, offset: int, into):
    """Fill the contiguous tensor `into` with the bytes of `file` from `offset` on: read straight into its memory
    (on a GPU, through the host a chunk at a time)."""
    flat = into.reshape(-1).view(torch.uint8)
    with open(file, "rb") as f:
        f.seek(offset)
        for start in range(0, flat.numel(), COPY_CHUNK_BYTES):
            chunk = flat[start:start + COPY_CHUNK_BYTES]
            host = chunk if chunk.device.type == "cpu" else torch.empty_like(chunk, device="cpu")
            if f.readinto(host.numpy()) != host.numel():
                raise SystemExit(f"{file}: shorter than its header says, so this checkpoint is damaged; restore the "
                                 "file, or start the run again in a new --output_dir")
            if host is not chunk:
                chunk.copy_(host)
    return into


def remove_others(output_dir: str, keep: str | None) -> None:
    """Delete every checkpoint directory but `keep`, its mark of completeness first, so that a kill
    mid-delete never leaves a directory that looks complete without its shards."""
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith("checkpoint-") and path != keep:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(path, CHECKPOINT_DONE))
            shutil.rmtree(path)
