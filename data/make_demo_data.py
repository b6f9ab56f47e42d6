"""Write the demo's bundled data: easy verifiable tasks in the three Tülu 3 formats, with held-out splits.

    python data/make_demo_data.py              # rewrites data/demo/*.jsonl (deterministic for a seed)

Two task families, both checkable by `verifiers.verify`, both easy enough that a 135M instruct model
can visibly move on them in a few minutes of CPU training:

- arithmetic word problems (dataset "gsm8k"): one or two additions/subtractions of small numbers,
  answered with a line of working that ends in "The answer is N.";
- instruction following (dataset "ifeval"): a one-sentence answer about a topic under one IFEval
  constraint (lowercase, no commas, end phrase, double quotes, JSON, word limit, "My answer is yes.").

Files (chosen/rejected differ only in the final assistant turn; every prompt in a held-out file is
absent from every train file):

    sft_train.jsonl    sft_heldout.jsonl    {"id", "messages", "source"}
    pref_train.jsonl   pref_heldout.jsonl   {"id", "prompt", "chosen", "rejected"}
    rlvr_train.jsonl   rlvr_heldout.jsonl   {"messages", "ground_truth", "dataset"}

A preference pair's rejected answer has a wrong number (with matching wrong working) or breaks the
constraint. IFEval ground truth is the IFEval-format JSON string {"instruction_id_list", "kwargs"}.
"""
import argparse
import json
import os
import random
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# How many distinct prompts each file gets, per task family (arithmetic, instruction following).
SPLIT_SIZES = {
    "sft_train": (240, 160), "sft_heldout": (25, 25),
    "pref_train": (180, 120), "pref_heldout": (25, 25),
    "rlvr_train": (120, 120), "rlvr_heldout": (30, 30),
}

# ----------------------------------------------------------------------------------------------
# Arithmetic word problems

NAMES = ["Tom", "Anna", "Ben", "Mia", "Sam", "Lucy", "Omar", "Nina", "Leo", "Zoe", "Ravi", "Emma",
         "Jack", "Sara", "Ken", "Lily", "Hugo", "Ada", "Max", "Ivy"]
ITEMS = ["apples", "pencils", "marbles", "stickers", "books", "cookies", "coins", "shells", "cards",
         "balloons", "stamps", "flowers", "eggs", "toy cars", "oranges"]


def arithmetic_problem(rng: random.Random) -> dict:
    """One word problem: the prompt, its steps [(left, op, right)], the answer, and a wrong answer's error."""
    name, friend = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    kind = rng.choice(["add", "subtract", "together", "add_then_subtract"])
    if kind == "add":
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        prompt = f"{name} has {a} {item}. {friend} gives {name} {b} more {item}. How many {item} does {name} have now?"
        steps = [(a, "+", b)]
    elif kind == "subtract":
        a = rng.randint(5, 25)
        b = rng.randint(1, a - 1)
        prompt = f"{name} has {a} {item} and gives {b} of them to {friend}. How many {item} does {name} have left?"
        steps = [(a, "-", b)]
    elif kind == "together":
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        prompt = f"{name} has {a} {item} and {friend} has {b} {item}. How many {item} do they have together?"
        steps = [(a, "+", b)]
    else:
        a, b = rng.randint(2, 15), rng.randint(2, 15)
        c = rng.randint(1, a + b - 1)
        prompt = (f"{name} has {a} {item}, buys {b} more, and then gives {c} to {friend}. "
                  f"How many {item} does {name} have now?")
        steps = [(a, "+", b), (a + b, "-", c)]
    answer = a + b if kind != "subtract" else a - b
    if kind == "add_then_subtract":
        answer -= c
    # the rejected answer is 1 to 3 away from the right one, never equal to it
    return {"prompt": prompt, "steps": steps, "answer": answer, "error": rng.choice([-3, -2, -1, 1, 2, 3])}


def arithmetic_solution(steps: list, error: int = 0) -> str:
    """The working, one equation per step, then "The answer is N.". A nonzero `error` makes the
    last equation wrong by that much, and the final answer follows it (a consistent wrong answer)."""
    lines, value = [], None
    for index, (left, op, right) in enumerate(steps):
        left = left if value is None else value  # a later step starts from the previous result
        value = left + right if op == "+" else left - right
        if index == len(steps) - 1:
            value += error
        lines.append(f"{'Then ' if index > 0 else ''}{left} {op} {right} = {value}.")
    return " ".join(lines) + f" The answer is {value}."


