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
