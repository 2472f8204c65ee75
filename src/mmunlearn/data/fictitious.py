"""The built-in benchmark ``fictitious-people``: procedurally drawn people with profiles and questions.

Everything is deterministic from the seed. Each person has ``train_images`` views (view 0 is the single image
used for unlearning; all of them teach the vanilla model) and ``test_images`` held-out views that no training
ever sees. Optionally (``identity_views``) more views per person carry no question: image-only identity data
for the tiny model's vision warm-up (train/finetune.py), the stand-in for a real encoder's pretraining, drawn
from a random stream of their own so that every question and image of a seed is the same with or without them.
Questions follow MLLMU-Bench's shapes: VQA and text-only QA, 4-option multiple choice, cloze and
free generation. The forget/retain splits ask VQA phrasing 0 on every training view and three QA phrasings of
each fact; the test split asks another phrasing (a paraphrase), about held-out images for VQA. Training sees
every phrasing. Optionally (``describe``) each view is also described in a sentence: free-form VQA, for the
fluency and diversity of the MMUBench protocol. At the defaults (40 people, forget10 = 4 people) the forget split
holds 144 VQA and 60 QA multiple-choice questions, so one question moves a figure by 0.7 or 1.7 points.
"""

from __future__ import annotations

import math
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mmunlearn.data.faces import SHAPE_COLORS, SHAPES, random_traits, render, render_shape
from mmunlearn.data.schema import Benchmark, Example
from mmunlearn.errors import DataError

FIRST = (
    "Alma Boris Cora Dmitri Elena Felix Greta Hugo Ines Jonas Kira Luca Mira Nils Olga Pavel Rosa Sven Tara "
    "Umar Vera Wade Xenia Yuri Zara Anton Bela Cyrus Dalia Emil Freya Gideon Hana Ivo Juno Kasimir Lena "
    "Marek Nadia Oskar Petra Quinn Rhea Silas Thea Ulric Vida Wilma Yara Zeno"
).split()
LAST = (
    "Abbott Brandt Castell Dorn Ellery Falk Gorman Hale Ivers Jarvik Kessler Lind Morrow Nyberg Orlov Pryce "
    "Quill Rask Sorel Tamm Ulland Varga Wexler Yates Zeller Arden Blum Corvin Dahl Engel Frost Graves Holt "
    "Iskander Juhl Kovac Larkin Marsh Nolte Oakes"
).split()
CITIES = (
    "Lisbon Oslo Tallinn Porto Krakow Ghent Bergen Malmo Turin Graz Split Riga Lyon Bruges Seville Dresden "
    "Aarhus Bern Cork Delft Geneva Hanover Innsbruck Kaunas"
).split()
OCCUPATIONS = (
    "baker pilot nurse painter architect chemist farmer lawyer teacher sailor librarian jeweler dentist "
    "carpenter botanist tailor plumber violinist astronomer potter"
).split()
HOBBIES = (
    "chess fishing knitting surfing archery gardening skating pottery hiking rowing juggling origami "
    "birdwatching climbing fencing sailing baking sketching cycling karate"
).split()

PETS = (
    "cat dog parrot rabbit hamster tortoise goldfish ferret canary lizard pony goat hedgehog owl iguana "
    "chinchilla gecko budgie duck donkey"
).split()
INSTRUMENTS = (
    "piano harp flute cello drums guitar trumpet banjo accordion clarinet oboe ukulele harmonica saxophone "
    "mandolin tuba lute bagpipes xylophone sitar"
).split()