# ----------------------------------------------------------------------------------------------
# Instruction following: a short fact about a topic under one IFEval constraint

# (topic, a one-sentence fact, a second sentence used to make over-long answers)
TOPICS = [
    ("the sun", "The sun is a star, and it gives Earth light and heat.", "It is very far away from us."),
    ("the moon", "The moon moves around Earth about once a month.", "It has no air and no rain."),
    ("bees", "Bees collect nectar from flowers, and they turn it into honey.", "They live together in hives."),
    ("rain", "Rain falls when water in the clouds gets too heavy.", "It helps plants and trees grow."),
    ("cats", "Cats are small animals that like to sleep in warm places.", "Many people keep them as pets."),
    ("dogs", "Dogs are friendly animals, and many of them love to play fetch.", "They can learn simple commands."),
    ("trees", "Trees make oxygen, and they give shade on hot days.", "Some trees live for hundreds of years."),
    ("the ocean", "The ocean covers most of the surface of Earth.", "It is home to whales and fish."),
    ("snow", "Snow forms when water freezes high in cold clouds.", "Each snowflake has six sides."),
    ("bread", "Bread is made from flour, water, salt, and yeast.", "It is baked in a hot oven."),
    ("bicycles", "A bicycle has two wheels, and you move it by pushing the pedals.", "Riding one is good exercise."),
    ("the library", "A library lends books to people for free.", "It is a quiet place to read."),
    ("water", "Water boils at one hundred degrees Celsius at sea level.", "It freezes at zero degrees."),
    ("birds", "Birds have feathers, and most of them can fly.", "Many birds build nests in spring."),
    ("the wind", "Wind is air that moves from one place to another.", "It can turn the blades of a windmill."),
    ("apples", "Apples grow on trees, and they can be red, green, or yellow.", "They are a healthy snack."),
    ("the piano", "A piano makes sound when small hammers hit its strings.", "It has black and white keys."),
    ("frogs", "Frogs start life as tadpoles that live in water.", "Adult frogs can jump very far."),
    ("mountains", "Mountains are tall, and their tops are often cold.", "Some are covered with snow all year."),
    ("the train", "A train runs on rails, and it can carry many people at once.", "Some trains are very fast."),
    ("coffee", "Coffee is a drink made from roasted beans.", "Many people drink it in the morning."),
    ("the garden", "A garden needs sunlight, water, and good soil to grow plants.", "People grow flowers and vegetables there."),
    ("clocks", "A clock shows the time with hands or with numbers.", "Most clocks have twelve hours on the face."),
    ("sleep", "Sleep helps the body rest and the mind stay sharp.", "Adults need about eight hours each night."),
    ("fish", "Fish breathe underwater through their gills.", "They use their fins to swim."),
    ("the desert", "A desert gets very little rain, and it can be very hot.", "Camels can live there for days without water."),
    ("honey", "Honey is sweet, and it can last for a very long time.", "Bees make it from nectar."),
    ("the park", "A park is a green place where people walk and play.", "Many parks have benches and ponds."),
    ("stars", "Stars are huge balls of hot gas far out in space.", "We see them best on clear nights."),
    ("music", "Music uses rhythm, melody, and harmony.", "People play it on many instruments."),
    ("milk", "Milk is a white drink that has calcium for strong bones.", "It comes from cows and goats."),
    ("the river", "A river carries fresh water from the hills to the sea.", "Many towns are built near rivers."),
    ("elephants", "Elephants are the largest animals that live on land.", "They use their trunks to drink."),
    ("the kitchen", "A kitchen is the room where people cook food.", "It often has a stove and a sink."),
    ("paper", "Paper is made from wood pulp, and it is used for writing.", "It can be recycled many times."),
    ("the bus", "A bus carries many people along a fixed route.", "It stops at many bus stops."),
    ("tomatoes", "Tomatoes are red fruits, and people often use them in salads.", "They grow well in warm weather."),
    ("the farm", "A farm grows crops, and it often keeps animals like cows.", "Farmers wake up early."),
    ("winter", "Winter is the coldest season of the year.", "The days are short and the nights are long."),
    ("the beach", "A beach is a strip of sand next to the sea.", "People swim and build sandcastles there."),
]
ASKS = ["Write one sentence about {topic}.", "Tell me a fact about {topic}.", "Describe {topic} in one sentence."]
END_PHRASES = ["Is there anything else I can help with?", "That is all.", "Hope this helps."]

