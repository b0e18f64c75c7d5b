"""Self-test of the chDB ClickHouse HTTP adapter (tests/chdb/adapter.py).

Starts the adapter as a subprocess (as the Rust integration tests do) and speaks ClickHouse's
HTTP interface to it the way the `clickhouse` crate 0.15 does: statements in the body with
`Content-Length`, inserts with the statement in the URL and a chunked body, `default_format`
`RowBinaryWithNamesAndTypes` for fetches and the `DESCRIBE TABLE` schema lookup.

Run with: /tmp/chvenv/bin/pytest -q tests/chdb   (needs `pip install -r tests/chdb/requirements.txt`)
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import pytest

ADAPTER = Path(__file__).with_name("adapter.py")
START_TIMEOUT_S = 60.0

# ---------------------------------------------------------------------------------------------
# Harness


class Adapter:
    def __init__(self, proc: subprocess.Popen, addr: str):
        self.proc = proc
        self.host, port = addr.rsplit(":", 1)
        self.port = int(port)

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=30)

    def request(self, method, path, body=None, headers=None, params=None):
        """One request on a fresh connection: (status, headers, body)."""
        if params:
            path = path + "?" + urllib.parse.urlencode(params)
        c = self.conn()
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            c.close()

    def sql(self, sql: str, **params):
        """What `client.query(sql).execute()/fetch*()` sends: POST /, SQL body, settings in the URL."""
        body = sql.encode()
        return self.request("POST", "/", body, {"Content-Length": str(len(body))}, params)

    def ok(self, sql: str, **params) -> bytes:
        status, headers, body = self.sql(sql, **params)
        assert status == 200, (status, headers, body)
        return body

    def insert(self, statement: str, data: bytes, chunked=True, chunk=7, **params):
        """What `client.insert()` sends: POST /?query=INSERT..., body chunked."""
        params = {"query": statement, **params}
        path = "/?" + urllib.parse.urlencode(params)
        c = self.conn()
        try:
            if chunked:
                parts = [data[i : i + chunk] for i in range(0, len(data), chunk)]
                c.request("POST", path, body=iter(parts), encode_chunked=True)
            else:
                c.request("POST", path, body=data, headers={"Content-Length": str(len(data))})
            r = c.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            c.close()

    def control(self, method, what, **params):
        status, _, body = self.request(method, f"/__adapter/{what}", b"" if method == "POST" else None, params=params)
        assert status == 200, body
        return json.loads(body)


@pytest.fixture(scope="module")
def adapter():
    datadir = tempfile.mkdtemp(prefix="chdb-adapter-test-")
    proc = subprocess.Popen(
        [sys.executable, str(ADAPTER), "--listen", "127.0.0.1:0", "--path", datadir],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline().strip()
    assert line, f"adapter did not start: {proc.stderr.read() if proc.poll() is not None else ''}"
    ad = Adapter(proc, line)
    deadline = time.time() + START_TIMEOUT_S
    while True:
        try:
            if ad.request("GET", "/ping")[0] == 200:
                break
        except OSError:
            pass
        assert time.time() < deadline, "adapter not answering /ping"
        time.sleep(0.1)
    yield ad
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    shutil.rmtree(datadir, ignore_errors=True)
    assert rc == 0, proc.stderr.read()


# ---------------------------------------------------------------------------------------------
# RowBinary encoding and decoding (the subset the tests use)


def leb128(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def rb_str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return leb128(len(b)) + b


class Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def leb(self) -> int:
        shift = n = 0
        while True:
            b = self.data[self.pos]
            self.pos += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n

    def take(self, k: int) -> bytes:
        out = self.data[self.pos : self.pos + k]
        assert len(out) == k, "truncated RowBinary"
        self.pos += k
        return out

    def str(self) -> str:
        return self.take(self.leb()).decode()

    def value(self, typ: str):
        if typ.startswith("LowCardinality("):
            return self.value(typ[len("LowCardinality(") : -1])
        if typ == "String":
            return self.str()
        if typ == "UInt64":
            return struct.unpack("<Q", self.take(8))[0]
        if typ == "UInt16":
            return struct.unpack("<H", self.take(2))[0]
        if typ == "UInt8":
            return self.take(1)[0]
        if typ == "Float64":
            return struct.unpack("<d", self.take(8))[0]
        if typ == "Bool":
            return bool(self.take(1)[0])
        if typ.startswith("DateTime64("):
            return struct.unpack("<q", self.take(8))[0]
        if typ.startswith("Array("):
            inner = typ[len("Array(") : -1]
            return [self.value(inner) for _ in range(self.leb())]
        if typ.startswith("Map("):
            k, v = split_args(typ[len("Map(") : -1])
            return {self.value(k): self.value(v) for _ in range(self.leb())}
        raise AssertionError(f"type {typ} not handled by the test decoder")

    def done(self) -> bool:
        return self.pos == len(self.data)


def split_args(s: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        depth += ch == "("
        depth -= ch == ")"
        cur += ch
    out.append(cur.strip())
    return out


def decode_rbwnat(data: bytes) -> tuple[list[tuple[str, str]], list[dict]]:
    """RowBinaryWithNamesAndTypes: leb128 column count, names, types, then RowBinary rows."""
    r = Reader(data)
    n = r.leb()
    names = [r.str() for _ in range(n)]
    types = [r.str() for _ in range(n)]
    rows = []
    while not r.done():
        rows.append({name: r.value(typ) for name, typ in zip(names, types)})
    return list(zip(names, types)), rows


def rbwnat_header(columns: list[tuple[str, str]]) -> bytes:
    return leb128(len(columns)) + b"".join(rb_str(n) for n, _ in columns) + b"".join(rb_str(t) for _, t in columns)


TRACE_COLUMNS = [
    ("id", "UInt64"),
    ("trace_id", "String"),
    ("ts", "DateTime64(3, 'UTC')"),
    ("tags", "Map(LowCardinality(String), String)"),
    ("tool_calls", "Array(String)"),
    ("streamed", "Bool"),
]


def trace_row(id_: int, trace_id: str, ts_ms: int, tags: dict, tools: list, streamed: bool) -> bytes:
    return (
        struct.pack("<Q", id_)
        + rb_str(trace_id)
        + struct.pack("<q", ts_ms)
        + leb128(len(tags))
        + b"".join(rb_str(k) + rb_str(v) for k, v in tags.items())
        + leb128(len(tools))
        + b"".join(rb_str(t) for t in tools)
        + (b"\x01" if streamed else b"\x00")
    )


def lz4_native_frames(data: bytes, block=64 * 1024) -> bytes:
    """ClickHouse native compression framing with LZ4 blocks (what the crate's lz4 feature sends).

    The 16-byte CityHash128 checksum is left zero: the adapter does not verify it.
    """
    import pyarrow

    codec = pyarrow.Codec("lz4_raw")
    out = b""
    for i in range(0, len(data), block):
        raw = data[i : i + block]
        comp = codec.compress(raw, asbytes=True)
        out += b"\x00" * 16 + b"\x82" + struct.pack("<II", 9 + len(comp), len(raw)) + comp
    return out


# ---------------------------------------------------------------------------------------------
# Tests


def test_ping(adapter):
    for path in ("/ping", "/"):
        status, headers, body = adapter.request("GET", path)
        assert (status, body) == (200, b"Ok.\n")


def test_create_table_and_describe_like_the_crate(adapter):
    adapter.ok("CREATE DATABASE IF NOT EXISTS llmtap")
    adapter.ok(
        "CREATE TABLE IF NOT EXISTS traces (id UInt64, trace_id String, ts DateTime64(3, 'UTC'), "
        "tags Map(LowCardinality(String), String), tool_calls Array(String), streamed Bool) "
        "ENGINE = MergeTree ORDER BY id",
        database="llmtap",
    )
    # The crate's schema lookup before an insert with validation (lib.rs insert_metadata_query).
    body = adapter.ok(
        "DESCRIBE TABLE `traces`",
        default_format="RowBinaryWithNamesAndTypes",
        database="llmtap",
        describe_include_subcolumns="0",
    )
    columns, rows = decode_rbwnat(body)
    assert [c for c, _ in columns] == [
        "name", "type", "default_type", "default_expression", "comment", "codec_expression", "ttl_expression",
    ]
    assert all(t == "String" for _, t in columns)
    assert [(r["name"], r["type"]) for r in rows] == TRACE_COLUMNS


def test_insert_jsoneachrow(adapter):
    data = (
        b'{"id":1,"trace_id":"t1","ts":"2026-01-02 03:04:05.678","tags":{"env":"prod"},"tool_calls":["a","b"],"streamed":true}\n'
        b'{"id":2,"trace_id":"t2","ts":"2026-01-02 03:04:06.000","tags":{},"tool_calls":[],"streamed":false}\n'
    )
    status, headers, body = adapter.insert("INSERT INTO traces FORMAT JSONEachRow", data, database="llmtap")
    assert status == 200, body
    assert json.loads(headers["x-clickhouse-summary"])["written_rows"] == "2"
    out = adapter.ok("SELECT id, toUnixTimestamp64Milli(ts), tags['env'] FROM llmtap.traces WHERE id <= 2 ORDER BY id FORMAT TSV")
    assert out == b"1\t1767323045678\tprod\n2\t1767323046000\t\n"


def test_insert_rowbinary_chunked(adapter):
    row = trace_row(10, "t10", 1767323045678, {"k": "v", "x": "y"}, ["search", "fetch"], True)
    status, _, body = adapter.insert(
        "INSERT INTO `traces`(`id`,`trace_id`,`ts`,`tags`,`tool_calls`,`streamed`) FORMAT RowBinary",
        row * 1,
        chunk=5,  # chunk boundaries fall inside values
        database="llmtap",
    )
    assert status == 200, body
    out = adapter.ok("SELECT * FROM llmtap.traces WHERE id = 10 FORMAT JSONEachRow")
    assert json.loads(out) == {
        "id": 10,
        "trace_id": "t10",
        "ts": "2026-01-02 03:04:05.678",
        "tags": {"k": "v", "x": "y"},
        "tool_calls": ["search", "fetch"],
        "streamed": True,
    }


def test_insert_rowbinary_with_names_and_types_lz4(adapter):
    # The crate's default: validation on (RowBinaryWithNamesAndTypes), lz4 feature (decompress=1).
    data = rbwnat_header(TRACE_COLUMNS) + b"".join(
        trace_row(100 + i, f"t{100 + i}", 1767323045000 + i, {"i": str(i)}, ["x"] * (i % 3), i % 2 == 0)
        for i in range(2000)
    )
    status, _, body = adapter.insert(
        # exactly what insert.rs:61 builds for `client.insert::<Row>("traces")`
        "INSERT INTO `traces`(`id`,`trace_id`,`ts`,`tags`,`tool_calls`,`streamed`) FORMAT RowBinaryWithNamesAndTypes",
        lz4_native_frames(data, block=10_000),
        chunk=4096,
        database="llmtap",
        decompress="1",
    )
    assert status == 200, body
    assert adapter.ok("SELECT count(), sum(length(tool_calls)) FROM llmtap.traces WHERE id >= 100") == b"2000\t1999\n"


def test_select_rowbinary_with_names_and_types(adapter):
    # What `client.query("SELECT ?fields FROM traces WHERE id = 10").fetch_all::<Row>()` sends.
    body = adapter.ok(
        "SELECT `id`,`trace_id`,`ts`,`tags`,`tool_calls`,`streamed` FROM traces WHERE id IN (1, 10) ORDER BY id",
        default_format="RowBinaryWithNamesAndTypes",
        database="llmtap",
    )
    columns, rows = decode_rbwnat(body)
    assert columns == TRACE_COLUMNS
    assert rows == [
        {"id": 1, "trace_id": "t1", "ts": 1767323045678, "tags": {"env": "prod"}, "tool_calls": ["a", "b"], "streamed": True},
        {"id": 10, "trace_id": "t10", "ts": 1767323045678, "tags": {"k": "v", "x": "y"}, "tool_calls": ["search", "fetch"], "streamed": True},
    ]
    # Plain RowBinary (validation off) and other formats.
    body = adapter.ok("SELECT toUInt16(7) AS a, 1.5 AS b", default_format="RowBinary")
    assert body == struct.pack("<H", 7) + struct.pack("<d", 1.5)
    assert json.loads(adapter.ok("SELECT 1 AS x", default_format="JSON"))["data"] == [{"x": 1}]
    assert adapter.ok("SELECT 1, 'a'") == b"1\ta\n"  # TabSeparated by default


def test_query_in_url_and_get(adapter):
    status, headers, body = adapter.request("GET", "/", params={"query": "SELECT 40 + 2"})
    assert (status, body) == (200, b"42\n")


def test_multipart_server_side_params(adapter):
    # `Query::param()` (query.rs multipart_query_body): query and param_* as form fields.
    boundary = "clickhouse-rs-boundary-0123456789abcdef"
    fields = [("query", "SELECT {who: String} AS w, {n: UInt64} + 1 AS n"), ("param_who", "wor'ld"), ("param_n", "41")]
    body = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in fields)
    body = (body + f"--{boundary}--\r\n").encode()
    status, _, out = adapter.request(
        "POST", "/", body, {"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(len(body))},
        params={"default_format": "JSONEachRow"},
    )
    assert status == 200, out
    assert json.loads(out) == {"w": "wor'ld", "n": 42}


def test_exception_codes(adapter):
    status, headers, body = adapter.sql("SELEC 1")
    assert status == 400
    assert headers["x-clickhouse-exception-code"] == "62"
    assert body.startswith(b"Code: 62. DB::Exception: Syntax error") and b"(SYNTAX_ERROR)" in body

    status, headers, body = adapter.sql("SELECT * FROM no_such_table")
    assert status == 404
    assert headers["x-clickhouse-exception-code"] == "60"
    assert body.startswith(b"Code: 60. DB::Exception:") and b"(UNKNOWN_TABLE)" in body

    status, headers, body = adapter.insert("INSERT INTO no_such_table FORMAT JSONEachRow", b'{"a":1}\n')
    assert (status, headers["x-clickhouse-exception-code"]) == (404, "60"), body

    status, headers, body = adapter.sql("SELECT 1", database="no_such_db")
    assert (status, headers["x-clickhouse-exception-code"]) == (404, "81"), body

    status, headers, body = adapter.sql("SELECT 1", no_such_setting="1")
    assert (status, headers["x-clickhouse-exception-code"]) == (404, "115"), body

    # Data that does not parse: 400, nothing written.
    before = adapter.ok("SELECT count() FROM llmtap.traces")
    status, headers, body = adapter.insert(
        "INSERT INTO traces FORMAT JSONEachRow", b'{"id":77}\n{"id":"not a number"}\n', database="llmtap"
    )
    assert status == 400 and headers["x-clickhouse-exception-code"] == "27", body
    assert adapter.ok("SELECT count() FROM llmtap.traces") == before

    # A RowBinaryWithNamesAndTypes header whose types do not match the table.
    bad = rbwnat_header([("id", "UInt32")]) + struct.pack("<I", 5)
    status, headers, body = adapter.insert("INSERT INTO traces(id) FORMAT RowBinaryWithNamesAndTypes", bad, database="llmtap")
    assert status == 400 and headers["x-clickhouse-exception-code"] == "117", body

    # ClickHouse's HTTP interface runs one statement per request (chDB alone would run both).
    status, headers, body = adapter.sql("SELECT 1; SELECT 2")
    assert status == 400 and headers["x-clickhouse-exception-code"] == "62", body
    assert adapter.ok("SELECT ';' AS x; -- trailing semicolon and comment") == b";\n"

    status, headers, body = adapter.sql("SELECT throwIf(1)")
    assert status == 500 and headers["x-clickhouse-exception-code"] == "395", body


def test_insert_deduplication_token(adapter):
    adapter.ok(
        "CREATE TABLE dedup (id UInt64, s String) ENGINE = MergeTree ORDER BY id "
        "SETTINGS non_replicated_deduplication_window = 100"
    )
    rows = b'{"id":1,"s":"a"}\n{"id":2,"s":"b"}\n'
    for _ in range(3):
        status, _, body = adapter.insert("INSERT INTO dedup FORMAT JSONEachRow", rows, insert_deduplication_token="batch-1")
        assert status == 200, body
    assert adapter.ok("SELECT count() FROM dedup") == b"2\n"
    status, _, body = adapter.insert("INSERT INTO dedup FORMAT JSONEachRow", rows, insert_deduplication_token="batch-2")
    assert status == 200, body
    assert adapter.ok("SELECT count() FROM dedup") == b"4\n"
    # Without a token, identical data is deduplicated by its hash; a different block is not.
    adapter.insert("INSERT INTO dedup FORMAT JSONEachRow", b'{"id":3,"s":"c"}\n')
    adapter.insert("INSERT INTO dedup FORMAT JSONEachRow", b'{"id":3,"s":"c"}\n')
    assert adapter.ok("SELECT count() FROM dedup") == b"5\n"


def test_settings_are_per_request(adapter):
    assert adapter.ok("SELECT getSetting('max_threads') = 3", max_threads="3") == b"1\n"
    assert adapter.ok("SELECT getSetting('max_threads') = 3") == b"0\n"
    assert adapter.ok("SELECT currentDatabase()", database="llmtap") == b"llmtap\n"
    assert adapter.ok("SELECT currentDatabase()") == b"default\n"


def test_open_insert_does_not_block_queries(adapter):
    # An insert whose body is still streaming (the crate keeps it open until `end()`).
    path = "/?" + urllib.parse.urlencode({"query": "INSERT INTO dedup FORMAT JSONEachRow"})
    s = socket.create_connection((adapter.host, adapter.port), timeout=30)
    try:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        part = b'{"id":50,"s":"open"}\n'
        s.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        t = time.time()
        assert adapter.ok("SELECT count() FROM dedup WHERE id = 50") == b"0\n"
        assert time.time() - t < 5
        s.sendall(b"0\r\n\r\n")
        resp = s.recv(4096)
        assert resp.startswith(b"HTTP/1.1 200"), resp
    finally:
        s.close()
    assert adapter.ok("SELECT count() FROM dedup WHERE id = 50") == b"1\n"


def test_aborted_insert_writes_nothing(adapter):
    path = "/?" + urllib.parse.urlencode({"query": "INSERT INTO dedup FORMAT JSONEachRow"})
    s = socket.create_connection((adapter.host, adapter.port), timeout=30)
    part = b'{"id":60,"s":"aborted"}\n'
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    s.sendall(b"%x\r\n%s\r\n" % (len(part), part))
    s.close()  # no terminating chunk: the client aborted the insert
    deadline = time.time() + 5
    while adapter.control("GET", "stats")["aborted_requests"] < 1:
        assert time.time() < deadline
        time.sleep(0.05)
    assert adapter.ok("SELECT count() FROM dedup WHERE id = 60") == b"0\n"


def test_pause_and_resume(adapter):
    adapter.control("POST", "pause")  # default: drop connections
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
        adapter.request("GET", "/ping")
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
        adapter.insert("INSERT INTO dedup FORMAT JSONEachRow", b'{"id":70,"s":"x"}\n')
    adapter.control("POST", "pause", mode="503")
    status, headers, _ = adapter.sql("SELECT 1")
    assert status == 503 and "x-clickhouse-exception-code" not in headers
    status, _, _ = adapter.insert("INSERT INTO dedup FORMAT JSONEachRow", b'{"id":70,"s":"x"}\n')
    assert status == 503
    stats = adapter.control("GET", "stats")
    assert stats["paused"] == "503" and stats["rejected_while_paused"] >= 4
    adapter.control("POST", "resume")
    assert adapter.request("GET", "/ping")[0] == 200
    assert adapter.ok("SELECT count() FROM dedup WHERE id = 70") == b"0\n"
    adapter.control("POST", "delay", ms="300")
    t = time.time()
    assert adapter.ok("SELECT 1") == b"1\n"
    assert time.time() - t >= 0.3
    adapter.control("POST", "delay", ms="0")


def test_stats_and_request_log(adapter):
    adapter.control("POST", "reset")
    adapter.insert("INSERT INTO dedup FORMAT JSONEachRow", b'{"id":80,"s":"a"}\n{"id":81,"s":"b"}\n', insert_deduplication_token="stats-1")
    adapter.ok("SELECT 1")
    stats = adapter.control("GET", "stats")
    assert stats["inserts"] == 1 and stats["rows_inserted"] == 2 and stats["queries"] == 1
    assert stats["tables"] == {"dedup": {"inserts": 1, "rows": 2}}
    log = adapter.control("GET", "requests")
    assert log[0]["settings"] == {"insert_deduplication_token": "stats-1"}
    assert log[0]["insert_format"] == "JSONEachRow" and log[0]["status"] == 200


def test_bad_compressed_body(adapter):
    frame = b"\x00" * 16 + b"\x33" + struct.pack("<II", 9 + 3, 3) + b"abc"
    status, headers, body = adapter.insert("INSERT INTO dedup FORMAT JSONEachRow", frame, decompress="1")
    assert status == 500 and headers["x-clickhouse-exception-code"] == "89", body  # UNKNOWN_COMPRESSION_METHOD


def test_authentication():
    datadir = tempfile.mkdtemp(prefix="chdb-adapter-auth-")
    proc = subprocess.Popen(
        [sys.executable, str(ADAPTER), "--listen", "127.0.0.1:0", "--path", datadir, "--user", "llmtap", "--password", "s3cret"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ad = Adapter(proc, proc.stdout.readline().strip())
        status, headers, body = ad.request("POST", "/", b"SELECT 1", {"X-ClickHouse-User": "llmtap", "X-ClickHouse-Key": "wrong"})
        assert status == 403 and headers["x-clickhouse-exception-code"] == "516", body
        status, _, body = ad.request("POST", "/", b"SELECT 1", {"X-ClickHouse-User": "llmtap", "X-ClickHouse-Key": "s3cret"})
        assert (status, body) == (200, b"1\n")
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        shutil.rmtree(datadir, ignore_errors=True)
        assert rc == 0


def test_concurrent_clients(adapter):
    import threading

    adapter.ok("CREATE TABLE conc (t UInt8, i UInt32, tok String) ENGINE = MergeTree ORDER BY (t, i) SETTINGS non_replicated_deduplication_window = 1000")
    errors = []

    def worker(t: int):
        try:
            for i in range(15):
                data = f'{{"t":{t},"i":{i},"tok":"x"}}\n'.encode()
                status, _, body = adapter.insert("INSERT INTO conc FORMAT JSONEachRow", data, insert_deduplication_token=f"{t}-{i}")
                assert status == 200, body
                got = adapter.ok("SELECT getSetting('max_threads')", max_threads=str(t + 1))
                assert got == f"{t + 1}\n".encode(), got
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    assert adapter.ok("SELECT count(), uniqExact(t, i) FROM conc") == b"120\t120\n"
