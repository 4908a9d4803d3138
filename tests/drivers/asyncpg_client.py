"""asyncpg against PostgreSQL or pgshield: `asyncpg_client.py load|ddl PORT USER PASSWORD DB TAG`.

load: 10 clients at once, each with its own statement_timeout, run parameters, prepared
statements, transactions, a rolled-back one, a cursor, executemany and an error; then a
pool of 2 connections shared by 6 tasks (each release runs asyncpg's reset query); prints
the most backend pids one client saw. ddl: a prepared SELECT * across an added column;
prints how each execution went while another client holds the same statement (the
test compares it with PostgreSQL's own)."""
import asyncio
import sys

import asyncpg

MODE, PORT, USER, PASSWORD, DB, TAG = sys.argv[1:7]


async def connect():
    return await asyncpg.connect(host="127.0.0.1", port=int(PORT), user=USER,
                                 password=PASSWORD, database=DB)


async def client(i):
    c = await connect()
    timeout = f"{i + 1}s"
    await c.execute(f"SET statement_timeout = '{timeout}'")
    pids = set()
    for k in range(15):
        assert await c.fetchval("SELECT $1::int + $2::int", i, k) == i + k
        pids.add(await c.fetchval("SELECT pg_backend_pid()"))
        assert await c.fetchval("SHOW statement_timeout") == timeout
        st = await c.prepare("SELECT $1::text || '-' || $2::text")
        assert await st.fetchval(str(i), str(k)) == f"{i}-{k}"
        async with c.transaction():
            rows = await c.fetch("SELECT g FROM generate_series(1, $1::int) g", k + 1)
            assert [r["g"] for r in rows] == list(range(1, k + 2))
            seen = [r["g"] async for r in c.cursor("SELECT generate_series(1, 30) g", prefetch=7)]
            assert len(seen) == 30
        try:
            async with c.transaction():
                await c.execute("SET LOCAL statement_timeout = '9s'")
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        await c.executemany("SELECT $1::int", [(x,) for x in range(4)])
        try:
            await c.fetchval("SELECT 1 / $1::int", 0)
            raise AssertionError("no error")
        except asyncpg.DivisionByZeroError:
            pass
    await c.close()
    return len(pids)


async def pooled():
    pool = await asyncpg.create_pool(host="127.0.0.1", port=int(PORT), user=USER,
                                     password=PASSWORD, database=DB, min_size=2, max_size=2)

    async def work(k):
        for n in range(10):
            async with pool.acquire() as c:
                assert await c.fetchval("SELECT $1::int * $2::int", k, n) == k * n

    await asyncio.gather(*[work(k) for k in range(6)])
    await pool.close()


async def ddl():
    c = await connect()
    table = f"drv_ddl_{TAG}"
    await c.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (a int); INSERT INTO {table} VALUES (1)")
    # Another client holds the same statement (through pgshield, the same server statement).
    other = await connect()
    await other.fetchrow(f"SELECT * FROM {table}")
    out = []
    for _ in range(2):
        out.append(str(len(await c.fetchrow(f"SELECT * FROM {table}"))))
    await c.execute(f"ALTER TABLE {table} ADD COLUMN b int DEFAULT 2")
    for _ in range(3):
        try:
            out.append(str(len(await c.fetchrow(f"SELECT * FROM {table}"))))
        except asyncpg.PostgresError as e:
            out.append(f"ERR {e.sqlstate}")
    await c.execute(f"DROP TABLE {table}")
    await other.close()
    await c.close()
    print("ddl:", " ".join(out))


async def main():
    if MODE == "load":
        pids = await asyncio.gather(*[client(i) for i in range(10)])
        await pooled()
        print("most backends one client saw:", max(pids))
    else:
        await ddl()


asyncio.run(main())
