#!/usr/bin/env python3
"""A small ClickHouse HTTP interface in front of chDB, for tests.

The real ClickHouse engine (PyPI `chdb`, ClickHouse 26.x in-process) behind the parts of
ClickHouse's HTTP interface that the Rust `clickhouse` crate (0.15) uses:

- `GET /ping`, `GET /` without a query  ->  `Ok.\\n`
- `GET|POST /` with the statement in the `query` URL parameter, in the body, or in a
  `multipart/form-data` field named `query` (what the crate sends when `Query::param` is used);
  `param_<name>` URL parameters or multipart fields are query parameters (`{name: Type}`).
- INSERT: the statement is in the URL, the body carries the data in the format named by the
  statement's `FORMAT` clause (RowBinary, RowBinaryWithNamesAndTypes, JSONEachRow, anything
  ClickHouse reads) or, after `VALUES`, in the Values format. The body may use
  `Transfer-Encoding: chunked` (the crate always streams inserts that way) and, with
  `decompress=1`, ClickHouse's native compression framing (LZ4 0x82, ZSTD 0x90, none 0x02;
  the crate's default `lz4` feature does this). A body that ends before its final chunk is
  an aborted insert: nothing is written, no response is sent.
- Other statements: the result is returned in the statement's own `FORMAT`, else the
  `default_format` parameter (or `X-ClickHouse-Format` header), else TabSeparated.
- `database` parameter (or `X-ClickHouse-Database` header): the current database for that
  request. Every other URL parameter is a ClickHouse setting for that request only (e.g.
  `insert_deduplication_token`, `async_insert`, `describe_include_subcolumns`); parameters that
  configure the HTTP layer rather than the query (compress, query_id, session_id, role, ...)
  are accepted and ignored. Responses are never compressed, whatever `Accept-Encoding` says.
- Errors: the HTTP status ClickHouse uses for the exception code (400 for syntax and parse
  errors, 404 for unknown tables and databases, ..., 500 otherwise), header
  `X-ClickHouse-Exception-Code: NNN`, body `Code: NNN. DB::Exception: ... (NAME)`.
- Optional authentication (`--user`, `--password`): `X-ClickHouse-User`/`X-ClickHouse-Key`,
  HTTP basic auth or `user`/`password` URL parameters; a mismatch is ClickHouse's 516.

Test control (never paused):

- `POST /__adapter/pause[?mode=drop|503]`: until resumed, every ClickHouse request (ping
  included) is answered by closing the connection without a response (`drop`, the default:
  what a client sees when ClickHouse dies) or by `503 Service Unavailable` (`503`: a load
  balancer with no healthy backend).
- `POST /__adapter/resume`
- `POST /__adapter/delay?ms=N`: answer every ClickHouse request N ms after its body has arrived
  (0 turns it off): a slow server, for the client's timeouts.
- `GET /__adapter/stats`: JSON counters (requests, queries, inserts, rows_inserted, per table).
- `GET /__adapter/requests`: JSON list of the last 500 ClickHouse requests (statement, settings,
  format, status, exception code, rows written).
- `POST /__adapter/reset`: zero the counters and forget the request list.

Usage: python adapter.py --listen 127.0.0.1:0 --path /tmp/somedir
prints the bound `HOST:PORT` as its first stdout line, serves until SIGTERM/SIGINT, exits 0.

The chDB session is shared by all connections behind one lock; a request body is read in
full before the lock is taken, so an INSERT the client keeps open never blocks other queries.
"""

from __future__ import annotations

import argparse
import base64
import collections
import email.parser
import email.policy
import json
import os
import re
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import chdb.session

# ---------------------------------------------------------------------------------------------
# Exception code -> HTTP status, as ClickHouse's src/Server/HTTP/exceptionCodeToHTTPStatus.cpp.
# Names are resolved to numeric codes from the engine's own system.errors at start-up.

