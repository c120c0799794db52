"""A small image encoder that carries real signal: a tiny ViT (transformers' `Blip2VisionModel`) pre-trained briefly to
name the object in each grid cell of the scenes, then frozen as BLIP-2's image encoder.

Two heads train it, and the Q-Former needs both:
- naming each cell's object from the mean of that cell's patch tokens makes every patch token describe what is drawn
  under it;
- naming each patch token's cell from the token alone makes it say where it lies. The Q-Former's cross-attention has
  no positions of its own: it knows where an object is only if the tokens say so, as a real ViT's tokens do (their
  pre-training needs spatial relations). Without this head the tokens forgot their position (a linear probe named a
  token's cell 28% of the time, chance being 25%) and the captions put objects in the wrong cells.
"""

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import Blip2VisionConfig, Blip2VisionModel, get_cosine_schedule_with_warmup

from .scenes import COLOURS, POSITIONS, SHAPES, Scene


# Class 0 is an empty cell; then every (colour, shape).
CELL_CLASSES = ("empty", *(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES))


def make_vision_config(image_size: int, patch_size: int = 16, hidden_size: int = 64, num_layers: int = 2):
    return Blip2VisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        attention_dropout=0.0,
    )


def cell_labels(scene: Scene) -> list[int]:
    """The CELL_CLASSES index of each grid cell, in POSITIONS order."""
    by_position = {item.position: CELL_CLASSES.index(item.name) for item in scene.objects}
    return [by_position.get(position, 0) for position in POSITIONS]


class CellClassifier(nn.Module):
    """The pre-training heads: a linear classifier of each grid cell's object on the cell's mean patch token, and one
    of each patch token's cell on the token."""

    def __init__(self, vision_model: Blip2VisionModel):
        super().__init__()
        config = vision_model.config
        self.vision_model = vision_model
        self.classifier = nn.Linear(config.hidden_size, len(CELL_CLASSES))
        self.position_classifier = nn.Linear(config.hidden_size, len(POSITIONS))
        patches_per_side = config.image_size // config.patch_size
        # cell_of_patch[p] = the POSITIONS index of the cell patch p lies in (patches in raster order).
        rows = torch.arange(patches_per_side).repeat_interleave(patches_per_side)
        columns = torch.arange(patches_per_side).repeat(patches_per_side)
        cell_of_patch = (rows * 2 // patches_per_side) * 2 + columns * 2 // patches_per_side
        self.register_buffer("cell_of_patch", cell_of_patch, persistent=False)
        self.register_buffer("cell_pooling", nn.functional.one_hot(cell_of_patch, 4).T.float() / (len(rows) / 4))

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, 4 cells, len(CELL_CLASSES)) logits of each cell's object and (batch, patches, 4) logits of each
        patch token's cell."""
        patch_tokens = self.vision_model(pixel_values=pixel_values).last_hidden_state[:, 1:]  # drop the class token
        return self.classifier(self.cell_pooling @ patch_tokens), self.position_classifier(patch_tokens)

    def loss(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cell_logits, position_logits = self(pixel_values)
        positions = self.cell_of_patch.expand(len(pixel_values), -1)
        return nn.functional.cross_entropy(cell_logits.flatten(0, 1), labels.flatten()) + nn.functional.cross_entropy(
            position_logits.flatten(0, 1), positions.flatten()
        )


def pretrain_vision_model(
    config: Blip2VisionConfig,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    seed: int = 0,
) -> tuple[CellClassifier, list[float]]:
    """Trains a fresh vision model with both heads (`CellClassifier.loss`); returns it with its heads (eval mode) and
    every step's loss."""
    torch.manual_seed(seed)
    model = CellClassifier(Blip2VisionModel(config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    # The schedule of the other phases (the Trainer's warm-up + cosine), kept to one place.
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=max(1, steps // 10), num_training_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    progress = tqdm(range(steps), desc="image encoder pre-training", unit="step", dynamic_ncols=True)
    for step in progress:
        batch = torch.randint(len(pixel_values), (batch_size,), generator=generator)
        loss = model.loss(pixel_values[batch], labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 10 == 0:
            progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval(), losses


@torch.no_grad()
def cell_accuracy(classifier: CellClassifier, pixel_values: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of grid cells whose object (or emptiness) the classifier names right."""
    logits = torch.cat([classifier(batch)[0] for batch in pixel_values.split(256)])
    return (logits.argmax(-1) == labels).float().mean().item()
