"""What a long `GET /v1/feedback` page costs the server's memory.

Starts `flywheel serve` (the binary given, default target/debug/flywheel) on a fresh data directory, posts
ROWS feedback rows of 60 KB each to one task, then reads one page of all of them while sampling the server's
resident memory (VmRSS) every 5 ms, and prints the peak growth over the memory before the read.

    python3 loadtest/feedback-listing-memory.py [--binary PATH] [--rows 2000]
"""

import argparse
import json
import re
import subprocess
import tempfile
import threading
import time
import urllib.request


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default="target/debug/flywheel")
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    data = tempfile.mkdtemp()
    server = subprocess.Popen(
        [args.binary, "serve", "--port", "0", "--data-dir", data],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = None
        for line in server.stderr:
            found = re.search(r"listening on (http://[0-9.:]+)", line)
            if found:
                base = found.group(1)
                break
        threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
        for _ in range(240):
            try:
                urllib.request.urlopen(base + "/ready", timeout=2)
                break
            except Exception:
                time.sleep(0.5)

        def post(path, body):
            request = urllib.request.Request(
                base + path, json.dumps(body).encode(), {"content-type": "application/json"}
            )
            return urllib.request.urlopen(request, timeout=60).read()

        post("/v1/tasks", {"name": "t", "labels": ["a", "b"]})
        text = "x" * 60000
        for batch in range(args.rows // 50):
            items = [{"task": "t", "label": "a", "text": f"{batch}-{i} {text}"} for i in range(50)]
            post("/v1/feedback", {"items": items})

        def rss_mib():
            with open(f"/proc/{server.pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS"):
                        return int(line.split()[1]) // 1024
            return 0

        peak, done = [0], threading.Event()

        def watch():
            while not done.is_set():
                peak[0] = max(peak[0], rss_mib())
                time.sleep(0.005)

        before = rss_mib()
        watcher = threading.Thread(target=watch)
        watcher.start()
        started = time.time()
        url = f"{base}/v1/feedback?task=t&limit={args.rows}"
        with urllib.request.urlopen(url, timeout=300) as answer:
            chunked = answer.headers.get("Transfer-Encoding") == "chunked"
            size = 0
            while piece := answer.read(1 << 20):
                size += len(piece)
        done.set()
        watcher.join()
        print(
            f"{args.rows} rows, {size / 1e6:.0f} MB of JSON in {time.time() - started:.1f} s, "
            f"{'chunked' if chunked else 'one body'}; server memory {before} MiB before, "
            f"peak +{peak[0] - before} MiB"
        )
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
