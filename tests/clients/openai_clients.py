"""Points the real OpenAI Python SDK and LangChain's OpenAIEmbeddings at a running Flywheel server and checks
their vectors equal the server's own /v1/embed (within 1e-6; with `dimensions`, its first values re-normalised).

    .venv/bin/python tests/clients/openai_clients.py http://127.0.0.1:PORT

Prints `ok <check>` per check; tests/compat_http.rs runs it.
"""

import json
import math
import sys
import urllib.request

from langchain_openai import OpenAIEmbeddings
from openai import OpenAI

BASE = sys.argv[1].rstrip("/")
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TEXTS = [
    "The quarterly report is due on Friday.",
    "Win a free cruise! Click here now to claim your prize.",
    "退货很麻烦，客服也不回复。",
]


def own(texts):
    request = urllib.request.Request(
        BASE + "/v1/embed",
        json.dumps({"inputs": texts}).encode(),
        {"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.load(answer)["embeddings"]


def check(name, got, want):
    assert len(got) == len(want), (name, len(got), len(want))
    for g, w in zip(got, want):
        assert len(g) == len(w), (name, len(g), len(w))
        diff = max(abs(a - b) for a, b in zip(g, w))
        assert diff <= 1e-6, (name, diff)
    print("ok", name, flush=True)


def shortened(v, d):
    v = v[:d]
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


reference = own(TEXTS)
client = OpenAI(base_url=BASE + "/v1", api_key="not-needed", max_retries=0)

# Default arguments: the SDK asks for base64 and decodes it itself.
answer = client.embeddings.create(model=MODEL, input=TEXTS)
assert answer.model == MODEL and answer.usage.prompt_tokens > 0, answer
check("sdk-base64", [d.embedding for d in answer.data], reference)

answer = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
check("sdk-float", [d.embedding for d in answer.data], reference)

answer = client.embeddings.create(model=MODEL, input=TEXTS[0], dimensions=128)
check("sdk-dimensions", [answer.data[0].embedding], [shortened(reference[0], 128)])

# LangChain: without tiktoken's length check (it would send OpenAI's token ids, and fetch their vocabulary), and
# with chunks of at most [limits] max_inputs texts (LangChain's default is 1,000 per request).
embeddings = OpenAIEmbeddings(
    model=MODEL,
    base_url=BASE + "/v1",
    api_key="not-needed",
    check_embedding_ctx_length=False,
    chunk_size=256,
    max_retries=0,
)
check("langchain", embeddings.embed_documents(TEXTS), reference)
# More documents than one request may hold: LangChain cuts them into chunks, each answered.
many = embeddings.embed_documents(TEXTS * 150)
assert len(many) == len(TEXTS) * 150, len(many)
check("langchain-chunked", many[-len(TEXTS):], reference)
check("langchain-query", [embeddings.embed_query(TEXTS[1])], [reference[1]])
