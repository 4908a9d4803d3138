"""psycopg 3 against PostgreSQL or pgshield: `psycopg_client.py load|ddl PORT USER PASSWORD DB TAG`.

load: 10 threads, each a connection with its own statement_timeout, statements prepared
by the server (prepare_threshold=0), transactions, a rolled-back one, a server-side
cursor, pipeline mode, COPY and an error; prints the most backend pids one client saw.
ddl: a prepared SELECT * across an added column; prints how each execution went while
another client holds the same statement."""
import sys
import threading

import psycopg

MODE, PORT, USER, PASSWORD, DB, TAG = sys.argv[1:7]
DSN = f"host=127.0.0.1 port={PORT} user={USER} password={PASSWORD} dbname={DB}"


def client(i, results, errors):
    try:
        with psycopg.connect(DSN, autocommit=True, prepare_threshold=0) as c:
            timeout = f"{i + 1}s"
            c.execute(f"SET statement_timeout = '{timeout}'", prepare=False)
            pids = set()
            for k in range(15):
                assert c.execute("SELECT %s::int + %s::int", (i, k)).fetchone()[0] == i + k
                pids.add(c.execute("SELECT pg_backend_pid()").fetchone()[0])
                assert c.execute("SHOW statement_timeout").fetchone()[0] == timeout
                with c.transaction():
                    with c.cursor(name=f"drv_cur_{i}") as cur:
                        cur.execute("SELECT g FROM generate_series(1, %s) g", (k + 5,))
                        assert len(cur.fetchall()) == k + 5
                try:
                    with c.transaction():
                        c.execute("SET LOCAL statement_timeout = '9s'")
                        raise RuntimeError("roll back")
                except RuntimeError:
                    pass
                with c.pipeline():
                    curs = [c.execute("SELECT %s::int * 2", (x,)) for x in range(8)]
                assert [cu.fetchone()[0] for cu in curs] == [x * 2 for x in range(8)]
                with c.cursor() as cur:
                    with cur.copy("COPY (SELECT g, g::text FROM generate_series(1, 20) g) TO STDOUT") as copy:
                        assert len(list(copy.rows())) == 20
                try:
                    c.execute("SELECT 1 / %s::int", (0,))
                    raise AssertionError("no error")
                except psycopg.errors.DivisionByZero:
                    pass
            results[i] = len(pids)
    except Exception as e:  # reported by the main thread
        errors.append(f"client {i}: {e!r}")


def ddl():
    table = f"drv_ddl_{TAG}"
    with psycopg.connect(DSN, autocommit=True, prepare_threshold=0) as c, \
            psycopg.connect(DSN, autocommit=True, prepare_threshold=0) as other:
        c.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (a int); INSERT INTO {table} VALUES (1)", prepare=False)
        # Another client holds the same statement (through pgshield, the same server one).
        other.execute(f"SELECT * FROM {table}").fetchone()
        out = [str(len(c.execute(f"SELECT * FROM {table}").fetchone())) for _ in range(2)]
        c.execute(f"ALTER TABLE {table} ADD COLUMN b int DEFAULT 2")
        for _ in range(3):
            try:
                out.append(str(len(c.execute(f"SELECT * FROM {table}").fetchone())))
            except psycopg.Error as e:
                out.append(f"ERR {e.sqlstate}")
        c.execute(f"DROP TABLE {table}")
    print("ddl:", " ".join(out))


if MODE == "load":
    results, errors = {}, []
    threads = [threading.Thread(target=client, args=(i, results, errors)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        sys.exit("\n".join(errors))
    print("most backends one client saw:", max(results.values()))
else:
    ddl()
