"""The whole Tülu 3 recipe in one command: SFT -> DPO -> RLVR on the bundled model, evaluated after each stage.

    python demo.py                                  # make demo; its run time: docs/performance.md
    python demo.py --scale 0.5                      # fewer rows and steps everywhere
    python demo.py --model_name_or_path my/model    # any HF causal LM directory with a chat template

The model is SmolLM2-135M-Instruct (run data/fetch_offline.py once, or let this script do it); the
data is data/demo/ (written by data/make_demo_data.py): easy arithmetic word problems and one-line
answers under IFEval constraints, in the three Tülu 3 formats, with held-out prompts.

Each stage runs as a subprocess with its real command line (printed before it runs), reading the
previous stage's output directory and writing its own, exactly as a user would chain them:

    base -> sft.py -> output/demo/sft -> dpo.py -> output/demo/dpo -> rlvr.py --algo grpo -> output/demo/rlvr
                           └-> synth.py preferences -> dpo.py -> output/demo/onpolicy/dpo   (on-policy data)

The on-policy branch makes DPO data the Tülu 3 way, small: the SFT model's and the base model's completions (T 1)
on held-out RLVR prompts that no measurement uses, rated by the verifier (`--judge verifier`), binarized into
pairs, then a short DPO run from the SFT checkpoint on those pairs; the report gives the pairs' count and the
checkpoint's held-out figures beside SFT's.

Before the first stage and after each one, this script measures the checkpoint on the held-out
splits (greedy decoding, so the numbers are reproducible):
- verifiable accuracy: mean `verifiers.verify` score on rlvr_heldout (GSM8K-style answers, IFEval
  constraints), the quantity RLVR optimizes;
- SFT loss: token-mean cross-entropy on the assistant turns of sft_heldout;
- preference accuracy: the share of pref_heldout pairs whose chosen answer the model finds more
  likely than the rejected one (mean log-prob per token, so answer length does not decide).
It then writes output/demo/report.md: one table of these figures per checkpoint, the first-vs-last
figures of each training run (read from each stage's metrics.jsonl), and PNG plots of the curves.

Demo scale is not a recipe: the hyperparameters below were chosen once to fit the time budget (a
135M model, a few dozen optimizer steps per stage) and were not tuned on the results. The full-scale
command sequence with Tülu 3 8B settings is in docs/stages.md#full-scale-tülu-3-8b.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
import decoding  # noqa: E402
from data_mix import IGNORE_INDEX, collate_padded, load_tokenizer, tokenize_prompt, tokenize_sft  # noqa: E402
from verifiers import verify  # noqa: E402

DATA_DIR = os.path.join(ROOT, "data", "demo")
BUNDLED_MODEL = os.path.join(ROOT, ".cache", "models", "SmolLM2-135M-Instruct")

# ----------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=BUNDLED_MODEL,
                        help="starting checkpoint (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "output", "demo"),
                        help="one subdirectory per stage, plus report.md and the plots")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiplies every row count and step count (the test runs 0.05)")
    parser.add_argument("--eval_examples", type=int, default=24,
                        help="held-out rows per measurement, before --scale (each split, balanced by task)")
    parser.add_argument("--max_new_tokens", type=int, default=48,
                        help="greedy decoding budget for held-out accuracy (the reference answers take < 30)")
    parser.add_argument("--seed", type=int, default=123)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# The three stages, as a user would type them in the repository root (where they run). Sizes are at
# scale 1.0.

# Chosen once to fit 15 minutes on 2 CPU cores, not tuned on the results. The learning rates are
# above Tülu 3's (SFT 5e-6, DPO 5e-7, GRPO 5e-7) because each stage takes a dozen steps, not thousands.
SFT_ROWS, DPO_ROWS, RLVR_STEPS = 96, 64, 6


def scaled(count: int, scale: float, minimum: int = 1) -> int:
    """A count at --scale, never below `minimum` (the training stages need one full batch of 8)."""
    return max(minimum, round(count * scale))


def sft_command(args, model: str, output_dir: str) -> list[str]:
    return [sys.executable, "sft.py",
            "--model_name_or_path", shown_path(model),
            "--dataset_mixer_list", shown_path(f"{DATA_DIR}/sft_train.jsonl"), str(scaled(SFT_ROWS, args.scale, 8)),
            "--max_seq_length", "256",
            "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
            "--learning_rate", "2e-5", "--lr_scheduler_type", "linear", "--warmup_ratio", "0.03",
            "--num_train_epochs", "1", "--seed", str(args.seed),
            "--output_dir", shown_path(output_dir)]


def dpo_command(args, model: str, output_dir: str) -> list[str]:
    return [sys.executable, "dpo.py",
            "--model_name_or_path", shown_path(model),
            "--dataset_mixer_list", shown_path(f"{DATA_DIR}/pref_train.jsonl"), str(scaled(DPO_ROWS, args.scale, 8)),
            "--max_seq_length", "256",
            "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
            "--dpo_loss_type", "dpo_norm", "--dpo_beta", "5",
            "--learning_rate", "5e-6", "--lr_scheduler_type", "linear", "--warmup_ratio", "0.1",
            "--num_train_epochs", "1", "--seed", str(args.seed),
            "--output_dir", shown_path(output_dir)]


def rlvr_command(args, model: str, output_dir: str) -> list[str]:
    steps = scaled(RLVR_STEPS, args.scale)
    prompts, samples = 4, 4  # per step: 4 prompts x G = 4 sampled answers, advantages within each group
    return [sys.executable, "rlvr.py", "--algo", "grpo",
            "--model_name_or_path", shown_path(model),
            "--dataset_mixer_list", shown_path(f"{DATA_DIR}/rlvr_train.jsonl"), "1.0",
            "--max_seq_length", "256",  # the sampler's KV cache is rows x max_seq_length: keep it small
            "--total_episodes", str(steps * prompts * samples),
            "--num_unique_prompts_rollout", str(prompts), "--num_samples_per_prompt_rollout", str(samples),
            "--response_length", str(args.max_new_tokens), "--temperature", "1.0",
            "--beta", "0.01", "--learning_rate", "3e-6", "--per_device_train_batch_size", "8",
            "--seed", str(args.seed), "--output_dir", shown_path(output_dir)]


ONPOLICY_PROMPTS = 36  # the held-out RLVR prompts beyond the measured 24
ONPOLICY_BATCH = 4  # pairs per optimizer step: the branch makes a dozen or two


def synth_command(args, policy: str, base: str, onpolicy_dir: str) -> list[str]:
    return [sys.executable, "synth.py", "preferences",
            "--prompts", shown_path(f"{onpolicy_dir}/prompts.jsonl"),
            "--policy", shown_path(policy), "--pool", shown_path(base), "--models_per_prompt", "1",
            "--judge", "verifier", "--max_new_tokens", str(args.max_new_tokens), "--temperature", "1.0",
            "--seed", str(args.seed), "--output", shown_path(f"{onpolicy_dir}/preferences.jsonl")]


def onpolicy_dpo_command(args, model: str, onpolicy_dir: str) -> list[str]:
    return [sys.executable, "dpo.py",
            "--model_name_or_path", shown_path(model),
            "--dataset_mixer_list", shown_path(f"{onpolicy_dir}/preferences.jsonl"), "1.0",
            "--max_seq_length", "256",
            "--per_device_train_batch_size", str(ONPOLICY_BATCH), "--gradient_accumulation_steps", "1",
            "--dpo_loss_type", "dpo_norm", "--dpo_beta", "5",
            "--learning_rate", "5e-6", "--lr_scheduler_type", "linear", "--warmup_ratio", "0.1",
            "--num_train_epochs", "1", "--seed", str(args.seed),
            "--output_dir", shown_path(f"{onpolicy_dir}/dpo")]


def onpolicy_branch(args, heldout: dict, base: str, sft_dir: str) -> dict:
    """Make on-policy pairs from the SFT model and the base model, then DPO from SFT on them (if they fill a batch).
    Returns the branch's counts and, if DPO ran, its checkpoint."""
    onpolicy_dir = os.path.join(args.output_dir, "onpolicy")
    shutil.rmtree(onpolicy_dir, ignore_errors=True)  # a previous demo's branch (synth.py continues an output)
    os.makedirs(onpolicy_dir)
    measured = {row["messages"][-1]["content"] for row in heldout["rlvr"]}
    prompts = [row for row in load_jsonl(os.path.join(DATA_DIR, "rlvr_heldout.jsonl"))
               if row["messages"][-1]["content"] not in measured][:scaled(ONPOLICY_PROMPTS, args.scale, 4)]
    with open(os.path.join(onpolicy_dir, "prompts.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in prompts)
    run_stage("[on-policy] pairs: SFT vs base completions, judged by the verifier",
              synth_command(args, sft_dir, base, onpolicy_dir), onpolicy_dir)
    pairs = len(load_jsonl(os.path.join(onpolicy_dir, "preferences.jsonl")))
    branch = {"prompts": len(prompts), "pairs": pairs, "checkpoint": None}
    if pairs >= ONPOLICY_BATCH:
        branch["checkpoint"] = os.path.join(onpolicy_dir, "dpo")
        run_stage(f"[on-policy] DPO on {pairs} pairs: {shown_path(sft_dir)} -> {shown_path(branch['checkpoint'])}",
                  onpolicy_dpo_command(args, sft_dir, onpolicy_dir), branch["checkpoint"])
    return branch


def run_stage(name: str, command: list[str], stage_dir: str) -> None:
    """Run one stage with its output streaming through (its own progress bars).

    The stages refuse an output directory that holds another run, so a previous demo run of this
    stage (recognized by the run_config.json the stages write) is removed first.
    """
    if os.path.exists(os.path.join(stage_dir, "run_config.json")):
        print(f"replacing the previous demo run in {stage_dir}")
        shutil.rmtree(stage_dir)
    print(f"\n=== {name}\n$ {' '.join(command)}\n", flush=True)
    completed = subprocess.run(command, cwd=ROOT)
    if completed.returncode != 0:
        raise SystemExit(f"{name} failed with exit code {completed.returncode}; the command is printed above")


def clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its finished stages). On a shared machine the
    wall time depends on the neighbours; the CPU time is what the run itself cost."""
    own, stages = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.time(), own.ru_utime + own.ru_stime + stages.ru_utime + stages.ru_stime


def since(start: tuple[float, float]) -> tuple[float, float]:
    return tuple(now - then for now, then in zip(clock(), start))


# ----------------------------------------------------------------------------------------------
# Held-out measurements of one checkpoint


def load_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def balanced_head(rows: list[dict], count: int, key) -> list[dict]:
    """The first `count` rows, taking the task families in turn so both are represented."""
    families = {}
    for row in rows:
        families.setdefault(key(row), []).append(row)
    picked = []
    while len(picked) < min(count, len(rows)):
        for family in families.values():
            if family and len(picked) < count:
                picked.append(family.pop(0))
    return picked


def family_of(row: dict) -> str:
    """gsm8k or ifeval, for any demo record (RLVR rows carry it; the others are told by their answer)."""
    if "dataset" in row:
        return row["dataset"]
    answer = (row.get("messages") or row["chosen"])[-1]["content"]
    return "gsm8k" if answer.endswith(".") and "The answer is" in answer else "ifeval"


@torch.no_grad()
def verifiable_accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int, desc: str) -> dict:
    """Greedy answers to the held-out RLVR prompts, scored by verifiers.verify (mean, per family)."""
    scores, predictions = [], []
    for start in tqdm(range(0, len(rows), 16), desc=desc, unit="batch"):
        batch = rows[start:start + 16]
        prompts = [tokenize_prompt(tokenizer, row["messages"]) for row in batch]
        completions = decoding.complete(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
        for row, response in zip(batch, (completion.text for completion in completions)):
            score = verify(response, row["ground_truth"], row["dataset"])
            scores.append((row["dataset"], score))
            predictions.append({"prompt": row["messages"][-1]["content"], "response": response,
                                "ground_truth": row["ground_truth"], "dataset": row["dataset"], "score": score})
    result = {"accuracy": sum(s for _, s in scores) / len(scores)}
    for family in sorted({f for f, _ in scores}):
        family_scores = [s for f, s in scores if f == family]
        result[f"accuracy/{family}"] = sum(family_scores) / len(family_scores)
    return result | {"predictions": predictions}


def response_logps(model, tokenizer, conversations: list[list[dict]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob and token count of the final assistant turn of each conversation."""
    examples = [tokenize_sft(tokenizer, messages, 512, last_turn_only=True) for messages in conversations]
    batch = {k: v.to(device) for k, v in collate_padded(examples, tokenizer.pad_token_id).items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]  # token t is predicted by position t - 1
    mask = labels != IGNORE_INDEX
    logps = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, T-1]
    return (logps * mask).sum(dim=1), mask.sum(dim=1)


