"""bench/instructions.py: how it tells a response is whole, and whose instructions a dump holds."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
import instructions  # noqa: E402


def test_a_chunked_response_is_whole_at_its_last_chunk():
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    assert not instructions.done(head)
    assert not instructions.done(head + b"5\r\nhello\r\n")
    assert instructions.done(head + b"5\r\nhello\r\n0\r\n\r\n")


def test_a_sized_response_is_whole_at_its_length():
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    assert not instructions.done(b"HTTP/1.1 200 OK\r\nContent-Len")
    assert not instructions.done(head + b"hell")
    assert instructions.done(head + b"hello")


def test_dumps_are_summed_per_thread_role(tmp_path):
    def dump(name, total, fns):
        body = "".join(f"fn=(1) {f}\n1 10\n" for f in fns)
        (tmp_path / name).write_text(f"version: 1\ncreator: callgrind\nevents: Ir\n{body}summary: {total}\n")

    dump("cg.out.1-01", 7, ["main"])
    dump("cg.out.1-02", 1000, ["tokio::x", "llmtap::workers::run_worker::{{closure}}"])
    dump("cg.out.1-03", 300, ["llmtap_ingest::recorder::Batcher::write"])
    dump("cg.out.1-04", 20, ["llmtap_scorer::drift::runner::spawn_drift"])
    dump("cg.out.1-05", 5, ["std::thread"])
    dump("cg.out.2-02", 99999, ["llmtap::workers::run_worker"])  # another dump: not counted
    counts = instructions.counts(str(tmp_path / "cg.out.1"))
    assert counts == {"other": 12, "worker": 1000, "recorder": 300, "drift": 20}