_STATUS_BY_NAME: dict[str, int] = {}
for _status, _names in (
    (401, "REQUIRED_PASSWORD"),
    (403, "UNKNOWN_USER WRONG_PASSWORD AUTHENTICATION_FAILED SET_NON_GRANTED_ROLE ACCESS_DENIED"),
    (
        400,
        "BAD_ARGUMENTS CANNOT_COMPILE_REGEXP CANNOT_PARSE_TEXT CANNOT_PARSE_ESCAPE_SEQUENCE "
        "CANNOT_PARSE_QUOTED_STRING CANNOT_PARSE_DATE CANNOT_PARSE_DATETIME CANNOT_PARSE_NUMBER "
        "CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING CANNOT_PARSE_IPV4 CANNOT_PARSE_IPV6 "
        "CANNOT_PARSE_INPUT_ASSERTION_FAILED CANNOT_PARSE_UUID DUPLICATE_COLUMN ILLEGAL_COLUMN "
        "UNKNOWN_ELEMENT_IN_AST UNKNOWN_TYPE_OF_AST_NODE THERE_IS_NO_COLUMN TOO_DEEP_AST "
        "TOO_BIG_AST UNEXPECTED_AST_STRUCTURE SYNTAX_ERROR INCORRECT_DATA TYPE_MISMATCH "
        "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE",
    ),
    (
        404,
        "UNKNOWN_TABLE UNKNOWN_FUNCTION UNKNOWN_IDENTIFIER UNKNOWN_TYPE UNKNOWN_STORAGE "
        "UNKNOWN_DATABASE UNKNOWN_SETTING UNKNOWN_DIRECTION_OF_SORTING UNKNOWN_AGGREGATE_FUNCTION "
        "UNKNOWN_FORMAT UNKNOWN_DATABASE_ENGINE UNKNOWN_TYPE_OF_QUERY UNKNOWN_ROLE",
    ),
    (413, "QUERY_IS_TOO_LARGE"),
    (501, "NOT_IMPLEMENTED"),
    (503, "SOCKET_TIMEOUT CANNOT_OPEN_FILE CANNOT_SCHEDULE_TASK"),
    (411, "HTTP_LENGTH_REQUIRED"),
    (408, "TIMEOUT_EXCEEDED"),
    (415, "UNSUPPORTED_MEDIA_TYPE"),
):
    for _name in _names.split():
        _STATUS_BY_NAME[_name] = _status

# Codes the adapter raises itself (fallbacks if system.errors cannot be read).
_FALLBACK_CODES = {
    "UNKNOWN_SETTING": 115,
    "SYNTAX_ERROR": 62,
    "NOT_IMPLEMENTED": 48,
    "CANNOT_DECOMPRESS": 271,
    "UNKNOWN_COMPRESSION_METHOD": 89,
    "AUTHENTICATION_FAILED": 516,
    "STD_EXCEPTION": 1001,
    "CANNOT_PARSE_INPUT_ASSERTION_FAILED": 27,
}

# URL parameters that configure the HTTP layer, not the query: accepted and ignored.
# (`readonly` is here because a session-wide `SET readonly = 1` could not be undone.)
_NON_SETTINGS = {
    "query", "database", "default_format", "compress", "decompress", "query_id", "session_id",
    "session_timeout", "session_check", "user", "password", "quota_key", "buffer_size",
    "wait_end_of_query", "role", "enable_http_compression", "http_zlib_compression_level",
    "http_native_compression_disable_checksumming_on_decompress", "send_progress_in_http_headers",
    "http_headers_progress_interval_ms", "client_protocol_version", "readonly", "stacktrace",
    "add_http_cors_header", "cancel_http_readonly_queries_on_client_close",
    "http_response_buffer_size", "http_wait_end_of_query", "max_query_size_bytes_for_log",
}

_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CODE_RE = re.compile(r"Code: (\d+)\.")
_NAME_RE = re.compile(r"\(([A-Z][A-Z0-9_]+)\)")


