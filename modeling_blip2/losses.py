"""The three stage-1 objectives of BLIP-2, side by side, with the cross-process gather they share.

Names follow the paper: ITC (image-text contrastive), ITM (image-text matching), ITG (image-grounded text
generation). Similarities are already divided by the temperature when they reach these functions.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .compat import is_traced


def world_size_and_rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_across_processes(tensor: torch.Tensor, with_grad: bool = False) -> torch.Tensor:
    """Concatenates `tensor` from every process along dim 0, in rank order.

    Without grad, the copies are detached even with a single process, as the original's `concat_all_gather`: the
    image-to-text term of ITC then trains only the image side and the text-to-image term only the text side. With
    grad, the backward pass sums each copy's gradient back into the process that owns it.
    """
    world_size, _ = world_size_and_rank()
    if world_size == 1:
        return tensor if with_grad else tensor.detach()
    if with_grad:
        return _GatherWithGrad.apply(tensor)
    return _all_gather(tensor.detach())


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every process's gradient for this process's slice.

    torch.distributed.nn's all_gather is not used: on gloo its backward emulates reduce-scatter with all_to_all,
    which returns wrong gradients when the incoming gradient is not contiguous (as an einsum's is).
    """

    @staticmethod
    def forward(ctx, tensor):
        return _all_gather(tensor)

    @staticmethod
    def backward(ctx, grad_output):
        grad_output = grad_output.contiguous()
        dist.all_reduce(grad_output)
        local_size = grad_output.shape[0] // dist.get_world_size()
        return grad_output.narrow(0, dist.get_rank() * local_size, local_size)


def pad_to_length(tensor: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return F.pad(tensor, (0, length - tensor.shape[1]), value=value)


def gather_text_across_processes(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gathers token ids and masks whose padded length may differ between processes (padded to the longest)."""
    world_size, _ = world_size_and_rank()
    if world_size == 1:
        return input_ids, attention_mask
    length = torch.tensor([input_ids.shape[1]], device=input_ids.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    length = int(length)
    return (
        gather_across_processes(pad_to_length(input_ids, length, pad_token_id)),
        gather_across_processes(pad_to_length(attention_mask, length, 0)),
    )


def max_over_queries_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """(num_images, num_texts): each image-text pair scored by its best-matching query.

    image_feats: (num_images, num_queries, dim) and text_feats: (num_texts, dim), both L2-normalised.
    """
    return torch.einsum("iqd,td->itq", image_feats, text_feats).amax(dim=-1)


def itc_positive_mask(
    image_ids: torch.Tensor | None,
    gathered_image_ids: torch.Tensor | None,
    batch_size: int,
    rank: int,
    world_size: int,
    device: torch.device,
) -> torch.Tensor:
    """(batch, gathered_batch) True where this process's text i and gathered image j are a pair: the text's own
    image, or with image_ids every image of the same id."""
    if image_ids is None:
        targets = torch.arange(batch_size, device=device) + rank * batch_size
        return F.one_hot(targets, num_classes=batch_size * world_size).bool()
    return image_ids[:, None] == gathered_image_ids[None, :]


def contrastive_targets(positive_mask: torch.Tensor, label_smoothing: float, dtype: torch.dtype) -> torch.Tensor:
    """Soft targets spreading (1 - label_smoothing) over the positives and label_smoothing uniformly.

    With one positive per row this is exactly cross-entropy with label smoothing; with image ids, every caption of
    the same image counts as a positive (COCO retrieval fine-tuning).
    """
    positives = positive_mask.to(dtype)
    positives = positives / positives.sum(dim=1, keepdim=True)
    return (1.0 - label_smoothing) * positives + label_smoothing / positive_mask.shape[1]


def image_text_contrastive_loss(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    positive_mask_i2t: torch.Tensor,
    positive_mask_t2i: torch.Tensor,
    label_smoothing: float = 0.1,
) -> torch.Tensor:
    """ITC: mean of the image-to-text and text-to-image cross-entropies over the gathered batch."""
    loss_i2t = F.cross_entropy(sim_i2t, contrastive_targets(positive_mask_i2t, label_smoothing, sim_i2t.dtype))
    loss_t2i = F.cross_entropy(sim_t2i, contrastive_targets(positive_mask_t2i, label_smoothing, sim_t2i.dtype))
    return (loss_i2t + loss_t2i) / 2


@torch.no_grad()
def has_two_distinct_images(images: torch.Tensor, gathered_image_ids: torch.Tensor | None = None) -> bool:
    """Whether the batch gathered over all processes holds two different images: ITC and ITM need in-batch negatives.

    With image ids (gathered), distinct ids; without, rows of `images` (pixel_values or image_embeds) that differ in
    any value (a collator repeating one sample gives identical rows). Every process gets the same answer: one flag
    per process is gathered, and one row per process only when every process holds a single repeated image.
    """
    if gathered_image_ids is not None:
        return bool((gathered_image_ids != gathered_image_ids[0]).any())
    repeats_one_image = (images == images[:1]).all().reshape(1).long()
    if not gather_across_processes(repeats_one_image).all():
        return True
    first_images = gather_across_processes(images[:1])
    return bool((first_images != first_images[:1]).any())


@torch.no_grad()
def sample_hard_negatives(
    similarity: torch.Tensor, positive_mask: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One negative column per row, drawn with probability softmax(similarity) over the non-positive entries.

    One multinomial call for the whole batch, no per-row loop. The positives get the original's additive -10000
    rather than -inf; a row whose entries are all positives (the original would draw a positive and label it a
    negative) is refused, which costs one host synchronisation. Non-finite similarities are the caller's to refuse
    (`Blip2BridgeModel.forward` names where they come from). generator: where the draws come from (default torch's
    global one, as the original).
    """
    no_negative = positive_mask.all(dim=1)
    if not is_traced() and no_negative.any():
        raise ValueError(
            f"rows {no_negative.nonzero().flatten().tolist()} of the similarities have no negative: every column is "
            "a positive of theirs (the same image). Drawing one would train ITM on a positive pair labelled 0; give "
            "every row at least one other image (a bigger batch or more processes)"
        )
    weights = F.softmax(similarity.masked_fill(positive_mask, -10000.0), dim=1)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def image_text_matching_loss(itm_logits: torch.Tensor, num_positives: int) -> torch.Tensor:
    """ITM: binary cross-entropy over [positives; negatives], label 1 for the first `num_positives` rows."""
    labels = torch.zeros(itm_logits.shape[0], dtype=torch.long, device=itm_logits.device)
    labels[:num_positives] = 1
    return F.cross_entropy(itm_logits, labels)


def image_grounded_generation_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1
) -> torch.Tensor:
    """ITG: token-level mean cross-entropy with label smoothing over the vocabulary; -100 labels are ignored."""
    return F.cross_entropy(logits, labels, ignore_index=-100, label_smoothing=label_smoothing)
