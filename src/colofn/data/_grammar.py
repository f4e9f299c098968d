"""A deterministic synthetic English corpus: short stories from a small grammar.

The shipped ``stories.txt`` is ``generate_text(random.key(0), 80_000)``. It is
synthetic rather than a public-domain book so that the repository holds no text
of uncertain provenance, and it has structure a small model can learn within a
CPU minute: subject-verb agreement, quoted speech, fixed facts (a fox is always
red and says "yip"), a found object's place remembered later in the story, and
small sums written in words.

Draws come from :func:`colofn.random.fold_in` of one key (pure integer
arithmetic), so the text is the same on every machine and torch version.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import TypeVar

import torch

from colofn import random

__all__ = ["generate_text"]

T = TypeVar("T")

NAMES = [
    ("Anna", "she"), ("Ben", "he"), ("Clara", "she"), ("David", "he"), ("Emma", "she"),
    ("Finn", "he"), ("Greta", "she"), ("Hugo", "he"), ("Iris", "she"), ("Jonas", "he"),
    ("Kate", "she"), ("Leo", "he"), ("Mia", "she"), ("Noah", "he"), ("Olga", "she"), ("Paul", "he"),
]  # fmt: skip
# animal: (plural, colour, sound)
ANIMALS = {
    "cat": ("cats", "grey", "meow"), "dog": ("dogs", "brown", "woof"),
    "fox": ("foxes", "red", "yip"), "owl": ("owls", "white", "hoot"),
    "duck": ("ducks", "yellow", "quack"), "cow": ("cows", "black", "moo"),
    "frog": ("frogs", "green", "croak"), "sheep": ("sheep", "white", "baa"),
    "mouse": ("mice", "grey", "squeak"), "horse": ("horses", "brown", "neigh"),
    "bee": ("bees", "yellow", "buzz"), "goat": ("goats", "black", "meh"),
}  # fmt: skip
PLACES = ["garden", "river", "forest", "market", "village", "hill", "lake", "farm",
          "kitchen", "library", "school", "beach", "meadow", "bridge"]  # fmt: skip
OBJECTS = ["ball", "book", "apple", "kite", "basket", "hat", "lamp", "cake",
           "letter", "key", "boat", "drum", "flower", "map", "cup"]  # fmt: skip
QUALITIES = ["small", "big", "old", "young", "quiet", "funny", "tiny", "clever", "lazy"]  # animals
ADJECTIVES = ["small", "big", "old", "new", "red", "blue", "green", "bright",
              "soft", "heavy", "shiny", "tiny", "lovely"]  # fmt: skip
FEELINGS = ["happy", "tired", "brave", "hungry", "sleepy", "glad", "curious", "proud"]
ACTS = ["sang", "ran", "slept", "laughed", "waited", "danced", "walked", "jumped",
        "smiled", "rested", "played", "listened"]  # fmt: skip
DEEDS = ["found", "saw", "carried", "held", "opened", "lost", "bought", "brought",
         "painted", "hid", "washed", "dropped"]  # fmt: skip
ADVERBS = ["slowly", "quickly", "quietly", "happily", "carefully", "loudly", "softly"]
TIMES = ["One morning", "In the evening", "At night", "On a sunny day", "After lunch",
         "Later", "The next day", "In the spring", "In the winter", "Before dinner"]  # fmt: skip
PREPS = ["under", "near", "behind", "in", "beside"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
           "nine", "ten", "eleven", "twelve"]  # fmt: skip
WEATHER = ["The sun was warm.", "It was raining.", "The wind was cold.",
           "The sky was blue.", "Snow fell on the {place}.", "Fog covered the {place}."]  # fmt: skip


class _Draws:
    """A stream of integers: the ``i``-th is the low word of ``fold_in(key, i)``."""

    def __init__(self, key: torch.Tensor) -> None:
        self.key, self.i = key, 0

    def below(self, n: int) -> int:
        self.i += 1
        return int(random.fold_in(self.key, self.i)[1]) % n

    def pick(self, options: Sequence[T]) -> T:
        return options[self.below(len(options))]


def _story(d: _Draws) -> str:
    name, pron = d.pick(NAMES)
    friend = d.pick([n for n, _ in NAMES if n != name])
    home = d.pick(PLACES)
    hidden: dict[str, tuple[str, str]] = {}  # object -> (preposition, place)

    def who() -> str:
        return d.pick([name, pron.capitalize()])

    intro = d.below(3)
    if intro == 0:
        sentences = [f"{d.pick(TIMES)}, {name} went to the {home}."]
    elif intro == 1:
        animal = d.pick(list(ANIMALS))
        sentences = [f"Once upon a time there was a {d.pick(QUALITIES)} {animal} named {name}."]
    else:
        sentences = [f"{name} lived in a {d.pick(ADJECTIVES)} house near the {home}."]
    for _ in range(3 + d.below(5)):
        kind = d.below(8)
        if kind == 0:
            animal = d.pick(list(ANIMALS))
            plural, colour, sound = ANIMALS[animal]
            sentences += [
                f"{who()} saw a {animal} by the {d.pick(PLACES)}.",
                f"The {animal} was {colour}.",
                f'It said, "{sound.capitalize()}!"',
            ]
        elif kind == 1:
            obj, prep, place = d.pick(OBJECTS), d.pick(PREPS), d.pick(PLACES)
            hidden[obj] = (prep, place)
            sentences.append(f"{who()} found a {d.pick(ADJECTIVES)} {obj} {prep} the {place}.")
        elif kind == 2 and hidden:
            obj = d.pick(sorted(hidden))
            prep, place = hidden[obj]
            sentences += [
                f'{friend} asked, "Where is the {obj}?"',
                f'{name} said, "It is {prep} the {place}."',
            ]
        elif kind == 3:
            sentences.append(f"{who()} {d.pick(ACTS)} {d.pick(ADVERBS)}.")
        elif kind == 4:
            sentences.append(
                f"{name} and {friend} {d.pick(ACTS)} together by the {d.pick(PLACES)}."
            )
        elif kind == 5:
            a, b = 1 + d.below(6), 1 + d.below(6)
            thing = d.pick(OBJECTS)
            sentences.append(
                f"{name} had {NUMBERS[a]} {thing}s and {friend} had {NUMBERS[b]}. "
                f"Together they had {NUMBERS[a + b]} {thing}s."
            )
        elif kind == 6:
            animal = d.pick(list(ANIMALS))
            n = 2 + d.below(8)
            sentences.append(
                f"There were {NUMBERS[n]} {ANIMALS[animal][0]} in the {d.pick(PLACES)}."
            )
        else:
            sentences.append(d.pick(WEATHER).format(place=d.pick(PLACES)))
            sentences.append(f"{who()} {d.pick(DEEDS)} the {d.pick(OBJECTS)} {d.pick(ADVERBS)}.")
    ending = d.below(3)
    if ending == 0:
        sentences.append(f"In the end, {pron} went home to the {home}.")
    elif ending == 1:
        sentences.append(f"That night, {name} was {d.pick(FEELINGS)} and slept well.")
    else:
        sentences.append(f"{name} was very {d.pick(FEELINGS)}. The end.")
    return textwrap.fill(" ".join(sentences), width=72)


def generate_text(key: torch.Tensor, n_bytes: int) -> str:
    """Whole stories, separated by blank lines, until the text is at least ``n_bytes`` long.

    Args:
        key: a key from :func:`colofn.random.key`.
        n_bytes: the least length of the text (it is ASCII: one byte per character).

    >>> text = generate_text(random.key(0), 300)
    >>> len(text) >= 300, text.isascii()
    (True, True)
    """
    d, stories, size = _Draws(key), [], 0
    while size < n_bytes:
        stories.append(_story(d))
        size += len(stories[-1]) + 2
    return "\n\n".join(stories) + "\n"
