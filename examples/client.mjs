// shardgate from Node 18+ (no dependencies): a query with an array
// parameter, an interactive transaction, and 503 retried after Retry-After.
const URL = process.env.SHARDGATE_URL ?? "http://localhost:8080";
const HEADERS = { "X-Organization-Id": process.env.TENANT ?? "42", "Content-Type": "application/json" };

async function call(path, body = {}, txn, tries = 5) {
  const headers = txn ? { ...HEADERS, "X-Transaction": txn } : HEADERS;
  for (let attempt = 1; ; attempt++) {
    const res = await fetch(URL + path, { method: "POST", headers, body: JSON.stringify(body) });
    if (res.status === 503 && attempt < tries) {
      console.log(`503, retrying in ${res.headers.get("Retry-After")} s`);
      await new Promise((done) => setTimeout(done, 1000 * res.headers.get("Retry-After")));
      continue;
    }
    const answer = await res.json();
    if (!res.ok) throw new Error(`${answer.code}: ${answer.error}`);
    return answer;
  }
}

// "int8": "string": JSON.parse would round ids beyond 2^53.
const sql = "SELECT id, name FROM organizations WHERE id = ANY($1) ORDER BY id";
console.log(JSON.stringify((await call("/query", { sql, params: [[1, 2]], int8: "string" })).rows));
const { transaction } = await call("/begin");
const [[max]] = (await call("/query", { sql: "SELECT max(id) FROM organizations", int8: "string" }, transaction)).rows;
await call("/query", { sql: "INSERT INTO organizations VALUES ($1, $2)", params: [(BigInt(max) + 1n).toString(), "from node"] }, transaction);
console.log((await call("/commit", {}, transaction)).command);