# (yes/no question, the true answer)
YES_NO = [
    ("Is the sun a star?", "yes"), ("Do fish live in water?", "yes"), ("Is ice cold?", "yes"),
    ("Can a cat fly?", "no"), ("Is the moon made of cheese?", "no"), ("Do bees make honey?", "yes"),
    ("Is snow hot?", "no"), ("Do trees have leaves?", "yes"), ("Is two bigger than five?", "no"),
    ("Can birds lay eggs?", "yes"), ("Is the ocean salty?", "yes"), ("Do dogs have wings?", "no"),
    ("Is a week seven days long?", "yes"), ("Can people breathe under water without help?", "no"),
    ("Is grass usually green?", "yes"), ("Is ten less than three?", "no"), ("Do plants need water?", "yes"),
    ("Is a circle square?", "no"), ("Does the sun rise in the east?", "yes"), ("Can an elephant fit in a cup?", "no"),
    ("Is milk white?", "yes"), ("Do frogs have fur?", "no"), ("Is winter the coldest season?", "yes"),
    ("Are there twelve months in a year?", "yes"), ("Is a desert very wet?", "no"),
]
CHOICES = "Answer with one of the following options: ('My answer is yes.', 'My answer is no.', 'My answer is maybe.')"


def count_words(text: str) -> int:
    return len(re.findall(r"\w+", text))


def constrained_task(rng: random.Random) -> dict:
    """One instruction-following task: prompt, IFEval instruction, a following and a breaking answer."""
    constraint = rng.choice(["lowercase", "no_comma", "end_phrase", "quotation", "json", "word_limit", "yes_no"])
    if constraint == "yes_no":
        question, answer = rng.choice(YES_NO)
        return {"prompt": f"{question} {CHOICES}", "instruction": "detectable_format:constrained_response",
                "kwargs": {}, "chosen": f"My answer is {answer}.",
                "rejected": f"{answer.capitalize()}, I think so." if answer == "yes" else "No, not at all."}
    topic, fact, more = rng.choice(TOPICS)
    ask = rng.choice(ASKS).format(topic=topic)
    if constraint == "lowercase":
        return {"prompt": f"{ask} Your entire response should be in English, and in all lowercase letters.",
                "instruction": "change_case:english_lowercase", "kwargs": {},
                "chosen": fact.lower(), "rejected": fact}
    if constraint == "no_comma":
        with_comma = fact if "," in fact else f"Well, {fact[0].lower()}{fact[1:]}"
        return {"prompt": f"{ask} Do not use any commas in your response.", "instruction": "punctuation:no_comma",
                "kwargs": {}, "chosen": fact.replace(",", ""), "rejected": with_comma}
    if constraint == "end_phrase":
        phrase = rng.choice(END_PHRASES)
        return {"prompt": f'{ask} Finish your response with this exact phrase "{phrase}". No other words should follow it.',
                "instruction": "startend:end_checker", "kwargs": {"end_phrase": phrase},
                "chosen": f"{fact} {phrase}", "rejected": f"{phrase} {fact}"}
    if constraint == "quotation":
        return {"prompt": f"{ask} Wrap your entire response with double quotation marks.",
                "instruction": "startend:quotation", "kwargs": {}, "chosen": f'"{fact}"', "rejected": fact}
    if constraint == "json":
        return {"prompt": f"{ask} Your entire output should be wrapped in JSON format.",
                "instruction": "detectable_format:json_format", "kwargs": {},
                "chosen": json.dumps({"fact": fact}), "rejected": f"fact: {fact}"}
    # word_limit: the fact alone fits under the limit, the fact plus the extra sentence does not
    limit = count_words(fact) + rng.randint(1, min(3, count_words(more)))
    return {"prompt": f"{ask} Answer with less than {limit} words.", "instruction": "length_constraints:number_words",
            "kwargs": {"num_words": limit, "relation": "less than"}, "chosen": fact, "rejected": f"{fact} {more}"}