@torch.no_grad()
def heldout_sft_loss(model, tokenizer, rows: list[dict], device) -> float:
    """Token-mean cross-entropy over every assistant token of the held-out conversations."""
    total_logp, total_tokens = 0.0, 0
    for start in range(0, len(rows), 8):
        logps, counts = response_logps(model, tokenizer, [r["messages"] for r in rows[start:start + 8]], device)
        total_logp, total_tokens = total_logp + logps.sum().item(), total_tokens + counts.sum().item()
    return -total_logp / total_tokens


@torch.no_grad()
def heldout_preference_accuracy(model, tokenizer, rows: list[dict], device) -> float:
    """Share of pairs where mean log-prob per token of chosen > rejected (no reference model needed)."""
    wins = 0
    for start in range(0, len(rows), 8):
        batch = rows[start:start + 8]
        chosen, chosen_n = response_logps(model, tokenizer, [r["chosen"] for r in batch], device)
        rejected, rejected_n = response_logps(model, tokenizer, [r["rejected"] for r in batch], device)
        wins += (chosen / chosen_n > rejected / rejected_n).sum().item()
    return wins / len(rows)


def measure(checkpoint: str, heldout: dict, args, device, name: str) -> dict:
    """All held-out figures for one checkpoint; the greedy answers go to <output_dir>/predictions_<name>.jsonl."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(device).eval()
    figures = verifiable_accuracy(model, tokenizer, heldout["rlvr"], args.max_new_tokens, f"eval {name}")
    with open(os.path.join(args.output_dir, f"predictions_{name}.jsonl"), "w") as out:
        for prediction in figures.pop("predictions"):
            out.write(json.dumps(prediction) + "\n")
    figures["sft_loss"] = heldout_sft_loss(model, tokenizer, heldout["sft"], device)
    figures["preference_accuracy"] = heldout_preference_accuracy(model, tokenizer, heldout["pref"], device)
    print(f"[{name}] " + "  ".join(f"{k} {v:.3f}" for k, v in figures.items()), flush=True)
    return figures


# ----------------------------------------------------------------------------------------------
# Report: the training curves each stage logged, and the held-out table


def read_metrics(output_dir: str) -> list[dict]:
    path = os.path.join(output_dir, "metrics.jsonl")
    return load_jsonl(path) if os.path.exists(path) else []


def first_last(records: list[dict], key: str) -> tuple | None:
    """Mean of `key` over the first and over the last fifth of the logged steps (at least one step
    each): single steps of a tiny batch are too noisy to compare."""
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    if not values:
        return None
    window = max(1, len(values) // 5)
    return sum(values[:window]) / window, sum(values[-window:]) / window


def plot_curves(records: list[dict], keys: list[str], title: str, path: str) -> bool:
    """One panel per logged key against the step; False if none of the keys was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in records)]
    if not keys:
        return False
    figure, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for axis, key in zip(axes[0], keys):
        points = [(r.get("step", i), r[key]) for i, r in enumerate(records) if isinstance(r.get(key), (int, float))]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        axis.set_title(key)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


