"""BLEU, ROUGE-L and CIDEr-D exactly as the COCO caption toolkit (pycocoevalcap) computes them.

Inputs are PTB-tokenised captions (see ptb_tokenizer.py), one prediction and its references per image. The arithmetic
follows pycocoevalcap's bleu_scorer.py, rouge.py and cider_scorer.py operation for operation, including their
quirks (BLEU's 1e-9 / 1e-15 smoothing constants, CIDEr-D's length penalty measured on bigram counts, ROUGE-L's split
on single spaces), so that scores agree with the toolkit's to rounding error.
"""

import math
from collections import defaultdict

import numpy as np


def _ngram_counts(sentence: str, n: int = 4) -> dict:
    words = sentence.split()
    counts = defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def bleu(predictions: list, references: list, n: int = 4) -> list:
    """Corpus BLEU-1..n with the "closest" effective reference length (Bleu.compute_score)."""
    small, tiny = 1e-9, 1e-15  # so that a zero n-gram count still gives a finite 0 instead of a division by zero
    total_test_length, total_reference_length = 0, 0
    guessed, correct = [0] * n, [0] * n
    for prediction, refs in zip(predictions, references):
        reference_lengths, max_reference_counts = [], {}
        for ref in refs:
            ref_counts = _ngram_counts(ref, n)
            reference_lengths.append(len(ref.split()))
            for ngram, count in ref_counts.items():
                max_reference_counts[ngram] = max(max_reference_counts.get(ngram, 0), count)
        test_length = len(prediction.split())
        total_test_length += test_length
        total_reference_length += min((abs(length - test_length), length) for length in reference_lengths)[1]
        for k in range(n):
            guessed[k] += max(0, test_length - k)
        for ngram, count in _ngram_counts(prediction, n).items():
            correct[len(ngram) - 1] += min(max_reference_counts.get(ngram, 0), count)

    scores = []
    product = 1.0
    for k in range(n):
        product *= float(correct[k] + tiny) / (guessed[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (total_test_length + tiny) / (total_reference_length + small)
    if ratio < 1:  # brevity penalty
        scores = [score * math.exp(1 - 1 / ratio) for score in scores]
    return scores


def _longest_common_subsequence(a: list, b: list) -> int:
    if len(a) < len(b):
        a, b = b, a
    lengths = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for j in range(1, len(b) + 1):
        for i in range(1, len(a) + 1):
            if a[i - 1] == b[j - 1]:
                lengths[i][j] = lengths[i - 1][j - 1] + 1
            else:
                lengths[i][j] = max(lengths[i - 1][j], lengths[i][j - 1])
    return lengths[len(a)][len(b)]


def rouge_l(predictions: list, references: list, beta: float = 1.2) -> float:
    """Mean over images of ROUGE-L F (beta 1.2) from the best precision and best recall over the references."""
    scores = []
    for prediction, refs in zip(predictions, references):
        candidate = prediction.split(" ")
        precisions, recalls = [], []
        for ref in refs:
            reference = ref.split(" ")
            lcs = _longest_common_subsequence(reference, candidate)
            precisions.append(lcs / float(len(candidate)))
            recalls.append(lcs / float(len(reference)))
        precision, recall = max(precisions), max(recalls)
        if precision != 0 and recall != 0:
            scores.append(((1 + beta**2) * precision * recall) / float(recall + beta**2 * precision))
        else:
            scores.append(0.0)
    return np.mean(np.array(scores))


def cider_d(predictions: list, references: list, n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D: tf-idf n-gram cosine similarity (idf from the references of this evaluation set), clipped, with a
    Gaussian length penalty, averaged over n = 1..4 and the references, times 10; then the mean over images."""
    reference_counts = [[_ngram_counts(ref, n) for ref in refs] for refs in references]
    document_frequency = defaultdict(float)
    for counts_per_ref in reference_counts:
        for ngram in set(ngram for counts in counts_per_ref for ngram in counts):
            document_frequency[ngram] += 1
    log_num_images = np.log(float(len(reference_counts)))

    def tf_idf(counts):
        vectors = [defaultdict(float) for _ in range(n)]
        norms = [0.0] * n
        length = 0
        for ngram, term_frequency in counts.items():
            df = np.log(max(1.0, document_frequency[ngram]))
            order = len(ngram) - 1
            vectors[order][ngram] = float(term_frequency) * (log_num_images - df)
            norms[order] += pow(vectors[order][ngram], 2)
            if order == 1:  # the toolkit measures caption length in bigrams
                length += term_frequency
        return vectors, [np.sqrt(norm) for norm in norms], length

    def similarity(hypothesis, reference):
        (vec_hyp, norm_hyp, length_hyp), (vec_ref, norm_ref, length_ref) = hypothesis, reference
        delta = float(length_hyp - length_ref)
        values = np.array([0.0] * n)
        for order in range(n):
            for ngram in vec_hyp[order]:
                values[order] += min(vec_hyp[order][ngram], vec_ref[order][ngram]) * vec_ref[order][ngram]
            if norm_hyp[order] != 0 and norm_ref[order] != 0:
                values[order] /= norm_hyp[order] * norm_ref[order]
            values[order] *= np.e ** (-(delta**2) / (2 * sigma**2))
        return values

    scores = []
    for prediction, counts_per_ref in zip(predictions, reference_counts):
        hypothesis = tf_idf(_ngram_counts(prediction, n))
        score = np.array([0.0] * n)
        for counts in counts_per_ref:
            score += similarity(hypothesis, tf_idf(counts))
        score_avg = np.mean(score)
        score_avg /= len(counts_per_ref)
        score_avg *= 10.0
        scores.append(score_avg)
    return np.mean(np.array(scores))