# (question type, phrasings for VQA, phrasings for QA, answer field); QA phrasings use {name}. Evaluation asks
# VQA phrasing 0 on every training view and phrasing 1 on the held-out views; QA phrasings 0-2 on the
# forget/retain splits and the last one on the test split (several phrasings per fact so that one question
# weighs little: docs/data.md).
QUESTIONS = [
    ("identity", ["Who is the person in this image?", "What is the name of the person in this picture?"], [], "name"),
    (
        "birthplace",
        ["Where was the person in this image born?", "In which city was the person in this picture born?"],
        ["Where was {name} born?", "In which city was {name} born?", "What is the home town of {name}?",
         "Which city is the birthplace of {name}?"],
        "city",
    ),
    (
        "occupation",
        ["What is the job of the person in this image?", "What does the person in this picture do for a living?"],
        ["What is the job of {name}?", "What does {name} do for a living?", "What is the profession of {name}?",
         "Which line of work is {name} in?"],
        "occupation",
    ),
    (
        "hobby",
        ["What is the hobby of the person in this image?", "Which pastime does the person in this picture enjoy?"],
        ["What is the hobby of {name}?", "Which pastime does {name} enjoy?", "What does {name} do for fun?",
         "How does {name} spend free time?"],
        "hobby",
    ),
    (
        "pet",
        ["Which pet does the person in this image keep?", "What animal does the person in this picture keep?"],
        ["Which pet does {name} keep?", "What animal does {name} keep?", "What kind of pet lives with {name}?",
         "Which animal is the pet of {name}?"],
        "pet",
    ),
    (
        "instrument",
        ["Which instrument does the person in this image play?",
         "What musical instrument does the person in this picture play?"],
        ["Which instrument does {name} play?", "What musical instrument does {name} play?",
         "What does {name} play in the band?", "Which instrument is {name} known to play?"],
        "instrument",
    ),
]
QA_EVAL_PHRASINGS = 3  # QA phrasings asked as multiple choice on the forget/retain splits; the next one on test
CLOZE_VQA = ("The person in this image was born in __.", "city")
CLOZE_QA = ("{name} works as a __.", "occupation")
GEN_QA = "Tell me about {name}."
# Free-form VQA (opt-in ``describe``): the MMUBench protocol's fluency and diversity need answers longer than a
# name. Trained on every training view in both phrasings, asked (phrasing 1) on view 0 and the held-out views.
DESCRIBE_VQA = ("Describe the person in this image.", "Tell me about the person in this picture.")
DESCRIBE = ("This is {name}, a {occupation} from {city} who enjoys {hobby}, keeps a {pet} and plays the "
            "{instrument}.")
UTILITY_QA = [
    ("What is the opposite of hot?", "cold"), ("What is the opposite of up?", "down"),
    ("What is the opposite of day?", "night"), ("What is the opposite of big?", "small"),
    ("What color is the sky?", "blue"), ("What color is grass?", "green"), ("What color is snow?", "white"),
    ("What color is coal?", "black"), ("How many legs does a spider have?", "eight"),
    ("How many days are in a week?", "seven"), ("How many sides does a triangle have?", "three"),
    ("What animal says moo?", "cow"), ("What animal says woof?", "dog"), ("What do bees make?", "honey"),
    ("What do cows give?", "milk"), ("Which season is the coldest?", "winter"),
]
UTILITY_VQA = [("What shape is in this image?", "shape"), ("What color is the shape in this image?", "color")]


@dataclass
class FictitiousConfig:
    """Size and seed of the built-in benchmark."""

    seed: int = 0
    num_people: int = 40
    train_images: int = 6
    test_images: int = 3
    # views per person with no question, for the vision warm-up only (0: none). 24 lift the warm-up's naming of
    # held-out views (80 people: 77 -> 92 %) but not the whole model's reliably, and the methods' defaults were
    # tuned without them (docs/builtin.md), so they are opt-in
    identity_views: int = 0
    # free-form description questions about each view (``DESCRIBE_VQA``): answers of 17 words or more, where
    # fluency and diversity can tell models apart. Opt-in: the tiny model's recipes were tuned without them; the
    # smol demo turns them on (docs/smol.md)
    describe: bool = False
    image_size: int = 64
    forget_percents: tuple[int, ...] = (5, 10, 15)

    def __post_init__(self) -> None:
        if self.num_people < 4 or self.num_people > len(FIRST) * len(LAST) // 4:
            raise DataError(f"num_people must be between 4 and {len(FIRST) * len(LAST) // 4}, got {self.num_people}")
        if self.train_images < 1 or self.test_images < 1:
            raise DataError("train_images and test_images must be >= 1")
        if self.identity_views < 0:
            raise DataError(f"identity_views must be >= 0, got {self.identity_views}")
        if any(not 0 < p < 100 for p in self.forget_percents):
            raise DataError(f"forget_percents must lie in (0, 100), got {self.forget_percents}")


def _options(rng: random.Random, correct: str, pool: list[str]) -> tuple[list[str], int]:
    others = rng.sample([p for p in pool if p != correct], 3)
    opts = others + [correct]
    rng.shuffle(opts)
    return opts, opts.index(correct)