class ChError(Exception):
    """A ClickHouse exception: numeric code, text `Code: NNN. DB::Exception: ...`."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class ClientAbort(Exception):
    """The client closed the connection or sent a malformed body; no response is possible."""


# ---------------------------------------------------------------------------------------------
# SQL helpers


def _quote_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _quote_ident(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _top_level_words(sql: str):
    """Yield (UPPER_WORD, start, end, paren_depth) for bare words outside literals/comments."""
    i, n, depth = 0, len(sql), 0
    while i < n:
        c = sql[i]
        if c in "'\"`":
            j = i + 1
            while j < n:
                if sql[j] == "\\":
                    j += 2
                    continue
                if sql[j] == c:
                    if j + 1 < n and sql[j + 1] == c:
                        j += 2
                        continue
                    break
                j += 1
            i = j + 1
            continue
        if sql.startswith("--", i) or sql.startswith("# ", i) or sql.startswith("#!", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
            continue
        if sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            i = n if j < 0 else j + 2
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth = max(0, depth - 1)
        m = _WORD.match(sql, i)
        if m:
            yield m.group().upper(), m.start(), m.end(), depth
            i = m.end()
            continue
        i += 1


def _is_multi_statement(sql: str) -> bool:
    """True if something other than whitespace/comments follows a top-level `;`.

    ClickHouse's HTTP interface rejects that (SYNTAX_ERROR, "Multi-statements are not allowed");
    chDB would run every statement, so the adapter checks it itself.
    """
    i, n, seen_semicolon = 0, len(sql), False
    while i < n:
        c = sql[i]
        if sql.startswith("--", i) or sql.startswith("# ", i) or sql.startswith("#!", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
            continue
        if sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            i = n if j < 0 else j + 2
            continue
        if c == ";":
            seen_semicolon = True
        elif not c.isspace():
            if seen_semicolon:
                return True
            if c in "'\"`":
                j = i + 1
                while j < n:
                    if sql[j] == "\\":
                        j += 2
                        continue
                    if sql[j] == c:
                        if j + 1 < n and sql[j + 1] == c:
                            j += 2
                            continue
                        break
                    j += 1
                i = j + 1
                continue
        i += 1
    return False


def _skip_ws(sql: str, i: int) -> int:
    while i < len(sql) and sql[i].isspace():
        i += 1
    return i


class Statement:
    """What the adapter needs to know about one statement."""

    def __init__(self, sql: str):
        self.sql = sql
        self.is_insert = False
        self.insert_prefix: str | None = None  # `INSERT INTO t (...) [SETTINGS ...]`
        self.insert_format: str | None = None  # input format of the data
        self.inline_data = b""  # data that followed FORMAT/VALUES inside the statement
        self.output_format: str | None = None  # the statement's own FORMAT clause
        self.table: str | None = None
        words = _top_level_words(sql)
        first = next(words, None)
        if first is None:
            return
        if first[0] == "INSERT":
            self.is_insert = True
            m = re.match(
                r"\s*INSERT\s+INTO\s+(?:TABLE\s+)?((?:`[^`]*`|\"[^\"]*\"|[A-Za-z0-9_]+)"
                r"(?:\.(?:`[^`]*`|\"[^\"]*\"|[A-Za-z0-9_]+))?)",
                sql,
                re.I,
            )
            if m:
                self.table = m.group(1).replace("`", "").replace('"', "")
            for word, start, end, depth in words:
                if depth:
                    continue
                if word in ("SELECT", "WITH"):
                    return  # INSERT ... SELECT: no data
                if word == "FORMAT":
                    fm = _WORD.match(sql, _skip_ws(sql, end))
                    if fm:
                        self.insert_prefix = sql[:start]
                        self.insert_format = fm.group()
                        self.inline_data = sql[fm.end():].lstrip().encode()
                    return
                if word == "VALUES":
                    self.insert_prefix = sql[:start]
                    self.insert_format = "Values"
                    self.inline_data = sql[end:].strip().encode()
                    return
            return
        # Not an INSERT: find a top-level trailing FORMAT clause, for the response headers.
        for word, start, end, depth in words:
            if word == "FORMAT" and depth == 0:
                fm = _WORD.match(sql, _skip_ws(sql, end))
                if fm:
                    self.output_format = fm.group()


# ---------------------------------------------------------------------------------------------
# ClickHouse native compression framing (`decompress=1`)


def decode_native_compression(data: bytes, codes: dict[str, int]) -> bytes:
    """Decode a sequence of ClickHouse compressed blocks.

    Block: 16-byte CityHash128 checksum, 1 method byte, u32 LE compressed size (incl. the 9-byte
    header), u32 LE uncompressed size, payload. The checksum is not verified.
    """
    import pyarrow  # a dependency of chdb

    def error(text: str, name: str = "CANNOT_DECOMPRESS") -> ChError:
        return ChError(codes[name], _msg(codes[name], text, name))

    out = []
    i, n = 0, len(data)
    while i < n:
        if n - i < 25:
            raise error("Cannot decompress: truncated compressed block header")
        method = data[i + 16]
        compressed_size, raw_size = struct.unpack_from("<II", data, i + 17)
        end = i + 16 + compressed_size
        if compressed_size < 9 or end > n:
            raise error(f"Cannot decompress: compressed block of {compressed_size} bytes is truncated")
        payload = data[i + 25 : end]
        codec = {0x82: "lz4_raw", 0x90: "zstd"}.get(method)
        if method == 0x02:
            out.append(bytes(payload))
        elif codec is None:
            raise error(f"Unknown compression method: {method:#x}", "UNKNOWN_COMPRESSION_METHOD")
        else:
            try:
                out.append(pyarrow.Codec(codec).decompress(payload, decompressed_size=raw_size, asbytes=True))
            except Exception as e:  # pyarrow's error for a corrupt block
                raise error(f"Cannot decompress {codec} block: {e}") from None
        i = end
    return b"".join(out)


def _msg(code: int, text: str, name: str) -> str:
    return f"Code: {code}. DB::Exception: {text}. ({name})"


# ---------------------------------------------------------------------------------------------
# The engine


class Engine:
    def __init__(self, path: str):
        os.makedirs(path, exist_ok=True)
        self.tmp_dir = os.path.join(os.path.abspath(path), "_adapter_inserts")
        os.makedirs(self.tmp_dir, exist_ok=True)
        self.session = chdb.session.Session(path)
        self.lock = threading.Lock()
        self.version = self._raw("SELECT version()").bytes().decode().strip()
        self.codes = dict(_FALLBACK_CODES)
        self.status_by_code: dict[int, int] = {}
        try:
            names = sorted(set(_STATUS_BY_NAME) | set(_FALLBACK_CODES))
            listed = ", ".join(_quote_string(n) for n in names)
            rows = self._raw(
                f"SELECT DISTINCT code, name FROM system.errors WHERE name IN ({listed}) "
                "SETTINGS system_events_show_zero_values = 1"
            ).bytes().decode()
            for line in rows.splitlines():
                code, name = line.split("\t")
                self.codes[name] = int(code)
        except Exception as e:  # pragma: no cover - older engines
            print(f"adapter: cannot read system.errors ({e}); using fallback codes", file=sys.stderr)
        for name, status in _STATUS_BY_NAME.items():
            if name in self.codes:
                self.status_by_code[self.codes[name]] = status

    def close(self):
        with self.lock:
            self.session.close()

    def _raw(self, sql: str, fmt: str = "TabSeparated", params=None):
        return self.session.query(sql, fmt, params=params or None)

    def error_from(self, exc: BaseException) -> ChError:
        text = str(exc)
        idx = text.find("Code: ")
        if idx > 0:
            text = text[idx:]  # strip "Streaming insert finish failed: " and the like
        text = text.strip()
        m = _CODE_RE.search(text)
        if m:
            return ChError(int(m.group(1)), text)
        code = self.codes["STD_EXCEPTION"]
        return ChError(code, _msg(code, text, "STD_EXCEPTION"))

    def http_status(self, err: ChError) -> int:
        status = self.status_by_code.get(err.code)
        if status is None:
            names = _NAME_RE.findall(err.message)
            for name in reversed(names):
                if name in _STATUS_BY_NAME:
                    return _STATUS_BY_NAME[name]
            return 500
        return status

    def _enter(self, database: str | None, settings: list[tuple[str, str]]) -> list[str]:
        self._raw(f"USE {_quote_ident(database or 'default')}")
        applied: list[str] = []
        try:
            for name, value in settings:
                if not _SETTING_NAME.match(name):
                    code = self.codes["UNKNOWN_SETTING"]
                    raise ChError(code, _msg(code, f"Unknown setting '{name}'", "UNKNOWN_SETTING"))
                self._raw(f"SET {name} = {_quote_string(value)}")
                applied.append(name)
        except BaseException:
            self._leave(applied)
            raise
        return applied

    def _leave(self, applied: list[str]):
        for name in applied:
            try:
                self._raw(f"SET {name} = DEFAULT")
            except Exception as e:  # pragma: no cover
                print(f"adapter: cannot reset setting {name}: {e}", file=sys.stderr)
        try:
            self._raw("USE default")
        except Exception:  # pragma: no cover
            pass

    def query(self, sql: str, fmt: str, database, settings, params) -> tuple[bytes, dict]:
        with self.lock:
            try:
                applied = self._enter(database, settings)
                try:
                    res = self._raw(sql, fmt, params)
                finally:
                    self._leave(applied)
            except ChError:
                raise
            except Exception as e:
                raise self.error_from(e) from None
        data = res.bytes()
        summary = {
            "read_rows": res.rows_read(),
            "read_bytes": res.bytes_read(),
            "written_rows": res.rows_written(),
            "written_bytes": res.bytes_written(),
            "elapsed_ns": int(res.elapsed() * 1e9),
        }
        return data, summary

    def insert(self, prefix: str, fmt: str, data: bytes, database, settings) -> dict:
        with self.lock:
            try:
                applied = self._enter(database, settings)
                try:
                    # chdb's streaming send_insert swallows exceptions raised while the
                    # block is written (a violated CONSTRAINT, say) and drops the block with
                    # no error, where ClickHouse answers with the exception. INSERT ... FROM
                    # INFILE goes through the same insert pipeline and reports them.
                    with tempfile.NamedTemporaryFile(dir=self.tmp_dir, suffix="." + fmt) as f:
                        f.write(data)
                        f.flush()
                        path = f.name.replace("'", "\\'")
                        res = self._raw(f"{prefix} FROM INFILE '{path}' FORMAT {fmt}", "TabSeparated", None)
                finally:
                    self._leave(applied)
            except ChError:
                raise
            except Exception as e:
                raise self.error_from(e) from None
        return {
            "written_rows": res.rows_written(),
            "written_bytes": res.bytes_written(),
            "elapsed_ns": int(res.elapsed() * 1e9),
        }


# ---------------------------------------------------------------------------------------------
# Shared state: pause/delay and statistics


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.paused: str | None = None  # None, "drop" or "503"
        self.delay_ms = 0
        self.reset()

    def reset(self):
        with self.lock:
            self.stats = {
                "requests": 0,
                "pings": 0,
                "queries": 0,
                "inserts": 0,
                "rows_inserted": 0,
                "insert_bytes": 0,
                "failed_queries": 0,
                "failed_inserts": 0,
                "aborted_requests": 0,
                "rejected_while_paused": 0,
                "tables": {},
            }
            self.log = collections.deque(maxlen=500)

    def bump(self, **kw):
        with self.lock:
            for k, v in kw.items():
                self.stats[k] += v

    def table_insert(self, table: str, rows: int):
        with self.lock:
            t = self.stats["tables"].setdefault(table, {"inserts": 0, "rows": 0})
            t["inserts"] += 1
            t["rows"] += rows

    def record(self, entry: dict):
        with self.lock:
            self.log.append(entry)

    def snapshot(self) -> dict:
        with self.lock:
            out = json.loads(json.dumps(self.stats))
            out["paused"] = self.paused
            out["delay_ms"] = self.delay_ms
            return out


# ---------------------------------------------------------------------------------------------
# HTTP


def _content_type(fmt: str) -> str:
    f = fmt.lower()
    if f.startswith("tabseparated") or f.startswith("tsv"):
        return "text/tab-separated-values; charset=UTF-8"
    if f.startswith("json") or f.startswith("ndjson"):
        return "application/json; charset=UTF-8"
    if f.startswith("csv"):
        return "text/csv; charset=UTF-8; header=absent"
    if f.startswith("rowbinary") or f in ("native", "parquet", "arrow", "arrowstream", "orc"):
        return "application/octet-stream"
    return "text/plain; charset=UTF-8"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "chdb-adapter"
    engine: Engine
    state: State
    auth: tuple[str, str] | None = None
    verbose = False

    # -- plumbing -----------------------------------------------------------------------------

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's name
        if self.verbose:
            sys.stderr.write("adapter: " + (format % args) + "\n")

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status=200):
        self._send(status, (json.dumps(obj, indent=1) + "\n").encode(), {"Content-Type": "application/json"})

    def _drop(self):
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _read_body(self) -> bytes:
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise ClientAbort("connection closed inside a chunked body")
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise ClientAbort(f"bad chunk size line {line[:40]!r}") from None
                if size == 0:
                    while True:  # trailers, then the empty line
                        trailer = self.rfile.readline(65537)
                        if not trailer:
                            raise ClientAbort("connection closed in chunked trailers")
                        if trailer in (b"\r\n", b"\n"):
                            break
                    return b"".join(chunks)
                data = self.rfile.read(size)
                if len(data) < size:
                    raise ClientAbort("connection closed inside a chunk")
                if self.rfile.read(2) != b"\r\n":
                    raise ClientAbort("chunk not followed by CRLF")
                chunks.append(data)
        length = int(self.headers.get("Content-Length") or 0)
        if not length:
            return b""
        data = self.rfile.read(length)
        if len(data) < length:
            raise ClientAbort("connection closed inside the body")
        return data

    # -- routes -------------------------------------------------------------------------------

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def _dispatch(self):
        url = urlsplit(self.path)
        if url.path.startswith("/__adapter/"):
            return self._control(url)
        state = self.state
        state.bump(requests=1)
        if state.paused:
            state.bump(rejected_while_paused=1)
            if state.paused == "drop":
                return self._drop()
            # read the body so the connection stays usable
            try:
                self._read_body()
            except ClientAbort:
                return self._drop()
            return self._send(503, b"Service Unavailable\n", {"Content-Type": "text/plain; charset=UTF-8"})
        has_query = any(k == "query" for k, _ in parse_qsl(url.query, keep_blank_values=True))
        if url.path in ("/ping", "/ping/", "/replicas_status") or (
            url.path == "/" and self.command in ("GET", "HEAD") and not has_query
        ):
            try:
                self._read_body()
            except ClientAbort:
                return self._drop()
            if state.delay_ms:
                time.sleep(state.delay_ms / 1000)
            state.bump(pings=1)
            return self._send(200, b"Ok.\n", {"Content-Type": "text/html; charset=UTF-8"})
        if url.path != "/":
            try:
                self._read_body()
            except ClientAbort:
                return self._drop()
            return self._send(404, f"There is no handle {url.path}\n".encode(), {"Content-Type": "text/plain; charset=UTF-8"})
        try:
            body = self._read_body()
        except ClientAbort as e:
            state.bump(aborted_requests=1)
            state.record({"time": time.time(), "aborted": str(e), "path": self.path[:300]})
            return self._drop()
        if state.delay_ms:  # a slow server: the body is in, the answer takes its time
            time.sleep(state.delay_ms / 1000)
        self._clickhouse(url, body)

    def _control(self, url):
        try:
            self._read_body()
        except ClientAbort:
            return self._drop()
        q = dict(parse_qsl(url.query))
        st = self.state
        if url.path == "/__adapter/pause" and self.command == "POST":
            mode = q.get("mode", "drop")
            if mode not in ("drop", "503"):
                return self._json({"error": "mode must be drop or 503"}, 400)
            with st.lock:
                st.paused = mode
            return self._json({"paused": mode})
        if url.path == "/__adapter/resume" and self.command == "POST":
            with st.lock:
                st.paused = None
            return self._json({"paused": None})
        if url.path == "/__adapter/delay" and self.command == "POST":
            with st.lock:
                st.delay_ms = int(q.get("ms", "0"))
            return self._json({"delay_ms": st.delay_ms})
        if url.path == "/__adapter/stats":
            return self._json(st.snapshot())
        if url.path == "/__adapter/requests":
            with st.lock:
                return self._json(list(st.log))
        if url.path == "/__adapter/reset" and self.command == "POST":
            st.reset()
            return self._json({"reset": True})
        return self._json({"error": f"unknown control {self.command} {url.path}"}, 404)

    def _authorized(self, params: dict[str, str]) -> bool:
        if self.auth is None:
            return True
        user = self.headers.get("X-ClickHouse-User")
        key = self.headers.get("X-ClickHouse-Key")
        authz = self.headers.get("Authorization") or ""
        if user is None and authz.lower().startswith("basic "):
            try:
                user, _, key = base64.b64decode(authz[6:]).decode().partition(":")
            except Exception:
                return False
        if user is None:
            user, key = params.get("user", "default"), params.get("password", "")
        return (user, key or "") == self.auth

    def _clickhouse(self, url, body: bytes):
        engine, state = self.engine, self.state
        pairs = parse_qsl(url.query, keep_blank_values=True)
        params = {k: v for k, v in pairs}
        query_id = params.get("query_id") or str(uuid.uuid4())
        base_headers = {
            "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Server-Display-Name": "chdb-adapter",
            "X-ClickHouse-Timezone": "UTC",
        }
        entry = {"time": time.time(), "method": self.command, "query_id": query_id}

        def fail(err: ChError, insert: bool):
            status = engine.http_status(err)
            state.bump(**({"failed_inserts": 1} if insert else {"failed_queries": 1}))
            entry.update(status=status, exception_code=err.code, error=err.message[:500])
            state.record(entry)
            headers = dict(base_headers)
            headers["X-ClickHouse-Exception-Code"] = str(err.code)
            headers["Content-Type"] = "text/plain; charset=UTF-8"
            self._send(status, (err.message + "\n").encode(), headers)

        if not self._authorized(params):
            code = engine.codes["AUTHENTICATION_FAILED"]
            user = self.headers.get("X-ClickHouse-User") or params.get("user") or "default"
            return fail(ChError(code, _msg(code, f"{user}: Authentication failed: password is incorrect, or there is no user with such name", "AUTHENTICATION_FAILED")), False)

        query_params: dict[str, str] = {}
        sql_in_url = params.get("query")
        content_type = self.headers.get("Content-Type") or ""
        if content_type.lower().startswith("multipart/form-data"):
            msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
            )
            body = b""
            for part in msg.iter_parts():
                name = part.get_param("name", header="content-disposition")
                value = part.get_payload(decode=True) or b""
                if name == "query":
                    sql_in_url = (sql_in_url or "") + value.decode()
                elif name and name.startswith("param_"):
                    query_params[name[6:]] = value.decode()
                # other parts would be external tables: not supported, ignored
        for k, v in pairs:
            if k.startswith("param_") and _PARAM_NAME.match(k[6:]):
                query_params.setdefault(k[6:], v)

        if params.get("compress", "0") not in ("", "0"):
            code = engine.codes["NOT_IMPLEMENTED"]
            return fail(ChError(code, _msg(code, "compress=1 (compressed responses) is not supported by the chdb adapter", "NOT_IMPLEMENTED")), False)
        if params.get("decompress", "0") not in ("", "0") and body:
            try:
                body = decode_native_compression(body, engine.codes)
            except ChError as err:
                return fail(err, True)

        if sql_in_url is None:
            sql, data = body.decode("utf-8", errors="replace"), None
        else:
            sql, data = sql_in_url, body
        stmt = Statement(sql)
        if data and not stmt.is_insert:
            sql, data = sql + "\n" + data.decode("utf-8", errors="replace"), None
            stmt = Statement(sql)

        database = params.get("database") or self.headers.get("X-ClickHouse-Database") or None
        settings = [(k, v) for k, v in pairs if k not in _NON_SETTINGS and not k.startswith("param_")]
        entry.update(sql=sql[:100000], database=database, settings=dict(settings), params=query_params)

        if stmt.is_insert and stmt.insert_format is not None:
            if _is_multi_statement(stmt.insert_prefix):
                code = engine.codes["SYNTAX_ERROR"]
                return fail(ChError(code, _msg(code, "Syntax error (Multi-statements are not allowed)", "SYNTAX_ERROR")), True)
            payload = stmt.inline_data
            if data:
                payload = payload + b"\n" + data if payload else data
            entry.update(insert_format=stmt.insert_format, table=stmt.table, data_bytes=len(payload))
            try:
                summary = engine.insert(stmt.insert_prefix, stmt.insert_format, payload, database, settings)
            except ChError as err:
                return fail(err, True)
            rows = summary["written_rows"]
            state.bump(inserts=1, rows_inserted=rows, insert_bytes=len(payload))
            if stmt.table:
                state.table_insert(stmt.table, rows)
            entry.update(status=200, written_rows=rows)
            state.record(entry)
            headers = dict(base_headers)
            headers["Content-Type"] = "text/plain; charset=UTF-8"
            headers["X-ClickHouse-Summary"] = json.dumps(
                {
                    "read_rows": "0",
                    "read_bytes": "0",
                    "written_rows": str(rows),
                    "written_bytes": str(summary["written_bytes"]),
                    "total_rows_to_read": "0",
                    "result_rows": str(rows),
                    "result_bytes": str(summary["written_bytes"]),
                    "elapsed_ns": str(summary["elapsed_ns"]),
                }
            )
            return self._send(200, b"", headers)

        if _is_multi_statement(sql):
            code = engine.codes["SYNTAX_ERROR"]
            return fail(ChError(code, _msg(code, "Syntax error (Multi-statements are not allowed): failed at position of the second statement", "SYNTAX_ERROR")), stmt.is_insert)
        fmt = params.get("default_format") or self.headers.get("X-ClickHouse-Format") or "TabSeparated"
        out_fmt = stmt.output_format or fmt
        entry.update(format=out_fmt)
        if not sql.strip():
            code = engine.codes["SYNTAX_ERROR"]
            return fail(ChError(code, _msg(code, "Empty query", "SYNTAX_ERROR")), False)
        try:
            result, summary = engine.query(sql, fmt, database, settings, query_params)
        except ChError as err:
            return fail(err, stmt.is_insert)
        if stmt.is_insert:
            rows = summary["written_rows"]
            state.bump(inserts=1, rows_inserted=rows)
            if stmt.table:
                state.table_insert(stmt.table, rows)
            entry.update(written_rows=rows)
        else:
            state.bump(queries=1)
        entry.update(status=200, result_bytes=len(result))
        state.record(entry)
        headers = dict(base_headers)
        headers["Content-Type"] = _content_type(out_fmt)
        headers["X-ClickHouse-Format"] = out_fmt
        headers["X-ClickHouse-Summary"] = json.dumps(
            {
                "read_rows": str(summary["read_rows"]),
                "read_bytes": str(summary["read_bytes"]),
                "written_rows": str(summary["written_rows"]),
                "written_bytes": str(summary["written_bytes"]),
                "total_rows_to_read": str(summary["read_rows"]),
                "result_rows": "0",
                "result_bytes": str(len(result)),
                "elapsed_ns": str(summary["elapsed_ns"]),
            }
        )
        self._send(200, result, headers)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def handle_error(self, request, client_address):
        # A client that went away mid-answer (the shipper tests kill llmtap while it
        # inserts) is not the adapter's error: no traceback for it.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any free port)")
    ap.add_argument("--path", required=True, help="chDB data directory (created if missing)")
    ap.add_argument("--user", help="require this user (X-ClickHouse-User, basic auth or ?user=)")
    ap.add_argument("--password", default="", help="password for --user")
    ap.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = ap.parse_args(argv)

    host, _, port = args.listen.rpartition(":")
    engine = Engine(args.path)
    Handler.engine = engine
    Handler.state = State()
    Handler.auth = (args.user, args.password) if args.user else None
    Handler.verbose = args.verbose
    server = Server((host or "127.0.0.1", int(port)), Handler)
    bound_host, bound_port = server.server_address[:2]
    print(f"{bound_host}:{bound_port}", flush=True)
    if args.verbose:
        print(f"adapter: ClickHouse {engine.version} (chdb) at {args.path}", file=sys.stderr, flush=True)

    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
