"""
Anomaly-detection metrics: AUROC and average precision, for image scores and for pixel maps, and the
per-category Markdown table that AA-CLIP-style papers report (image AUROC, pixel AUROC, pixel AP).

  - auroc(): exactly from ranks. AUROC = P(score of a random positive > score of a random negative), ties
    counted 1/2, which is the Mann-Whitney U statistic divided by n_pos * n_neg (Hanley & McNeil 1982).
  - average_precision(): the area under the step precision-recall curve, as scikit-learn's
    average_precision_score defines it: AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds,
    from the highest down; equal scores form one threshold (no interpolation, unlike the VOC 11-point AP).

No scikit-learn: these are short, and tests/test_anomaly.py checks them against brute-force counts.
Pixel metrics flatten every map and mask into one long vector. Scores keep their dtype (float32 maps sort
the same as float64 copies, at half the memory); sums are accumulated in float64.

References:
- Hanley & McNeil 1982, "The meaning and use of the area under a ROC curve":
  https://doi.org/10.1148/radiology.143.1.7063747
- scikit-learn average_precision_score:
  https://scikit-learn.org/stable/modules/generated/sklearn.metrics.average_precision_score.html
- AA-CLIP forward_utils.metrics_eval (the metrics reported): https://github.com/Mwxinnn/AA-CLIP
"""

import numpy as np


def _flat(x):
    if hasattr(x, "detach"):  # a torch tensor, on any device
        x = x.detach().cpu().numpy()
    return np.asarray(x).reshape(-1)


def _scores_and_labels(scores, labels):
    s, y = _flat(scores), _flat(labels)
    if s.size != y.size:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0/1 (or booleans)")
    y = y.astype(bool)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise ValueError(f"AUROC/AP need both classes, got {n_pos} positives and {y.size - n_pos} negatives")
    return s, y, n_pos


def _tied_groups(sorted_scores):
    """Start index and size of each run of equal values in an ascending array."""
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    return starts, np.diff(np.r_[starts, sorted_scores.size])


def auroc(scores, labels):
    """Area under the ROC curve from the rank sum of the positives (Mann-Whitney U), ties counted 1/2."""
    s, y, n_pos = _scores_and_labels(scores, labels)
    order = np.argsort(s, kind="stable")
    starts, sizes = _tied_groups(s[order])
    mean_rank = starts + (sizes + 1) / 2.0  # tied values share the mean of their 1-based ranks
    rank = np.repeat(mean_rank, sizes)  # rank of each sorted element
    rank_sum_pos = rank[y[order]].sum(dtype=np.float64)
    u = rank_sum_pos - n_pos * (n_pos + 1) / 2.0  # pairs (pos, neg) where pos wins, ties counted 1/2
    return float(u / (n_pos * (y.size - n_pos)))


def average_precision(scores, labels):
    """sum_n (R_n - R_{n-1}) P_n, thresholds at each distinct score from the highest down (sklearn's AP)."""
    s, y, n_pos = _scores_and_labels(scores, labels)
    order = np.argsort(s, kind="stable")[::-1]  # descending; ties end up together
    starts, sizes = _tied_groups(-s[order])
    ends = starts + sizes - 1  # last index of each tied group: the threshold takes the whole group
    tp = np.cumsum(y[order], dtype=np.float64)[ends]  # true positives predicted at each threshold
    precision, recall = tp / (ends + 1), tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def pixel_auroc(maps, masks):
    """AUROC over all pixels: maps (N, H, W) scores, masks (N, H, W) or (N, 1, H, W) with values in {0, 1}."""
    return auroc(maps, _flat(masks) > 0.5)


def pixel_ap(maps, masks):
    """Average precision over all pixels, same inputs as pixel_auroc."""
    return average_precision(maps, _flat(masks) > 0.5)


def per_category_table(results):
    """Markdown table from {category: {"image_auroc", "pixel_auroc", "pixel_ap"}} (fractions), plus the mean.
    A missing or None value prints as "-" and is left out of its column's mean."""
    columns = [("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("pixel_ap", "pixel AP")]
    lines = ["| category | " + " | ".join(title for _, title in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    fmt = lambda v: "-" if v is None else f"{100 * v:.1f}"  # percentages, as papers report them
    for category, row in results.items():
        lines.append(f"| {category} | " + " | ".join(fmt(row.get(key)) for key, _ in columns) + " |")
    means = []
    for key, _ in columns:
        values = [row[key] for row in results.values() if row.get(key) is not None]
        means.append(float(np.mean(values)) if values else None)
    lines.append("| **mean** | " + " | ".join(fmt(m) for m in means) + " |")
    return "\n".join(lines)
