"""Small real-ish data sets for the multi-label and text-pair examples, built from the SMS Spam Collection.

- ``sms_multilabel.csv``: every message with up to three labels: ``spam`` (the collection's own human
  label), ``number`` (the message holds a run of 5 or more digits: a phone or short code) and ``money``
  (it names a currency sign or amount, cash, prize, won/win, award or reward). ``number`` and ``money`` are
  derived by those rules, so they are what a rule-based tagger would say: the example shows the
  machinery (thresholds, per-label metrics), not human multi-label judgements. Every message with a label
  is kept, and as many messages without any (drawn with the seed), so that a CPU run stays short.
- ``sms_pairs.csv``: pairs of two different messages (``text_a``, ``text_b``) labelled ``same`` when both
  have the collection's same label and ``different`` otherwise; half of the pairs are same, with spam drawn
  as often as ham within each kind, each message used at most twice. The labels are the collection's own.

    python benchmarks/task_data.py --data ../shared/data/sms_spam_collection/SMSSpamCollection --out data/
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pandas as pd

MONEY = re.compile(r"[£$€]|\b\d+\s?(p|pence|pounds?|quid)\b|\bcash\b|\bprizes?\b|\bw[io]n\b|\bawards?\b|\brewards?\b",
                   re.IGNORECASE)
NUMBER = re.compile(r"\d{5,}")


def read_sms(path: Path) -> pd.DataFrame:
    rows = [line.split("\t", 1) for line in path.read_text(encoding="utf-8").splitlines() if "\t" in line]
    return pd.DataFrame(rows, columns=["label", "text"])


def multilabel(sms: pd.DataFrame, seed: int) -> pd.DataFrame:
    labels = [("spam" if lab == "spam" else "",) + (("number",) if NUMBER.search(t) else ()) +
              (("money",) if MONEY.search(t) else ()) for lab, t in zip(sms["label"], sms["text"])]
    df = pd.DataFrame({"text": sms["text"], "label": ["|".join(x for x in ls if x) for ls in labels]})
    none = df.index[df["label"] == ""]
    keep = np.random.default_rng(seed).permutation(none)[: len(df) - len(none)]
    return df[(df["label"] != "") | df.index.isin(keep)].reset_index(drop=True)


def pairs(sms: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """``n`` pairs: n/4 spam-spam, n/4 ham-ham, n/2 spam-ham (either order), no message in more than two."""
    rng = np.random.default_rng(seed)
    spam = list(rng.permutation(sms.index[sms["label"] == "spam"]))
    ham = list(rng.permutation(sms.index[sms["label"] == "ham"]))
    kinds = [("spam", "spam")] * (n // 4) + [("ham", "ham")] * (n // 4) + [("spam", "ham")] * (n - 2 * (n // 4))
    pool = {"spam": spam * 2, "ham": ham * 2}  # each message at most twice
    rows = []
    for a, b in (kinds[i] for i in rng.permutation(len(kinds))):
        x, y = pool[a].pop(), pool[b].pop()
        if rng.random() < 0.5:
            x, y = y, x
        rows.append({"text_a": sms.at[x, "text"], "text_b": sms.at[y, "text"],
                     "label": "same" if a == b else "different"})
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, type=Path, help="the SMSSpamCollection file")
    p.add_argument("--out", default=Path("data"), type=Path)
    p.add_argument("--pairs", type=int, default=1400, help="how many pairs")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()
    sms = read_sms(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    ml = multilabel(sms, args.seed)
    ml.to_csv(args.out / "sms_multilabel.csv", index=False)
    pr = pairs(sms, args.pairs, args.seed)
    pr.to_csv(args.out / "sms_pairs.csv", index=False)
    counts = {k: int(ml["label"].str.split("|").map(lambda s, k=k: k in s).sum()) for k in ("spam", "number", "money")}
    print(f"{args.out / 'sms_multilabel.csv'}: {len(ml)} texts, label counts {counts}, "
          f"{int((ml['label'] == '').sum())} with none")
    print(f"{args.out / 'sms_pairs.csv'}: {len(pr)} pairs, {pr['label'].value_counts().to_dict()}")


if __name__ == "__main__":
    main()
