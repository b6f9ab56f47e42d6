"""eval.py's results: OUTPUT_DIR/results.json maps model -> task -> entry, each entry with the settings it was
computed with, and predictions/<model>/<task>.jsonl holds its records. A task is written as soon as it is done
(predictions first, each file replaced atomically); a rerun skips what results.json holds; a table never mixes
numbers computed under different settings. Runtime only: a reader learning the evaluation may skip this file.
"""
import fcntl
import json
import os

import infra


def read_results(output_dir: str) -> dict:
    path = os.path.join(output_dir, "results.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def settings_clash(results: dict, task: str, settings: dict, names=()) -> list[str]:
    """For each model column (but `names`) holding `task` under other settings: a line naming what differs."""
    clashes = []
    for name, tasks in results.items():
        held = tasks.get(task, {}).get("settings")
        if name not in names and held is not None and held != settings:
            differ = ", ".join(f"{key} {held.get(key)!r} there, {settings.get(key)!r} now"
                               for key in sorted(set(held) | set(settings)) if held.get(key) != settings.get(key))
            clashes.append(f"{task} of {name}: {differ}")
    return clashes


def model_names(paths: list[str], results: dict) -> list[str]:
    """Short, distinct column names: a model results.json has already keeps its column; a new one gets the
    directory's last component, numbered if that column is taken."""
    owners = {entry["model"]: name for name, tasks in results.items() for entry in tasks.values()}
    names = []
    for path in paths:
        name = owners.get(path)
        if name is None or name in names:  # a new model, or the same one named twice
            base = name = os.path.basename(os.path.normpath(path)) or path
            number = 1
            while name in names or name in results:
                number += 1
                name = f"{base}-{number}"
        names.append(name)
    return names


def plan_run(output_dir: str, paths: list[str], settings: dict, overwrite: bool) -> tuple[list[str], set, str | None]:
    """Rank 0: the model columns, the (model, task) pairs to evaluate, or the error that stops the run. `settings`:
    {task: its settings}; overwrite (--overwrite): evaluate again, discarding results under other settings."""
    results = read_results(output_dir)
    names = model_names(paths, results)
    clashes = [line for task in settings for line in settings_clash(results, task, settings[task])]
    if clashes and not overwrite:
        return names, set(), "\n".join(
            [f"{output_dir}/results.json holds results computed with other settings:"] + clashes +
            ["Use another --output_dir, or --overwrite to discard those results."])
    if clashes:  # discard them now, so that the file never holds a task under two settings
        for name, tasks in results.items():
            for task in [t for t in settings if settings_clash({name: tasks}, t, settings[t])]:
                del tasks[task]
                prediction = os.path.join(output_dir, "predictions", name, f"{task}.jsonl")
                if os.path.exists(prediction):
                    os.remove(prediction)
        infra.write_durably(os.path.join(output_dir, "results.json"), json.dumps(results, indent=2))
        print(f"--overwrite: discarded {len(clashes)} results computed with other settings", flush=True)
    done = {(name, task) for name in names for task in settings if task in results.get(name, {})}
    if done and not overwrite:
        print(f"{len(done)} results already in {output_dir}/results.json with the same settings are kept, "
              f"not evaluated again (--overwrite evaluates them again)", flush=True)
    return names, {(name, task) for name in names for task in settings} - (set() if overwrite else done), None


def save_result(output_dir: str, name: str, task: str, entry: dict, records: list[dict]) -> None:
    """The predictions, then the result, each replaced atomically, so a result always has its predictions and an
    interruption loses at most the task in progress. results.json is re-read under a lock: another run writing
    to the same directory adds its columns instead of overwriting them."""
    predictions = os.path.join(output_dir, "predictions", name, f"{task}.jsonl")
    os.makedirs(os.path.dirname(predictions), exist_ok=True)
    infra.write_durably(predictions, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    with open(os.path.join(output_dir, ".results.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = read_results(output_dir)
        clashes = settings_clash(results, task, entry["settings"], names=(name,))
        if clashes:  # another run wrote this task under other settings meanwhile
            raise SystemExit(f"{output_dir}/results.json: not saving {task} of {name}: " + "; ".join(clashes))
        results.setdefault(name, {})[task] = entry
        infra.write_durably(os.path.join(output_dir, "results.json"), json.dumps(results, indent=2))


def print_table(results: dict, names: list[str]) -> None:
    """One row per task metric, one column per model, so before/after stages compare at a glance."""
    rows = {}
    for name in names:
        for task, entry in results.get(name, {}).items():
            for metric in entry["metrics"]:
                rows.setdefault((task, metric), {})[name] = entry["metrics"][metric]
    width = max([len(f"{task} {metric}") for task, metric in rows] + [10])
    columns = [max(len(n), 7) for n in names]
    print(f"{'':{width}}  " + "  ".join(f"{n:>{w}}" for n, w in zip(names, columns)))
    for (task, metric), values in rows.items():
        cells = [f"{100 * values[n]:{w}.1f}" if n in values else f"{'-':>{w}}" for n, w in zip(names, columns)]
        print(f"{task + ' ' + metric:{width}}  " + "  ".join(cells))
