"""Inputs the stage-1 losses cannot learn from are refused with a message that says why and what to do.

Degenerate batches (one image in the gathered batch) would make ITC 0 and ITM's negatives the positive pair itself;
non-finite values would surface far away as the sampler's "probability tensor contains either inf, nan".
"""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from modeling_blip2.cli import main
from modeling_blip2.convert_lavis import convert_lavis_checkpoint, load_lavis_state_dict
from modeling_blip2.losses import has_two_distinct_images, sample_hard_negatives
from tests.lavis_checkpoints import EVA_CONFIG, QFORMER_CONFIG, eva_tower, lavis_checkpoint, save_checkpoint, write_json
from tests.helpers import free_port
from tests.tiny_models import tiny_batch, tiny_model

NO_NEGATIVES = "need at least 2 distinct images in the batch gathered over all processes"
WHAT_TO_DO = "Use a bigger batch or more processes"


# ---- degenerate stage-1 batches ------------------------------------------------------------------------------------


def test_batch_of_one_is_refused_saying_why_and_what_to_do():
    model = tiny_model().train()
    pixel_values, input_ids, attention_mask = tiny_batch(batch_size=1)
    with pytest.raises(ValueError) as error:
        model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    message = str(error.value)
    assert NO_NEGATIVES in message
    assert "this one (1 pair over 1 process) has 1: a batch of 1" in message
    assert "ITM's negatives would be the positive pair itself labelled 0" in message
    assert WHAT_TO_DO in message
    assert "return_loss=False" in message


def test_batch_of_one_still_gives_features_and_similarities_without_the_loss():
    model = tiny_model().eval()
    pixel_values, input_ids, attention_mask = tiny_batch(batch_size=1)
    with torch.no_grad():
        scores = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, return_loss=False)
        features = model(pixel_values=pixel_values)
    assert scores.loss is None
    assert scores.logits_per_image.shape == scores.logits_per_text.shape == (1, 1)
    assert torch.isfinite(scores.logits_per_image).all()
    assert features.image_feats.shape == (1, 4, 16)


def test_equal_image_ids_are_refused_naming_the_id():
    model = tiny_model().train()
    pixel_values, input_ids, attention_mask = tiny_batch(batch_size=4)
    with pytest.raises(ValueError) as error:
        model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
              image_ids=torch.tensor([7, 7, 7, 7]))
    message = str(error.value)
    assert NO_NEGATIVES in message
    assert "(4 pairs over 1 process) has 1: every image_id is 7" in message
    assert WHAT_TO_DO in message


def test_repeats_of_one_sample_are_refused_from_pixels_and_from_image_embeds():
    model = tiny_model().train()
    pixel_values, input_ids, attention_mask = tiny_batch(batch_size=4)
    repeated = pixel_values[:1].repeat(4, 1, 1, 1)
    for images in ({"pixel_values": repeated}, {"image_embeds": model.get_image_embeds(repeated).detach()}):
        with pytest.raises(ValueError) as error:
            model(**images, input_ids=input_ids, attention_mask=attention_mask)
        message = str(error.value)
        assert NO_NEGATIVES in message
        assert "has 1: all 4 images are identical, e.g. a collator repeating its one readable sample" in message
        assert WHAT_TO_DO in message


def test_two_distinct_images_are_enough_and_never_drawn_as_their_own_negative():
    model = tiny_model().train()
    pixel_values, input_ids, attention_mask = tiny_batch(batch_size=4)
    two_images = pixel_values[[0, 0, 1, 1]]
    image_ids = torch.tensor([5, 5, 9, 9])
    out = model(pixel_values=two_images, input_ids=input_ids, attention_mask=attention_mask, image_ids=image_ids)
    assert torch.isfinite(out.loss) and out.loss_itc > 0
    # Without ids, a batch of 2 different images trains too.
    out = model(pixel_values=pixel_values[:2], input_ids=input_ids[:2], attention_mask=attention_mask[:2])
    assert torch.isfinite(out.loss) and out.itm_logits.shape == (6, 2)


