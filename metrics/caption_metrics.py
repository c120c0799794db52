"""Caption metrics of the COCO caption toolkit (pycocoevalcap), without Java for BLEU, ROUGE-L and CIDEr.

`evaluate.load("path/to/caption_metrics.py")` copies this file and the two modules it imports relatively
(ptb_tokenizer.py, coco_caption_scorers.py) into evaluate's module cache.
"""

import importlib.util
import os
import shutil

import datasets
import evaluate

from .coco_caption_scorers import bleu, cider_d, rouge_l
from .ptb_tokenizer import ptb_tokenize_captions


_DESCRIPTION = """\
The COCO caption evaluation (Chen et al. 2015) as pycocoevalcap's COCOEvalCap runs it on raw captions: every caption
is PTB-tokenised, lower-cased and stripped of punctuation tokens, then scored with BLEU-1..4 (corpus level, "closest"
reference length), ROUGE-L (beta 1.2) and CIDEr-D (sigma 6, document frequencies from the references of the evaluated
set, so the score depends on which images are evaluated together). Scores are on the toolkit's scale (CIDEr 1.0 is
"100" in papers). The tokeniser and the three scorers are pure Python and equal the toolkit's Java tokeniser and
Python scorers on ordinary captions.

METEOR and SPICE need Java and their jar files and models, which ship with the `pycocoevalcap` package (SPICE's
Stanford CoreNLP models are downloaded by pycocoevalcap on first use; this metric never downloads). They are computed
through pycocoevalcap when all of it is present and `java_metrics=True`, else reported as None with the reason under
`unavailable`.
"""

_CITATION = """\
@article{chen2015microsoft,
  title={Microsoft {COCO} Captions: Data Collection and Evaluation Server},
  author={Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta, Saurabh and Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  journal={arXiv preprint arXiv:1504.00325},
  year={2015}
}
@inproceedings{vedantam2015cider,
  title={{CIDEr}: Consensus-based Image Description Evaluation},
  author={Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi},
  booktitle={CVPR},
  year={2015}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): one generated caption per image.
    references (`list` of `list` of `str`): the reference captions of each image.
    java_metrics (`bool`, defaults to True): also compute METEOR and SPICE where Java and pycocoevalcap's jars and
        models are present.
Returns:
    Bleu_1, Bleu_2, Bleu_3, Bleu_4, ROUGE_L, CIDEr (`float`): corpus scores on the toolkit's scale.
    METEOR, SPICE (`float` or None): None when unavailable.
    unavailable (`dict`): metric name -> why it was not computed (empty when everything was).
Examples:
    >>> caption_metrics = CaptionMetrics()
    >>> result = caption_metrics.compute(predictions=["a dog runs on the grass."],
    ...                                  references=[["A dog running on grass.", "A brown dog runs outside."]])
    >>> round(result["Bleu_1"], 4)
    0.8333
"""

JAVA_METRICS = ("METEOR", "SPICE")


def _pycocoevalcap_files(metric: str):
    """(module to import, files it needs) for a Java metric of pycocoevalcap, or a reason why it cannot run."""
    if shutil.which("java") is None:
        return None, "no `java` executable on PATH"
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return None, "the pycocoevalcap package is not installed"
    root = list(spec.submodule_search_locations)[0]
    if metric == "METEOR":
        module, files = "pycocoevalcap.meteor.meteor", ["meteor/meteor-1.5.jar", "meteor/data/paraphrase-en.gz"]
    else:
        module = "pycocoevalcap.spice.spice"
        files = ["spice/spice-1.0.jar", "spice/lib/stanford-corenlp-3.6.0.jar", "spice/lib/stanford-corenlp-3.6.0-models.jar"]
    missing = [name for name in files if not os.path.exists(os.path.join(root, name))]
    if missing:
        return None, f"pycocoevalcap lacks {missing} (it would download them; this metric does not)"
    return module, None


def _java_metric(metric: str, gts: dict, res: dict):
    module_name, reason = _pycocoevalcap_files(metric)
    if module_name is None:
        return None, reason
    module = importlib.import_module(module_name)
    scorer = module.Meteor() if metric == "METEOR" else module.Spice()
    score, _ = scorer.compute_score(gts, res)
    return float(score), None


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CaptionMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
            codebase_urls=["https://github.com/salaniz/pycocoevalcap"],
            reference_urls=["https://arxiv.org/abs/1504.00325", "https://arxiv.org/abs/1411.5726"],
        )

    def _compute(self, predictions, references, java_metrics=True):
        if len(predictions) == 0:
            raise ValueError("CaptionMetrics got no predictions; expected one caption per image.")
        for index, refs in enumerate(references):
            if len(refs) == 0:
                raise ValueError(f"references[{index}] is empty; expected at least one reference caption per image.")
        # Tokenised as the toolkit does: all references in one stream, all predictions in another.
        tokenized_predictions = ptb_tokenize_captions(list(predictions))
        flat_references = ptb_tokenize_captions([ref for refs in references for ref in refs])
        tokenized_references, start = [], 0
        for refs in references:
            tokenized_references.append(flat_references[start : start + len(refs)])
            start += len(refs)

        bleu_scores = bleu(tokenized_predictions, tokenized_references)
        result = {f"Bleu_{k + 1}": float(score) for k, score in enumerate(bleu_scores)}
        result["ROUGE_L"] = float(rouge_l(tokenized_predictions, tokenized_references))
        result["CIDEr"] = float(cider_d(tokenized_predictions, tokenized_references))

        unavailable = {}
        gts = dict(enumerate(tokenized_references))
        res = {index: [prediction] for index, prediction in enumerate(tokenized_predictions)}
        for metric in JAVA_METRICS:
            if java_metrics:
                result[metric], reason = _java_metric(metric, gts, res)
            else:
                result[metric], reason = None, "not requested (java_metrics=False)"
            if reason is not None:
                unavailable[metric] = reason
        result["unavailable"] = unavailable
        return result
