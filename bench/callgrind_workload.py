"""The SQL bench/callgrind_sql.sh feeds PostgreSQL's single-user backend: ROUNDS batches of
BATCH calls to admit_batch(), then their answers, then their releases, through
control_events() (one statement, so one transaction, each), as the sidecar calls them.

    python bench/callgrind_workload.py ROUNDS BATCH > workload.sql

With ANALYZE=1 in the environment, `ANALYZE calls` runs once between the admissions and the
answers (as autovacuum would on a busy table; the single-user backend has no autovacuum).
"""

import os
import sys

n, b = int(sys.argv[1]), int(sys.argv[2])
out = []


def arr(xs, t="text"):
    return "ARRAY[" + ",".join("NULL" if x is None else "'" + str(x) + "'" for x in xs) + f"]::{t}[]"


for r in range(n):
    ids = [f"c{r}-{i}" for i in range(b)]
    users = [f"u{i % 64}" for i in range(b)]
    out.append(f"SELECT admit_batch({arr(ids)}, {arr(['ft']*b)}, {arr(['127.0.0.1']*b,'inet')}, {arr(users)}, {arr(['+15551230000']*b)}, {arr(users)}, {arr(['n']*b)}, {arr(['b']*b)}, {arr(['false']*b,'boolean')}, false, 'bench', '180 s', '4 h');")
if os.environ.get("ANALYZE") == "1":
    out.append("ANALYZE calls;")
for r in range(n):
    ids = [f"c{r}-{i}" for i in range(b)]
    out.append(f"SELECT control_events({arr(['answer']*b)}, {arr(ids)}, {arr(['ft']*b)}, {arr([0]*b,'integer')}, {arr([None]*b)}, '4 h', '180 s');")
for r in range(n):
    ids = [f"c{r}-{i}" for i in range(b)]
    out.append(f"SELECT control_events({arr(['release']*b)}, {arr(ids)}, {arr(['ft']*b)}, {arr([None]*b,'integer')}, {arr(['bye']*b)}, '4 h', '180 s');")
print("\n".join(out))
