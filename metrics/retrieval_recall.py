"""Image-text retrieval recall@K, as LAVIS's retrieval task reports it.

Self-contained on purpose: `evaluate.load("path/to/retrieval_recall.py")` copies this file alone into its module cache.
"""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """\
Recall@K for image-to-text and text-to-image retrieval (as `itm_eval` in LAVIS's lavis/tasks/retrieval.py reports it
for BLIP-2 on COCO and Flickr30K). Each image ranks all texts by `scores_i2t`; its rank is the best rank among its
ground-truth texts. Each text ranks all images by `scores_t2i`; its rank is that of its one ground-truth image. Ranks
come from `numpy.argsort` of the scores, reversed, as in LAVIS, so ties break exactly as there.

One `compute` call scores one whole evaluation set (the score matrices are not split into batches).
"""

_CITATION = """\
@inproceedings{li2023blip2,
  title={{BLIP-2}: Bootstrapping Language-Image Pre-training with Frozen Image Encoders and Large Language Models},
  author={Li, Junnan and Li, Dongxu and Savarese, Silvio and Hoi, Steven},
  booktitle={ICML},
  year={2023}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    scores_i2t (`N_img x N_txt` array or nested list of float): score of every text for every image.
    scores_t2i (`N_txt x N_img` array or nested list of float): score of every image for every text.
    img2txt (`list` of `list` of `int`): the ground-truth text indices of each image.
    txt2img (`list` of `int`): the ground-truth image index of each text.
Returns:
    txt_r1, txt_r5, txt_r10, txt_r_mean: image-to-text recall@1/5/10 in percent and their mean.
    img_r1, img_r5, img_r10, img_r_mean: text-to-image recall@1/5/10 in percent and their mean.
    r_mean: the mean of txt_r_mean and img_r_mean.
Examples:
    >>> recall = RetrievalRecall()
    >>> recall.compute(scores_i2t=[[0.9, 0.1], [0.2, 0.8]], scores_t2i=[[0.9, 0.2], [0.1, 0.8]],
    ...                img2txt=[[0], [1]], txt2img=[0, 1])["r_mean"]
    100.0
"""


def _rank_positions(scores: np.ndarray) -> np.ndarray:
    """positions[i, j]: where column j lands when row i is sorted by descending score (0 = first).

    Same order as LAVIS's per-row `np.argsort(score)[::-1]`, so tied scores resolve identically."""
    order = np.argsort(scores, axis=1)[:, ::-1]
    positions = np.empty_like(order)
    positions[np.arange(scores.shape[0])[:, None], order] = np.arange(scores.shape[1])[None, :]
    return positions


def _recalls(ranks: np.ndarray) -> tuple:
    return tuple(100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10))


def _as_matrix(name: str, value, shape: tuple) -> np.ndarray:
    matrix = np.asarray(value, dtype=np.float64)
    if matrix.shape != shape:
        raise ValueError(f"{name} has shape {matrix.shape}; expected {shape} (from the lengths of img2txt and txt2img).")
    return matrix


def retrieval_recall(scores_i2t, scores_t2i, img2txt, txt2img) -> dict:
    img2txt = [np.asarray(text_ids, dtype=np.int64).reshape(-1) for text_ids in img2txt]
    txt2img = np.asarray(txt2img, dtype=np.int64).reshape(-1)
    num_images, num_texts = len(img2txt), len(txt2img)
    if num_images == 0 or num_texts == 0:
        raise ValueError(f"Retrieval needs at least one image and one text; got {num_images} and {num_texts}.")
    scores_i2t = _as_matrix("scores_i2t", scores_i2t, (num_images, num_texts))
    scores_t2i = _as_matrix("scores_t2i", scores_t2i, (num_texts, num_images))
    for image_id, text_ids in enumerate(img2txt):
        if len(text_ids) == 0 or text_ids.min() < 0 or text_ids.max() >= num_texts:
            raise ValueError(
                f"img2txt[{image_id}] = {text_ids.tolist()}; expected one or more text indices in [0, {num_texts})."
            )
    if txt2img.min() < 0 or txt2img.max() >= num_images:
        raise ValueError(f"txt2img holds image indices outside [0, {num_images}): {txt2img.tolist()}.")

    text_positions = _rank_positions(scores_i2t)
    image_ranks = np.array([text_positions[i, text_ids].min() for i, text_ids in enumerate(img2txt)])
    text_ranks = _rank_positions(scores_t2i)[np.arange(num_texts), txt2img]

    txt_r1, txt_r5, txt_r10 = _recalls(image_ranks)
    img_r1, img_r5, img_r10 = _recalls(text_ranks)
    txt_r_mean = (txt_r1 + txt_r5 + txt_r10) / 3
    img_r_mean = (img_r1 + img_r5 + img_r10) / 3
    return {
        "txt_r1": txt_r1,
        "txt_r5": txt_r5,
        "txt_r10": txt_r10,
        "txt_r_mean": txt_r_mean,
        "img_r1": img_r1,
        "img_r5": img_r5,
        "img_r10": img_r10,
        "img_r_mean": img_r_mean,
        "r_mean": (txt_r_mean + img_r_mean) / 2,
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # One example is one whole evaluation set: the four inputs have different lengths (images vs texts).
            features=datasets.Features(
                {
                    "scores_i2t": datasets.Sequence(datasets.Sequence(datasets.Value("float64"))),
                    "scores_t2i": datasets.Sequence(datasets.Sequence(datasets.Value("float64"))),
                    "img2txt": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                    "txt2img": datasets.Sequence(datasets.Value("int64")),
                }
            ),
            reference_urls=["https://github.com/salesforce/LAVIS/blob/main/lavis/tasks/retrieval.py"],
        )

    def compute(self, *, scores_i2t=None, scores_t2i=None, img2txt=None, txt2img=None, **kwargs):
        """Scores one whole evaluation set; the arguments are described below.

        In a single process the matrices go straight to the computation: a round trip through evaluate's Arrow cache
        as nested lists would cost minutes for COCO's 5k x 25k scores. With several processes, evaluate gathers them.
        """
        inputs = {"scores_i2t": scores_i2t, "scores_t2i": scores_t2i, "img2txt": img2txt, "txt2img": txt2img}
        if all(value is None for value in inputs.values()):
            return super().compute(**kwargs)  # what add_batch stored
        missing = [name for name, value in inputs.items() if value is None]
        if missing:
            raise ValueError(f"RetrievalRecall.compute is missing {missing}; it takes all of {list(inputs)}.")
        if self.num_process == 1 and not kwargs:
            return retrieval_recall(**inputs)
        return super().compute(**{name: [value] for name, value in inputs.items()}, **kwargs)

    def _compute(self, scores_i2t, scores_t2i, img2txt, txt2img):
        if len(scores_i2t) != 1:
            raise ValueError(f"RetrievalRecall scores one evaluation set per compute call; got {len(scores_i2t)}.")
        return retrieval_recall(
            np.stack(scores_i2t[0]), np.stack(scores_t2i[0]), list(img2txt[0]), txt2img[0]
        )
