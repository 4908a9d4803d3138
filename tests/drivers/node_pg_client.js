// node-postgres against PostgreSQL or pgshield: `node node_pg_client.js load|ddl PORT USER PASSWORD DB TAG`.
//
// load: 10 clients at once, each with its own statement_timeout, run named statements
// (prepared once per connection, as node-postgres does), parameters, transactions, a
// rolled-back one and an error; prints the most backend pids one client saw. ddl: a named
// SELECT * across an added column; prints how each execution went while another client
// holds the same statement.
const { Client } = require('pg');
const assert = require('assert');

const [mode, port, user, password, database, tag] = process.argv.slice(2);
const connect = async () => {
  const c = new Client({ host: '127.0.0.1', port: +port, user, password, database });
  await c.connect();
  return c;
};

async function client(i) {
  const c = await connect();
  const timeout = `${i + 1}s`;
  await c.query(`SET statement_timeout = '${timeout}'`);
  const pids = new Set();
  for (let k = 0; k < 15; k++) {
    let r = await c.query({ name: 'add', text: 'SELECT $1::int + $2::int AS s', values: [i, k] });
    assert.strictEqual(r.rows[0].s, i + k);
    r = await c.query({ name: `cat${k % 3}`, text: "SELECT $1::text || '-' || $2::text AS s", values: [String(i), String(k)] });
    assert.strictEqual(r.rows[0].s, `${i}-${k}`);
    pids.add((await c.query('SELECT pg_backend_pid() AS p')).rows[0].p);
    assert.strictEqual((await c.query({ name: 'show', text: 'SHOW statement_timeout' })).rows[0].statement_timeout, timeout);
    await c.query('BEGIN');
    r = await c.query({ name: 'series', text: 'SELECT g FROM generate_series(1, $1::int) g', values: [k + 1] });
    assert.strictEqual(r.rows.length, k + 1);
    await c.query('COMMIT');
    await c.query('BEGIN');
    await c.query("SET LOCAL statement_timeout = '9s'");
    await c.query('ROLLBACK');
    await assert.rejects(c.query({ name: 'div', text: 'SELECT 1 / $1::int', values: [0] }), (e) => e.code === '22012');
  }
  await c.end();
  return pids.size;
}

async function ddl() {
  const c = await connect();
  const table = `drv_ddl_${tag}`;
  await c.query(`DROP TABLE IF EXISTS ${table}; CREATE TABLE ${table} (a int); INSERT INTO ${table} VALUES (1)`);
  // Another client holds the same statement (through pgshield, the same server one).
  const other = await connect();
  await other.query({ name: 'star', text: `SELECT * FROM ${table}` });
  const run = async () => Object.keys((await c.query({ name: 'star', text: `SELECT * FROM ${table}` })).rows[0]).length;
  const out = [await run(), await run()];
  await c.query(`ALTER TABLE ${table} ADD COLUMN b int DEFAULT 2`);
  for (let i = 0; i < 3; i++) {
    try { out.push(await run()); } catch (e) { out.push(`ERR ${e.code}`); }
  }
  await c.query(`DROP TABLE ${table}`);
  await other.end();
  await c.end();
  console.log(`ddl: ${out.join(' ')}`);
}

(async () => {
  if (mode === 'load') {
    const pids = await Promise.all([...Array(10).keys()].map(client));
    console.log(`most backends one client saw: ${Math.max(...pids)}`);
  } else {
    await ddl();
  }
})().catch((e) => { console.error(e); process.exit(1); });
