#!/usr/bin/env python3
"""How often a rollout's accuracy analysis reaches a wrong verdict when it looks at growing evidence.

Simulates one rollout step with the shipped defaults (10 % candidate share, min_feedback 100, margin 0.02,
confidence 0.95; stable 0.90 accurate): judgements arrive one at a time and the analysis runs after every
`every` of them, until it passes or rolls back. Two rules:
- fixed: the Agresti-Caffo interval at the configured confidence at every look (Flywheel before the change);
- sequential: Flywheel's rule (src/rollout/analysis.rs): look k when the smaller arm first holds
  min_feedback x 2^k judgements, at one-sided level (1 - confidence) / 2^(k+1).
A candidate as accurate as stable should be rolled back at most 5 % of the time, and one worse by the
margin (0.88) should pass at most 5 % of the time.
Usage: benches/rollout_looks.py [runs per row, default 2000]
"""
import math
import random
import sys

CONFIDENCE, MARGIN, MIN_FEEDBACK, SHARE, STABLE = 0.95, 0.02, 100, 0.1, 0.90


def z(confidence):
    lo, hi = 0.0, 12.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(mid / math.sqrt(2)) > 1 - confidence:
            lo = mid
        else:
            hi = mid
    return lo


def verdict(cs, js, cc, jc, confidence):
    ps, pc = (cs + 1) / (js + 2), (cc + 1) / (jc + 2)
    se = math.sqrt(ps * (1 - ps) / (js + 2) + pc * (1 - pc) / (jc + 2))
    q = z(confidence) * se
    if pc - ps + q < 0:
        return "rollback"
    if pc - ps - q > -MARGIN:
        return "pass"
    return None


def run(candidate, rule, every, rng, cap=400_000):
    cs = js = cc = jc = 0
    next_look = 0
    for n in range(1, cap + 1):
        if rng.random() < SHARE:
            jc += 1
            cc += rng.random() < candidate
        else:
            js += 1
            cs += rng.random() < STABLE
        if n % every or min(js, jc) < MIN_FEEDBACK:
            continue
        if rule == "fixed":
            v = verdict(cs, js, cc, jc, CONFIDENCE)
        else:
            look = int(math.log2(min(js, jc) // MIN_FEEDBACK))
            if look < next_look:
                continue
            next_look = look + 1
            v = verdict(cs, js, cc, jc, 1 - (1 - CONFIDENCE) / 2 ** (look + 1))
        if v:
            return v, jc
    return "hold", jc


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    rng = random.Random(1)
    print("| rule | analysed every | candidate | rolled back | passed | median candidate judgements to a verdict |")
    print("| --- | --- | --- | --- | --- | --- |")
    for rule in ("fixed", "sequential"):
        for every in (1, 100):
            for candidate in (0.90, 0.88):
                results = [run(candidate, rule, every, rng) for _ in range(runs)]
                share = lambda v: sum(r[0] == v for r in results) / runs
                median = sorted(r[1] for r in results)[runs // 2]
                print(f"| {rule} | {every} judgements | {candidate:.2f} | {share('rollback'):.3f} | "
                      f"{share('pass'):.3f} | {median} |")


if __name__ == "__main__":
    main()