# ----------------------------------------------------------------------------------------------
# Records in the three Tülu formats


def task_pool(make, count: int, rng: random.Random) -> list:
    """`count` tasks with distinct prompts (the split into files is by prompt, so none leaks)."""
    tasks, seen = [], set()
    for _ in range(count * 200):
        task = make(rng)
        if task["prompt"] not in seen:
            seen.add(task["prompt"])
            tasks.append(task)
            if len(tasks) == count:
                return tasks
    raise SystemExit(f"could only make {len(tasks)} distinct {make.__name__} prompts, {count} needed")


def as_common(task: dict, family: str) -> dict:
    """Both families in one shape: prompt, chosen/rejected answers, verifier ground truth, dataset."""
    if family == "arithmetic":
        return {"prompt": task["prompt"], "chosen": arithmetic_solution(task["steps"]),
                "rejected": arithmetic_solution(task["steps"], error=task["error"]),
                "ground_truth": str(task["answer"]), "dataset": "gsm8k"}
    ground_truth = json.dumps({"instruction_id_list": [task["instruction"]], "kwargs": [task["kwargs"]]})
    return {"prompt": task["prompt"], "chosen": task["chosen"], "rejected": task["rejected"],
            "ground_truth": ground_truth, "dataset": "ifeval"}


def to_record(split: str, index: int, item: dict) -> dict:
    user = [{"role": "user", "content": item["prompt"]}]
    if split.startswith("sft"):
        return {"id": f"demo_{split}_{index}", "messages": user + [{"role": "assistant", "content": item["chosen"]}],
                "source": f"demo_{item['dataset']}"}
    if split.startswith("pref"):
        return {"id": f"demo_{split}_{index}", "prompt": item["prompt"],
                "chosen": user + [{"role": "assistant", "content": item["chosen"]}],
                "rejected": user + [{"role": "assistant", "content": item["rejected"]}]}
    return {"messages": user, "ground_truth": item["ground_truth"], "dataset": item["dataset"]}


def make_splits(seed: int) -> dict:
    """{split name: common items}; each prompt lands in exactly one split."""
    rng = random.Random(seed)
    math_tasks = task_pool(arithmetic_problem, sum(sizes[0] for sizes in SPLIT_SIZES.values()), rng)
    if_tasks = task_pool(constrained_task, sum(sizes[1] for sizes in SPLIT_SIZES.values()), rng)
    splits = {}
    for split, (n_math, n_if) in SPLIT_SIZES.items():
        items = [as_common(math_tasks.pop(), "arithmetic") for _ in range(n_math)]
        items += [as_common(if_tasks.pop(), "ifeval") for _ in range(n_if)]
        rng.shuffle(items)
        splits[split] = items
    return splits


def check_answers(splits: dict) -> None:
    """Every chosen answer must pass its verifier and every rejected one must fail: the data teaches
    exactly what the reward measures."""
    sys.path.insert(0, ROOT)
    import verifiers

    for split, items in splits.items():
        for item in items:
            chosen = verifiers.verify(item["chosen"], item["ground_truth"], item["dataset"])
            rejected = verifiers.verify(item["rejected"], item["ground_truth"], item["dataset"])
            if chosen != 1.0 or rejected != 0.0:
                raise SystemExit(f"{split}: the chosen answer must verify and the rejected one must not: "
                                 f"{item['chosen']!r} -> {chosen}, {item['rejected']!r} -> {rejected} "
                                 f"(ground truth {item['ground_truth']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "data", "demo"))
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    splits = make_splits(args.seed)
    check_answers(splits)
    os.makedirs(args.output_dir, exist_ok=True)
    for split, items in splits.items():
        with open(os.path.join(args.output_dir, f"{split}.jsonl"), "w") as out:
            for index, item in enumerate(items):
                out.write(json.dumps(to_record(split, index, item)) + "\n")
        print(f"{split}: {len(items)} rows")


if __name__ == "__main__":
    main()
