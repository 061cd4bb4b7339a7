# shardgate from Python (standard library only): a query with an array
# parameter, an interactive transaction, and 503 retried after Retry-After.
import json, os, time, urllib.error, urllib.request

URL = os.environ.get("SHARDGATE_URL", "http://localhost:8080")
HEADERS = {"X-Organization-Id": os.environ.get("TENANT", "42"), "Content-Type": "application/json"}

def call(path, body=None, txn=None, tries=5):
    headers = dict(HEADERS, **({"X-Transaction": txn} if txn else {}))
    request = urllib.request.Request(URL + path, json.dumps(body or {}).encode(), headers)
    for attempt in range(1, tries + 1):
        try:
            return json.load(urllib.request.urlopen(request))  # int8 stays exact in Python
        except urllib.error.HTTPError as e:
            if e.code != 503 or attempt == tries:
                raise RuntimeError(json.load(e))
            print("503, retrying in", e.headers["Retry-After"], "s")
            time.sleep(float(e.headers["Retry-After"]))

print(call("/query", {"sql": "SELECT id, name FROM organizations WHERE id = ANY($1) ORDER BY id", "params": [[1, 2]]})["rows"])
txn = call("/begin")["transaction"]
n = call("/query", {"sql": "SELECT max(id) FROM organizations"}, txn)["rows"][0][0]
call("/query", {"sql": "INSERT INTO organizations VALUES ($1, $2)", "params": [n + 1, "from python"]}, txn)
print(call("/commit", txn=txn)["command"])
