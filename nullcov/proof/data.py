"""What the fine-tune proof shows the model and asks of it, in the shapes world (:mod:`nullcov.shapes.grammar`).

- **The concept**: a shape the model never saw (:data:`CONCEPT_SHAPE`, rendered by
  :func:`nullcov.shapes.grammar.render`) under a made-up token (:data:`CONCEPT_TOKEN`): instance captions
  read ``a red sks on the left``. :func:`instance_scenes` are the few renders it is taught from.
- **Concept prompts** (:func:`concept_scenes`): every colour x position with the token, each at
  several seeds; a sample counts when the evaluator reads the new shape in the colour and at the
  position the prompt asks (compositional use of the concept).
- **Preserved prompts** (:func:`preserved_scenes`): grammar prompts of the trained shapes, none an
  instance caption, grouped by whether they share the concept prompts' frame
  (``a {colour} {shape} {position}``: they differ from a concept prompt in the shape word only)
  and whether they are in the statistics' prompt set.
- **Class prompts** (:func:`class_scenes`): DreamBooth's prior preservation: the same frame with
  the trained shapes, whose images the base model draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nullcov.shapes import grammar as shapes

#: The identifier: one rare token of builtin:shapes' tokenizer (:mod:`nullcov.shapes.rare_tokens`), never in a
#: training caption (it was split into ``s``, ``k``, ``s`` before the tokenizer held it).
CONCEPT_TOKEN = "sks"
#: A cross: fine-tuning the attn2 linears of ``builtin:shapes`` draws it in the colour and at the place
#: asked within a few dozen steps. A star (five thin points in a 32-pixel image) plateaued at 25-44 %
#: of the concept prompts' samples at every learning rate and timestep mix tried (2e-4 to 2e-3,
#: uniform or half the batches at t >= 600), so no variant could be compared at matched fidelity.
CONCEPT_SHAPE = "cross"
#: The frame concept prompts are written in (template 0: ``a {colour} {shape} {position}``).
CONCEPT_TEMPLATE = 0
GROUPS = ("same_frame", "other_frames", "in_statistics", "not_in_statistics")


def concept_caption(scene: shapes.Scene) -> str:
    """The scene's caption with the made-up token for its shape (template 0)."""
    return shapes.caption(scene.colour, CONCEPT_TOKEN, scene.position, scene.size, CONCEPT_TEMPLATE)


def instance_scenes(count: int = 8) -> list[shapes.Scene]:
    """``count`` (<= 16) renders of the concept: colours and positions cycled so that each colour
    and each position appears, sizes alternating."""
    if not 1 <= count <= 16:
        raise ValueError(f"instance images: 1 to 16, got {count}")
    colours, positions = list(shapes.COLOURS), list(shapes.POSITIONS)
    return [shapes.Scene(colours[i % 4], CONCEPT_SHAPE, positions[(i + i // 4) % 4], list(shapes.SIZES)[i % 2])
            for i in range(count)]


def concept_scenes() -> list[shapes.Scene]:
    """Every colour x position of the concept, in the concept frame (16 scenes)."""
    return [shapes.Scene(colour, CONCEPT_SHAPE, position, "small", CONCEPT_TEMPLATE)
            for colour in shapes.COLOURS for position in shapes.POSITIONS]


@dataclass(frozen=True)
class PreservedPrompt:
    scene: shapes.Scene
    in_statistics: bool

    @property
    def caption(self) -> str:
        return self.scene.caption

    def groups(self) -> list[str]:
        frame = "same_frame" if self.scene.template == CONCEPT_TEMPLATE else "other_frames"
        return [frame, "in_statistics" if self.in_statistics else "not_in_statistics"]


def preserved_scenes(statistics_prompts: list[str], templates: tuple[int, ...] = (0, 2, 3)) -> list[PreservedPrompt]:
    """Every (colour, trained shape, position) in ``templates`` (48 each), marked in or out of the statistics."""
    known = set(statistics_prompts)
    return [PreservedPrompt(scene, scene.caption in known) for scene in shapes.grammar_scenes(shapes.SHAPES, templates)]


def class_scenes(count: int, seed: int) -> list[shapes.Scene]:
    """``count`` class prompts for prior preservation: the concept frame with a trained shape,
    colour and position drawn from ``seed``."""
    rng = np.random.default_rng([seed, 7])
    return [shapes.Scene(list(shapes.COLOURS)[rng.integers(4)], shapes.SHAPES[rng.integers(3)],
                         list(shapes.POSITIONS)[rng.integers(4)], "small", CONCEPT_TEMPLATE) for _ in range(count)]
