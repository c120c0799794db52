"""RetrievalRecall against a hand-worked example and LAVIS's `itm_eval` loop (lavis/tasks/retrieval.py)."""

import numpy as np
import pytest

from modeling_blip2.metrics import RetrievalRecall


def lavis_itm_eval(scores_i2t, scores_t2i, txt2img, img2txt):
    """RetrievalTask.itm_eval, as in LAVIS (minus the torch.no_grad decorator)."""
    # Images->Text
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        # Score
        rank = 1e20
        for i in img2txt[index]:
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[index] = rank

    # Compute metrics
    tr1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    tr5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    tr10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)

    # Text->Images
    ranks = np.zeros(scores_t2i.shape[0])

    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]

    # Compute metrics
    ir1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    ir5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    ir10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)

    tr_mean = (tr1 + tr5 + tr10) / 3
    ir_mean = (ir1 + ir5 + ir10) / 3
    r_mean = (tr_mean + ir_mean) / 2

    return {
        "txt_r1": tr1,
        "txt_r5": tr5,
        "txt_r10": tr10,
        "txt_r_mean": tr_mean,
        "img_r1": ir1,
        "img_r5": ir5,
        "img_r10": ir10,
        "img_r_mean": ir_mean,
        "r_mean": r_mean,
    }


def test_recall_on_a_hand_worked_example():
    # 3 images with 2 texts each (texts 2i and 2i+1 describe image i).
    scores_i2t = [
        [0.1, 0.9, 0.8, 0.2, 0.3, 0.4],  # best own text (1) ranks first
        [0.9, 0.8, 0.1, 0.2, 0.7, 0.6],  # own texts 3 and 2 rank 5th and 6th: best rank 4 (0-based)
        [0.5, 0.6, 0.7, 0.8, 0.1, 0.2],  # own texts 5 and 4 rank 5th and 6th: best rank 4
    ]
    scores_t2i = [
        [0.9, 0.1, 0.2],  # own image 0 first
        [0.1, 0.9, 0.2],  # own image 0 third
        [0.3, 0.5, 0.4],  # own image 1 first
        [0.6, 0.5, 0.4],  # own image 1 second
        [0.1, 0.2, 0.3],  # own image 2 first
        [0.3, 0.2, 0.1],  # own image 2 third
    ]
    result = RetrievalRecall().compute(
        scores_i2t=scores_i2t, scores_t2i=scores_t2i, img2txt=[[0, 1], [2, 3], [4, 5]], txt2img=[0, 0, 1, 1, 2, 2]
    )
    assert result["txt_r1"] == pytest.approx(100 / 3)
    assert result["txt_r5"] == result["txt_r10"] == 100.0
    assert result["img_r1"] == 50.0
    assert result["img_r5"] == result["img_r10"] == 100.0
    assert result["txt_r_mean"] == pytest.approx((100 / 3 + 200) / 3)
    assert result["img_r_mean"] == pytest.approx(250 / 3)
    assert result["r_mean"] == pytest.approx(((100 / 3 + 200) / 3 + 250 / 3) / 2)


@pytest.mark.parametrize("seed", [0, 1])
def test_recall_equals_lavis_loop_including_ties(seed):
    rng = np.random.default_rng(seed)
    num_images, texts_per_image = 40, 5
    num_texts = num_images * texts_per_image
    txt2img = np.repeat(np.arange(num_images), texts_per_image)
    rng.shuffle(txt2img)
    img2txt = [np.flatnonzero(txt2img == image).tolist() for image in range(num_images)]
    # Coarse scores make ties common; -100 outside each row's top k mimics LAVIS's ITM re-ranking fill value.
    scores_i2t = np.round(rng.normal(size=(num_images, num_texts)) + 0.8 * (txt2img[None] == np.arange(num_images)[:, None]), 1)
    scores_i2t = scores_i2t.astype(np.float32)
    scores_t2i = scores_i2t.T.copy() + np.round(rng.normal(size=(num_texts, num_images)), 1).astype(np.float32)
    for scores, k in ((scores_i2t, 16), (scores_t2i, 8)):
        kth_best = -np.sort(-scores, axis=1)[:, k - 1 : k]
        scores[scores < kth_best] = -100.0

    expected = lavis_itm_eval(scores_i2t, scores_t2i, txt2img.tolist(), img2txt)
    result = RetrievalRecall().compute(
        scores_i2t=scores_i2t, scores_t2i=scores_t2i, img2txt=img2txt, txt2img=txt2img.tolist()
    )
    assert result == expected
    assert 0 < expected["txt_r1"] < expected["txt_r10"] < 100 and 0 < expected["img_r1"] < expected["img_r10"] < 100


