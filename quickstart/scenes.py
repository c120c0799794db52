"""Synthetic scenes: coloured shapes on a 2x2 grid, drawn with PIL, whose captions and answers follow from the drawing.

A scene holds one to three objects, each a (shape, colour) in its own grid cell, with a little jitter in size and
position so that no two drawings are alike. Everything is a pure function of a seed: the same seed gives the same
scenes, pixels, captions and questions on every machine.
"""

import random
from math import comb
from dataclasses import dataclass

from PIL import Image, ImageDraw


SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
# Cell name -> (column, row) on the 2x2 grid, in reading order (the order captions list objects in).
POSITIONS = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
BACKGROUND = (245, 245, 240)
COUNT_WORDS = ("zero", "one", "two", "three", "four")
MAX_OBJECTS = 3
# Radius as a fraction of the image side; a cell is half the side, so the largest shape keeps a margin in its cell.
RADIUS_RANGE = (0.13, 0.18)
CENTRE_JITTER = 0.04
# The question templates, one answer type each; evaluation asks one per scene, cycling through them.
QUESTION_TYPES = ("count", "colour", "shape", "presence", "position")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    position: str
    # Centre and radius as fractions of the image side, so that a scene draws at any resolution.
    centre_x: float
    centre_y: float
    radius: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # in reading order of their cells
    questions: tuple[tuple[str, str], ...]  # (question, answer), one per QUESTION_TYPES entry

    @property
    def layout(self) -> tuple[tuple[str, str, str], ...]:
        """What the caption says: (position, colour, shape) per object. Two scenes with one layout share a caption."""
        return tuple((item.position, item.colour, item.shape) for item in self.objects)

    @property
    def caption(self) -> str:
        """E.g. "a red circle in the top left, a blue square in the top right and a green triangle in the bottom left"."""
        phrases = [f"a {item.name} in the {item.position}" for item in self.objects]
        if len(phrases) == 1:
            return phrases[0]
        return ", ".join(phrases[:-1]) + " and " + phrases[-1]

    def draw(self, image_size: int) -> Image.Image:
        image = Image.new("RGB", (image_size, image_size), BACKGROUND)
        canvas = ImageDraw.Draw(image)
        for item in self.objects:
            x, y, r = item.centre_x * image_size, item.centre_y * image_size, item.radius * image_size
            fill = COLOURS[item.colour]
            if item.shape == "circle":
                canvas.ellipse((x - r, y - r, x + r, y + r), fill=fill)
            elif item.shape == "square":
                canvas.rectangle((x - r, y - r, x + r, y + r), fill=fill)
            else:  # an upright triangle: apex on top, base at the bottom of the bounding box
                canvas.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
        return image


def sample_scene(rng: random.Random) -> Scene:
    num_objects = rng.randint(1, MAX_OBJECTS)
    positions = sorted(rng.sample(list(POSITIONS), num_objects), key=list(POSITIONS).index)
    objects = []
    for position in positions:
        column, row = POSITIONS[position]
        objects.append(
            SceneObject(
                shape=rng.choice(SHAPES),
                colour=rng.choice(list(COLOURS)),
                position=position,
                centre_x=0.25 + 0.5 * column + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER),
                centre_y=0.25 + 0.5 * row + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER),
                radius=rng.uniform(*RADIUS_RANGE),
            )
        )
    return Scene(objects=tuple(objects), questions=sample_questions(tuple(objects), rng))


def sample_questions(objects: tuple[SceneObject, ...], rng: random.Random) -> tuple[tuple[str, str], ...]:
    """One question of each type in QUESTION_TYPES, answerable from the drawing alone."""
    asked = rng.choice(objects)
    present = {item.name for item in objects}
    if rng.random() < 0.5:
        probe, presence = rng.choice(objects).name, "yes"
    else:
        absent = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES if f"{colour} {shape}" not in present]
        probe, presence = rng.choice(absent), "no"
    return (
        ("how many shapes are there?", COUNT_WORDS[len(objects)]),
        (f"what color is the {asked.shape} in the {asked.position}?", asked.colour),
        (f"what shape is in the {asked.position}?", asked.shape),
        (f"is there a {probe}?", presence),
        (f"where is the {asked.name}?", asked.position),
    )


def make_scenes(num_train: int, num_test: int, seed: int = 0) -> tuple[list[Scene], list[Scene]]:
    """Training and held-out scenes. Held-out layouts are distinct from each other and from every training layout,
    so retrieval has one right caption per image and no held-out caption was seen in training."""
    if num_train < 1 or num_test < 1:
        raise ValueError(f"num_train={num_train}, num_test={num_test}; expected at least one scene each")
    num_layouts = sum(
        comb(len(POSITIONS), count) * (len(SHAPES) * len(COLOURS)) ** count for count in range(1, MAX_OBJECTS + 1)
    )
    if num_test > num_layouts // 4:
        raise ValueError(f"num_test={num_test}; at most {num_layouts // 4} distinct held-out layouts are available")
    rng = random.Random(seed)
    test, test_layouts = [], set()
    while len(test) < num_test:
        scene = sample_scene(rng)
        if scene.layout not in test_layouts:
            test_layouts.add(scene.layout)
            test.append(scene)
    train = []
    while len(train) < num_train:
        scene = sample_scene(rng)
        if scene.layout not in test_layouts:
            train.append(scene)
    return train, test

