"""Each stage's docstring examples (its `python ...` commands, the ones a newcomer runs first on a CPU) use flags the
stage accepts and run a bounded number of steps or examples, so they finish in minutes; none is run here."""
import shlex

import pytest

import dpo
import eval as evaluation
import rlvr
import sft


def python_examples(module) -> list[list[str]]:
    """The argv (after the script) of every `python <script>.py ...` command in the module's docstring."""
    commands, lines = [], iter(module.__doc__.splitlines())
    for line in lines:
        if not line.strip().startswith("python "):
            continue
        while line.rstrip().endswith("\\"):
            line = line.rstrip()[:-1] + " " + next(lines).strip()
        commands.append(shlex.split(line)[2:])
    return commands


@pytest.mark.parametrize("module", [sft, dpo])
def test_training_examples_stop_after_a_few_optimizer_steps(module):
    examples = python_examples(module)
    assert examples, f"{module.__name__}.py's docstring has no python example"
    for argv in examples:
        assert 0 < module.parse_args(argv).max_train_steps <= 20, argv


def test_rlvr_examples_run_grpo_and_ppo_for_a_few_steps():
    examples = [rlvr.parse_args(argv) for argv in python_examples(rlvr)]
    assert {args.algo for args in examples} == {"grpo", "ppo"}
    for args in examples:
        steps = args.total_episodes // (args.num_unique_prompts_rollout * args.num_samples_per_prompt_rollout)
        assert 0 < steps <= 5, (args.algo, steps)
        assert args.max_seq_length <= 512  # the sampler's KV cache is rows x max_seq_length


def test_eval_example_scores_a_few_examples_of_tasks_with_offline_data():
    (argv,) = python_examples(evaluation)
    args = evaluation.parse_args(argv)
    assert args.limit is not None and args.limit <= 20


PROJECT_MODULES = ("infra", "checkpoint", "modeling", "decoding", "data_mix", "benchmarks", "flags", "verifiers",
                   "sandbox", "eval_metrics", "chat_models", "sft", "dpo", "rlvr", "synth")


def test_every_project_name_the_docs_and_gpu_script_use_exists():
    """`module.name` in README.md, docs/ and bench/'s shell scripts (which no test runs) names something that
    module has: code moved between modules leaves no stale pointer. A name followed by "at <commit>" is history."""
    import glob
    import importlib
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    reference = re.compile(r"(?<![\w/.-])(%s)\.([A-Za-z_]\w*)\b(?!`? at [0-9a-f]{7})" % "|".join(PROJECT_MODULES))
    files = [os.path.join(root, "README.md"), *glob.glob(os.path.join(root, "docs", "*.md")),
             *glob.glob(os.path.join(root, "bench", "*.sh"))]
    missing = []
    for path in files:
        with open(path) as f:
            for number, line in enumerate(f, start=1):
                for module, name in reference.findall(line):
                    if name not in ("py", "md", "json", "jsonl") and not hasattr(importlib.import_module(module), name):
                        missing.append(f"{os.path.relpath(path, root)}:{number}: {module}.{name}")
    assert not missing