def test_scores_added_in_a_batch_give_the_same_recall():
    rng = np.random.default_rng(2)
    scores_i2t = rng.normal(size=(6, 12))
    inputs = dict(
        scores_i2t=scores_i2t,
        scores_t2i=scores_i2t.T + rng.normal(size=(12, 6)),
        img2txt=[[2 * i, 2 * i + 1] for i in range(6)],
        txt2img=[j // 2 for j in range(12)],
    )
    metric = RetrievalRecall()
    metric.add_batch(**{name: [value] for name, value in inputs.items()})
    assert metric.compute() == RetrievalRecall().compute(**inputs)


def test_bad_retrieval_inputs_are_named_in_the_error():
    scores = np.zeros((2, 4))
    with pytest.raises(ValueError, match=r"scores_t2i has shape \(2, 4\); expected \(4, 2\)"):
        RetrievalRecall().compute(scores_i2t=scores, scores_t2i=scores, img2txt=[[0, 1], [2, 3]], txt2img=[0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"img2txt\[1\] = \[\]"):
        RetrievalRecall().compute(scores_i2t=scores, scores_t2i=scores.T, img2txt=[[0, 1], []], txt2img=[0, 0, 1, 1])
    with pytest.raises(ValueError, match="missing"):
        RetrievalRecall().compute(scores_i2t=scores, scores_t2i=scores.T)
    # An image index past the end (an IndexError unchecked) or negative (silently the last image) is refused.
    for txt2img in ([0, 0, 1, 2], [0, 0, 1, -1]):
        with pytest.raises(ValueError, match=r"txt2img holds image indices outside \[0, 2\)"):
            RetrievalRecall().compute(scores_i2t=scores, scores_t2i=scores.T, img2txt=[[0, 1], [2, 3]], txt2img=txt2img)


def test_two_evaluation_sets_in_one_compute_and_unknown_keywords_are_refused():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(2, 4))
    inputs = dict(scores_i2t=scores, scores_t2i=scores.T, img2txt=[[0, 1], [2, 3]], txt2img=[0, 0, 1, 1])
    metric = RetrievalRecall()
    for _ in range(2):
        metric.add_batch(**{name: [value] for name, value in inputs.items()})
    with pytest.raises(ValueError, match="one evaluation set per compute call; got 2"):
        metric.compute()
    # A keyword the metric does not take is not silently dropped by the single-process shortcut.
    with pytest.raises(TypeError, match="unknown_option"):
        RetrievalRecall().compute(**inputs, unknown_option=1)


def test_the_metric_class_documents_its_arguments_for_help():
    # evaluate's add_start_docstrings writes the description and the arguments into the class docstring.
    assert "Recall@K for image-to-text" in RetrievalRecall.__doc__ and "scores_i2t (`N_img x N_txt`" in RetrievalRecall.__doc__


def test_one_image_is_enough_and_text_ids_past_the_last_text_are_refused():
    result = RetrievalRecall().compute(
        scores_i2t=[[0.2, 0.9]], scores_t2i=[[0.5], [0.1]], img2txt=[[1]], txt2img=[0, 0]
    )
    assert result["txt_r1"] == 100.0 and result["img_r1"] == 100.0
    with pytest.raises(ValueError, match=r"img2txt\[0\] = \[2\]; expected one or more text indices in \[0, 2\)"):
        RetrievalRecall().compute(scores_i2t=[[0.2, 0.9]], scores_t2i=[[0.5], [0.1]], img2txt=[[2]], txt2img=[0, 0])
