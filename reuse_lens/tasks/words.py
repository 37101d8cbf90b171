"""Word lists the built-in task generators draw from.

Each generator keeps only the words that are one token under the model's tokenizer
(``WordPool``), so the lists can be generous. The zoo's word-level tokenizer is built
from these same lists, so every word here is one token there.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from reuse_lens.tasks.tokenize import single_token_words

MALE_NAMES = [
    "John",
    "James",
    "Robert",
    "Michael",
    "William",
    "David",
    "Richard",
    "Joseph",
    "Thomas",
    "Charles",
    "Daniel",
    "Matthew",
    "Anthony",
    "Mark",
    "Paul",
    "Steven",
    "Andrew",
    "Kevin",
    "Brian",
    "George",
    "Edward",
    "Ronald",
    "Timothy",
    "Jason",
    "Jeffrey",
    "Ryan",
    "Jacob",
    "Gary",
    "Eric",
    "Jonathan",
    "Stephen",
    "Larry",
    "Justin",
    "Scott",
    "Frank",
    "Benjamin",
    "Gregory",
    "Samuel",
    "Raymond",
    "Patrick",
    "Alexander",
    "Jack",
    "Dennis",
    "Jerry",
    "Tyler",
    "Aaron",
    "Henry",
    "Adam",
    "Peter",
    "Nathan",
    "Carl",
    "Arthur",
    "Roger",
    "Joe",
    "Juan",
    "Albert",
    "Harold",
    "Kyle",
    "Oliver",
    "Leo",
    "Max",
    "Sam",
    "Tom",
    "Ben",
    "Alan",
    "Ivan",
    "Hugo",
]

FEMALE_NAMES = [
    "Mary",
    "Patricia",
    "Jennifer",
    "Linda",
    "Elizabeth",
    "Barbara",
    "Susan",
    "Jessica",
    "Sarah",
    "Karen",
    "Lisa",
    "Nancy",
    "Betty",
    "Sandra",
    "Margaret",
    "Ashley",
    "Kimberly",
    "Emily",
    "Donna",
    "Michelle",
    "Carol",
    "Amanda",
    "Melissa",
    "Deborah",
    "Stephanie",
    "Rebecca",
    "Sharon",
    "Laura",
    "Cynthia",
    "Amy",
    "Kathleen",
    "Angela",
    "Anna",
    "Helen",
    "Emma",
    "Ruth",
    "Julie",
    "Olivia",
    "Joyce",
    "Victoria",
    "Kelly",
    "Lauren",
    "Christine",
    "Rachel",
    "Alice",
    "Grace",
    "Rose",
    "Claire",
    "Sophie",
    "Lucy",
    "Diana",
    "Julia",
    "Hannah",
    "Megan",
    "Kate",
    "Jane",
    "Eva",
    "Nina",
    "Sara",
    "Ella",
    "Mia",
    "Ivy",
    "Zoe",
    "Iris",
    "Vera",
    "Paula",
]

NAMES = MALE_NAMES + FEMALE_NAMES

PLACES = [
    "store",
    "garden",
    "restaurant",
    "school",
    "hospital",
    "office",
    "station",
    "park",
    "house",
    "market",
    "beach",
    "library",
    "church",
    "museum",
    "bank",
    "kitchen",
    "farm",
    "castle",
    "river",
    "lake",
    "forest",
    "shop",
    "hotel",
    "cafe",
]

OBJECTS = [
    "ring",
    "kiss",
    "bone",
    "basketball",
    "computer",
    "necklace",
    "drink",
    "snack",
    "apple",
    "book",
    "pen",
    "key",
    "bag",
    "hat",
    "cup",
    "box",
    "ball",
    "letter",
    "phone",
    "watch",
    "bottle",
    "plate",
    "lamp",
    "chair",
    "coin",
    "card",
    "map",
    "knife",
    "spoon",
    "brush",
]

COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "black", "white"]
"""Merullo et al. use eight plain colours; each is also needed capitalised as the answer."""

SCENE_OBJECTS = [
    "pen",
    "cup",
    "book",
    "key",
    "bag",
    "hat",
    "box",
    "ball",
    "phone",
    "watch",
    "bottle",
    "plate",
    "lamp",
    "chair",
    "coin",
    "card",
    "map",
    "knife",
    "spoon",
    "brush",
    "mug",
    "shoe",
    "sock",
    "scarf",
    "pencil",
    "notebook",
    "jug",
    "bowl",
    "candle",
    "clock",
]

SURFACES = ["table", "floor", "desk", "shelf", "bed", "counter"]

EVENTS = [
    "war",
    "dynasty",
    "siege",
    "drought",
    "expedition",
    "reign",
    "trial",
    "strike",
    "famine",
    "journey",
    "voyage",
    "rebellion",
    "crisis",
    "campaign",
    "festival",
    "era",
    "alliance",
    "empire",
    "plague",
    "blockade",
]

CENTURIES = ("11", "12", "13", "14", "15", "16", "17", "18")

NOUN_NUMBER = (
    ("dog", "dogs"),
    ("key", "keys"),
    ("author", "authors"),
    ("teacher", "teachers"),
    ("farmer", "farmers"),
    ("doctor", "doctors"),
    ("pilot", "pilots"),
    ("singer", "singers"),
    ("student", "students"),
    ("player", "players"),
    ("officer", "officers"),
    ("manager", "managers"),
    ("driver", "drivers"),
    ("writer", "writers"),
    ("cat", "cats"),
    ("bird", "birds"),
    ("boy", "boys"),
    ("girl", "girls"),
    ("car", "cars"),
    ("house", "houses"),
    ("table", "tables"),
    ("lawyer", "lawyers"),
    ("guard", "guards"),
    ("nurse", "nurses"),
    ("friend", "friends"),
    ("king", "kings"),
    ("baker", "bakers"),
)
"""Singular and plural forms; subject–verb agreement needs both to be single tokens."""

VERB_NUMBER = (("is", "are"), ("was", "were"), ("has", "have"))

PREPOSITIONS = ["near", "behind", "beside", "with"]

BOX_LABELS = tuple("ABCDEFGHJKLMNPQRSTVWXZ")

PRONOUNS = ("he", "she")

ADJECTIVES = ["great", "good", "kind", "nice", "smart", "funny", "brave", "quiet"]

ROLES = ["friend", "cook", "teacher", "person", "neighbor", "worker", "leader", "dancer"]

INDUCTION_WORDS = tuple(
    sorted(
        set(OBJECTS)
        | set(SCENE_OBJECTS)
        | set(PLACES)
        | set(EVENTS)
        | {s for s, _ in NOUN_NUMBER}
        | set(COLORS)
    )
)
"""Words that induction sequences are drawn from: every noun of the other tasks."""


def capitalize(word: str) -> str:
    return word[:1].upper() + word[1:]


class WordPool:
    """The word lists filtered to single tokens under one tokenizer, computed once each.

    With no tokenizer the lists are kept whole. ``text`` says whether prompts are written
    as text; it is False only for a model with no tokenizer, where a generator that can
    (induction) draws token ids instead.
    """

    def __init__(self, tokenizer: Any, *, text: bool | None = None) -> None:
        self.tokenizer = tokenizer
        self.text = tokenizer is not None if text is None else text

    def single(self, words: tuple[str, ...] | list[str], *, prefix: str = " ") -> list[str]:
        return single_token_words(self.tokenizer, list(words), prefix=prefix)

    @cached_property
    def male_names(self) -> list[str]:
        return self.single(MALE_NAMES)

    @cached_property
    def female_names(self) -> list[str]:
        return self.single(FEMALE_NAMES)

    @cached_property
    def names(self) -> list[str]:
        return self.male_names + self.female_names

    @cached_property
    def places(self) -> list[str]:
        return self.single(PLACES)

    @cached_property
    def objects(self) -> list[str]:
        return self.single(OBJECTS)

    @cached_property
    def colors(self) -> list[str]:
        lower = set(self.single(COLORS))
        upper = {c for c in COLORS if self.single([capitalize(c)])}
        return [c for c in COLORS if c in lower and c in upper]

    @cached_property
    def scene_objects(self) -> list[str]:
        return self.single(SCENE_OBJECTS)

    @cached_property
    def surfaces(self) -> list[str]:
        return self.single(SURFACES)

    @cached_property
    def events(self) -> list[str]:
        return self.single(EVENTS)

    @cached_property
    def noun_number(self) -> list[tuple[str, str]]:
        ok = set(self.single([w for pair in NOUN_NUMBER for w in pair]))
        return [(s, p) for s, p in NOUN_NUMBER if s in ok and p in ok]

    @cached_property
    def box_labels(self) -> list[str]:
        return self.single(BOX_LABELS)

    @cached_property
    def induction_words(self) -> list[str]:
        return self.single(INDUCTION_WORDS)


def all_words() -> list[str]:
    """Every word a built-in generator can emit, for building a word-level vocabulary."""
    words: set[str] = set(NAMES) | set(PLACES) | set(OBJECTS) | set(SCENE_OBJECTS)
    words |= set(COLORS) | {capitalize(c) for c in COLORS} | set(SURFACES) | set(EVENTS)
    words |= {w for pair in NOUN_NUMBER for w in pair} | {w for pair in VERB_NUMBER for w in pair}
    words |= set(PREPOSITIONS) | set(BOX_LABELS) | set(PRONOUNS) | set(ADJECTIVES) | set(ROLES)
    words |= set(CENTURIES) | {f"{y:02d}" for y in range(100)}
    return sorted(words)