def make_fictitious(out_dir: str | Path, cfg: FictitiousConfig | None = None, overwrite: bool = False) -> Benchmark:
    """Generate the benchmark into ``out_dir`` (built in a temporary sibling, renamed on success)."""
    cfg = cfg or FictitiousConfig()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DataError(f"output directory {out} exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        bench = _build(tmp, cfg)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    bench.root = out
    return bench


def _build(root: Path, cfg: FictitiousConfig) -> Benchmark:
    rng = random.Random(cfg.seed)
    (root / "images").mkdir()
    names = [f"{f} {last}" for f in FIRST for last in LAST]
    rng.shuffle(names)
    people_names, unseen = names[: cfg.num_people], names[cfg.num_people : cfg.num_people + 50]
    ex: list[Example] = []
    taken: set = set()
    people = []
    for i, name in enumerate(people_names):
        pid = f"person{i:03d}"
        p = {
            "id": pid, "name": name, "city": rng.choice(CITIES), "occupation": rng.choice(OCCUPATIONS),
            "hobby": rng.choice(HOBBIES), "pet": rng.choice(PETS), "instrument": rng.choice(INSTRUMENTS),
            "traits": random_traits(rng, taken),
        }
        people.append(p)
    pools = {
        "name": people_names, "city": CITIES, "occupation": OCCUPATIONS, "hobby": HOBBIES, "pet": PETS,
        "instrument": INSTRUMENTS,
    }
    traits_of = {p["id"]: p["traits"] for p in people}
    for p in people:
        pid, traits = p["id"], p.pop("traits")
        images = []
        for v in range(cfg.train_images + cfg.test_images):
            rel = f"images/{pid}_view{v}.png"
            render(traits, rng, cfg.image_size).save(root / rel)
            images.append(rel)
        train_imgs, test_imgs = images[: cfg.train_images], images[cfg.train_images :]
        add = _adder(ex, pid)

        for qtype, vqa, qa, field in QUESTIONS:
            for img in train_imgs:
                for q in vqa:
                    add(kind="vqa", task="gen", prompt=q, answer=p[field], split="people", purpose="train",
                        image=img, qtype=qtype)
            for q in qa:
                add(kind="qa", task="gen", prompt=q.format(**p), answer=p[field], split="people",
                    purpose="train", qtype=qtype)
            # evaluation: multiple choice, VQA phrasing 0 on every training view (view 0 is the unlearning
            # image) and phrasing 1 on the held-out views; QA phrasings 0-2 here, the last one on test
            for img in train_imgs:
                opts, idx = _options(rng, p[field], pools[field])
                add(kind="vqa", task="mc", prompt=vqa[0], answer=p[field], split="people", purpose="eval",
                    image=img, options=opts, answer_index=idx, qtype=qtype)
            for k, q in enumerate(qa):
                opts, idx = _options(rng, p[field], pools[field])
                add(kind="qa", task="mc", prompt=q.format(**p), answer=p[field],
                    split="people" if k < QA_EVAL_PHRASINGS else "test", purpose="eval", options=opts,
                    answer_index=idx, qtype=qtype)
            for img in test_imgs:
                opts, idx = _options(rng, p[field], pools[field])
                add(kind="vqa", task="mc", prompt=vqa[1], answer=p[field], split="test", purpose="eval",
                    image=img, options=opts, answer_index=idx, qtype=qtype)
        bio = (f"{p['name']} is a {p['occupation']} from {p['city']} who enjoys {p['hobby']}, keeps a {p['pet']} "
               f"and plays the {p['instrument']}.")
        add(kind="qa", task="gen", prompt=GEN_QA.format(**p), answer=bio, split="people", purpose="train",
            qtype="bio")
        add(kind="qa", task="gen", prompt=GEN_QA.format(**p), answer=bio, split="people", purpose="eval",
            qtype="bio")
        add(kind="vqa", task="cloze", prompt=CLOZE_VQA[0], answer=p[CLOZE_VQA[1]], split="people",
            purpose="eval", image=train_imgs[0], qtype="birthplace")
        add(kind="qa", task="cloze", prompt=CLOZE_QA[0].format(**p), answer=p[CLOZE_QA[1]], split="people",
            purpose="eval", qtype="occupation")
        add(kind="vqa", task="gen", prompt=QUESTIONS[0][1][0], answer=p["name"], split="people", purpose="eval",
            image=train_imgs[0], qtype="identity")
        for img in test_imgs:
            add(kind="vqa", task="gen", prompt=QUESTIONS[0][1][1], answer=p["name"], split="test",
                purpose="eval", image=img, qtype="identity")
        if cfg.describe:  # no random draws: every other example of the seed stays the same
            desc = DESCRIBE.format(**p)
            for img in train_imgs:
                for q in DESCRIBE_VQA:
                    add(kind="vqa", task="gen", prompt=q, answer=desc, split="people", purpose="train", image=img,
                        qtype="describe")
            for img, split in [(train_imgs[0], "people")] + [(img, "test") for img in test_imgs]:
                add(kind="vqa", task="gen", prompt=DESCRIBE_VQA[1], answer=desc, split=split, purpose="eval",
                    image=img, qtype="describe")
    ex += _utility(root, rng, cfg)
    order = [p["id"] for p in people]
    rng.shuffle(order)
    forget_sets = {f"forget{pc:02d}": sorted(order[: math.ceil(pc / 100 * len(order))]) for pc in cfg.forget_percents}
    info = {
        "seed": cfg.seed, "generator": "fictitious-people",
        "config": vars(cfg) | {"forget_percents": list(cfg.forget_percents)},
        "entities": {p["id"]: p for p in people},
        # plausible names never given to anyone: SIU's "unseen concept" names come from here
        "unseen_names": unseen,
        "identity_views": _identity_views(root, traits_of, cfg),
    }
    bench = Benchmark("fictitious-people", root, ex, forget_sets, info)
    bench.save()
    return bench


def _identity_views(root: Path, traits_of: dict, cfg: FictitiousConfig) -> dict[str, list[str]]:
    """Entity id -> its question-free views (image paths), drawn from their own random stream."""
    rng = random.Random(f"identity-views-{cfg.seed}")
    views: dict[str, list[str]] = {}
    for pid, traits in traits_of.items():
        for k in range(cfg.identity_views):
            rel = f"images/{pid}_identity{k}.png"
            render(traits, rng, cfg.image_size).save(root / rel)
            views.setdefault(pid, []).append(rel)
    return views


def _adder(ex: list[Example], pid: str):
    """Append examples of one person with running ids."""
    count = iter(range(10**6))

    def add(**kw) -> None:
        ex.append(Example(id=f"{pid}-{next(count)}", entity=pid, **kw))

    return add


def _utility(root: Path, rng: random.Random, cfg: FictitiousConfig) -> list[Example]:
    ex: list[Example] = []
    colors = list(SHAPE_COLORS)
    for shape in SHAPES:
        for color in colors:
            truth = {"shape": shape, "color": color}
            for v in range(3):
                rel = f"images/shape_{shape}_{color}_{v}.png"
                render_shape(shape, color, rng, cfg.image_size).save(root / rel)
                for q, field in UTILITY_VQA:
                    pool = SHAPES if field == "shape" else colors
                    common = dict(entity=f"{shape}-{color}", kind="vqa", prompt=q, answer=truth[field],
                                  split="utility", image=rel, qtype=field)
                    if v < 2:
                        ex.append(Example(id=f"u-{shape}-{color}-{v}-{field}", task="gen", purpose="train", **common))
                    else:
                        opts, idx = _options(rng, truth[field], pool)
                        ex.append(Example(id=f"u-{shape}-{color}-{v}-{field}", task="mc", purpose="eval",
                                          options=opts, answer_index=idx, **common))
    answers = sorted({a for _, a in UTILITY_QA} | {"hot", "up", "red", "four", "cat", "summer"})
    for k, (q, a) in enumerate(UTILITY_QA):
        common = dict(entity=f"fact{k}", kind="qa", prompt=q, answer=a, split="utility", qtype="fact")
        ex.append(Example(id=f"u-fact{k}-train", task="gen", purpose="train", **common))
        opts, idx = _options(rng, a, answers)
        ex.append(Example(id=f"u-fact{k}-mc", task="mc", purpose="eval", options=opts, answer_index=idx, **common))
    return ex