# (stage, metric keys to summarize as first -> last, keys to plot)
CURVES = [
    ("sft", ["loss"], ["loss", "lr", "grad_norm"]),
    ("dpo", ["loss", "rewards/accuracy", "rewards/margin", "logps/chosen", "logps/rejected"],
     ["loss", "rewards/accuracy", "rewards/margin", "logps/chosen", "logps/rejected"]),
    ("rlvr", ["reward_mean", "accuracy/gsm8k", "accuracy/ifeval", "kl3", "response_length"],
     ["reward_mean", "accuracy/gsm8k", "accuracy/ifeval", "kl3", "response_length"]),
]
HELDOUT_COLUMNS = [("accuracy", "verifiable accuracy"), ("accuracy/gsm8k", "arithmetic"),
                   ("accuracy/ifeval", "IFEval constraints"), ("sft_loss", "SFT loss"),
                   ("preference_accuracy", "preference accuracy")]


def write_report(args, heldout_figures: dict, timings: dict, heldout_sizes: dict, onpolicy: dict) -> str:
    lines = ["# Tülu 3 recipe demo: SFT -> DPO -> RLVR", "",
             f"Model `{shown_path(args.model_name_or_path)}`, scale {args.scale}, seed {args.seed}, "
             f"device {device_name()}. Wall (CPU) minutes: "
             + ", ".join(f"{k} {wall / 60:.1f} ({cpu / 60:.1f})" for k, (wall, cpu) in timings.items()) + ".", "",
             "## Held-out figures after each stage", "",
             f"Greedy decoding, {heldout_sizes['rlvr']} RLVR prompts (verifiable accuracy), "
             f"{heldout_sizes['sft']} SFT conversations (loss), {heldout_sizes['pref']} preference pairs "
             "(chosen more likely than rejected, per-token log-prob).", "",
             "| checkpoint | " + " | ".join(label for _, label in HELDOUT_COLUMNS) + " |",
             "|---" * (len(HELDOUT_COLUMNS) + 1) + "|"]
    for name, figures in heldout_figures.items():
        lines.append(f"| {name} | " + " | ".join(f"{figures[k]:.3f}" if k in figures else "-"
                                                  for k, _ in HELDOUT_COLUMNS) + " |")
    lines += ["", f"On-policy branch: {onpolicy['pairs']} pairs from {onpolicy['prompts']} held-out RLVR prompts "
              "(the SFT model's and the base model's completions at T 1, rated by the verifier; `synth.py "
              "preferences --judge verifier`), " + (
                  f"then DPO from SFT on them ({ONPOLICY_BATCH} pairs per step): the row \"after on-policy DPO\"."
                  if onpolicy["checkpoint"] else f"too few for one DPO batch of {ONPOLICY_BATCH}: no DPO run.")]
    lines += ["", "## Training curves (first -> last fifth of the logged steps)", "",
              "| stage | metric | first | last |", "|---|---|---|---|"]
    plots = []
    for stage, summary_keys, plot_keys in CURVES:
        records = read_metrics(os.path.join(args.output_dir, stage))
        for key in summary_keys:
            values = first_last(records, key)
            if values:
                lines.append(f"| {stage} | {key} | {values[0]:.4f} | {values[1]:.4f} |")
        if plot_curves(records, plot_keys, f"{stage} ({len(records)} logged steps)",
                       os.path.join(args.output_dir, f"{stage}_curves.png")):
            plots.append(f"![{stage} curves]({stage}_curves.png)")
    lines += [""] + plots
    report = "\n".join(lines) + "\n"
    with open(os.path.join(args.output_dir, "report.md"), "w") as out:
        out.write(report)
    return report


