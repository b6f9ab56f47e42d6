"""The learning-rate schedule is transformers' get_scheduler's (open-instruct's), factor for factor at every step."""
import pytest
import torch

import infra


def factors(scheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("kind", infra.LR_SCHEDULES)
@pytest.mark.parametrize("warmup_steps, total_steps", [(0, 10), (3, 10), (1, 1), (5, 5), (2, 7)])
def test_each_schedule_matches_transformers_get_scheduler_at_every_step(kind, warmup_steps, total_steps):
    from transformers import get_scheduler

    ours = infra.make_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), kind, warmup_steps,
                                total_steps)
    theirs = get_scheduler(kind, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                           num_warmup_steps=warmup_steps, num_training_steps=total_steps)
    assert factors(ours, total_steps + 2) == pytest.approx(factors(theirs, total_steps + 2), abs=1e-12)


def test_warmup_starts_at_zero_and_reaches_the_peak_at_step_w():
    scheduler = infra.make_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), "linear", 4, 12)
    assert factors(scheduler, 6) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 0.875])
