"""Plain-Python classification metrics (no numpy or torch), shared by benches/peft_classify.py and
benches/chinese-sentiment.sh so that both sides of a comparison are scored by the same code."""


def macro_f1(truth, pred, classes):
    f1s = []
    for c in range(classes):
        tp = sum(1 for t, p in zip(truth, pred) if t == c and p == c)
        fp = sum(1 for t, p in zip(truth, pred) if t != c and p == c)
        fn = sum(1 for t, p in zip(truth, pred) if t == c and p != c)
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(f1s) / classes


def auc(truth, score):
    """Area under the ROC curve: the chance a positive outscores a negative (ties count half)."""
    ranked = sorted(zip(score, truth))
    ranks, i = [0.0] * len(ranked), 0
    while i < len(ranked):
        j = i
        while j + 1 < len(ranked) and ranked[j + 1][0] == ranked[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    pos = sum(t for _, t in ranked)
    neg = len(ranked) - pos
    rank_sum = sum(r for r, (_, t) in zip(ranks, ranked) if t == 1)
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)