def test_distinct_images_count_by_id_first_then_by_exact_rows():
    images = torch.zeros(3, 2, 2)
    assert not has_two_distinct_images(images)
    images[2, 1, 1] = 1e-6
    assert has_two_distinct_images(images)
    # Ids decide when given: different ids of identical pixels are different images (and vice versa).
    assert has_two_distinct_images(torch.zeros(3, 2, 2), torch.tensor([1, 2, 2]))
    assert not has_two_distinct_images(images, torch.tensor([4, 4, 4]))


def test_sampler_refuses_rows_whose_every_column_is_a_positive():
    similarity = torch.tensor([[1.0, 2.0, 3.0], [3.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    positive_mask = torch.tensor([[True, True, True], [False, True, False], [True, True, True]])
    with pytest.raises(ValueError, match=r"rows \[0, 2\] of the similarities have no negative: every column is a "
                                         r"positive of theirs"):
        sample_hard_negatives(similarity, positive_mask)
    # Rows with a negative draw only negatives.
    torch.manual_seed(0)
    drawn = sample_hard_negatives(similarity[1:2].repeat(500, 1), positive_mask[1:2].repeat(500, 1))
    assert set(drawn.tolist()) == {0, 2}


def test_nan_pixels_are_refused_naming_their_rows():
    model = tiny_model().train()
    pixel_values, input_ids, attention_mask = tiny_batch(batch_size=4)
    pixel_values[0, 1, 3, 5] = float("nan")
    pixel_values[2] = float("nan")
    for return_loss in (True, False):
        with pytest.raises(ValueError) as error:
            model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                  return_loss=return_loss)
        assert str(error.value) == (
            "image_embeds hold NaN in rows [0, 2]: pixel_values already hold NaN in rows [0, 2] of this process's "
            "batch: check the images and their preprocessing"
        )
    with pytest.raises(ValueError, match=r"image_embeds hold NaN in rows \[0, 2\]"):
        model(pixel_values=pixel_values)


def test_nan_in_the_vision_tower_is_refused_pointing_at_its_weights():
    model = tiny_model().train()
    with torch.no_grad():
        model.vision_model.embeddings.patch_embedding.weight[0, 0, 0, 0] = float("nan")
    pixel_values, input_ids, attention_mask = tiny_batch(batch_size=4)
    with pytest.raises(ValueError) as error:
        model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    assert str(error.value) == (
        "image_embeds hold NaN in rows [0, 1, 2, 3]: check pixel_values and the vision tower's weights "
        "(vision_model, vision_layernorm)"
    )


def test_inf_in_given_image_embeds_is_refused_pointing_at_them():
    model = tiny_model().train()
    pixel_values, input_ids, attention_mask = tiny_batch(batch_size=4)
    image_embeds = model.get_image_embeds(pixel_values).detach()
    image_embeds[3, 2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"^image_embeds hold inf in rows \[3\]: check the image_embeds given"):
        model(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask)


def test_nan_after_the_vision_tower_is_refused_at_the_similarities():
    model = tiny_model().train()
    with torch.no_grad():
        model.text_proj.weight[0, 0] = float("nan")
    pixel_values, input_ids, attention_mask = tiny_batch(batch_size=4)
    with pytest.raises(ValueError) as error:
        model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    message = str(error.value)
    assert message.startswith(
        "the ITC similarities hold NaN (rows [0, 1, 2, 3] of logits_per_image, [0, 1, 2, 3] of logits_per_text) "
        "although image_embeds are finite; image_feats are not finite in rows [], text_feats in rows [0, 1, 2, 3], "
        "temp = 0.07."
    )
    assert "Check the Q-Former, vision_proj, text_proj and temp weights" in message


def test_one_image_overflowing_in_the_qformer_is_named_by_its_row():
    # image_embeds finite but 1e36 times too large in row 2: only that image's features overflow, so the message names
    # row 2 of logits_per_image and of image_feats (and every row of logits_per_text, whose column 2 it fills).
    model = tiny_model().train()
    pixel_values, input_ids, attention_mask = tiny_batch(batch_size=4)
    image_embeds = model.get_image_embeds(pixel_values).detach()
    image_embeds[2] *= 1e36
    with pytest.raises(ValueError) as error:
        model(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask)
    assert str(error.value).startswith(
        "the ITC similarities hold NaN (rows [2] of logits_per_image, [0, 1, 2, 3] of logits_per_text) "
        "although image_embeds are finite; image_feats are not finite in rows [2], text_feats in rows [], "
    )


# ---- the gathered batch decides, on every process alike -------------------------------------------------------------


def run_rank(rank: int, port: int, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = {}
    try:
        model = tiny_model().train()
        pixel_values, input_ids, attention_mask = tiny_batch(batch_size=2, seed=3)
        one = slice(rank, rank + 1)
        cases = {
            # One pair per process, different images: the gathered batch has two, so both processes train.
            "distinct": dict(pixel_values=pixel_values[one]),
            # The same image on both processes: both refuse, none waits for the other.
            "same image": dict(pixel_values=pixel_values[:1]),
            "same id": dict(pixel_values=pixel_values[one], image_ids=torch.tensor([3])),
            # NaN on process 1 only: both refuse.
            "nan on one": dict(pixel_values=pixel_values[one] * (float("nan") if rank == 1 else 1.0)),
        }
        for name, images in cases.items():
            try:
                out = model(**images, input_ids=input_ids[one], attention_mask=attention_mask[one])
                out.loss.backward()
                results[name] = f"loss {out.loss.item():.3f}, itm rows {out.itm_logits.shape[0]}"
            except ValueError as error:
                results[name] = str(error)
        with open(f"{out_dir}/rank{rank}.json", "w") as file:
            json.dump(results, file)
    finally:
        dist.destroy_process_group()


def test_processes_agree_on_the_gathered_batch(tmp_path):
    mp.spawn(run_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for rank, results in enumerate(ranks):
        assert results["distinct"].startswith("loss ") and results["distinct"].endswith("itm rows 3")
        assert NO_NEGATIVES in results["same image"]
        assert "(2 pairs over 2 processes) has 1: all 2 images are identical" in results["same image"]
        assert "(2 pairs over 2 processes) has 1: every image_id is 3" in results["same id"]
        assert results["nan on one"].startswith(
            f"image_embeds hold NaN in rows [1] of the batch gathered over 2 processes (1 rows each, this is "
            f"process {rank})"
        )


# ---- conversion of LAVIS checkpoints -------------------------------------------------------------------------------


def test_lavis_checkpoint_with_a_nan_tensor_is_refused_naming_the_key(tmp_path, capsys):
    state_dict = lavis_checkpoint("eva")
    key = "Qformer.bert.encoder.layer.1.output_query.dense.weight"
    state_dict[key] = state_dict[key].clone()
    state_dict[key][0, :3] = float("nan")
    checkpoint = save_checkpoint(tmp_path / "ckpt.pth", state_dict)
    argv = ["convert", "--from", "lavis", str(checkpoint), "--output", str(tmp_path / "out")]
    argv += ["--vision", write_json(tmp_path / "v.json", EVA_CONFIG)]
    argv += ["--qformer-config", write_json(tmp_path / "q.json", QFORMER_CONFIG)]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert f"tensor '{key}' holds NaN (3 of " in error
    assert "the checkpoint is damaged or was saved after training diverged" in error
    assert not (tmp_path / "out").exists()


def test_separate_vision_file_with_inf_is_refused_naming_the_file_and_key(tmp_path):
    tower = eva_tower()
    key = next(name for name in tower if name.endswith("attn.qkv.weight"))
    tower[key] = tower[key].clone()
    tower[key][1, 1] = float("-inf")
    tower_file = save_checkpoint(tmp_path / "eva_vit_g.pth", tower, wrap=False)
    with pytest.raises(ValueError, match=rf"eva_vit_g.pth: tensor '{key}' holds inf \(1 of \d+ values\)"):
        load_lavis_state_dict(tower_file)
    stage1_only = {k: v for k, v in lavis_checkpoint("eva").items() if not k.startswith("visual_encoder.")}
    checkpoint = save_checkpoint(tmp_path / "ckpt.pth", stage1_only)
    with pytest.raises(ValueError, match=rf"tensor '{key}' holds inf"):
        convert_lavis_checkpoint(checkpoint, tmp_path / "out", vision=EVA_CONFIG, qformer_config=QFORMER_CONFIG,
                                 vision_checkpoint=tower_file)