def shown_path(path: str) -> str:
    """An absolute path inside the repository relative to its root (where the stages run), so
    commands and reports read the same on every machine; any other path or hub name as given."""
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, torch threads: {torch.get_num_threads()})"


# ----------------------------------------------------------------------------------------------
# The run


def main(argv=None) -> None:
    args = parse_args(argv)
    args.output_dir = os.path.abspath(args.output_dir)  # the stages run in the repository root
    if os.path.exists(args.model_name_or_path):
        args.model_name_or_path = os.path.abspath(args.model_name_or_path)
    bundled_weights = os.path.join(BUNDLED_MODEL, "model.safetensors")
    if args.model_name_or_path == BUNDLED_MODEL and not os.path.exists(bundled_weights):
        subprocess.run([sys.executable, os.path.join(ROOT, "data", "fetch_offline.py")], check=True)
    os.makedirs(args.output_dir, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    eval_rows = scaled(args.eval_examples, args.scale, 2)
    heldout = {"rlvr": balanced_head(load_jsonl(os.path.join(DATA_DIR, "rlvr_heldout.jsonl")), eval_rows, family_of),
               "sft": balanced_head(load_jsonl(os.path.join(DATA_DIR, "sft_heldout.jsonl")), eval_rows, family_of),
               "pref": balanced_head(load_jsonl(os.path.join(DATA_DIR, "pref_heldout.jsonl")), eval_rows, family_of)}
    stages = [("sft", sft_command), ("dpo", dpo_command), ("rlvr", rlvr_command)]
    start = clock()
    timings = {}
    figures = {"base": measure(args.model_name_or_path, heldout, args, device, "base")}
    timings["base eval"] = since(start)
    checkpoint = args.model_name_or_path
    for number, (stage, command) in enumerate(stages, start=1):
        stage_dir = os.path.join(args.output_dir, stage)
        stage_start = clock()
        run_stage(f"[{number}/{len(stages)}] {stage.upper()}: {shown_path(checkpoint)} -> {shown_path(stage_dir)}",
                  command(args, checkpoint, stage_dir), stage_dir)
        timings[stage] = since(stage_start)
        checkpoint = stage_dir
        eval_start = clock()
        figures[f"after {stage.upper()}"] = measure(checkpoint, heldout, args, device, stage)
        timings[f"{stage} eval"] = since(eval_start)
        if stage == "sft":  # the on-policy branch starts from this checkpoint
            branch_start = clock()
            onpolicy = onpolicy_branch(args, heldout, args.model_name_or_path, checkpoint)
            if onpolicy["checkpoint"]:
                figures["after on-policy DPO"] = measure(onpolicy["checkpoint"], heldout, args, device, "onpolicy")
            timings["on-policy branch"] = since(branch_start)
    timings["total"] = since(start)
    print("\n" + write_report(args, figures, timings, {k: len(v) for k, v in heldout.items()}, onpolicy))
    print(f"report: {os.path.join(args.output_dir, 'report.md')}")


if __name__ == "__main__":
    main()
