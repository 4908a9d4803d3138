// pgjdbc against PostgreSQL or pgshield: `java JdbcClient load|ddl PORT USER PASSWORD DB TAG`.
//
// load: 10 threads, each a connection with its own statement_timeout, server-prepared
// statements (prepareThreshold=1, named S_n), transactions with fetch-size cursors, a
// batch, a rolled-back transaction and an error; prints the most backend pids one client
// saw. ddl: a prepared SELECT * across an added column; prints how each execution went
// while another client holds the same statement.
import java.sql.*;
import java.util.*;
import java.util.concurrent.*;

public class JdbcClient {
    static String url;

    public static void main(String[] a) throws Exception {
        url = "jdbc:postgresql://127.0.0.1:" + a[1] + "/" + a[4] + "?user=" + a[2] + "&password=" + a[3]
            + "&prepareThreshold=1";
        if (a[0].equals("load")) load(); else ddl("drv_ddl_" + a[5]);
    }

    static void check(boolean ok, String what) {
        if (!ok) throw new IllegalStateException(what);
    }

    static void load() throws Exception {
        ExecutorService pool = Executors.newFixedThreadPool(10);
        List<Future<Integer>> clients = new ArrayList<>();
        for (int i = 0; i < 10; i++) {
            final int id = i;
            clients.add(pool.submit(() -> client(id)));
        }
        int most = 0;
        for (Future<Integer> f : clients) most = Math.max(most, f.get());
        pool.shutdown();
        System.out.println("most backends one client saw: " + most);
    }

    static int client(int id) throws SQLException {
        Set<Integer> pids = new HashSet<>();
        String timeout = (id + 1) + "s";
        try (Connection c = DriverManager.getConnection(url)) {
            try (Statement s = c.createStatement()) { s.execute("SET statement_timeout = '" + timeout + "'"); }
            for (int k = 0; k < 15; k++) {
                try (PreparedStatement ps = c.prepareStatement("SELECT ?::int + ?::int")) {
                    ps.setInt(1, id); ps.setInt(2, k);
                    try (ResultSet rs = ps.executeQuery()) { rs.next(); check(rs.getInt(1) == id + k, "sum"); }
                }
                try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery("SELECT pg_backend_pid()")) {
                    rs.next(); pids.add(rs.getInt(1));
                }
                try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery("SHOW statement_timeout")) {
                    rs.next(); check(rs.getString(1).equals(timeout), "statement_timeout " + rs.getString(1));
                }
                c.setAutoCommit(false);
                try (PreparedStatement ps = c.prepareStatement("SELECT g FROM generate_series(1, ?) g")) {
                    ps.setInt(1, k + 5); ps.setFetchSize(3);
                    int n = 0;
                    try (ResultSet rs = ps.executeQuery()) { while (rs.next()) n++; }
                    check(n == k + 5, "rows " + n);
                }
                try (PreparedStatement ps = c.prepareStatement("SELECT set_config('drv.x', ?, true)")) {
                    for (int x = 0; x < 4; x++) { ps.setString(1, "v" + x); ps.addBatch(); }
                    try { ps.executeBatch(); } catch (BatchUpdateException e) { /* a SELECT returns rows */ }
                }
                c.commit();
                try (Statement s = c.createStatement()) { s.execute("SET LOCAL statement_timeout = '9s'"); }
                c.rollback();
                c.setAutoCommit(true);
                try (PreparedStatement ps = c.prepareStatement("SELECT 1 / ?")) {
                    ps.setInt(1, 0);
                    ps.executeQuery();
                    check(false, "no error");
                } catch (SQLException e) {
                    check("22012".equals(e.getSQLState()), "sqlstate " + e.getSQLState());
                }
            }
        }
        return pids.size();
    }

    static void ddl(String table) throws SQLException {
        List<String> out = new ArrayList<>();
        try (Connection c = DriverManager.getConnection(url); Connection other = DriverManager.getConnection(url)) {
            try (Statement s = c.createStatement()) {
                s.execute("DROP TABLE IF EXISTS " + table + "; CREATE TABLE " + table + " (a int); INSERT INTO " + table + " VALUES (1)");
            }
            // Another client holds the same statement (through pgshield, the same server one).
            PreparedStatement held = other.prepareStatement("SELECT * FROM " + table);
            run(held);
            try (PreparedStatement ps = c.prepareStatement("SELECT * FROM " + table)) {
                for (int i = 0; i < 2; i++) out.add(run(ps));
                try (Statement s = c.createStatement()) { s.execute("ALTER TABLE " + table + " ADD COLUMN b int DEFAULT 2"); }
                for (int i = 0; i < 3; i++) out.add(run(ps));
            }
            try (Statement s = c.createStatement()) { s.execute("DROP TABLE " + table); }
        }
        System.out.println("ddl: " + String.join(" ", out));
    }

    static String run(PreparedStatement ps) {
        try (ResultSet rs = ps.executeQuery()) {
            rs.next();
            return String.valueOf(rs.getMetaData().getColumnCount());
        } catch (SQLException e) {
            return "ERR " + e.getSQLState();
        }
    }
}
